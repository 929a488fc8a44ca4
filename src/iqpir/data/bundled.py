"""Photos that ship inside scikit-image and matplotlib (no download): the demo's and the default model's.

HELD_OUT photos are evaluation images: nothing in iqpir trains on them.
"""

from __future__ import annotations

import torch

from iqpir import io

HELD_OUT = ("astronaut", "coffee", "grace_hopper")
TRAIN = (
    "chelsea", "rocket", "camera", "hubble_deep_field", "immunohistochemistry", "retina", "coins", "moon",
    "brick", "grass", "gravel", "page", "text", "clock", "colorwheel", "motorcycle_left", "motorcycle_right",
)


def bundled_images() -> dict[str, torch.Tensor]:
    """name -> (3, H, W) in [0, 1], from scikit-image's bundled data and matplotlib's sample data."""
    try:
        import matplotlib.cbook
        import numpy as np
        import skimage.data
    except ImportError as exc:
        raise ImportError("the demo needs scikit-image and matplotlib: pip install 'iqpir[demo]'") from exc

    def to_tensor(arr) -> torch.Tensor:
        a = np.asarray(arr)
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        a = a[..., :3]
        t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()
        return (t / (65535.0 if a.dtype == np.uint16 else 255.0)).clamp(0, 1)

    images = {}
    for name in set(HELD_OUT + TRAIN) - {"grace_hopper", "motorcycle_left", "motorcycle_right"}:
        images[name] = to_tensor(getattr(skimage.data, name)())
    left, right, _ = skimage.data.stereo_motorcycle()
    images["motorcycle_left"], images["motorcycle_right"] = to_tensor(left), to_tensor(right)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        from PIL import Image

        images["grace_hopper"] = io.from_pil(Image.open(fh))
    return images


def resize_long_side(img: torch.Tensor, side: int) -> torch.Tensor:
    h, w = img.shape[1:]
    scale = side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return torch.nn.functional.interpolate(img[None], size=size, mode="bicubic", antialias=True,
                                           align_corners=False)[0].clamp(0, 1)
