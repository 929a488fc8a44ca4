"""Code-prediction Transformer T (paper 3.2; CodeFormer's sizes: 9 layers, width 512, 8 heads,
MLP 1024, pre-norm, learned position embedding over the h*w tokens).

It reads the conditioned latent Z_l' (B, C, h, w) as h*w tokens (row-major), projects them to
the width, and predicts per token logits over the common codebook and, with the dual codebook,
over the HQ+ codebook. As in CodeFormer (after DETR), the position embedding is added to the
queries and keys of every layer, never to the values or the residual stream.

The official IQPIR head is one LayerNorm + Linear(width -> 2K) whose outputs are read per token
as (K, 2): slot 0 scores the HQ+ codebook, slot 1 the common one. Here they are two bias-free
K-wide heads after one LayerNorm (`iqpir.official` maps rows 0::2 and 1::2 onto them).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iqpir.models.init import normal_

INITS = ("official", "small")


class SelfAttention(nn.Module):
    """Multi-head self-attention, (B, N, width) -> (B, N, width), no mask.

    `qkv` is one (3*width, width) projection, rows [q; k; v] (nn.MultiheadAttention's
    in_proj layout). forward(x, pos) attends with queries and keys from x + pos, values from x.
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        if pos is None:
            qkv = self.qkv(x)
        else:
            w, bias = self.qkv.weight, self.qkv.bias
            qk = F.linear(x + pos, w[: 2 * d], bias[: 2 * d])
            qkv = torch.cat([qk, F.linear(x, w[2 * d :], bias[2 * d :])], dim=-1)
        q, k, v = qkv.view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerLayer(nn.Module):
    """Pre-norm layer: x + Attn(LN(x), pos), then x + MLP(LN(x)) with GELU."""

    def __init__(self, width: int, heads: int, mlp: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp, width), nn.Dropout(dropout)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), pos))
        return x + self.mlp(self.norm2(x))


class CodeTransformer(nn.Module):
    """T: Z_l' (B, in_channels, h, w) -> (logits_common (B, h*w, K), logits_hq (B, h*w, K) or None).

    Args:
        in_channels: latent channels C.
        tokens: h * w (the learned position embedding is fixed to it).
        codebook_size: K.
        layers, width, heads, mlp, dropout: the Transformer's sizes.
        dual: a second head for the HQ+ codebook.
        init: "official" (CodeFormer/IQPIR as released: PyTorch's default Linear and LayerNorm
            initialisation, a zero position embedding) or "small" (GPT-style N(0, 0.02)
            weights, zero biases and a N(0, 0.02) position embedding).
    """

    def __init__(
        self,
        in_channels: int,
        tokens: int,
        codebook_size: int,
        layers: int = 9,
        width: int = 512,
        heads: int = 8,
        mlp: int = 1024,
        dropout: float = 0.0,
        dual: bool = True,
        init: Literal["official", "small"] = "official",
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init {init!r} is not one of {list(INITS)}")
        self.tokens = tokens
        self.proj_in = nn.Linear(in_channels, width)
        self.pos_emb = nn.Parameter(torch.zeros(tokens, width))
        self.layers = nn.ModuleList(TransformerLayer(width, heads, mlp, dropout) for _ in range(layers))
        self.norm_out = nn.LayerNorm(width)
        self.head_common = nn.Linear(width, codebook_size, bias=False)
        self.head_hq = nn.Linear(width, codebook_size, bias=False) if dual else None
        if init == "small":
            self._init_small()

    def _init_small(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        normal_(self.pos_emb, 0.0, 0.02)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        b, c, h, w = z.shape
        if h * w != self.tokens:
            raise ValueError(
                f"the Transformer was built for {self.tokens} tokens, got a {h}x{w} latent; "
                "feed images of model.image_size (restore tiles larger images)"
            )
        x = self.proj_in(z.flatten(2).transpose(1, 2))
        pos = self.pos_emb.to(x.dtype)
        for layer in self.layers:
            x = layer(x, pos)
        x = self.norm_out(x)
        return self.head_common(x), None if self.head_hq is None else self.head_hq(x)
