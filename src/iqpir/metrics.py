"""Evaluation metrics and the paper-style results table (IQPIR section 4, Tables 1-4).

Full-reference: `psnr`, `ssim` (own implementations of the standard definitions), LPIPS and
FID when their weights are on this machine. No-reference: `uciqe`, `uiqm` (underwater,
Table 3) and every NR-IQA model of the quality-prior module (`iqpir.iqa.build_scorer`:
NIQE, PIQE, ...). `evaluate_folder` scores a folder of restored images (optionally against
a folder of references), appends one row per call to a CSV and returns the Markdown table
of every row in that CSV with the best value per column in bold.

All image functions take batches in the package convention: (N, 3, H, W) float in [0, 1],
RGB, and return one value per image, shape (N,).

Optional dependencies (lpips, torchvision, torch-fidelity) are imported inside the
functions that need them; importing this module loads torch and numpy only.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from iqpir.io import check_batch

# --------------------------------------------------------------------------------------
# Directions and display names
# --------------------------------------------------------------------------------------

#: Which way is better, per metric name: "higher" or "lower". NR-IQA models built through
#: `iqpir.iqa.build_scorer` report their own direction (`lower_better`), which takes
#: precedence; the entries for learned models are here so that a table read back from a
#: CSV can still mark the best values when those models are not built in this process.
METRIC_DIRECTIONS: dict[str, str] = {
    "psnr": "higher",
    "ssim": "higher",
    "psnr_y": "higher",
    "ssim_y": "higher",
    "lpips": "lower",
    "fid": "lower",
    "uciqe": "higher",
    "uiqm": "higher",
    "niqe": "lower",
    "piqe": "lower",
    "brisque": "lower",
    "mdfs": "lower",
    "biqe": "lower",
    "musiq": "higher",
    "musiq-ava": "higher",
    "musiq-gfiqa": "higher",
    "topiq_nr": "higher",
    "topiq_nr-face": "higher",
    "topiq_nr-face-v1": "higher",
    "arniqa": "higher",
    "qalign": "higher",
    "clipiqa": "higher",
    "clipiqa+": "higher",
    "maniqa": "higher",
}

_DISPLAY_NAMES = {
    "psnr": "PSNR",
    "ssim": "SSIM",
    "psnr_y": "PSNR-Y",
    "ssim_y": "SSIM-Y",
    "lpips": "LPIPS",
    "fid": "FID",
    "uciqe": "UCIQE",
    "uiqm": "UIQM",
    "niqe": "NIQE",
    "piqe": "PIQE",
    "brisque": "BRISQUE",
    "musiq": "MUSIQ",
    "musiq-ava": "MUSIQ-A",
    "topiq_nr-face": "TOPIQ-G",
    "topiq_nr-face-v1": "TOPIQ-G",
    "arniqa": "ARNIQA",
    "qalign": "Q-Align",
    "clipiqa": "CLIP-IQA",
}

#: Metrics computed by this module that need a reference image.
FULL_REFERENCE = ("psnr", "ssim", "lpips", "fid")
#: No-reference metrics computed by this module (NR-IQA models come from iqpir.iqa).
LOCAL_NO_REFERENCE = ("uciqe", "uiqm")
#: Leading CSV columns; metric columns follow.
ID_COLUMNS = ("method", "dataset", "n_images")


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
# UCIQE (Yang & Sowmya 2015)
# --------------------------------------------------------------------------------------


def rgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """sRGB (D65) -> CIE 1976 L*a*b*, L* in [0, 100], a*, b* unscaled.

    sRGB decoding (IEC 61966-2-1): c <= 0.04045 -> c / 12.92, else ((c + 0.055) / 1.055)^2.4;
    linear RGB -> XYZ with the sRGB/D65 matrix; white point D65 (0.95047, 1, 1.08883);
    f(t) = t^(1/3) for t > (6/29)^3, else t / (3 (6/29)^2) + 4/29 (CIE 15:2004).
    L* = 116 f(Y) - 16, a* = 500 (f(X) - f(Y)), b* = 200 (f(Y) - f(Z)). The constants are the
    ones scikit-image's rgb2lab uses; the two agree to ~2e-4 (skimage rounds the CIE
    breakpoint constants to 0.008856 and 7.787).

    Args:
        images: (N, 3, H, W) in [0, 1].
    Returns:
        (N, 3, H, W) with channels L*, a*, b*.
    """
    lin = torch.where(images <= 0.04045, images / 12.92, ((images + 0.055) / 1.055).clamp_min(0) ** 2.4)
    m = images.new_tensor(
        [
            [0.412453, 0.357580, 0.180423],
            [0.212671, 0.715160, 0.072169],
            [0.019334, 0.119193, 0.950227],
        ]
    )
    xyz = torch.einsum("ij,njhw->nihw", m, lin)
    white = images.new_tensor([0.95047, 1.0, 1.08883]).view(1, 3, 1, 1)
    t = xyz / white
    eps = (6.0 / 29.0) ** 3
    f = torch.where(t > eps, t.clamp_min(eps) ** (1.0 / 3.0), t / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(dim=1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def _quantile_rows(values: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row quantile with linear interpolation (numpy's default), for (N, K) tensors.

    Written with sort instead of torch.quantile, which refuses inputs of more than 2^24 elements.
    """
    s, _ = values.sort(dim=1)
    pos = q * (s.shape[1] - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, s.shape[1] - 1)
    frac = pos - lo
    return s[:, lo] * (1 - frac) + s[:, hi] * frac


