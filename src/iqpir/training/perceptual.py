"""Optional perceptual loss for stage 1: LPIPS with a VGG16 backbone (paper 3.1; CodeFormer).

It needs pretrained weights that are never downloaded here: torchvision's VGG16 ImageNet
checkpoint in torch.hub's cache and the `lpips` package's linear heads (extra `perceptual`).
When either is missing the caller gets None and a one-line reason, and trains without it.
"""

from __future__ import annotations

from pathlib import Path

import torch

VGG16_FILE = "vgg16-397923af.pth"  # torchvision.models.VGG16_Weights.IMAGENET1K_V1


def vgg16_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def build_perceptual(device: torch.device):
    """-> (module mapping (x, y) in [0, 1] to (N,) distances, None) or (None, reason)."""
    path = vgg16_weights_path()
    try:
        import lpips  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        return None, "needs the `perceptual` extra (pip install 'iqpir[perceptual]') and VGG16 weights at " + str(path)
    if not path.is_file():
        return None, f"VGG16 weights not found at {path} (put {VGG16_FILE} there; TORCH_HOME moves the folder)"
    import lpips  # torchvision finds the VGG16 file in torch.hub's cache, the folder checked above

    net = lpips.LPIPS(net="vgg", verbose=False).to(device).eval().requires_grad_(False)

    class _LPIPS(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, y):
            return self.net(x * 2 - 1, y * 2 - 1).flatten()  # LPIPS expects [-1, 1]

    return _LPIPS(), None
