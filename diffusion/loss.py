"""Training loss: a batch of clean images x0 [B, C, H, W] in [-1, 1] + condition -> scalar loss.

L_simple of Ho et al. 2020 (eq. 14): the network predicts the noise added at a uniformly drawn timestep.
Condition dropout for classifier-free guidance (Ho & Salimans 2022) is decided here, not in the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusion.schedule import q_sample


def diffusion_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    cond: dict[str, torch.Tensor],
    alphas_cumprod: torch.Tensor,
    cond_drop_prob: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """E_t,eps || eps - model(x_t, t, cond) ||^2 with the condition dropped with probability cond_drop_prob."""
    b = x0.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (b,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    drop = torch.rand(b, device=x0.device, generator=generator) < cond_drop_prob
    pred = model(q_sample(x0, t, noise, alphas_cumprod), t, drop=drop, **cond)
    return F.mse_loss(pred.float(), noise.float())
