"""Vector quantization: one nearest-neighbour codebook, and the dual codebook of paper 3.1.

Latents are (B, C, h, w); indices (B, h, w) long; per-sample losses (B,) so that a
sample's HQ+ loss can be masked by its quality (paper Eq. 1).

Where beta goes (`beta_on`), with sg = stop-gradient and mean squared errors over (C, h, w):
- "commitment": loss = ||z_q - sg(z)||^2 + beta * ||sg(z_q) - z||^2. The VQ-VAE paper
  (van den Oord et al. 2017, Eq. 3) weights the commitment term (the gradient to the encoder);
  taming-transformers' quantizer with legacy=False does the same.
- "codebook": loss = beta * ||z_q - sg(z)||^2 + ||sg(z_q) - z||^2. taming's legacy quantizer,
  which CodeFormer and IQPIR inherit, applies beta to the codebook term in its code although
  its comment describes the VQ-VAE form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iqpir.models.embedding import check_quality

BETA_PLACEMENTS = ("commitment", "codebook")


@dataclass
class QuantizerOutput:
    """Result of one codebook.

    quantized: (B, C, h, w) code vectors in the forward pass, straight-through to z in the
        backward pass (z + sg(z_q - z)).
    indices: (B, h, w) long, nearest code per position.
    codebook_loss: (B,) ||z_q - sg(z)||^2 (moves the codes), unweighted.
    commitment_loss: (B,) ||sg(z_q) - z||^2 (moves the encoder), unweighted.
    loss: (B,) the two terms weighted by beta according to `beta_on`.
    """

    quantized: Tensor
    indices: Tensor
    codebook_loss: Tensor
    commitment_loss: Tensor
    loss: Tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with a (num_codes, dim) codebook.

    forward(z (B, dim, h, w)) -> QuantizerOutput; lookup(indices (B, h, w)) -> (B, dim, h, w).
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, beta_on: str = "commitment") -> None:
        super().__init__()
        if beta_on not in BETA_PLACEMENTS:
            raise ValueError(f"beta_on {beta_on!r} is not one of {list(BETA_PLACEMENTS)}")
        self.num_codes = num_codes
        self.dim = dim
        self.beta = beta
        self.beta_on = beta_on
        # (num_codes, dim) code vectors. The VQGAN lineage's initialisation: codes start near
        # zero, inside the encoder's range.
        self.codebook = nn.Parameter(torch.empty(num_codes, dim))
        nn.init.uniform_(self.codebook, -1.0 / num_codes, 1.0 / num_codes)

    def nearest(self, z: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, h, w) indices of the nearest codes (squared L2)."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        # Distances in float32 even under autocast: bf16 dot products would change argmins.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = flat.float()
            codes = self.codebook.float()
            # ||z||^2 - 2 z.e + ||e||^2 without materialising (N, K, C) differences.
            dist = (
                flat.pow(2).sum(1, keepdim=True)
                - 2.0 * flat @ codes.t()
                + codes.pow(2).sum(1)[None, :]
            )
            return dist.argmin(dim=1).view(b, h, w)

    @torch.no_grad()
    def init_from(self, z: Tensor, generator: torch.Generator | None = None) -> None:
        """Set the codes to encoder outputs drawn from `z` (B, dim, h, w), plus a little noise.

        Data-dependent initialisation (as k-means init in vector-quantize-pytorch, van den Oord
        et al. 2017 follow-ups): codes that start inside the encoder's distribution are all
        reachable, where the near-zero default leaves most of them dead and the codebook
        collapses to a few dozen entries at small training budgets.
        """
        flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, self.dim).cpu()
        pick = torch.randint(len(flat), (self.num_codes,), generator=generator)
        noise = torch.randn(self.num_codes, self.dim, generator=generator) * flat.std() * 0.01
        self.codebook.copy_((flat[pick] + noise).to(self.codebook))

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, h, w) long -> (B, dim, h, w) code vectors."""
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, dim, h, w) -> QuantizerOutput (see its fields)."""
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"expected z of shape (B, {self.dim}, h, w), got {tuple(z.shape)}")
        indices = self.nearest(z.detach())
        z_q = self.lookup(indices)
        # Losses in float32 whatever the autocast dtype of z: they are small differences.
        z32, q32 = z.float(), z_q.float()
        codebook_loss = (q32 - z32.detach()).pow(2).mean(dim=(1, 2, 3))
        commitment_loss = (q32.detach() - z32).pow(2).mean(dim=(1, 2, 3))
        if self.beta_on == "commitment":
            loss = codebook_loss + self.beta * commitment_loss
        else:
            loss = self.beta * codebook_loss + commitment_loss
        quantized = z + (z_q.to(z.dtype) - z).detach()
        return QuantizerOutput(quantized, indices, codebook_loss, commitment_loss, loss)

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, beta_on={self.beta_on!r}"


@dataclass
class DualQuantizerOutput:
    """Result of the dual codebook (paper Eq. 1).

    quantized: (B, C, h, w) Zq = Zq1 + alpha * mask * Zq2, straight-through to z.
    common: the common codebook's result.
    hq: the HQ+ codebook's result with its `quantized` and per-sample losses multiplied by the
        mask (exactly zero for samples with S <= S_thr); None with a single codebook.
    hq_mask: (B,) bool, S > S_thr (all False with a single codebook).
    """

    quantized: Tensor
    common: QuantizerOutput
    hq: QuantizerOutput | None
    hq_mask: Tensor

    @property
    def indices_common(self) -> Tensor:
        return self.common.indices

    @property
    def indices_hq(self) -> Tensor | None:
        return None if self.hq is None else self.hq.indices

    @property
    def loss(self) -> Tensor:
        """(B,) total quantization loss, the HQ+ part already masked."""
        return self.common.loss if self.hq is None else self.common.loss + self.hq.loss


class DualCodebookQuantizer(nn.Module):
    """Common and HQ+ codebooks quantizing the same latent (paper 3.1).

    Both codebooks quantize every sample (their codes are also the stage-2 targets); the HQ+
    contribution and its losses are kept only where S > S_thr. The masking multiplies by
    zero instead of skipping, so the HQ+ codebook stays in the autograd graph (zero gradients
    rather than missing ones, which DDP requires without find_unused_parameters).

    With dual=False there is a single (common) codebook: the single-codebook ablation behind
    the same interface (quality is then optional and ignored).
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        beta_on: str = "commitment",
        alpha: float = 0.8,
        threshold: float = 0.70,
        dual: bool = True,
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.threshold = threshold
        self.dual = dual
        self.common = VectorQuantizer(num_codes, dim, beta, beta_on)
        self.hq = VectorQuantizer(num_codes, dim, beta, beta_on) if dual else None

    def init_from(self, z: Tensor, generator: torch.Generator | None = None) -> None:
        """Data-dependent initialisation of both codebooks from encoder outputs (see VectorQuantizer)."""
        self.common.init_from(z, generator)
        if self.hq is not None:
            self.hq.init_from(z, generator)

    def hq_mask(self, quality: Tensor | float | None, batch: int, device: torch.device) -> Tensor:
        """(B,) bool: S > S_thr. Quality None means every sample (the official stage-2 targets)."""
        if not self.dual:
            return torch.zeros(batch, dtype=torch.bool, device=device)
        if quality is None:
            return torch.ones(batch, dtype=torch.bool, device=device)
        return check_quality(quality, batch, device=device) > self.threshold

    def forward(self, z: Tensor, quality: Tensor | float | None) -> DualQuantizerOutput:
        """z (B, C, h, w), quality (B,) in [0, 1] -> DualQuantizerOutput.

        quality=None applies the HQ+ branch to every sample (stage-2 code targets, as in the
        official code); a single-codebook quantizer ignores quality.
        """
        common = self.common(z)
        mask = self.hq_mask(quality, z.shape[0], z.device)
        if self.hq is None:
            return DualQuantizerOutput(common.quantized, common, None, mask)
        hq = self.hq(z)
        m = mask.to(hq.loss.dtype)
        hq = QuantizerOutput(
            quantized=hq.quantized * mask.to(z.dtype)[:, None, None, None],
            indices=hq.indices,
            codebook_loss=hq.codebook_loss * m,
            commitment_loss=hq.commitment_loss * m,
            loss=hq.loss * m,
        )
        return DualQuantizerOutput(common.quantized + self.alpha * hq.quantized, common, hq, mask)

    def lookup(
        self,
        indices_common: Tensor,
        indices_hq: Tensor | None = None,
        alpha: float | None = None,
        hq_mask: Tensor | None = None,
    ) -> Tensor:
        """Fused code vectors Z = Z1 + alpha * mask * Z2 (paper Eqs. 1 and 3), (B, C, h, w).

        indices_* (B, h, w) long. alpha defaults to the configured one; hq_mask (B,) bool
        defaults to all True (the HQ+ branch always on, as at inference). With a single
        codebook or indices_hq=None, returns the common codes only.
        """
        out = self.common.lookup(indices_common)
        if self.hq is None or indices_hq is None:
            return out
        alpha = self.alpha if alpha is None else alpha
        z2 = self.hq.lookup(indices_hq)
        if hq_mask is not None:
            z2 = z2 * hq_mask.to(z2.dtype)[:, None, None, None]
        return out + alpha * z2

    def extra_repr(self) -> str:
        return f"dual={self.dual}, alpha={self.alpha}, threshold={self.threshold}"
