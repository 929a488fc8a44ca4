"""Code-prediction Transformer T (paper 3.2; CodeFormer's sizes: 9 layers, width 512, 8 heads,
MLP 1024, pre-norm, learned position embedding over the h*w tokens).

It reads the conditioned latent Z_l' (B, C, h, w) as h*w tokens (row-major) and predicts,
per token, logits over the common codebook and, with the dual codebook, over the HQ+
codebook (two bias-free linear heads; the official code uses one 2K-wide head with
interleaved slots, which is the same map up to a permutation of its rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iqpir.models.init import normal_


class SelfAttention(nn.Module):
    """Multi-head self-attention, (B, N, width) -> (B, N, width), no mask."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerLayer(nn.Module):
    """Pre-norm layer: x + Attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, width: int, heads: int, mlp: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp, width), nn.Dropout(dropout)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class CodeTransformer(nn.Module):
    """T: Z_l' (B, in_channels, h, w) -> (logits_common (B, h*w, K), logits_hq (B, h*w, K) or None).

    Args:
        in_channels: latent channels C.
        tokens: h * w (the learned position embedding is fixed to it).
        codebook_size: K.
        layers, width, heads, mlp, dropout: the Transformer's sizes.
        dual: a second head for the HQ+ codebook.
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
    ) -> None:
        super().__init__()
        self.tokens = tokens
        self.proj_in = nn.Linear(in_channels, width)
        self.pos_emb = nn.Parameter(torch.empty(tokens, width))
        self.layers = nn.ModuleList(TransformerLayer(width, heads, mlp, dropout) for _ in range(layers))
        self.norm_out = nn.LayerNorm(width)
        self.head_common = nn.Linear(width, codebook_size, bias=False)
        self.head_hq = nn.Linear(width, codebook_size, bias=False) if dual else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-style initialisation (as CodeFormer's Transformer): N(0, 0.02) weights, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        normal_(self.pos_emb, 0.0, 0.02)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        b, c, h, w = z.shape
        if h * w != self.tokens:
            raise ValueError(
                f"the Transformer was built for {self.tokens} tokens, got a {h}x{w} latent; "
                "feed images of model.image_size (restore tiles larger images)"
            )
        x = self.proj_in(z.flatten(2).transpose(1, 2)) + self.pos_emb
        for layer in self.layers:
            x = layer(x)
        x = self.norm_out(x)
        return self.head_common(x), None if self.head_hq is None else self.head_hq(x)
