"""MATLAB-compatible image operations used by the classical NR-IQA metrics (batched torch).

The published NIQE and PIQE numbers were computed in MATLAB on 8-bit files, so the
details that move the scores are reproduced here:

- ``rgb2gray``: MATLAB's luminance weights (the first row of the inverse NTSC/YIQ matrix),
  and, for 8-bit images, its uint8 output, i.e. rounded half away from zero (not torch's
  round-half-to-even).
- ``imfilter(..., 'replicate')`` with ``fspecial('gaussian', 7, 7/6)``: a separable,
  normalised 7-tap Gaussian with replicate padding.
- ``imresize(x, scale)`` with the default bicubic kernel (Keys, a = -0.5) and antialiasing
  when shrinking: the kernel is stretched by 1/scale, each row of weights is normalised
  and out-of-range taps are mirrored (MATLAB's ``contributions``). It is a linear map per
  axis, applied here as two dense matrices: out = A_h @ x @ A_w^T.

Sources: MATLAB documentation of rgb2gray, fspecial, imfilter and imresize; R. Keys,
"Cubic convolution interpolation for digital image processing", IEEE TASSP 1981.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

# MATLAB rgb2gray: coef = T(1,:) with T = inv([1 0.956 0.621; 1 -0.272 -0.647; 1 -1.106 1.703]).
RGB2GRAY_WEIGHTS = (0.298936021293775, 0.587043074451121, 0.114020904255103)


def matlab_round(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero (MATLAB ``round`` and its casts to integer classes)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def to_uint8_levels(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> the 8-bit levels 0..255 (as floats) that an 8-bit file holds."""
    return torch.floor(images.clamp(0, 1) * 255.0 + 0.5)  # non-negative: MATLAB's round


def rgb2gray(images: torch.Tensor, uint8: bool = True) -> torch.Tensor:
    """MATLAB ``rgb2gray`` on a batch.

    Args:
        images: (N, 3, H, W) in [0, 1].
        uint8: treat the input as an 8-bit image (RGB quantised to 0..255, the grey output
            rounded as MATLAB's uint8 result is); False keeps MATLAB's double path.

    Returns:
        (N, H, W) grey levels in [0, 255] (integers when ``uint8``).
    """
    w = torch.tensor(RGB2GRAY_WEIGHTS, dtype=images.dtype, device=images.device)
    if uint8:
        levels = to_uint8_levels(images)
        return torch.floor(torch.einsum("nchw,c->nhw", levels, w) + 0.5)  # uint8 cast: round half up
    return torch.einsum("nchw,c->nhw", images * 255.0, w)


@lru_cache(maxsize=8)
def _gaussian_1d(size: int, sigma: float) -> tuple[float, ...]:
    # fspecial('gaussian', size, sigma) is the outer product of this normalised 1-D kernel
    # (its eps*max cut-off removes nothing at size 7, sigma 7/6).
    half = (size - 1) / 2
    vals = [math.exp(-((i - half) ** 2) / (2 * sigma * sigma)) for i in range(size)]
    s = sum(vals)
    return tuple(v / s for v in vals)


def gaussian_filter_replicate(x: torch.Tensor, size: int = 7, sigma: float = 7 / 6) -> torch.Tensor:
    """``imfilter(x, fspecial('gaussian', size, sigma), 'replicate')`` on (N, H, W).

    Separable: rows, then columns; taps accumulated in order, each product rounded before
    it is added (see ``mscn`` for why the order is fixed). Several times faster on CPU than
    conv2d in float64.
    """
    k = _gaussian_1d(size, sigma)
    pad = size // 2
    h, w = x.shape[-2:]
    y = F.pad(x[:, None], (pad, pad, pad, pad), mode="replicate")[:, 0]
    rows = y[:, :, 0:w] * k[0]
    for i in range(1, size):
        rows.add_(y[:, :, i : i + w] * k[i])
    out = rows[:, 0:h, :] * k[0]
    for i in range(1, size):
        out.add_(rows[:, i : i + h, :] * k[i])
    return out