def uciqe(x: torch.Tensor) -> torch.Tensor:
    """Underwater Colour Image Quality Evaluation (higher is better), per image.

    UCIQE = 0.4680 sigma_c + 0.2745 con_l + 0.2576 mu_s  (Yang & Sowmya, "An Underwater
    Color Image Quality Evaluation Metric", IEEE TIP 24(12):6062-6071, 2015, doi
    10.1109/TIP.2015.2491020; the coefficients are the paper's fitted ones), in CIELab.
    Published implementations disagree on the Lab encoding and on each term (see
    notes/iqa-ecosystem.md section 4.1); this one follows the paper's words with one
    consistent scale:

    - Lab: exact sRGB/D65 CIELab (`rgb_to_lab`), then L = L*/100 in [0, 1] and
      a = a*/100, b = b*/100 (one common factor, so Lab distances keep their meaning).
      Not OpenCV's or MATLAB's 8-bit Lab encodings (those offset a*, b* by 128).
    - sigma_c: the (population) standard deviation of chroma C = sqrt(a^2 + b^2) over the
      image's pixels, as the paper defines it (MATLAB code in circulation computes
      sqrt(mean(|1 - (mean(C)/C)^2|)) instead; not used).
    - con_l: the contrast of luminance as the difference between the top 1% and the bottom
      1% of L, taken as the 99th minus the 1st percentile (linear interpolation), like
      MATLAB's stretchlim limits; not the difference of the means of those 1% tails.
    - mu_s: the mean of saturation S = C / L (the paper's definition), with S = 0 where
      L = 0 (black, where C = 0 too). S is scale-free; for very dark strongly coloured
      pixels it can exceed 1 (up to ~20 for near-black pure blue).

    On natural photos the value is about 0.3-0.7 (astronaut 0.56, coffee 0.69, chelsea 0.35;
    the paper's Table 3 values, ~0.6, came from other code): compare numbers only when they
    come from the same implementation.

    Args:
        x: (N, 3, H, W) in [0, 1].
    Returns:
        (N,) float32.
    """
    check_batch(x, "x")
    dt = _work_dtype(x)
    lab = rgb_to_lab(x.to(dt).clamp(0, 1)).flatten(2)  # (N, 3, K)
    lum = lab[:, 0] / 100.0
    chroma = torch.sqrt(lab[:, 1] ** 2 + lab[:, 2] ** 2) / 100.0
    sigma_c = chroma.std(dim=1, unbiased=False)
    con_l = _quantile_rows(lum, 0.99) - _quantile_rows(lum, 0.01)
    sat = torch.where(lum > 0, chroma / lum.clamp_min(1e-12), torch.zeros_like(lum))
    mu_s = sat.mean(dim=1)
    return (0.4680 * sigma_c + 0.2745 * con_l + 0.2576 * mu_s).float()


# --------------------------------------------------------------------------------------
# UIQM (Panetta, Gao & Agaian 2016)
# --------------------------------------------------------------------------------------

# PLIP (parameterized logarithmic image processing) constants gamma = k = 1026: Panetta,
# Wharton & Agaian, IEEE TSMC-B 38(1), 2008, the values UIQM's authors use for 8-bit images.
_PLIP_GAMMA = 1026.0
_UIQM_BLOCK = 8


