"""Full-reference metrics: PSNR and SSIM (own implementations of the standard definitions),
LPIPS and FID when their optional packages and weights are on this machine (imported inside
`build_lpips` / `build_fid_features`, never at module import), and the Fréchet distance.

Images: (N, 3, H, W) float in [0, 1], RGB; each metric returns one value per image, (N,).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from iqpir.io import check_batch

#: Metrics computed by this package that need a reference image.
FULL_REFERENCE = ("psnr", "ssim", "lpips", "fid")


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # float64 reproduces the reference (NumPy/MATLAB double) numbers to ~1e-12; MPS has no float64.
    return torch.float32 if t.device.type == "mps" else torch.float64


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    check_batch(x, "x")
    check_batch(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def _crop(t: torch.Tensor, crop_border: int) -> torch.Tensor:
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border == 0:
        return t
    if 2 * crop_border >= min(t.shape[-2:]):
        raise ValueError(f"crop_border={crop_border} leaves nothing of a {t.shape[-2]}x{t.shape[-1]} image")
    return t[..., crop_border:-crop_border, crop_border:-crop_border]


def rgb_to_y(images: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma as MATLAB's rgb2ycbcr computes it, back on [0, 1].

    Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255 for R, G, B in [0, 1], so Y is in
    [16/255, 235/255] ("studio swing"). Source: MATLAB `rgb2ycbcr` documentation / ITU-R
    BT.601-7; this is the Y used by the super-resolution literature for PSNR/SSIM on Y.

    Args:
        images: (N, 3, H, W) in [0, 1].
    Returns:
        (N, 1, H, W).
    """
    w = images.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)
    return (16.0 + (images * w).sum(dim=1, keepdim=True)) / 255.0


# --------------------------------------------------------------------------------------
# PSNR and SSIM
# --------------------------------------------------------------------------------------