def local_mean_std(x: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Local Gaussian-weighted mean and std (7x7, sigma 7/6, replicate) of (N, H, W).

    sigma = sqrt(|E[x^2] - E[x]^2|) as in the LIVE code; ``eps`` (> 0 for the differentiable
    path) keeps the square root's gradient finite on flat regions.
    """
    mu = gaussian_filter_replicate(x)
    var = gaussian_filter_replicate(x * x) - mu * mu
    sigma = torch.sqrt(var.abs() + eps) if eps > 0 else torch.sqrt(var.abs())
    return mu, sigma


def mscn(x: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MSCN coefficients (x - mu) / (sigma + 1) of (N, H, W) grey levels in [0, 255], and sigma.

    In a flat region x - mu is 0 in exact arithmetic but a rounding residue of either sign
    (about 1e-13 in float64), and NIQE's AGGD fits count negative and positive values
    separately, so the residues' signs matter on images with large flat areas: across
    plausible summation orders, TID2013 I19 (a third of its pixels flat) moves between
    NIQE 8.67 and 9.13, I06 by +-0.04%. The filter here (taps in order, each product
    rounded, then added: IEEE-exact and the same on CPU and GPU) is the variant closest to
    the published I06 value (-18 ppm; setting residues to 0 gives -355 ppm, MATLAB's
    SVD-separated kernel or a direct 7x7 sum +73 ppm).
    """
    mu, sigma = local_mean_std(x, eps=eps)
    return (x - mu) / (sigma + 1), sigma


def _cubic(x: torch.Tensor) -> torch.Tensor:
    # Keys cubic kernel with a = -0.5 (MATLAB imresize 'bicubic').
    ax = x.abs()
    ax2 = ax * ax
    ax3 = ax2 * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * (
        (ax > 1) & (ax <= 2)
    )


@lru_cache(maxsize=32)
def _resize_matrix_f64(in_len: int, out_len: int, scale: float, antialias: bool) -> torch.Tensor:
    """(out_len, in_len) float64 matrix of MATLAB imresize's bicubic weights along one axis."""
    kernel_width = 4.0
    shrink = antialias and scale < 1
    if shrink:
        kernel_width /= scale
    x = torch.arange(1, out_len + 1, dtype=torch.float64)
    # Output pixel x maps to input coordinate u (1-based, pixel centres).
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None]
    dist = u[:, None] - idx
    w = scale * _cubic(scale * dist) if shrink else _cubic(dist)
    w = w / w.sum(dim=1, keepdim=True)
    # Mirror out-of-range indices: aux = [1..n, n..1], index = aux(mod(i - 1, 2n) + 1).
    aux = torch.cat([torch.arange(in_len), torch.arange(in_len - 1, -1, -1)])
    src = aux[torch.remainder(idx.long() - 1, 2 * in_len)]
    mat = torch.zeros(out_len, in_len, dtype=torch.float64)
    mat.scatter_add_(1, src, w)
    return mat


@lru_cache(maxsize=32)
def _resize_matrix(
    in_len: int, out_len: int, scale: float, antialias: bool, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    # Cached per device and dtype: no host-to-device copy per call on GPUs.
    return _resize_matrix_f64(in_len, out_len, scale, antialias).to(device=device, dtype=dtype)


def imresize(x: torch.Tensor, scale: float, antialias: bool = True) -> torch.Tensor:
    """MATLAB ``imresize(x, scale)`` (bicubic) for (N, H, W) or (N, C, H, W) floats.

    Output size is ceil(scale * size) per axis, as in MATLAB. No rounding (double input).
    """
    h, w = x.shape[-2], x.shape[-1]
    oh, ow = int(math.ceil(scale * h)), int(math.ceil(scale * w))
    ah = _resize_matrix(h, oh, float(scale), antialias, x.device, x.dtype)
    aw = _resize_matrix(w, ow, float(scale), antialias, x.device, x.dtype)
    return torch.matmul(torch.matmul(ah, x), aw.transpose(0, 1))


def blocks(x: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """(N, H, W) with H % bh == W % bw == 0 -> (N, B, bh, bw) non-overlapping blocks (row-major)."""
    n, h, w = x.shape
    r, c = h // bh, w // bw
    return x.reshape(n, r, bh, c, bw).permute(0, 1, 3, 2, 4).reshape(n, r * c, bh, bw)
