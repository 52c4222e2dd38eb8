"""Noise schedules and the forward process: timesteps [B] (ints in [0, T)) -> noise levels; x0 -> x_t.

Discrete-time Gaussian diffusion (Ho et al. 2020, "DDPM"): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
(eq. 4), with abar_t = prod_{s<=t} (1 - beta_s). Nothing here knows the network.
"""

from __future__ import annotations

import math

import torch


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008) -> torch.Tensor:
    """abar [T] float64 of the cosine schedule (Nichol & Dhariwal 2021, eq. 17; betas clipped at 0.999)."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


def linear_alphas_cumprod(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """abar [T] float64 of DDPM's linear beta schedule (Ho et al. 2020, sec. 4), rescaled to T steps."""
    scale = 1000 / num_timesteps
    betas = torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas.clamp(max=0.999), dim=0)  # short schedules: beta_end * 1000 / T passes 1


SCHEDULES = {"cosine": cosine_alphas_cumprod, "linear": linear_alphas_cumprod}


def alphas_cumprod(schedule: str, num_timesteps: int) -> torch.Tensor:
    """abar [T] float64 of a named schedule: the one place training and sampling take it from."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    return SCHEDULES[schedule](num_timesteps)


def q_sample(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t [B, ...] = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Ho et al. 2020, eq. 4)."""
    abar = alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def sampling_timesteps(num_timesteps: int, steps: int, strength: float = 1.0) -> list[int]:
    """`steps` timesteps evenly spaced from T-1 down to 0 (all T when steps >= T); with strength < 1 from
    round(strength * (T-1)) down (image-to-image: the first step denoises a partly noised image)."""
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if not 0 < strength <= 1:
        raise ValueError(f"--strength must be in (0, 1], got {strength}")
    first = round(strength * (num_timesteps - 1))
    steps = min(steps, first + 1)
    return sorted({round(x) for x in torch.linspace(first, 0, steps).tolist()}, reverse=True)
