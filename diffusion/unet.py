"""The convolutional denoiser: noisy image [B, C, H, W] + timestep [B] + condition tokens -> prediction [B, C, H, W].

A UNet in the style of ADM / GLIDE (Dhariwal & Nichol 2021; Nichol et al. 2022), which the paper's continuous
decoder follows: residual blocks at every resolution, halving the size between levels, skip connections from
the down path to the up path. The condition reaches it twice (Sheynin et al. 2023, sec. 3): the pooled
condition tokens are added to the timestep embedding, which scales and shifts every block's normalised
activations (FiLM), and at the low resolutions (<= attn_resolution) the pixels attend to the condition
tokens (the query and its k neighbours) by cross-attention, after a self-attention layer. Convolutions learn
the local structure of shapes and edges in minutes on a CPU where a patch transformer in pixel space does not
(shared/notes/generator-feasibility.md). Like every network here it knows nothing of noise schedules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.config import ModelConfig
from diffusion.model import ConditionTokens, timestep_embedding


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the embedding [B, E] scales and shifts the second normalisation (FiLM)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (through its skip)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class AttentionBlock(nn.Module):
    """Self-attention over the pixels, then cross-attention from the pixels to the condition tokens [B, M, W]."""

    def __init__(self, channels: int, cond_width: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = _norm(channels)
        self.self_attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.norm2 = _norm(channels)
        self.cross_attn = nn.MultiheadAttention(
            channels, num_heads, kdim=cond_width, vdim=cond_width, batch_first=True
        )
        for attn in (self.self_attn, self.cross_attn):  # start as the identity
            nn.init.zeros_(attn.out_proj.weight)
            nn.init.zeros_(attn.out_proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm1(x).flatten(2).transpose(1, 2)
        x = x + self.self_attn(t, t, t, need_weights=False)[0].transpose(1, 2).reshape(b, c, h, w)
        t = self.norm2(x).flatten(2).transpose(1, 2)
        return x + self.cross_attn(t, cond, cond, need_weights=False)[0].transpose(1, 2).reshape(b, c, h, w)


class KnnUNet(nn.Module):
    """forward(x [B,C,H,W], t [B], query [B,D], neighbours [B,k,D] | None, valid [B,k] | None, drop [B] | None,
    drop_query [B] | None, source [B,C,H,W] | None) -> [B,C,H,W]; the condition arguments are ConditionTokens';
    source: the image an editing model (config.edit) edits, in x's space."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths, emb = list(config.widths), config.width
        self.cond = ConditionTokens(config)
        self.t_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.pool_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        p = config.patch_size  # > 1: the first level works on p x p pixel patches (space-to-depth), for speed
        inputs = config.grid_channels * (2 if config.edit else 1)  # an editing model also reads the source
        self.stem = nn.Sequential(nn.PixelUnshuffle(p), nn.Conv2d(inputs * p * p, widths[0], 3, padding=1))
        self.down = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, c, res = [widths[0]], widths[0], config.grid_size // p
        for level, width in enumerate(widths):
            for _ in range(config.blocks_per_level):
                self.down.append(ResBlock(c, width, emb))
                self.down_attn.append(self._attn(width, res))
                c = width
                skips.append(c)
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res //= 2
        self.mid1, self.mid_attn, self.mid2 = ResBlock(c, c, emb), self._attn(c, 0), ResBlock(c, c, emb)
        self.up = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(config.blocks_per_level + 1):
                self.up.append(ResBlock(c + skips.pop(), width, emb))
                self.up_attn.append(self._attn(width, res))
                c = width
            if level > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
                res *= 2
        self.out_norm = _norm(c)
        self.out = nn.Sequential(nn.Conv2d(c, config.grid_channels * p * p, 3, padding=1), nn.PixelShuffle(p))
        nn.init.zeros_(self.out[0].weight)
        nn.init.zeros_(self.out[0].bias)

    def _attn(self, channels: int, resolution: int) -> nn.Module:
        if resolution > self.config.attn_resolution:
            return nn.Identity()
        return AttentionBlock(channels, self.config.width, self.config.num_heads)

    @staticmethod
    def _attend(block: nn.Module, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return h if isinstance(block, nn.Identity) else block(h, cond)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        query: torch.Tensor,
        neighbours: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
        drop_query: torch.Tensor | None = None,
        source: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cond = self.cond(query, neighbours, valid, drop, drop_query)
        emb = self.t_mlp(timestep_embedding(t, self.config.width).to(cond.dtype)) + self.pool_mlp(
            cond.mean(dim=1)
        )
        if self.config.edit:  # the source is never dropped: guidance contrasts the embedding alone
            if source is None or source.shape != x.shape:
                raise ValueError(
                    f"an editing model needs source= of the input's shape {tuple(x.shape)}, got "
                    f"{None if source is None else tuple(source.shape)}"
                )
            x = torch.cat([x, source.to(x.dtype)], dim=1)
        h = self.stem(x)
        hs = [h]
        blocks = iter(zip(self.down, self.down_attn, strict=True))
        for level in range(len(self.config.widths)):
            for _ in range(self.config.blocks_per_level):
                block, attn = next(blocks)
                h = self._attend(attn, block(h, emb), cond)
                hs.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid2(self._attend(self.mid_attn, self.mid1(h, emb), cond), emb)
        blocks = iter(zip(self.up, self.up_attn, strict=True))
        for i in range(len(self.config.widths)):
            for _ in range(self.config.blocks_per_level + 1):
                block, attn = next(blocks)
                h = self._attend(attn, block(torch.cat([h, hs.pop()], dim=1), emb), cond)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))
