"""Whole-photo face restoration: detect, align, restore, paste back.

    from iqpir.faces import restore_photo
    restorer = iqpir.load("runs/faces")
    out, report = restore_photo(photo, lambda x: restorer.restore(x, quality=1.0), upscale=2)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from iqpir.faces.align import FACE_SIZE, align_face, compose, invert_affine, paste_faces, upscale_map
from iqpir.faces.detect import Face, FaceDetector, get_detector

BOX_COLOUR = (0.0, 1.0, 0.0)
SKIPPED_COLOUR = (1.0, 0.8, 0.0)
LANDMARK_COLOUR = (1.0, 0.0, 0.0)


def resize_lanczos(image: torch.Tensor, upscale: int) -> torch.Tensor:
    """(C, H, W) in [0, 1] -> (C, H*upscale, W*upscale), Lanczos (PIL, in float32, clamped)."""
    if upscale == 1:
        return image
    c, h, w = image.shape
    arr = image.detach().float().cpu().numpy()
    chans = [np.asarray(Image.fromarray(arr[i], mode="F").resize((w * upscale, h * upscale), Image.LANCZOS))
             for i in range(c)]
    return torch.from_numpy(np.stack(chans)).clamp(0, 1).to(image.device)


def select_faces(faces: list[Face], height: int, width: int, only_center_face: bool = False,
                 min_face: float = 0) -> tuple[list[Face], list[tuple[Face, str]]]:
    """Faces to restore (left to right) and the others with why they are left alone."""
    faces = sorted(faces, key=lambda f: (f.box[0], f.box[1]))
    kept, skipped = [], []
    for f in faces:
        if f.size < min_face:
            skipped.append((f, f"smaller than --min-face {min_face:g} px"))
        else:
            kept.append(f)
    if only_center_face and len(kept) > 1:
        cx, cy = width / 2, height / 2
        centre = min(kept, key=lambda f: ((f.box[0] + f.box[2]) / 2 - cx) ** 2 + ((f.box[1] + f.box[3]) / 2 - cy) ** 2)
        skipped.extend((f, "not the centre face (--only-center-face)") for f in kept if f is not centre)
        kept = [centre]
    return kept, skipped


def _rect(img: torch.Tensor, x0: int, y0: int, x1: int, y1: int, colour, t: int) -> None:
    """Draw a rectangle outline of thickness t in place (clipped to the image)."""
    h, w = img.shape[1:]
    col = torch.tensor(colour, dtype=img.dtype, device=img.device)[:, None, None]
    x0, x1 = max(0, x0), min(w, x1)
    y0, y1 = max(0, y0), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        return
    img[:, y0 : min(y1, y0 + t), x0:x1] = col
    img[:, max(y0, y1 - t) : y1, x0:x1] = col
    img[:, y0:y1, x0 : min(x1, x0 + t)] = col
    img[:, y0:y1, max(x0, x1 - t) : x1] = col


def draw_faces(image: torch.Tensor, faces: list[Face], skipped: list[Face], upscale: int = 1) -> torch.Tensor:
    """Boxes (green: restored, amber: left alone) and landmarks (red) drawn on a copy of `image`."""
    out = image.clone()
    t = max(2, round(min(out.shape[1:]) / 300))
    for group, colour in ((faces, BOX_COLOUR), (skipped, SKIPPED_COLOUR)):
        for f in group:
            x0, y0, x1, y1 = (round(v * upscale) for v in f.box)
            _rect(out, x0, y0, x1, y1, colour, t)
            for x, y in f.landmarks:
                cx, cy = round((x + 0.5) * upscale - 0.5), round((y + 0.5) * upscale - 0.5)
                _rect(out, cx - t, cy - t, cx + t + 1, cy + t + 1, LANDMARK_COLOUR, 2 * t + 1)
    return out


def restore_photo(image: torch.Tensor, restore_faces: Callable[[torch.Tensor], torch.Tensor], *,
                  detector: FaceDetector | None = None, upscale: int = 1, only_center_face: bool = False,
                  min_face: float = 0, background: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  save_faces: bool = False, draw_box: bool = False,
                  face_upsample: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """Restore every face of a photo and paste it back.

    Args:
        image: (3, H, W) float in [0, 1].
        restore_faces: (N, 3, 512, 512) aligned faces in [0, 1] -> restored faces of the same shape.
        detector: a FaceDetector (default: dlib "hog+cnn", extra `faces`).
        upscale: integer output scale.
        only_center_face: restore only the face nearest the photo's centre.
        min_face: faces whose box is smaller than this many input pixels are left alone.
        background: (3, H, W) -> (3, H*upscale, W*upscale) for the rest of the photo
            (default: the photo itself at upscale 1, Lanczos-resized otherwise).
        save_faces: put the aligned and restored crops in the report.
        draw_box: draw the face boxes and landmarks on the result.
        face_upsample: (N, 3, 512, 512) -> (N, 3, 512 k, 512 k): with upscale > 1, the restored
            crops are upscaled by it (CodeFormer's --face_upsample: the background's upscaler) and
            pasted from that resolution, the input crops resized to match (bicubic).
    Returns:
        (restored (3, H*upscale, W*upscale) in [0, 1], report) with report keys `faces` (each
        `box` [x0, y0, x1, y1], `landmarks` 5x[x, y] and `score`, in input pixels), `skipped_faces`
        (the same plus `reason`), `detector`, `seconds` ({detect, align, restore, background,
        paste}) and, with save_faces, `aligned_faces` and `restored_faces` ((N, 3, 512, 512)).
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a (3, H, W) float tensor in [0, 1], got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    if int(upscale) != upscale or upscale < 1:
        raise ValueError(f"upscale must be a positive integer, got {upscale}")
    upscale = int(upscale)
    image = image.float()
    _, h, w = image.shape
    seconds = {}

    t = time.perf_counter()
    detector = get_detector() if detector is None else detector
    found = detector.detect(image)
    faces, skipped = select_faces(found, h, w, only_center_face=only_center_face, min_face=min_face)
    seconds["detect"] = time.perf_counter() - t

    t = time.perf_counter()
    template = np.asarray(detector.template, dtype=np.float64)
    crops, to_crop = [], []
    for f in faces:
        crop, m = align_face(image, f.landmarks, template, FACE_SIZE)
        crops.append(crop)
        to_crop.append(m)
    aligned = torch.stack(crops) if crops else image.new_zeros(0, 3, FACE_SIZE, FACE_SIZE)
    seconds["align"] = time.perf_counter() - t

    t = time.perf_counter()
    if faces:
        restored = restore_faces(aligned)
        if not isinstance(restored, torch.Tensor) or tuple(restored.shape) != tuple(aligned.shape):
            raise ValueError(f"restore_faces must return a tensor of shape {tuple(aligned.shape)}, got "
                             f"{tuple(restored.shape) if isinstance(restored, torch.Tensor) else type(restored).__name__}")
        restored = restored.detach().float().to(image.device).clamp(0, 1)
    else:
        restored = aligned
    seconds["restore"] = time.perf_counter() - t

    t = time.perf_counter()
    resized = resize_lanczos(image, upscale)
    if background is None:
        bg = resized
    else:
        bg = background(image)
        if tuple(bg.shape) != (3, h * upscale, w * upscale):
            raise ValueError(f"background must return shape {(3, h * upscale, w * upscale)}, got {tuple(bg.shape)}")
        bg = bg.detach().float().to(image.device).clamp(0, 1)
    seconds["background"] = time.perf_counter() - t

    t = time.perf_counter()
    crops_in, crops_out, maps = aligned, restored, to_crop
    if face_upsample is not None and upscale > 1 and faces:
        crops_out = face_upsample(restored).detach().float().to(image.device).clamp(0, 1)
        k = crops_out.shape[-1] / FACE_SIZE
        crops_in = torch.nn.functional.interpolate(aligned, size=crops_out.shape[-2:], mode="bicubic",
                                                   align_corners=False).clamp(0, 1)
        to_big = invert_affine(upscale_map(k))  # crop pixel -> pixel of the k-times larger crop
        maps = [compose(to_big, m) for m in to_crop]
    out = paste_faces(bg, resized, crops_in, crops_out, maps, upscale=upscale)
    if draw_box:
        out = draw_faces(out, faces, [f for f, _ in skipped], upscale)
    seconds["paste"] = time.perf_counter() - t

    report: dict = {
        "faces": [f.to_dict() for f in faces],
        "skipped_faces": [{**f.to_dict(), "reason": why} for f, why in skipped],
        "detector": getattr(detector, "name", type(detector).__name__),
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
    }
    if save_faces:
        report["aligned_faces"] = aligned
        report["restored_faces"] = restored
    return out, report
