"""Preconditioning: what the raw network predicts <-> the noise eps the samplers use, and the training target.

prediction "eps": the network predicts the added noise (Ho et al. 2020, eq. 14).
prediction "v": it predicts v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, "Progressive
distillation", sec. 4 and appendix D), whose scale stays ~1 at every noise level; at high noise it asks for
the image itself rather than the noise, which is where shapes are decided. Given x_t = sqrt(abar) x0 +
sqrt(1 - abar) eps, eps = sqrt(abar) v + sqrt(1 - abar) x_t.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PREDICTIONS = ("eps", "v")


def _bcast(abar: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return abar.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def prediction_target(
    x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor, prediction: str
) -> torch.Tensor:
    """What the network should output for x_t made from x0 and noise at noise level abar [B]."""
    if prediction == "eps":
        return noise
    a = _bcast(abar, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def eps_from_output(
    out: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction: str
) -> torch.Tensor:
    """The noise estimate [B, ...] from the network's output at x_t (inverse of prediction_target)."""
    if prediction == "eps":
        return out
    a = _bcast(abar, out)
    return a.sqrt() * out + (1 - a).sqrt() * x_t.to(out.dtype)


class EpsDenoiser(nn.Module):
    """model(x_t, t, **cond) -> eps [B, ...], whatever the wrapped network predicts: what every sampler calls."""

    def __init__(self, net: nn.Module, alphas_cumprod: torch.Tensor, prediction: str) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.net, self.prediction = net, prediction
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        out = self.net(x, t, **cond)
        return eps_from_output(out, x, self.alphas_cumprod[t], self.prediction)
