"""Training loss: a batch of clean images x0 [B, C, H, W] in [-1, 1] + condition -> scalar loss.

The network's target is the noise (L_simple, Ho et al. 2020, eq. 14) or v (Salimans & Ho 2022), see
diffusion.precond, at a uniformly drawn timestep; optionally weighted by min-SNR-gamma (Hang et al. 2023,
"Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 9: min(SNR, gamma) / SNR for eps, / (SNR + 1)
for v), which stops the nearly clean timesteps from dominating. Condition dropout for classifier-free guidance
(Ho & Salimans 2022), and dropping the query token alone, are decided here, not in the network.
"""

from __future__ import annotations

import torch

from diffusion.precond import prediction_target
from diffusion.schedule import q_sample


def diffusion_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    cond: dict[str, torch.Tensor],
    alphas_cumprod: torch.Tensor,
    cond_drop_prob: float,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
    query_drop_prob: float = 0.0,
    min_snr_gamma: float = 0.0,
) -> torch.Tensor:
    """E_t,eps w(t) || target - model(x_t, t, cond) ||^2; the whole condition dropped with probability
    cond_drop_prob, the query token alone with query_drop_prob; w = 1 unless min_snr_gamma > 0."""
    b = x0.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (b,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    drop = torch.rand(b, device=x0.device, generator=generator) < cond_drop_prob
    extra = {}
    if query_drop_prob > 0:
        extra["drop_query"] = torch.rand(b, device=x0.device, generator=generator) < query_drop_prob
    abar = alphas_cumprod.to(x0.device)[t]
    pred = model(q_sample(x0, t, noise, alphas_cumprod), t, drop=drop, **extra, **cond)
    target = prediction_target(x0, noise, abar, prediction)
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if min_snr_gamma > 0:
        snr = (abar / (1 - abar)).float()
        weight = snr.clamp(max=min_snr_gamma) / (snr + 1 if prediction == "v" else snr)
        per_sample = per_sample * weight
    return per_sample.mean()