def _alpha_trimmed_stats(
    v: torch.Tensor, alpha_l: float = 0.1, alpha_r: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric alpha-trimmed mean and the variance about it (Panetta et al. 2016, UICM).

    mu = mean of the sorted values with the lowest ceil(alpha_l K) and highest floor(alpha_r K)
    removed; sigma^2 = (1/K) sum over all K values of (v - mu)^2.
    """
    k = v.shape[1]
    t_l = int(math.ceil(alpha_l * k))
    t_r = int(math.floor(alpha_r * k))
    s, _ = v.sort(dim=1)
    mu = s[:, t_l : k - t_r].mean(dim=1)
    var = (v - mu[:, None]).pow(2).mean(dim=1)
    return mu, var


def _block_max_min(t: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block max and min over non-overlapping block x block tiles; partial tiles at the
    right and bottom edges are kept (ceil), so every pixel belongs to a block."""
    mx = F.max_pool2d(t, block, stride=block, ceil_mode=True)
    mn = -F.max_pool2d(-t, block, stride=block, ceil_mode=True)
    return mx, mn


def _sobel_magnitude(t: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of (N, C, H, W), kernels scaled by 1/4 (a unit step -> 1),
    replicate padding so the output has the input's size."""
    kx = t.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4.0
    c = t.shape[1]
    w = torch.stack([kx, kx.t()]).unsqueeze(1).repeat(c, 1, 1, 1)  # (2C, 1, 3, 3)
    g = F.conv2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), w, groups=c)
    gx, gy = g[:, 0::2], g[:, 1::2]
    return torch.sqrt(gx**2 + gy**2)


def _uicm(rgb255: torch.Tensor) -> torch.Tensor:
    r, g, b = rgb255.flatten(2).unbind(dim=1)
    rg = r - g
    yb = (r + g) / 2 - b
    mu_rg, var_rg = _alpha_trimmed_stats(rg)
    mu_yb, var_yb = _alpha_trimmed_stats(yb)
    # Panetta et al. 2016: UICM = -0.0268 sqrt(mu_RG^2 + mu_YB^2) + 0.1586 sqrt(s2_RG + s2_YB).
    return -0.0268 * torch.sqrt(mu_rg**2 + mu_yb**2) + 0.1586 * torch.sqrt(var_rg + var_yb)


def _uism(rgb255: torch.Tensor, block: int) -> torch.Tensor:
    # Grayscale edge map per channel = Sobel edge magnitude x the channel (paper section III-B),
    # on the 8-bit scale: the magnitude of the [0, 1] channel (<= ~1.4) times the channel in [0, 255].
    edges = _sobel_magnitude(rgb255 / 255.0) * rgb255
    mx, mn = _block_max_min(edges, block)
    # EME = 2/(k1 k2) sum log(I_max / I_min) (Panetta et al. 2016, UISM). Values below one grey level are
    # floored at 1, so flat blocks (I_max = I_min = 0) add 0 instead of log(0/0).
    eme = (2.0 * torch.log(mx.clamp_min(1.0) / mn.clamp_min(1.0))).flatten(2).mean(dim=2)  # (N, 3)
    return eme @ eme.new_tensor([0.299, 0.587, 0.114])  # lambda_R, lambda_G, lambda_B of the paper


