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

How the codes learn (`update`, `restart`; the official behaviour is the default, "loss" with no
restarts, which adds no buffer and changes no number):
- "loss": the codes move by the gradient of the codebook term (VQ-VAE, CodeFormer, IQPIR).
- "ema": the codes are exponential moving averages of the encoder outputs assigned to them
  (van den Oord et al. 2017, appendix A.1; Razavi et al. 2019, VQ-VAE-2): per code,
  N <- d N + (1 - d) n and m <- d m + (1 - d) sum(z assigned), code = m / N with N Laplace
  smoothed. The codebook gets no gradient; the codebook term is still reported.
- restart > 0: dead-code restarts (Dhariwal et al. 2020, Jukebox, section 2.2; Zeghidour et al.
  2021, SoundStream): a code whose moving average of assignments per step falls below
  `restart` times the mean over codes is moved onto an encoder output of the current batch.
Both act in training mode under autograd only (`forward` of a module in `.train()` with
grad enabled); a model in eval mode, or a frozen stage-1 target, never changes its codes.
`lookup(indices)` always returns what `forward` returned for those indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iqpir.models.embedding import check_quality

BETA_PLACEMENTS = ("commitment", "codebook")
CODEBOOK_UPDATES = ("loss", "ema")


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

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, beta_on: str = "commitment",
                 update: str = "loss", decay: float = 0.99, restart: float = 0.0) -> None:
        super().__init__()
        if beta_on not in BETA_PLACEMENTS:
            raise ValueError(f"beta_on {beta_on!r} is not one of {list(BETA_PLACEMENTS)}")
        if update not in CODEBOOK_UPDATES:
            raise ValueError(f"codebook update {update!r} is not one of {list(CODEBOOK_UPDATES)}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"codebook decay must be in [0, 1), got {decay}")
        if restart < 0:
            raise ValueError(f"codebook restart threshold must be >= 0, got {restart}")
        self.num_codes = num_codes
        self.dim = dim
        self.beta = beta
        self.beta_on = beta_on
        self.update = update
        self.decay = decay
        self.restart = restart
        # (num_codes, dim) code vectors. The VQGAN lineage's initialisation: codes start near
        # zero, inside the encoder's range.
        self.codebook = nn.Parameter(torch.empty(num_codes, dim), requires_grad=update == "loss")
        nn.init.uniform_(self.codebook, -1.0 / num_codes, 1.0 / num_codes)
        if self.tracks_usage:
            # Moving average of the assignments of each code per training step (one unit of
            # weight per code to start, so the first averages are not divisions by zero).
            self.register_buffer("usage", torch.ones(num_codes))
        if update == "ema":
            self.register_buffer("code_sum", self.codebook.detach().clone())

    @property
    def tracks_usage(self) -> bool:
        return self.update == "ema" or self.restart > 0

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
        if self.update == "ema":
            self.code_sum.copy_(self.codebook * self.usage[:, None])

    @torch.no_grad()
    def _learn(self, z: Tensor, indices: Tensor, mask: Tensor | None) -> None:
        """EMA update and dead-code restarts from one training batch (see the module docstring).

        z (B, dim, h, w) and indices (B, h, w) of the batch; mask (B,) bool selects the samples
        this codebook learns from (the HQ+ codebook: S > S_thr), None for all. Under
        torch.distributed the counts and sums are summed over ranks and rank 0's restarts are
        broadcast, so every rank keeps the same codebook.
        """
        if mask is not None:
            z, indices = z[mask], indices[mask]
        flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, self.dim)
        idx = indices.reshape(-1)
        counts = torch.bincount(idx, minlength=self.num_codes).float()
        sums = torch.zeros(self.num_codes, self.dim, device=flat.device).index_add_(0, idx, flat)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        if counts.sum() == 0:  # no sample of this codebook anywhere in the batch
            return
        d = self.decay
        self.usage.mul_(d).add_(counts, alpha=1 - d)
        if self.update == "ema":
            self.code_sum.mul_(d).add_(sums.to(self.code_sum), alpha=1 - d)
            total = self.usage.sum()
            eps = 1e-5  # Laplace smoothing of the counts, so a rarely used code stays finite
            smoothed = (self.usage + eps) / (total + self.num_codes * eps) * total
            self.codebook.copy_((self.code_sum / smoothed[:, None]).to(self.codebook))
        if self.restart > 0 and len(flat):
            mean = self.usage.mean()
            dead = (self.usage < self.restart * mean).nonzero().flatten()
            if len(dead):
                pick = torch.randint(len(flat), (len(dead),), device=flat.device)
                self.codebook[dead] = flat[pick].to(self.codebook)
                self.usage[dead] = mean
                if self.update == "ema":
                    self.code_sum[dead] = flat[pick].to(self.code_sum) * mean
            if distributed:
                for t in (self.codebook, self.usage, *((self.code_sum,) if self.update == "ema" else ())):
                    torch.distributed.broadcast(t.data, src=0)

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, h, w) long -> (B, dim, h, w) code vectors."""
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor, learn_mask: Tensor | None = None) -> QuantizerOutput:
        """z (B, dim, h, w) -> QuantizerOutput (see its fields).

        With an EMA update or restarts, a training-mode forward under autograd first learns from
        the samples of `learn_mask` ((B,) bool, None = all) and then quantizes with the
        updated codes, so the output is always the lookup of the returned indices.
        """
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"expected z of shape (B, {self.dim}, h, w), got {tuple(z.shape)}")
        indices = self.nearest(z.detach())
        if self.tracks_usage and self.training and torch.is_grad_enabled():
            self._learn(z, indices, learn_mask)
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
        extra = f", update={self.update!r}, decay={self.decay}" if self.update != "loss" else ""
        extra += f", restart={self.restart}" if self.restart else ""
        return f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, beta_on={self.beta_on!r}{extra}"


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
        update: str = "loss",
        decay: float = 0.99,
        restart: float = 0.0,
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.threshold = threshold
        self.dual = dual
        learning = dict(update=update, decay=decay, restart=restart)
        self.common = VectorQuantizer(num_codes, dim, beta, beta_on, **learning)
        self.hq = VectorQuantizer(num_codes, dim, beta, beta_on, **learning) if dual else None

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
        hq = self.hq(z, learn_mask=mask)  # the HQ+ codes learn from S > S_thr only, as their loss
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
