"""Optional perceptual loss for stage 1: LPIPS with a VGG16 backbone (paper 3.1; CodeFormer).

It needs pretrained weights that are never downloaded here: torchvision's VGG16 ImageNet
checkpoint in torch.hub's cache and the `lpips` package's linear heads (extra `perceptual`).
When either is missing the caller gets None and a one-line reason, and trains without it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

VGG16_FILE = "vgg16-397923af.pth"  # torchvision.models.VGG16_Weights.IMAGENET1K_V1

INPUT_NORMS = ("imagenet", "lpips")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg16_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


class PerceptualLoss(nn.Module):
    """LPIPS distance of image batches (N, 3, H, W) in [0, 1] -> (N,).

    input_norm says what the LPIPS network receives:
    - "lpips": 2x - 1, the [-1, 1] range LPIPS documents (it then applies its own scaling layer);
    - "imagenet": (x - mean) / std with ImageNet statistics. This is the official stage-1 loss
      (CodeFormer/IQPIR `LPIPSLoss` with `range_norm: true, use_input_norm: true`: its [-1, 1]
      images go back to [0, 1] and are normalised before LPIPS, whose scaling layer then acts
      on top).
    """

    def __init__(self, net: nn.Module, input_norm: str = "lpips") -> None:
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm {input_norm!r} is not one of {list(INPUT_NORMS)}")
        self.net = net
        self.input_norm = input_norm
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def prepare(self, images: Tensor) -> Tensor:
        """[0, 1] images -> the LPIPS network's input."""
        if self.input_norm == "imagenet":
            return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return images * 2 - 1

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net(self.prepare(x), self.prepare(y)).flatten()


def build_perceptual(device: torch.device, input_norm: str = "lpips"):
    """-> (PerceptualLoss on `device`, None) or (None, reason) when the weights are absent."""
    path = vgg16_weights_path()
    try:
        import lpips  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        return None, "needs the `perceptual` extra (pip install 'iqpir[perceptual]') and VGG16 weights at " + str(path)
    if not path.is_file():
        return None, f"VGG16 weights not found at {path} (put {VGG16_FILE} there; TORCH_HOME moves the folder)"
    import lpips  # torchvision finds the VGG16 file in torch.hub's cache, the folder checked above

    net = lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)
    return PerceptualLoss(net, input_norm).to(device).eval(), None