def _uiconm(rgb255: torch.Tensor, block: int) -> torch.Tensor:
    gamma = k = _PLIP_GAMMA
    inten = (rgb255 * rgb255.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    mx, mn = _block_max_min(inten, block)
    diff = k * (mx - mn) / (k - mn)  # PLIP subtraction  a (-) b = k (a - b) / (k - b)
    plus = mx + mn - mx * mn / gamma  # PLIP addition     a (+) b = a + b - a b / gamma
    m = torch.where(plus > 0, diff / plus.clamp_min(1e-12), torch.zeros_like(plus))
    # m log m -> 0 as m -> 0 (flat black blocks).
    terms = torch.where(m > 0, m * torch.log(m.clamp_min(1e-300)), torch.zeros_like(m)).flatten(1)
    s = terms.sum(dim=1)  # <= 0
    c = 1.0 / terms.shape[1]
    # PLIP scalar multiplication c (x) s = gamma - gamma (1 - s / gamma)^c (Panetta et al. 2008).
    log_amee = gamma - gamma * (1.0 - s / gamma) ** c
    return -log_amee


def uiqm(x: torch.Tensor, block: int = _UIQM_BLOCK) -> torch.Tensor:
    """Underwater Image Quality Measure (higher is better), per image.

    UIQM = 0.0282 UICM + 0.2953 UISM + 3.5753 UIConM (Panetta, Gao & Agaian,
    "Human-Visual-System-Inspired Underwater Image Quality Measures", IEEE J. Oceanic Eng.
    41(3):541-551, 2016, doi 10.1109/JOE.2015.2469915). The paper's coefficients were
    fitted on 8-bit values, so the terms are computed on R, G, B in [0, 255]. Choices
    (published code differs, see notes/iqa-ecosystem.md section 4.2):

    - UICM (colourfulness): RG = R - G, YB = (R + G)/2 - B; asymmetric
      alpha-trimmed mean with alpha_L = alpha_R = 0.1 (drop the lowest ceil(0.1 K) and the
      highest floor(0.1 K) values); variance about that mean over all K pixels;
      UICM = -0.0268 sqrt(mu_RG^2 + mu_YB^2) + 0.1586 sqrt(s2_RG + s2_YB).
    - UISM (sharpness): per channel, edge map = Sobel magnitude (kernels / 4,
      replicate padding) of the [0, 1] channel times the channel on [0, 255]; EME over
      `block` x `block` tiles (8 x 8 by default; partial edge tiles kept) =
      2/(#tiles) sum ln(I_max / I_min), with values below 1 floored at 1 (a flat tile adds 0);
      UISM = 0.299 EME_R + 0.587 EME_G + 0.114 EME_B (the 0.144 in widely copied code is a typo).
    - UIConM (contrast): logAMEE on the intensity 0.299 R + 0.587 G + 0.114 B with
      PLIP arithmetic (gamma = k = 1026): per tile m = (I_max (-) I_min) / (I_max (+) I_min),
      logAMEE = (1/#tiles) (x) sum m ln m. Every m ln m is <= 0, so logAMEE <= 0; UIConM is
      its negation, so that more local contrast (m up to 1/e) raises UIQM, the direction the
      paper's positive coefficient and published positive UIQM values imply. m ln m is
      smallest at m = 1/e, so UIConM is not monotone in contrast: a tile with m near 1
      (I_min near 0) adds about as little as a flat one. That is the measure as published.

    No resizing: the value depends somewhat on image size (tile counts), so compare images
    of the same size or dataset.

    Args:
        x: (N, 3, H, W) in [0, 1].
        block: tile size for EME and logAMEE.
    Returns:
        (N,) float32.
    """
    check_batch(x, "x")
    dt = _work_dtype(x)
    rgb255 = x.to(dt).clamp(0, 1) * 255.0
    return (
        0.0282 * _uicm(rgb255) + 0.2953 * _uism(rgb255, block) + 3.5753 * _uiconm(rgb255, block)
    ).float()


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


def build_lpips(device: str | torch.device = "cpu") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """LPIPS (Zhang et al., CVPR 2018), AlexNet variant, from the `lpips` package.

    Needs `pip install iqpir[perceptual]` and torchvision's AlexNet weights at
    $TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth (they cannot be downloaded here).
    Returns f(x, y) -> (N,) for (N, 3, H, W) images in [0, 1].

    Raises:
        MetricUnavailable: the package or the weights are missing.
    """
    path = _hub_checkpoints() / LPIPS_BACKBONE_FILE
    hint = f"pip install 'iqpir[perceptual]' and place {LPIPS_BACKBONE_FILE} in {path.parent}"
    if importlib.util.find_spec("lpips") is None:
        raise MetricUnavailable(f"lpips skipped: package lpips not installed ({hint})")
    if not path.is_file():
        raise MetricUnavailable(f"lpips skipped: weights not found at {path} ({hint})")
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
    path = _hub_checkpoints() / FID_INCEPTION_FILE
    hint = f"pip install 'iqpir[fid]' and place {FID_INCEPTION_FILE} in {path.parent}"
    if importlib.util.find_spec("torch_fidelity") is None:
        raise MetricUnavailable(f"fid skipped: package torch-fidelity not installed ({hint})")
    if not path.is_file():
        raise MetricUnavailable(f"fid skipped: weights not found at {path} ({hint})")
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


# --------------------------------------------------------------------------------------
# Results table
# --------------------------------------------------------------------------------------


def _to_float(v: object) -> float | None:
    if v is None or v == "":
        return None
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _decimals(values: Iterable[float]) -> int:
    # The paper prints PSNR/FID/MUSIQ with 2 decimals and SSIM/LPIPS/TOPIQ with 3.
    finite = [abs(v) for v in values if math.isfinite(v)]
    return 2 if finite and max(finite) >= 10 else 3


def _fmt(v: float | None, decimals: int) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{decimals}f}"


