"""PIQE (Venkatanath N, Praneeth D, Maruthi Chandrasekhar Bh, S. S. Channappayya,
S. S. Medasani, "Blind image quality evaluation using perception based features", NCC 2015),
batched in torch, reproducing MATLAB's ``piqe`` (Image Processing Toolbox, R2018b+).

Parameter-free. Steps (MATLAB's documented algorithm and behaviour):
1. pad the image at the bottom/right to a multiple of 16 by replicating edge pixels;
2. grey = rgb2gray of the 8-bit image, rounded to integers in [0, 255];
3. MSCN coefficients (I - mu) / (sigma + 1), 7x7 Gaussian (sigma 7/6), replicate padding;
4. for every 16x16 block with variance (N-1 normalised) > 0.1 ("spatially active"):
   - noticeable-artifact criterion: some 6-pixel segment (11 per edge, sliding by one)
     of the block's four edges has a standard deviation < 0.1;
   - noise criterion: sigma_block > 2 beta with beta = |sigma_block - r| / max(sigma_block, r),
     r = std(centre) / std(surround) (r := 0 when NaN). The centre is columns 8 and 9
     (1-based) of the block; the surround is the block without columns 8 and 10: MATLAB
     deletes column 8 and then column 9 *of the already shortened block*, and this
     reproduces that;
   - block distortion = [artifact] (1 - var) + [noise] var;
5. score = 100 (sum of block distortions + 1) / (number of active blocks + 1),
   in [0, 100], lower = better (a uniform image scores 100).

Not differentiable (integer rounding and thresholds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from iqpir.io import check_batch
from iqpir.iqa.base import ScorerModule
from iqpir.iqa.matlab import blocks, mscn, rgb2gray

PIQE_RANGE = (0.0, 100.0)
_BLOCK = 16
_ACTIVITY_THRESHOLD = 0.1
_IMPAIRED_THRESHOLD = 0.1
_SEGMENT = 6
# Column indices (0-based) of MATLAB's centre and surround (see the module docstring).
_CENTRE_COLS = (7, 8)
_SURROUND_COLS = tuple(c for c in range(_BLOCK) if c not in (7, 9))


def piqe_scores(images: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N,) PIQE scores (dtype)."""
    x = images.to(dtype)
    h, w = x.shape[-2:]
    ph, pw = (-h) % _BLOCK, (-w) % _BLOCK
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    grey = rgb2gray(x, uint8=True)
    coeffs, _ = mscn(grey)
    b = blocks(coeffs, _BLOCK, _BLOCK)  # (N, B, 16, 16)

    var = b.flatten(-2).var(dim=-1, unbiased=True)
    active = var > _ACTIVITY_THRESHOLD

    # Noticeable artifacts: std (N-1) of every 6-pixel segment of the four edges.
    edges = torch.stack([b[..., 0, :], b[..., :, -1], b[..., -1, :], b[..., :, 0]], dim=-2)  # (N, B, 4, 16)
    seg_std = edges.unfold(-1, _SEGMENT, 1).std(dim=-1, unbiased=True)  # (N, B, 4, 11)
    impaired = (seg_std < _IMPAIRED_THRESHOLD).flatten(-2).any(-1)

    # Gaussian noise: centre/surround deviation ratio against the block's std.
    block_sigma = var.sqrt()
    centre = b[..., list(_CENTRE_COLS)].flatten(-2).std(dim=-1, unbiased=True)
    surround = b[..., list(_SURROUND_COLS)].flatten(-2).std(dim=-1, unbiased=True)
    ratio = torch.nan_to_num(centre / surround, nan=0.0, posinf=float("inf"))
    beta = (block_sigma - ratio).abs() / torch.maximum(block_sigma, ratio)
    noisy = block_sigma > 2 * beta

    dist = impaired.to(dtype) * (1 - var) + noisy.to(dtype) * var
    dist = (dist * active.to(dtype)).sum(-1)
    n_active = active.to(dtype).sum(-1)
    return 100.0 * (dist + 1.0) / (n_active + 1.0)


class PIQE(ScorerModule):
    """PIQE, MATLAB-compatible; range [0, 100], lower = better; not differentiable.

    Args:
        dtype: computation dtype.
        cpu_chunk: images per pass on CPU (default 1, for the reasons given for NIQE); on
            GPUs the whole batch goes at once.
    """

    name = "piqe"
    native_range = PIQE_RANGE
    lower_better = True
    differentiable = False

    def __init__(self, dtype: torch.dtype = torch.float64, cpu_chunk: int = 1) -> None:
        super().__init__()
        self.compute_dtype = dtype
        self.cpu_chunk = max(1, int(cpu_chunk))
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N,) PIQE (float32)."""
        check_batch(images, self.name, check_range=False)
        x = images.to(self._device_anchor.device)
        step = self.cpu_chunk if x.device.type == "cpu" else max(1, x.shape[0])
        with torch.no_grad():
            parts = [piqe_scores(x[i : i + step], self.compute_dtype) for i in range(0, x.shape[0], step)]
            out = torch.cat(parts) if parts else torch.zeros(0, dtype=self.compute_dtype, device=x.device)
        return out.to(torch.float32)
