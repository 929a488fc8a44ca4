"""NIQE (Mittal, Soundararajan, Bovik, "Making a completely blind image quality analyzer",
IEEE Signal Processing Letters 20(3), 2013), batched in torch, and a differentiable variant.

``NIQE`` reproduces LIVE's MATLAB release (``computequality.m``, ``computefeature.m``,
``estimateaggdparam.m``) with its pristine model (``data/niqe_pristine.safetensors``):

1. grey = rgb2gray of the 8-bit image (MATLAB weights; uint8 result, i.e. rounded), as
   a double in [0, 255]. The rounding matters: without it TID2013 I04/I06 come out
   0.4%/1.3% below the published values, with it they match to 1e-7/2e-5;
2. crop to whole 96x96 blocks from the top-left corner;
3. at each of two scales (the second is ``imresize(grey, 0.5)``, bicubic with
   antialiasing), MSCN coefficients ``(I - mu) / (sigma + 1)`` with a 7x7 Gaussian window
   (sigma 7/6, replicate padding), then per block (96x96, then 48x48; no overlap) 18
   features: an AGGD fit of the coefficients (alpha, (beta_l + beta_r) / 2) and AGGD fits
   (alpha, mean, beta_l, beta_r) of the products of each coefficient with its neighbour
   under the circular shifts (0,1), (1,0), (1,1), (1,-1) of the block (on images with
   large flat areas the result depends on floating-point residues: see ``matlab.mscn``);
4. AGGD shape by the moment-ratio table: alpha = argmin over 0.2:0.001:10 of
   (rho(alpha) - rhat_norm)^2, rho(a) = Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)),
   rhat_norm = rhat (g^3 + 1)(g + 1) / (g^2 + 1)^2, g = sigma_l / sigma_r,
   rhat = mean(|x|)^2 / mean(x^2); beta_{l,r} = sigma_{l,r} sqrt(Gamma(1/a) / Gamma(3/a));
   mean = (beta_r - beta_l) Gamma(2/a) / Gamma(1/a);
5. all blocks are used at test time (the sharpness selection belongs to the pristine fit);
   NaN features (blocks without negative or positive values) are dropped as MATLAB's
   ``nanmean`` (per feature) and ``nancov`` (complete rows) do;
6. quality = sqrt((mu_p - mu_d) pinv((S_p + S_d) / 2) (mu_p - mu_d)^T).

``NIQEDiff`` ("niqe_diff") computes the same features with smooth operations so that the
gradient reaches the input (the stage-2 quality loss when no learned weights exist):
- the 8-bit rounding of the grey image is a straight-through estimator (value rounded,
  gradient of the identity);
- the table look-up of alpha is replaced by the table value refined by one Newton step on
  rho(alpha) = rhat_norm, where rho and rho' are evaluated at the (detached) table value;
  the value is the exact root (within ~1e-6) and d alpha / d rhat_norm = 1 / rho'(alpha)
  is the implicit-function derivative;
- square roots and divisions carry a small epsilon, every block is kept, and the
  Mahalanobis term uses ``solve`` (the pooled covariance is positive definite) instead
  of ``pinv``.
Its values stay within a few tenths of a percent of ``NIQE`` on natural images (measured in
``tests/test_iqa.py``).
"""

from __future__ import annotations

from importlib import resources

import torch

from iqpir.io import check_batch
from iqpir.iqa.base import ImageTooSmall, ScorerModule
from iqpir.iqa.matlab import blocks, imresize, mscn, rgb2gray

# Fixed-normalisation range of NIQE (lower = better). NIQE has no upper bound. 0 is the
# ideal (features equal to the pristine mean). Measured with this implementation: clean
# photographs 2.5-7 (skimage astronaut 3.1, coffee 4.1, chelsea 2.6, rocket 7.0; TID2013
# references 2.8-5.1), Gaussian blur sigma 2 -> 7-10, sigma 4 -> 10-12, JPEG q10 -> 6-12,
# noise sigma 0.1 -> 9-13, TID2013 I03 (strong blur) 15.8. 20 keeps all of these inside the
# range, so the clamp does not cut the quality loss's gradient on degraded outputs; quality
# 0.7 corresponds to NIQE 6.
NIQE_RANGE = (0.0, 20.0)

