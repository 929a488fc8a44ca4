"""No-reference underwater metrics of Table 3: UCIQE (Yang & Sowmya 2015) and UIQM
(Panetta, Gao & Agaian 2016), with the CIELab conversion UCIQE uses. Each function's
docstring states its formula choices where published implementations disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from iqpir.io import check_batch
from iqpir.metrics.reference import _work_dtype

#: No-reference metrics computed by this package (NR-IQA models come from iqpir.iqa).
LOCAL_NO_REFERENCE = ("uciqe", "uiqm")


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