def display_name(metric: str) -> str:
    return _DISPLAY_NAMES.get(metric, metric.upper())


def markdown_table(
    rows: Sequence[Mapping[str, object]],
    directions: Mapping[str, str] | None = None,
    group_by: str | None = "dataset",
) -> str:
    """A Markdown table like the paper's Tables 1-4.

    Args:
        rows: dicts with optional `method`, `dataset`, `n_images` and one key per metric
            (numbers or numeric strings; missing or empty -> "-").
        directions: metric -> "higher" | "lower" (default METRIC_DIRECTIONS). Metrics with a
            direction get an arrow in the header (PSNR ↑, NIQE ↓) and their best value in
            bold; ties at the printed precision are all bold.
        group_by: the best value is marked within each group of rows sharing this column
            (the paper marks the best per dataset); None marks it over all rows.
    """
    dirs = dict(METRIC_DIRECTIONS)
    if directions:
        dirs.update(directions)
    id_cols = [c for c in ID_COLUMNS if any(c in r for r in rows)]
    metric_cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in ID_COLUMNS and k not in metric_cols:
                metric_cols.append(k)
    values = {m: [_to_float(r.get(m)) for r in rows] for m in metric_cols}
    decimals = {m: _decimals(v for v in values[m] if v is not None) for m in metric_cols}
    text = {m: [_fmt(v, decimals[m]) for v in values[m]] for m in metric_cols}

    groups: dict[object, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.get(group_by, "") if group_by else "", []).append(i)
    bold: set[tuple[int, str]] = set()
    for m in metric_cols:
        d = dirs.get(m)
        if d not in ("higher", "lower"):
            continue
        for idx in groups.values():
            # Compare the printed values, so that rows that print the same tie.
            cand = [(float(text[m][i]), i) for i in idx if values[m][i] is not None]
            if len(cand) < 1:
                continue
            best = max(v for v, _ in cand) if d == "higher" else min(v for v, _ in cand)
            bold.update((i, m) for v, i in cand if v == best)

    head_names = {"method": "Method", "dataset": "Dataset", "n_images": "N"}
    header = [head_names[c] for c in id_cols]
    for m in metric_cols:
        arrow = {"higher": " ↑", "lower": " ↓"}.get(dirs.get(m, ""), "")
        header.append(display_name(m) + arrow)
    rule = "|" + "|".join(["---"] * len(id_cols) + ["---:"] * len(metric_cols)) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    for i, r in enumerate(rows):
        cells = [str(r.get(c, "") if r.get(c) is not None else "") for c in id_cols]
        for m in metric_cols:
            t = text[m][i]
            cells.append(f"**{t}**" if (i, m) in bold else t)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format_value(v: object) -> str:
    if isinstance(v, float):
        return "inf" if v == math.inf else ("nan" if math.isnan(v) else f"{v:.6g}")
    return "" if v is None else str(v)