BLOCK_SIZE = 96
_GAMMA_START, _GAMMA_STEP, _GAMMA_COUNT = 0.2, 0.001, 9801  # MATLAB 0.2:0.001:10
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))  # circshift offsets of computefeature.m


def load_pristine_params() -> tuple[torch.Tensor, torch.Tensor]:
    """LIVE's NIQE pristine model: (mu (36,), cov (36, 36)) float64. See data/README.md."""
    from iqpir.checkpoint import read_tensor_bytes

    data = resources.files("iqpir.iqa").joinpath("data/niqe_pristine.safetensors").read_bytes()
    tensors = read_tensor_bytes(data)
    return tensors["mu_prisparam"].to(torch.float64), tensors["cov_prisparam"].to(torch.float64)


_TABLES: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _log_rho(a: torch.Tensor) -> torch.Tensor:
    return 2 * torch.lgamma(2 / a) - torch.lgamma(1 / a) - torch.lgamma(3 / a)


def _rho_table(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    key = (str(device), dtype)
    if key not in _TABLES:
        gam = _GAMMA_START + _GAMMA_STEP * torch.arange(_GAMMA_COUNT, dtype=torch.float64)
        rho = torch.exp(_log_rho(gam))  # strictly increasing on [0.2, 10]
        _TABLES[key] = (gam.to(device=device, dtype=dtype), rho.to(device=device, dtype=dtype))
    return _TABLES[key]


def _table_alpha(rhat_norm: torch.Tensor) -> torch.Tensor:
    """argmin_k (rho_k - rhat_norm)^2 over MATLAB's table (first index on ties); NaN stays NaN."""
    gam, rho = _rho_table(rhat_norm.device, rhat_norm.dtype)
    x = torch.nan_to_num(rhat_norm, nan=0.0).contiguous()
    hi = torch.searchsorted(rho, x).clamp(1, rho.numel() - 1)
    lo = hi - 1
    pick_hi = (rho[hi] - x) ** 2 < (rho[lo] - x) ** 2
    alpha = gam[torch.where(pick_hi, hi, lo)]
    return torch.where(torch.isnan(rhat_norm), rhat_norm, alpha)


def _smooth_alpha(rhat_norm: torch.Tensor) -> torch.Tensor:
    """Root of rho(alpha) = rhat_norm: table start + one Newton step; differentiable in rhat_norm."""
    with torch.no_grad():
        a0 = _table_alpha(rhat_norm)
        log_r = _log_rho(a0)
        # d log rho / da = (psi(1/a) + 3 psi(3/a) - 4 psi(2/a)) / a^2
        dlog = (torch.digamma(1 / a0) + 3 * torch.digamma(3 / a0) - 4 * torch.digamma(2 / a0)) / (a0 * a0)
        r0 = torch.exp(log_r)
        dr = r0 * dlog
    alpha = a0 + (rhat_norm - r0) / dr
    return alpha.clamp(_GAMMA_START, _GAMMA_START + _GAMMA_STEP * (_GAMMA_COUNT - 1))


def aggd_fit(v: torch.Tensor, smooth: bool = False, eps: float = 0.0) -> tuple[torch.Tensor, ...]:
    """Asymmetric generalised Gaussian fit of the last axis (LIVE ``estimateaggdparam``).

    Returns (alpha, beta_l, beta_r), each of shape v.shape[:-1]. With ``smooth`` the shape
    comes from ``_smooth_alpha`` and counts/moments carry ``eps`` (no NaN, finite gradients).
    """
    neg = v < 0
    v2 = v * v
    total = v2.sum(-1)
    left_sum = torch.where(neg, v2, torch.zeros((), dtype=v.dtype, device=v.device)).sum(-1)
    right_sum = total - left_sum  # zeros add nothing to either side
    n_neg = neg.sum(-1).to(v.dtype)
    n_pos = (v > 0).sum(-1).to(v.dtype)
    if smooth:
        n_neg, n_pos = n_neg.clamp_min(1), n_pos.clamp_min(1)
    left = torch.sqrt(left_sum / n_neg + eps)
    right = torch.sqrt(right_sum.clamp_min(0) / n_pos + eps)
    g = left / right
    rhat = v.abs().mean(-1) ** 2 / (total / v.shape[-1] + eps)
    rhat_norm = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    alpha = _smooth_alpha(rhat_norm) if smooth else _table_alpha(rhat_norm)
    scale = torch.exp(0.5 * (torch.lgamma(1 / alpha) - torch.lgamma(3 / alpha)))
    return alpha, left * scale, right * scale


def _block_features(mscn_blocks: torch.Tensor, smooth: bool, eps: float) -> torch.Tensor:
    """(N, B, bh, bw) MSCN blocks -> (N, B, 18) features of ``computefeature.m``."""
    # The coefficients and their four neighbour products (circshift within the block, with
    # wrap-around, as blkproc hands each block to computefeature), fitted in one call.
    b = mscn_blocks
    prods = [b] + [b * torch.roll(b, shifts=shift, dims=(-2, -1)) for shift in _SHIFTS]
    alpha, bl, br = aggd_fit(torch.stack(prods, dim=2).flatten(-2), smooth, eps)  # (N, B, 5) each
    mean = (br - bl) * torch.exp(torch.lgamma(2 / alpha) - torch.lgamma(1 / alpha))
    first = torch.stack([alpha[..., 0], (bl[..., 0] + br[..., 0]) / 2], dim=-1)
    # Per shift: alpha, mean, beta_l, beta_r.
    pairs = torch.stack([alpha[..., 1:], mean[..., 1:], bl[..., 1:], br[..., 1:]], dim=-1).flatten(-2)
    return torch.cat([first, pairs], dim=-1)


def niqe_features(
    images: torch.Tensor,
    block_size: int = BLOCK_SIZE,
    smooth: bool = False,
    dtype: torch.dtype = torch.float64,
    eps: float = 0.0,
) -> torch.Tensor:
    """Per-block NIQE features.

    Args:
        images: (N, 3, H, W) in [0, 1] holding at least two whole blocks (e.g. 192x96 for
            96-px blocks); smaller images raise ``ImageTooSmall`` (a ValueError).
        smooth: the differentiable variant (straight-through rounding, Newton alpha).

    Returns:
        (N, B, 36) features, B = floor(H / bs) * floor(W / bs); NaN where MATLAB gives NaN
        (only when not ``smooth``).
    """
    h, w = images.shape[-2:]
    r, c = h // block_size, w // block_size
    if r * c < 2:
        # One block gives no covariance of the image's features (MATLAB returns NaN there).
        raise ImageTooSmall(
            "niqe", (h, w), f"two whole {block_size}x{block_size} blocks ({2 * block_size}x{block_size} or larger)"
        )
    x = images.to(dtype)
    # Crop first (computequality.m crops the grey image; rgb2gray is per pixel, so the order is free).
    x = x[:, :, : r * block_size, : c * block_size]
    if smooth:
        cont = rgb2gray(x.clamp(0, 1), uint8=False)
        grey = cont + (rgb2gray(x.detach(), uint8=True) - cont).detach()
    else:
        grey = rgb2gray(x, uint8=True)
    out = []
    for scale in (1, 2):
        coeffs, _ = mscn(grey, eps=eps)
        bs = block_size // scale
        out.append(_block_features(blocks(coeffs, bs, bs), smooth, eps))
        if scale == 1:
            grey = imresize(grey, 0.5)
    return torch.cat(out, dim=-1)


def mvg_distance(
    feats: torch.Tensor,
    mu_p: torch.Tensor,
    cov_p: torch.Tensor,
    smooth: bool = False,
    eps: float = 0.0,
) -> torch.Tensor:
    """NIQE's distance between the pristine MVG and the MVG of the image's block features.

    feats: (N, B, 36) -> (N,). Non-smooth: nanmean per feature, nancov over complete rows,
    pinv; fewer than two complete blocks give NaN, as in MATLAB.
    """
    finite = torch.isfinite(feats)
    f0 = torch.where(finite, feats, torch.zeros((), dtype=feats.dtype, device=feats.device))
    mu_d = f0.sum(1) / finite.sum(1).to(feats.dtype)
    rows = finite.all(-1, keepdim=True).to(feats.dtype)  # (N, B, 1)
    n_rows = rows.sum(1)  # (N, 1)
    mean_rows = (f0 * rows).sum(1) / n_rows.clamp_min(1)
    centred = (f0 - mean_rows[:, None]) * rows
    # Images with fewer than two complete rows have no covariance: NaN for them, computed with
    # the pristine covariance alone so that one such image does not stop the batch's SVD.
    ok = n_rows[:, 0] >= 2
    cov_d = centred.transpose(1, 2) @ centred / (n_rows[..., None] - 1).clamp_min(1)
    pooled = (cov_p + torch.where(ok[:, None, None], cov_d, cov_p)) / 2
    d = torch.nan_to_num(mu_p - mu_d)[..., None]  # (N, 36, 1)
    if smooth:
        q = (d.transpose(1, 2) @ torch.linalg.solve(pooled, d))[:, 0, 0]
        q = torch.sqrt(q.clamp_min(0) + eps)
    else:
        q = torch.sqrt((d.transpose(1, 2) @ torch.linalg.pinv(pooled) @ d)[:, 0, 0])
    return torch.where(ok, q, torch.full_like(q, float("nan")))


class NIQE(ScorerModule):
    """NIQE with LIVE's pristine model; lower = better; not differentiable.

    Args:
        block_size: 96 as in the release (the pristine model was fitted with it).
        dtype: computation dtype (float64 reproduces MATLAB's doubles).
        cpu_chunk: images per feature pass on CPU (default 1: one image at a time). A 512x384
            image needs ~30 MB of float64 intermediates; passes over several images outgrow the
            caches, and side by side in one process (benchmarks/bench_niqe.py) one image at a
            time was the fastest on CPU. On GPUs the whole batch goes at once.
    """

    name = "niqe"
    native_range = NIQE_RANGE
    lower_better = True
    differentiable = False
    _smooth = False
    _eps = 0.0

    def __init__(
        self, block_size: int = BLOCK_SIZE, dtype: torch.dtype = torch.float64, cpu_chunk: int = 1
    ) -> None:
        super().__init__()
        mu, cov = load_pristine_params()
        self.register_buffer("mu_prisparam", mu, persistent=False)
        self.register_buffer("cov_prisparam", cov, persistent=False)
        self.block_size = block_size
        self.compute_dtype = dtype
        self.cpu_chunk = max(1, int(cpu_chunk))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1], at least two 96x96 blocks -> (N,) NIQE (float32).

        Smaller images raise ``ImageTooSmall``; upsample them first to score them anyway
        (``iqpir.iqa.upsample_small``, what the stage-2 quality loss does).
        """
        check_batch(images, self.name, check_range=False)
        x = images.to(self.mu_prisparam.device)
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=x.device)
        step = self.cpu_chunk if x.device.type == "cpu" else max(1, x.shape[0])
        with torch.set_grad_enabled(self._smooth and torch.is_grad_enabled()):
            parts = [
                niqe_features(x[i : i + step], self.block_size, self._smooth, self.compute_dtype, self._eps)
                for i in range(0, x.shape[0], step)
            ]
            feats = torch.cat(parts) if len(parts) > 1 else parts[0]
            mu = self.mu_prisparam.to(self.compute_dtype)
            cov = self.cov_prisparam.to(self.compute_dtype)
            q = mvg_distance(feats, mu, cov, self._smooth, self._eps)
        return q.to(torch.float32)


class NIQEDiff(NIQE):
    """Differentiable NIQE ("niqe_diff"): same features with smooth estimation (module doc).

    Default dtype float64 keeps it within a fraction of a percent of NIQE; float32 is
    faster on GPUs and stays within about 1%. cpu_chunk defaults to 4 here: measured side by
    side in one process, forward and backward over 192x192 training crops took the same time
    per crop in groups of 1, 4 or 8 on one thread, and groups did better on two busy threads.
    """

    name = "niqe_diff"
    differentiable = True
    _smooth = True

    def __init__(
        self, block_size: int = BLOCK_SIZE, dtype: torch.dtype = torch.float64, cpu_chunk: int = 4
    ) -> None:
        super().__init__(block_size, dtype, cpu_chunk)
        self._eps = 1e-12 if dtype == torch.float64 else 1e-6


__all__ = [
    "NIQE",
    "NIQE_RANGE",
    "NIQEDiff",
    "aggd_fit",
    "load_pristine_params",
    "mvg_distance",
    "niqe_features",
]