def psnr(
    x: torch.Tensor, y: torch.Tensor, y_channel: bool = False, crop_border: int = 0, data_range: float = 1.0
) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB.

    PSNR = 10 log10(data_range^2 / MSE), MSE = mean over channels and pixels of (x - y)^2
    (the standard definition; skimage.metrics.peak_signal_noise_ratio computes the same).
    Identical images give +inf.

    Args:
        x, y: (N, 3, H, W) in [0, 1].
        y_channel: compare the BT.601 Y channel (`rgb_to_y`) instead of RGB.
        crop_border: pixels removed from each side before comparing (SR convention).
        data_range: peak value (1.0 for the package's [0, 1] images).
    Returns:
        (N,) float32.
    """
    _check_pair(x, y)
    dt = _work_dtype(x)
    x, y = x.to(dt), y.to(dt)
    if y_channel:
        x, y = rgb_to_y(x), rgb_to_y(y)
    x, y = _crop(x, crop_border), _crop(y, crop_border)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    # mse == 0 -> division gives inf -> log10(inf) = inf, which is the convention we want.
    return (10.0 * torch.log10(data_range**2 / mse)).float()


def _gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    """1-D normalised Gaussian (Wang et al. 2004: 11 taps, sigma 1.5; MATLAB fspecial('gaussian'))."""
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, y_channel: bool = False, crop_border: int = 0) -> torch.Tensor:
    """Structural similarity (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 13(4), 2004), per image.

    As in the authors' reference MATLAB `ssim_index.m`: an 11x11 Gaussian window with
    sigma 1.5 (separable), K1 = 0.01, K2 = 0.03, C1 = (K1 L)^2, C2 = (K2 L)^2 with L = 1
    on [0, 1] images (the same values as L = 255 on [0, 255]), local statistics computed
    with 'valid' filtering (no padding), and the SSIM map averaged. No downsampling (that
    is the later `ssim.m` wrapper). RGB: the mean over the three channels' SSIM.

    Args:
        x, y: (N, 3, H, W) in [0, 1]; H, W >= 11 after cropping.
        y_channel: compare the BT.601 Y channel instead of RGB.
        crop_border: pixels removed from each side before comparing.
    Returns:
        (N,) float32.
    """
    _check_pair(x, y)
    x, y = x.float(), y.float()
    if y_channel:
        x, y = rgb_to_y(x), rgb_to_y(y)
    x, y = _crop(x, crop_border), _crop(y, crop_border)
    n, c, h, w = x.shape
    if h < 11 or w < 11:
        raise ValueError(f"ssim needs images of at least 11x11 pixels, got {h}x{w}")
    c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2
    # The filtering runs in float32 (float64 convolutions are ~10x slower on CPU). Centering each
    # channel on its mean first keeps E[x^2] - E[x]^2 from cancelling; variances and covariance
    # do not change under the shift, and the local means get it added back.
    mx = x.mean(dim=(2, 3), keepdim=True)
    my = y.mean(dim=(2, 3), keepdim=True)
    xc, yc = x - mx, y - my
    g = _gaussian_window(dtype=torch.float64).to(device=x.device, dtype=torch.float32)
    # One grouped convolution filters the five local moments of every channel at once.
    stack = torch.cat([xc, yc, xc * xc, yc * yc, xc * yc], dim=1)  # (N, 5C, H, W)
    k = 5 * c
    stack = F.conv2d(stack, g.view(1, 1, 1, -1).expand(k, 1, 1, -1), groups=k)
    stack = F.conv2d(stack, g.view(1, 1, -1, 1).expand(k, 1, -1, 1), groups=k)
    dt = _work_dtype(x)
    mu_xc, mu_yc, e_xx, e_yy, e_xy = stack.to(dt).split(c, dim=1)
    var_x = e_xx - mu_xc**2
    var_y = e_yy - mu_yc**2
    cov = e_xy - mu_xc * mu_yc
    mu_x, mu_y = mu_xc + mx.to(dt), mu_yc + my.to(dt)
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).flatten(2).mean(dim=2).mean(dim=1).float()


# --------------------------------------------------------------------------------------
# LPIPS and FID (optional weights)
# --------------------------------------------------------------------------------------

LPIPS_BACKBONE_FILE = "alexnet-owt-7be5be79.pth"  # torchvision AlexNet ImageNet weights
FID_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's InceptionV3


def _hub_checkpoints() -> Path:
    # torch.hub.get_dir() honours $TORCH_HOME (default ~/.cache/torch/hub).
    return Path(torch.hub.get_dir()) / "checkpoints"


class MetricUnavailable(RuntimeError):
    """An optional metric cannot run here (package or weights missing); the message is one line."""


def _optional_weights(metric: str, module: str, package: str, extra: str, filename: str) -> Path:
    """The local weights file of a metric from an optional package, or MetricUnavailable naming
    what is missing (the package or the file) and how to get both."""
    path = _hub_checkpoints() / filename
    hint = f"pip install 'iqpir[{extra}]' and place {filename} in {path.parent}"
    if importlib.util.find_spec(module) is None:
        raise MetricUnavailable(f"{metric} skipped: package {package} not installed ({hint})")
    if not path.is_file():
        raise MetricUnavailable(f"{metric} skipped: weights not found at {path} ({hint})")
    return path


def build_lpips(device: str | torch.device = "cpu") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """LPIPS (Zhang et al., CVPR 2018), AlexNet variant, from the `lpips` package.

    Needs `pip install iqpir[perceptual]` and torchvision's AlexNet weights at
    $TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth (they cannot be downloaded here).
    Returns f(x, y) -> (N,) for (N, 3, H, W) images in [0, 1].

    Raises:
        MetricUnavailable: the package or the weights are missing.
    """
    path = _optional_weights("lpips", "lpips", "lpips", "perceptual", LPIPS_BACKBONE_FILE)
    import lpips  # optional dependency

    try:
        net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except Exception as exc:  # a corrupt or mismatched checkpoint
        raise MetricUnavailable(f"lpips skipped: could not load {path}: {exc}") from exc
    for p in net.parameters():
        p.requires_grad_(False)

    def score(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair(x, y)
        with torch.no_grad():
            return net(x.float(), y.float(), normalize=True).flatten().float()

    return score


def build_fid_features(device: str | torch.device = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """InceptionV3 pool features (2048-d) of torch-fidelity, for FID.

    Needs the `torch-fidelity` package (`pip install 'iqpir[fid]'`) and its weights file at
    $TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth.
    Returns f(images (N, 3, H, W) in [0, 1]) -> (N, 2048) float64.

    Raises:
        MetricUnavailable: the package or the weights are missing.
    """
    path = _optional_weights("fid", "torch_fidelity", "torch-fidelity", "fid", FID_INCEPTION_FILE)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # optional

    try:
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        ).to(device)
    except Exception as exc:
        raise MetricUnavailable(f"fid skipped: could not load {path}: {exc}") from exc

    def features(images: torch.Tensor) -> torch.Tensor:
        check_batch(images)
        u8 = images.clamp(0, 1).mul(255).round().to(torch.uint8)  # torch-fidelity takes 8-bit images
        with torch.no_grad():
            return net(u8.to(device))[0].double().cpu()

    return features


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al., NeurIPS 2017):
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Tr((S_a S_b)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2), which has the same spectrum as S_a S_b.

    Args:
        feats_a, feats_b: (N_a, D), (N_b, D), N >= 2.
    """
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ValueError("FID needs at least 2 images per set")
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    ev, vec = torch.linalg.eigh(cov_a)
    sqrt_a = (vec * ev.clamp_min(0).sqrt()) @ vec.T
    mid = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((mid + mid.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt)