def read_results(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """The columns and rows of a results CSV ([], [] when it does not exist)."""
    p = Path(path)
    if not p.is_file():
        return [], []
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = list(reader.fieldnames or [])
        rows = [dict(r) for r in reader]
    return cols, rows


def append_result(path: str | os.PathLike, row: Mapping[str, object]) -> list[dict[str, str]]:
    """Append one row to a results CSV; returns every row now in the file.

    The file is created with a header when it does not exist. When the row has columns the
    file lacks (or lacks columns the file has), the file is rewritten with the union of the
    columns (existing order first, then new ones; missing cells empty), so nothing is lost.
    Every write is atomic (temporary file + rename), under an advisory lock where the
    platform has one (a hidden `.NAME.lock` file next to the CSV, left in place), so
    concurrent runs do not drop each other's rows.
    """
    from iqpir.io import atomic_write_text

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    new = {k: _format_value(v) for k, v in row.items()}
    lock_path = p.with_name(f".{p.name}.lock")
    with _FileLock(lock_path):
        cols, rows = read_results(p)
        for k in new:
            if k not in cols:
                cols.append(k)
        rows.append(new)
        import io as _io

        buf = _io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, restval="", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") or "" for k in cols})
        atomic_write_text(p, buf.getvalue())
    return [{k: r.get(k, "") or "" for k in cols} for r in rows]


class _FileLock:
    """Advisory exclusive lock on a side file (fcntl on POSIX; a no-op elsewhere)."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; the atomic rename still protects the file
            return self
        self.fh = open(self.path, "a")
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            import fcntl

            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            # The lock file stays: unlinking it would let a waiting and a new process lock
            # two different files at once.
        return False


# --------------------------------------------------------------------------------------
# evaluate_folder
# --------------------------------------------------------------------------------------


@dataclass
class EvaluationReport:
    """What `evaluate_folder` did.

    done: restored images that were scored. skipped: (path, reason) for images left out on
    purpose (no reference with the same name, size differs from the reference). failed:
    (path, reason) for files that could not be read or scored. row: the CSV row (method,
    dataset, n_images, then metric -> mean over the scored images; fid is a set-level value).
    per_image: path -> metric -> value. table: the Markdown table of every row in the CSV.
    notes: one line per metric that was left out (weights or package missing).
    """

    done: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    row: dict[str, object] = field(default_factory=dict)
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    table: str = ""
    notes: list[str] = field(default_factory=list)
    directions: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"{len(self.done)} scored, {len(self.skipped)} skipped, {len(self.failed)} failed"
        lines = [text]
        lines += [f"  skipped: {p}: {why}" for p, why in self.skipped]
        lines += [f"  failed: {p}: {why}" for p, why in self.failed]
        return "\n".join(lines)


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _reference_index(reference: Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Reference images keyed by relative path without extension, and by bare stem."""
    from iqpir.io import collect_inputs

    paths, _ = collect_inputs([reference])
    by_rel: dict[str, list[Path]] = {}
    by_stem: dict[str, list[Path]] = {}
    for p in paths:
        rel = p.relative_to(reference).with_suffix("").as_posix()
        by_rel.setdefault(rel, []).append(p)
        by_stem.setdefault(p.stem, []).append(p)
    return by_rel, by_stem


def _match_reference(
    restored: Path, root: Path, by_rel: dict[str, list[Path]], by_stem: dict[str, list[Path]]
) -> tuple[Path | None, str]:
    rel = restored.relative_to(root).with_suffix("").as_posix()
    cands = by_rel.get(rel) or by_stem.get(restored.stem) or []
    if not cands:
        return None, f"no reference named {restored.stem}.* in the reference folder"
    if len(cands) > 1:
        return None, "ambiguous reference: " + ", ".join(str(c) for c in cands)
    return cands[0], ""


def _column_name(metric: str, y_channel: bool) -> str:
    # PSNR/SSIM on Y and on RGB differ by dB: they get their own columns so a table never mixes them.
    return f"{metric}_y" if y_channel and metric in ("psnr", "ssim") else metric


def _split_metrics(metrics: Sequence[str] | None, has_reference: bool) -> list[str]:
    if metrics is None:
        return ["psnr", "ssim", "niqe", "piqe"] if has_reference else ["niqe", "piqe"]
    out: list[str] = []
    for m in metrics:
        m = m.strip().lower()
        if m and m not in out:
            out.append(m)
    if not out:
        raise ValueError("no metrics given")
    if not has_reference:
        need = [m for m in out if m in FULL_REFERENCE]
        if need:
            verb = "needs" if len(need) == 1 else "need"
            raise ValueError(f"{', '.join(need)} {verb} reference images (--reference DIR)")
    return out


def _build_nr_scorer(name: str, device: torch.device):
    """An NR-IQA scorer from the quality-prior module, or raise MetricUnavailable / ValueError."""
    try:
        from iqpir.iqa import UnknownMetric, build_scorer, unknown_metric_error
    except ImportError as exc:
        raise MetricUnavailable(f"{name} skipped: NR-IQA module iqpir.iqa not available ({exc})") from exc
    try:
        return build_scorer(name, device=device, weights_dir=None)
    except UnknownMetric as exc:
        # A typo is the user's error, not a missing optional part: say so, with the closest name.
        from iqpir.iqa.names import PYIQA_FR_MODELS, PYIQA_NR_MODELS

        if name in PYIQA_FR_MODELS:
            raise ValueError(f"unknown metric {name!r}: evaluate computes {', '.join(FULL_REFERENCE)} with a "
                             "reference, and no-reference models by name") from None
        raise unknown_metric_error(name, PYIQA_NR_MODELS, others=FULL_REFERENCE + LOCAL_NO_REFERENCE) from exc
    except (KeyError, ValueError) as exc:
        raise ValueError(f"unknown metric {name!r}: {exc}") from exc
    except (ImportError, OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MetricUnavailable(f"{name} skipped: {first}") from exc


def evaluate_folder(
    restored: str | os.PathLike,
    reference: str | os.PathLike | None = None,
    metrics: Sequence[str] | None = None,
    name: str | None = None,
    dataset: str | None = None,
    out: str | os.PathLike | None = None,
    y_channel: bool = False,
    device: str | torch.device = "auto",
    crop_border: int = 0,
    quiet: bool = False,
) -> EvaluationReport:
    """Score a folder of restored images; append one row to a results CSV; make the table.

    Matching: a restored image matches the reference with the same relative path without
    extension (`a/x.png` <-> `a/x.jpg`), else the one reference with the same file stem
    anywhere in the reference folder (so `x.png` <-> `x.jpg`; no suffix stripping such as
    `x_restored`). Restored images without a reference, or whose size differs from it, are
    named and skipped (`report.skipped`); unreadable files are named, skipped and counted as
    failures (`report.failed`). With a reference folder, every metric is computed on the
    same matched images. Images are scored one at a time, so sizes may differ.

    Metrics (default: psnr, ssim, niqe, piqe with a reference; niqe, piqe without):
    psnr, ssim (RGB; with y_channel, BT.601 Y in columns psnr_y, ssim_y), lpips and fid
    (when their weights are present; else a one-line note and no column), uciqe, uiqm, and
    any NR-IQA model name that `iqpir.iqa.build_scorer` knows. The row holds the mean over images per metric
    (fid: one value for the whole set, restored vs reference).

    Args:
        restored: folder (searched recursively) of restored images.
        reference: folder of reference images, or None for no-reference evaluation.
        metrics: metric names; None for the default.
        name: the row's method name (default: the restored folder's name).
        dataset: the row's dataset name (default: empty).
        out: results CSV; one row is appended per call (None: write nothing).
        y_channel: PSNR/SSIM on the Y channel instead of RGB.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N".
        crop_border: pixels removed from each side for PSNR/SSIM.
        quiet: do not print the table, notes and problems.

    Returns:
        EvaluationReport (`.failed`, `.skipped`, `.row`, `.table`, `.notes`).

    Raises:
        FileNotFoundError: the restored or reference folder does not exist.
        ValueError: an unknown metric, or a full-reference metric without a reference.
    """
    from tqdm import tqdm

    from iqpir.io import ImageReadError, collect_inputs, load_rgb

    root = Path(restored)
    if not root.is_dir():
        raise FileNotFoundError(f"restored folder not found: {root}")
    ref_root = Path(reference) if reference is not None else None
    if ref_root is not None and not ref_root.is_dir():
        raise FileNotFoundError(f"reference folder not found: {ref_root}")
    names = _split_metrics(metrics, ref_root is not None)
    dev = _resolve_device(device)
    report = EvaluationReport()

    # Build what each metric needs once; optional ones that cannot run leave a one-line note.
    per_image_fns: dict[str, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]] = {}
    directions: dict[str, str] = {}
    fid_features = None
    columns = [_column_name(m, y_channel) for m in names]
    for m, col in zip(names, columns):
        directions[col] = METRIC_DIRECTIONS.get(col, "")
        try:
            if m == "psnr":
                per_image_fns[col] = lambda x, y: psnr(x, y, y_channel=y_channel, crop_border=crop_border)
            elif m == "ssim":
                per_image_fns[col] = lambda x, y: ssim(x, y, y_channel=y_channel, crop_border=crop_border)
            elif m == "uciqe":
                per_image_fns[m] = lambda x, y: uciqe(x)
            elif m == "uiqm":
                per_image_fns[m] = lambda x, y: uiqm(x)
            elif m == "lpips":
                lp = build_lpips(dev)
                per_image_fns[m] = lambda x, y, lp=lp: lp(x, y)
            elif m == "fid":
                fid_features = build_fid_features(dev)
            else:
                scorer = _build_nr_scorer(m, dev)
                directions[m] = "lower" if getattr(scorer, "lower_better", False) else "higher"
                per_image_fns[m] = lambda x, y, s=scorer: s(x)
        except MetricUnavailable as exc:
            report.notes.append(str(exc))
            directions.pop(col, None)
    report.directions = {k: v for k, v in directions.items() if v}
    fid_wanted = fid_features is not None

    files, _ = collect_inputs([root])
    by_rel: dict[str, list[Path]] = {}
    by_stem: dict[str, list[Path]] = {}
    if ref_root is not None:
        by_rel, by_stem = _reference_index(ref_root)

    values: dict[str, list[float]] = {m: [] for m in per_image_fns}
    # A metric that cannot score an image (too small for NIQE, NaN) leaves that metric out of
    # the row, named in a note; the image still counts for the other metrics.
    metric_failures: dict[str, list[tuple[str, str]]] = {m: [] for m in per_image_fns}
    feats_restored: list[torch.Tensor] = []
    feats_reference: list[torch.Tensor] = []
    # disable=None: a progress bar on a terminal, none in logs and CI.
    bar = tqdm(files, desc="evaluate", unit="img", disable=True if quiet else None, file=sys.stderr)
    for path in bar:
        ref_img = None
        # Read first: an unreadable file is a failure even when it has no reference.
        try:
            img = load_rgb(path).unsqueeze(0).to(dev)
        except ImageReadError as exc:
            report.failed.append((str(path), exc.reason))
            continue
        if ref_root is not None:
            ref_path, why = _match_reference(path, root, by_rel, by_stem)
            if ref_path is None:
                report.skipped.append((str(path), why))
                continue
            try:
                ref_img = load_rgb(ref_path).unsqueeze(0).to(dev)
            except ImageReadError as exc:
                report.failed.append((str(path), f"its reference {ref_path}: {exc.reason}"))
                continue
            if ref_img.shape != img.shape:
                report.skipped.append(
                    (
                        str(path),
                        f"size {img.shape[-1]}x{img.shape[-2]} differs from reference "
                        f"{ref_path} {ref_img.shape[-1]}x{ref_img.shape[-2]}",
                    )
                )
                continue
        scores = {}
        with torch.no_grad():
            for m, fn in per_image_fns.items():
                try:
                    v = float(fn(img, ref_img).reshape(-1)[0])
                except (ValueError, RuntimeError) as exc:  # too small, degenerate, ...
                    metric_failures[m].append((str(path), str(exc).strip().splitlines()[0]))
                    continue
                if math.isnan(v):  # e.g. NIQE of a flat image; a NaN would poison the mean
                    metric_failures[m].append((str(path), f"{m} is NaN for this image"))
                    continue
                scores[m] = v
            if fid_wanted:
                try:
                    fr, fq = fid_features(img), fid_features(ref_img)
                except (ValueError, RuntimeError) as exc:
                    metric_failures.setdefault("fid", []).append((str(path), str(exc).strip().splitlines()[0]))
                else:
                    feats_restored.append(fr)
                    feats_reference.append(fq)
        for m, v in scores.items():
            values[m].append(v)
        report.done.append(path)
        report.per_image[str(path)] = scores
    for m, fails in metric_failures.items():
        if fails:
            report.notes.append(
                f"{m} left out of the row: it could not score {len(fails)} of {len(report.done)} images "
                "(every column of a row covers the same images):\n"
                + "\n".join(f"  {p}: {why}" for p, why in fails)
            )
            values[m] = []
    if not files:
        report.failed.append((str(root), "no images found"))

    row: dict[str, object] = {
        "method": name if name is not None else root.resolve().name,
        "dataset": dataset or "",
        "n_images": len(report.done),
    }
    for m in columns:
        if m in values and values[m]:
            row[m] = sum(values[m]) / len(values[m])
        elif m == "fid" and fid_wanted and not metric_failures.get("fid"):
            if len(feats_restored) >= 2:
                row[m] = frechet_distance(torch.cat(feats_restored), torch.cat(feats_reference))
            else:
                report.notes.append("fid skipped: needs at least 2 scored images")
    report.row = row

    if report.done and set(row) - set(ID_COLUMNS):
        rows = append_result(out, row) if out is not None else [row]
    else:
        rows = read_results(out)[1] if out is not None else []
        if files:
            what = "image" if not report.done else "metric"
            report.failed.append((str(root), f"no {what} could be scored; no row written"))
    report.table = markdown_table(rows, report.directions) if rows else ""

    if not quiet:
        for note in report.notes:
            print(note, file=sys.stderr)
        for p, why in report.skipped:
            print(f"skipped: {p}: {why}", file=sys.stderr)
        for p, why in report.failed:
            print(f"failed: {p}: {why}", file=sys.stderr)
        if report.table:
            print(report.table)
    return report
