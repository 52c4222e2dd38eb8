"""The tokenizer stage: a small convolutional autoencoder that the generator denoises the latents of.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"): the
autoencoder is trained first, on the database's own images, to reconstruct them through a grid of
image_size / 2^(levels-1) cells; the denoiser then learns in that smaller space and its samples are decoded.
On 2 CPU cores this is what makes shapes appear in the demo's budget: the decoder draws the edges, and the
denoiser's steps are 4x cheaper (16 x 16 x 4 latents for 32 px images).

The autoencoder is one more network of diffusion/train.py's loop (model arch "autoencoder"): the same data
path, Ray Train workers, EMA, checkpoints and resume; only its loss differs (autoencoder_loss). After
training, export() writes the tokenizer file the generator reads: the EMA weights, the network config, and
the latents' mean and standard deviation over the training images (the denoiser sees unit-scale latents,
LDM's scale factor), plus the reconstruction error on held-out images.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusion.config import ModelConfig

FORMAT = "knn-diffusion-tokenizer/1"


class _Res(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(x)))


class Autoencoder(nn.Module):
    """encode(x [B,3,S,S] in [-1,1]) -> z [B,latent_channels,S/f,S/f]; decode(z) -> x; forward(x) -> (x_hat, z).

    widths: channels per level; every level after the first halves the image (a stride-2 conv, then a
    residual block); the decoder mirrors it with transposed convolutions."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        w = config.widths
        enc: list[nn.Module] = [nn.Conv2d(config.channels, w[0], 3, padding=1), nn.SiLU(), _Res(w[0])]
        for c_in, c_out in zip(w[:-1], w[1:], strict=True):
            enc += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU(), _Res(c_out)]
        enc += [nn.Conv2d(w[-1], config.latent_channels, 1)]
        dec: list[nn.Module] = [
            nn.Conv2d(config.latent_channels, w[-1], 3, padding=1),
            nn.SiLU(),
            _Res(w[-1]),
        ]
        for c_in, c_out in zip(w[:0:-1], w[-2::-1], strict=True):
            dec += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU(), _Res(c_out)]
        dec += [nn.Conv2d(w[0], config.channels, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        self.quantizer = None
        if config.fsq_levels:  # finite scalar quantisation: no codebook to collapse, no auxiliary losses
            from vector_quantize_pytorch import FSQ

            self.quantizer = FSQ(levels=list(config.fsq_levels), dim=config.latent_channels)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (quantised first, for a quantising autoencoder) -> images."""
        if self.quantizer is not None:
            z = self.quantizer(z)[0]
        return self.decoder(z)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> codes [B, S/f, S/f] int64 (quantising autoencoders only)."""
        return self.quantizer(self.encode(x))[1].long()

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantizer.indices_to_codes(tokens))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z


def autoencoder_loss(model: nn.Module, x0: torch.Tensor, latent_penalty: float = 1e-4) -> torch.Tensor:
    """L1 + L2 reconstruction error, plus a small L2 pull on the latents so their scale stays bounded."""
    x_hat, z = model(x0)
    err = x_hat.float() - x0.float()
    return err.abs().mean() + err.pow(2).mean() + latent_penalty * z.float().pow(2).mean()


class Tokenizer(nn.Module):
    """A trained autoencoder with its latent statistics: encode() gives unit-scale latents, decode() images."""

    def __init__(self, config: ModelConfig, mean: float, std: float) -> None:
        super().__init__()
        self.config = config
        self.autoencoder = Autoencoder(config)
        self.mean, self.std = float(mean), float(std)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (self.autoencoder.encode(x) - self.mean) / self.std

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z * self.std + self.mean).clamp(-1, 1)

    @torch.no_grad()
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] in [-1, 1] -> codes [B, N] (N = (S/f)^2), for the discrete backbone."""
        return self.autoencoder.tokens(x).flatten(1)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codes [B, N] -> images [B, 3, S, S] in [-1, 1]."""
        side = self.config.image_size // self.config.latent_factor
        return self.autoencoder.decode_tokens(tokens.view(-1, side, side)).clamp(-1, 1)


