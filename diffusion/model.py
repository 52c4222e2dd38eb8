"""The denoising network: noisy image [B, C, H, W] + timestep [B] + condition tokens -> predicted noise [B, C, H, W].

A DiT-style transformer (Peebles & Xie 2023, adaLN-Zero) made of timm building blocks (PatchEmbed,
Attention, Mlp, sin-cos position embedding), with a cross-attention layer per block. The condition is
KNN-Diffusion's (Sheynin et al. 2023, sec. 3): the query CLIP embedding [B, D] and the CLIP embeddings of
its k retrieved neighbours [B, k, D], each projected to the model width and marked by a type embedding.
The network attends to them by cross-attention, and their mean, projected, is added to the timestep
embedding. Learned null tokens replace the condition for classifier-free guidance. The network knows
nothing of noise schedules: it sees t as a number.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps [B] (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class CrossAttention(nn.Module):
    """Image tokens [B, N, W] attend to condition tokens [B, M, W]."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        h = self.num_heads
        q = self.q(x).view(b, n, h, w // h).transpose(1, 2)
        k, v = self.kv(cond).view(b, cond.shape[1], 2, h, w // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Self-attention, cross-attention to the condition, MLP; each pre-normed and gated by adaLN-Zero."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float) -> None:
        from timm.layers import Attention, Mlp  # here, not at the top: see KnnDenoiser

        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.cross = CrossAttention(width, num_heads)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 9 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2, s3, sc3, g3 = self.ada(c).chunk(9, dim=-1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1))
        x = x + g2[:, None] * self.cross(modulate(self.norm2(x), s2, sc2), cond)
        return x + g3[:, None] * self.mlp(modulate(self.norm3(x), s3, sc3))


class ConditionTokens(nn.Module):
    """KNN-Diffusion's condition as tokens [B, 1 + k, W] (or [B, 1, W] without kNN): the query CLIP embedding
    [B, D] and its k neighbours' [B, k, D], each projected to the width W and marked by a type embedding.

    valid [B, k] marks real neighbours (missing ones, id -1 in the table, become that slot's null token);
    drop [B] replaces the whole condition by the learned null tokens (classifier-free guidance); drop_query [B]
    replaces the query token alone, so that the network learns to draw from the neighbours (at training the
    query is the image's own embedding, at inference a text embedding). Shared by every backbone.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.num_tokens = 1 + (config.k if config.use_knn else 0)
        self.proj = nn.Linear(config.cond_dim, w)
        self.type_embed = nn.Parameter(torch.zeros(2, w))  # 0: query, 1: neighbour
        self.null_tokens = nn.Parameter(torch.randn(self.num_tokens, w) * 0.02)

    def forward(
        self,
        query: torch.Tensor,
        neighbours: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
        drop_query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tokens = (self.proj(query.to(self.proj.weight.dtype)) + self.type_embed[0])[:, None]
        if drop_query is not None and self.config.use_knn:  # without neighbours it would drop everything
            tokens = torch.where(drop_query[:, None, None], self.null_tokens[:1].expand_as(tokens), tokens)
        if self.config.use_knn:
            if neighbours is None:
                raise ValueError(
                    "this model was configured with use_knn: it needs neighbour embeddings [B, k, D]"
                )
            if neighbours.shape[1] != self.config.k:
                raise ValueError(f"expected {self.config.k} neighbours per sample, got {neighbours.shape[1]}")
            nb = self.proj(neighbours.to(self.proj.weight.dtype)) + self.type_embed[1]
            if valid is not None:
                nb = torch.where(valid[..., None], nb, self.null_tokens[1:].expand_as(nb))
            tokens = torch.cat([tokens, nb], dim=1)
        if drop is not None:
            tokens = torch.where(drop[:, None, None], self.null_tokens.expand_as(tokens), tokens)
        return tokens


class KnnDenoiser(nn.Module):
    """forward(x [B,C,H,W], t [B], query [B,D], neighbours [B,k,D] | None, valid [B,k] | None, drop [B] | None,
    drop_query [B] | None); the condition arguments are ConditionTokens'."""

    def __init__(self, config: ModelConfig) -> None:
        # timm is imported where the DiT is built, not with this module: the UNet imports ConditionTokens from
        # here, and importing timm adds 1.6-1.8 s to every training worker's start on a slow 2-core VM
        from timm.layers import PatchEmbed, build_sincos2d_pos_embed

        super().__init__()
        self.config = config
        w = config.width
        self.patch = PatchEmbed(config.grid_size, config.patch_size, config.grid_channels, w)
        grid = config.grid_size // config.patch_size
        pos = build_sincos2d_pos_embed([grid, grid], w)
        self.register_buffer("pos", pos.reshape(1, grid * grid, w), persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.cond = ConditionTokens(config)
        self.pool_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList(Block(w, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.final = nn.Linear(w, config.patch_size**2 * config.grid_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        for layer in (self.final_ada[-1], self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        query: torch.Tensor,
        neighbours: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
        drop_query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cond = self.cond(query, neighbours, valid, drop, drop_query)
        c = self.t_mlp(timestep_embedding(t, self.config.width).to(cond.dtype)) + self.pool_mlp(
            cond.mean(dim=1)
        )
        h = self.patch(x) + self.pos
        for block in self.blocks:
            h = block(h, c, cond)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        h = self.final(modulate(self.final_norm(h), shift, scale))
        return self.unpatchify(h)

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        p, c = self.config.patch_size, self.config.grid_channels
        g = self.config.grid_size // p
        h = h.view(h.shape[0], g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", h).reshape(h.shape[0], c, g * p, g * p)


def build_network(config: ModelConfig, num_timesteps: int = 1000) -> nn.Module:
    """The network config.arch names: "unet" (KnnUNet), "dit" (KnnDenoiser) or "autoencoder" (the tokenizer);
    for the discrete backbone, that network inside diffusion.discrete.TokenDenoiser (num_timesteps: its T)."""
    if config.backbone == "discrete":
        from diffusion.discrete import TokenDenoiser

        return TokenDenoiser(config, num_timesteps)
    if config.arch == "autoencoder":
        from diffusion.tokenizer import Autoencoder

        return Autoencoder(config)
    if config.arch == "unet":
        from diffusion.unet import KnnUNet

        return KnnUNet(config)
    return KnnDenoiser(config)