def read_tokenizer(path: str) -> dict[str, Any]:
    """The tokenizer file's contents (weights_only: tensors and plain containers), with errors that name it."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"tokenizer {path} does not exist; train one with `knn-diffusion tokenizer --db ... --output ...`"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(f"tokenizer {path} cannot be read ({type(err).__name__}); export it again") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a tokenizer file ({FORMAT}); pass the tokenizer stage's tokenizer.pt"
        )
    return state


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> Tokenizer:
    """The Tokenizer in a tokenizer file, in eval mode on the CPU (cached per path; move it where needed)."""
    from diffusion.train import load_weights

    state = read_tokenizer(path)
    config = ModelConfig(**json.loads(state["config"]))
    tokenizer = Tokenizer(config, state["latent_mean"], state["latent_std"])
    load_weights(tokenizer.autoencoder, state["weights"], path, "tokenizer")
    return tokenizer.eval().requires_grad_(False)


def export(
    run: str,
    output: str,
    db: str,
    heldout_parts: list[str] | None = None,
    num_images: int = 1000,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Write <output>/tokenizer.pt (EMA weights, config, latent mean/std), tokenizer.json (its figures) and
    reconstructions.png (held-out images above their reconstructions) from the training run in run."""
    from diffusion.evaluate import part_images
    from diffusion.sample import grid, load_model, save_png, to_uint8
    from retrieval.database import Database
    from retrieval.storage import json_bytes, write_atomic

    model, cfg, step = load_model(run)
    if cfg.model.arch != "autoencoder":
        raise ValueError(f"{run} trained a {cfg.model.arch}, not a tokenizer (model arch autoencoder)")
    database = Database.open(db)
    train_parts = [p for p in database.part_names if p not in cfg.exclude_parts]
    held = [p for p in (heldout_parts or cfg.exclude_parts) if p in database.part_names] or train_parts[-1:]
    rng = np.random.default_rng(0)
    _, train_images, _ = part_images(database, train_parts, cfg.model.image_size)
    train_images = train_images[rng.permutation(len(train_images))[:num_images]]
    _, held_images, _ = part_images(database, held, cfg.model.image_size)

    def batches(images: np.ndarray) -> Any:
        for lo in range(0, len(images), batch_size):
            yield torch.from_numpy(images[lo : lo + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1

    with torch.no_grad():
        z = torch.cat([model.encode(x) for x in batches(train_images)])
        mse, recons = [], []
        for x in batches(held_images):
            x_hat = model.decode(model.encode(x)).clamp(-1, 1)
            mse.append(((x_hat - x) ** 2).flatten(1).mean(1))
            recons.append(x_hat)
    mse_t = torch.cat(mse)
    codebook: dict[str, Any] = {}
    if model.quantizer is not None:  # how much of the codebook the training images use
        with torch.no_grad():
            codes = torch.cat([model.tokens(x).flatten() for x in batches(train_images)])
        counts = torch.bincount(codes, minlength=cfg.model.codebook_size).double()
        p = counts / counts.sum()
        codebook = {
            "codebook_size": cfg.model.codebook_size,
            "codebook_usage": float((counts > 0).double().mean()),
            "perplexity": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())),
        }
    figures = {
        "step": step,
        "latent_shape": list(z.shape[1:]),
        "latent_mean": float(z.mean()),
        "latent_std": float(z.std()),
        "heldout_parts": held,
        "num_heldout": len(held_images),
        "reconstruction_mse": float(mse_t.mean()),  # on [-1, 1] images
        "reconstruction_psnr": float((10 * torch.log10(4.0 / mse_t.clamp(min=1e-10))).mean()),
        "run": run,
        **codebook,
    }
    state = {
        "format": FORMAT,
        "config": json.dumps(cfg.model.__dict__),
        "weights": model.state_dict(),
        "latent_mean": figures["latent_mean"],
        "latent_std": figures["latent_std"],
        "figures": json.dumps(figures),
    }
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "tokenizer.pt")
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    write_atomic(os.path.join(output, "tokenizer.json"), json_bytes(figures))
    n = min(12, len(held_images))
    pair = [*held_images[:n], *to_uint8(torch.cat(recons)[:n])]
    save_png(grid(pair, cols=n), os.path.join(output, "reconstructions.png"))
    load_tokenizer.cache_clear()
    usage = (
        f", {codebook['codebook_size']} codes: {codebook['codebook_usage']:.0%} used, perplexity "
        f"{codebook['perplexity']:.0f}"
        if codebook
        else ""
    )
    print(
        f"tokenizer: {tuple(figures['latent_shape'])} latents{usage}, held-out reconstruction MSE "
        f"{figures['reconstruction_mse']:.4f} (PSNR {figures['reconstruction_psnr']:.1f} dB) on "
        f"{len(held_images)} images -> {path}",
        flush=True,
    )
    return figures


# The tokenizer stage's training (configs/tokenizer.yaml says the same): measured on the demo's 2,500 images,
# 400 steps of 64 reconstruct held-out shapes, colours and backgrounds that the attribute classifier reads at 1.00.
TRAINING = dict(
    steps=400, batch_size_per_worker=64, lr=2e-3, warmup_steps=20, checkpoint_every=200, log_every=20
)


def tokenizer_config(preset: str = "tokenizer", model: dict[str, Any] | None = None, **fields: Any) -> Any:
    """A TrainConfig for the tokenizer: the preset's autoencoder, TRAINING, then fields (db, output, ...)."""
    from diffusion.config import TrainConfig, model_config

    return TrainConfig(model=model_config(preset, **(model or {})), **{**TRAINING, **fields})


def train_tokenizer(config: Any, ray_address: str | None = None) -> dict[str, Any]:
    """Train (or resume) the autoencoder that config describes (model arch "autoencoder") on Ray Train, in
    config.output, then export its tokenizer file there. Returns train's result and the export's figures."""
    from diffusion.train import train

    if config.model.arch != "autoencoder":
        raise ValueError(
            f"the tokenizer's model must have arch autoencoder (e.g. model: preset: tokenizer), got {config.model.arch}"
        )
    result = train(config, ray_address=ray_address)
    figures = export(config.output, config.output, config.db, heldout_parts=config.exclude_parts)
    return {**result, "tokenizer": os.path.join(config.output, "tokenizer.pt"), "figures": figures}
