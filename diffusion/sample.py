"""Sampling: a checkpoint + prompts + any database (or aesthetic band) -> grid.png, neighbours.png, samples.json.

The condition at inference (Sheynin et al. 2023, sec. 3.2) is the CLIP text embedding of the prompt plus
the CLIP image embeddings of its k nearest images in the chosen database. The database is a choice made
here, not at training time: swapping it (or its band) changes what the samples look like.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffusion.config import TrainConfig
from retrieval.storage import image_bytes, json_bytes, write_atomic

if TYPE_CHECKING:
    from diffusion.samplers import Generator


@dataclasses.dataclass
class SampleConfig:
    """checkpoint: a run folder (latest checkpoint used) or a state.pt. database: folder or catalogue name.
    prompts: the prompts; prompt_file: one prompt per line (added to prompts). truncation: the discrete
    backbone's r (diffusion.discrete.truncate; None: discrete.TRUNCATION; 1: none).
    """

    checkpoint: str
    database: str
    output: str
    prompts: list[str] | None = None
    prompt_file: str | None = None
    band: str | None = None
    catalogue: str | None = None
    k: int | None = None
    guidance: float = 3.0
    steps: int = 20
    sampler: str = "dpmpp_2m_sde"
    seed: int = 0
    num_per_prompt: int = 4
    use_ema: bool = True
    device: str | None = None
    batch_size: int = 64
    truncation: float | None = None

    def __post_init__(self) -> None:
        from diffusion.discrete import truncation_or_default
        from diffusion.samplers import SAMPLERS

        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        truncation_or_default(self.truncation)  # refused here, before anything loads
        if self.num_per_prompt < 1:
            raise ValueError(f"--num-per-prompt must be >= 1, got {self.num_per_prompt}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")

    def all_prompts(self) -> list[str]:
        prompts = list(self.prompts or [])
        if self.prompt_file:
            if not os.path.exists(self.prompt_file):
                raise FileNotFoundError(f"--prompt-file {self.prompt_file} does not exist")
            with open(self.prompt_file) as f:
                prompts += [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ValueError("no prompts: pass --prompts or --prompt-file")
        return prompts


def default_device() -> str:
    """cuda when there is a GPU, else cpu: sampling is deterministic for a seed on either (the noise is drawn on
    the CPU and moved)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(checkpoint: str, use_ema: bool = True) -> tuple[torch.nn.Module, TrainConfig, int]:
    """(model in eval mode, its training config, its step) from a run folder or state.pt (weights_only)."""

    from diffusion.model import build_network
    from diffusion.train import latest_checkpoint, load_weights, read_state

    path = latest_checkpoint(checkpoint)
    state = read_state(path)
    try:
        config = TrainConfig.from_dict(json.loads(state["config"]))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"checkpoint {path}: its training config cannot be read ({err})") from err
    model = build_network(config.model, config.num_timesteps)
    load_weights(model, state["ema" if use_ema else "model"], path, "EMA" if use_ema else "model")
    return model.eval(), config, int(state["step"])


def check_clip(db: Any, config: TrainConfig) -> None:
    """Refuse a database embedded by another CLIP than the one the model was trained on (same width or not:
    two CLIPs' spaces do not mix)."""
    from retrieval.clip_model import clip_identity

    trained, used = config.clip_model, db.info.clip_model
    if trained and clip_identity(trained) != clip_identity(used):
        raise ValueError(
            f"the model was trained on embeddings of {trained} but {getattr(db, 'path', db)} is embedded with "
            f"{used}; retrieve from a database embedded with the training CLIP"
        )


def retrieval_condition(
    db: Any,
    query: np.ndarray,
    config: TrainConfig,
    band: str | None = None,
    exclude_ids: np.ndarray | None = None,
) -> tuple[dict[str, torch.Tensor], Any]:
    """The sampling condition for query embeddings [P, D] (text or image): {query, and with kNN neighbours
    [P, k, D] + valid [P, k]} from the database's k nearest images (optionally within a band, never one of
    exclude_ids), and the search result (None without kNN)."""
    mc = config.model
    check_clip(db, config)
    if query.shape[1] != mc.cond_dim:
        raise ValueError(
            f"the database embeds with {db.info.clip_model} ({query.shape[1]}-d) but the model was trained on "
            f"{mc.cond_dim}-d embeddings; use a database embedded with the training CLIP"
        )
    cond: dict[str, torch.Tensor] = {"query": torch.from_numpy(np.ascontiguousarray(query, np.float32))}
    if not mc.use_knn:
        return cond, None
    if exclude_ids is not None and len(exclude_ids):
        found = _search_excluding(db, query, mc.k, band, np.asarray(exclude_ids, np.int64))
    else:
        found = db.search(query, mc.k, band=band)
    valid = found.ids >= 0
    nb = np.zeros((len(query), mc.k, mc.cond_dim), np.float32)
    if valid.any():
        nb[valid] = db.embeddings(found.ids[valid])
    valid &= np.linalg.norm(nb, axis=-1) > 0  # a remote image that could not be fetched
    cond.update(neighbours=torch.from_numpy(nb), valid=torch.from_numpy(valid))
    return cond, found


def _search_excluding(db: Any, query: np.ndarray, k: int, band: str | None, exclude: np.ndarray) -> Any:
    """db.search with the excluded ids removed: searches k + len(exclude) deep (capped at the database size), so
    k remain whenever the database has them; missing slots are -1."""
    from retrieval.database import SearchResult

    deep = db.search(query, min(k + len(exclude), max(len(db), k)), band=band)
    keep = ~np.isin(deep.ids, exclude) & (deep.ids >= 0)
    ids = np.full((len(query), k), -1, np.int64)
    scores = np.full((len(query), k), -np.inf, np.float32)
    for i in range(len(query)):
        sel = np.flatnonzero(keep[i])[:k]
        ids[i, : len(sel)], scores[i, : len(sel)] = deep.ids[i, sel], deep.scores[i, sel]
    return SearchResult(ids=ids, scores=scores)


def generate(
    model: torch.nn.Module,
    config: TrainConfig,
    cond: dict[str, torch.Tensor],
    sampler: str = "ddim",
    steps: int = 50,
    guidance: float = 3.0,
    seed: int = 0,
    batch_size: int = 64,
    request_seeds: Sequence[tuple[int, int]] | None = None,
    truncation: float | None = None,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
) -> np.ndarray:
    """One image per condition row, [N, H, W, 3] uint8, in batches of batch_size; deterministic for a seed
    (each batch's noise is drawn from one seeded generator, in order). request_seeds, (seed, rows) per request in
    row order, runs all rows as one batch with each request's noise (x_T and every step's) from its own seed
    (samplers.RequestNoise), as the service needs. Runs on the model's device. A latent model's samples are
    decoded by its tokenizer. The discrete backbone samples ancestrally whatever the sampler
    (diffusion.discrete.sample_tokens, with truncation r; None: discrete.TRUNCATION) from all-[MASK], and decodes
    the tokens. init [N, C, H, W] and strength < 1: image-to-image (SDEdit, Meng et al. 2022): start from init
    noised to timestep strength * (T-1) instead of from pure noise."""
    from diffusion.precond import EpsDenoiser
    from diffusion.samplers import SAMPLERS, CFGDenoiser, RequestNoise, draw
    from diffusion.schedule import alphas_cumprod, sampling_timesteps

    device = next(model.parameters()).device
    discrete = config.model.backbone == "discrete"  # its many draws stay on the model's device
    gen: Generator = torch.Generator(device=device if discrete else "cpu").manual_seed(seed)
    if request_seeds is not None:
        gen, batch_size = RequestNoise(request_seeds), len(cond["query"])
    if discrete:
        from diffusion.discrete import truncation_or_default

        r = truncation_or_default(truncation)
        return _generate_tokens(model, config, cond, steps, guidance, gen, batch_size, r)
    abar = alphas_cumprod(config.schedule, config.num_timesteps).to(device)
    eps_model = EpsDenoiser(model, abar, config.prediction).eval()
    timesteps = sampling_timesteps(config.num_timesteps, steps, strength if init is not None else 1.0)
    a0 = abar[timesteps[0]]  # where an image-to-image start is noised to
    decode = None
    if config.tokenizer:
        from diffusion.tokenizer import load_tokenizer

        decode = load_tokenizer(config.tokenizer).to(device).decode
    n = len(cond["query"])
    out = []
    for lo in range(0, n, batch_size):
        part = {k: v[lo : lo + batch_size].to(device) for k, v in cond.items()}
        x = draw(torch.randn, (len(part["query"]), *noise_shape(config)), gen, device)
        if init is not None and strength < 1:
            x = a0.sqrt() * init[lo : lo + batch_size].to(device) + (1 - a0).sqrt() * x
        with torch.inference_mode():
            out.append(
                to_uint8(
                    (decode or (lambda z: z))(
                        SAMPLERS[sampler](
                            CFGDenoiser(eps_model, part, guidance),
                            x,
                            timesteps,
                            abar,
                            generator=gen,
                            clip_x0=decode is None,  # pixels lie in [-1, 1]; unit-scale latents do not
                        )
                    )
                )
            )
    return np.concatenate(out)


def _generate_tokens(
    model: torch.nn.Module,
    config: TrainConfig,
    cond: dict[str, torch.Tensor],
    steps: int,
    guidance: float,
    gen: Generator,
    batch_size: int,
    truncation: float,
) -> np.ndarray:
    from diffusion.discrete import MaskSchedule, sample_tokens
    from diffusion.tokenizer import load_tokenizer

    mc = config.model
    device = next(model.parameters()).device
    tokenizer = load_tokenizer(config.tokenizer).to(device)
    schedule = MaskSchedule(mc.codebook_size, config.num_timesteps)
    out = []
    for lo in range(0, len(cond["query"]), batch_size):
        part = {k: v[lo : lo + batch_size].to(device) for k, v in cond.items()}
        with torch.inference_mode():
            tokens = sample_tokens(
                model,
                part,
                schedule,
                mc.grid_size**2,
                min(steps, config.num_timesteps),
                guidance,
                truncation,
                gen,
            )
            out.append(to_uint8(tokenizer.decode_tokens(tokens)))
    return np.concatenate(out)


def noise_shape(config: TrainConfig) -> tuple[int, int, int]:
    """(C, H, W) of one sample's starting noise: the image's, or its latent grid's."""
    mc = config.model
    return (mc.grid_channels, mc.grid_size, mc.grid_size)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> [B, H, W, C] uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(images: list[np.ndarray], cols: int, pad: int = 2) -> np.ndarray:
    """Tile equally sized [H, W, 3] uint8 images row-major into one image."""
    h, w = images[0].shape[:2]
    rows = (len(images) + cols - 1) // cols
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            img
        )
    return out


def save_png(array: np.ndarray, path: str) -> None:
    write_atomic(path, image_bytes(array))


def sample(config: SampleConfig) -> dict[str, Any]:
    """Generate num_per_prompt images per prompt; write grid.png (a row per prompt), neighbours.png (the
    retrieved images, a row per prompt, when the database has them) and samples.json."""
    from diffusion.schedule import sampling_timesteps
    from retrieval.catalogue import open_database
    from retrieval.clip_model import cached_encoder

    start = time.time()
    prompts = config.all_prompts()
    model, train_config, step = load_model(config.checkpoint, config.use_ema)
    model = model.to(config.device or default_device())
    mc = train_config.model
    if config.k is not None and config.k != mc.k:
        raise ValueError(
            f"--k {config.k}: the model was trained with k={mc.k} neighbours; pass --k {mc.k} or omit it"
        )
    db = open_database(config.database, catalogue=config.catalogue)
    query = cached_encoder(db.info.clip_model).encode_texts(prompts).numpy()
    cond, found = retrieval_condition(db, query, train_config, band=config.band)
    n = config.num_per_prompt
    cond = {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}
    images = generate(
        model,
        train_config,
        cond,
        config.sampler,
        config.steps,
        config.guidance,
        config.seed,
        config.batch_size,
        truncation=config.truncation,
    )
    timesteps = sampling_timesteps(train_config.num_timesteps, config.steps)
    os.makedirs(config.output, exist_ok=True)
    save_png(grid(list(images), cols=n), os.path.join(config.output, "grid.png"))
    record: dict[str, Any] = {
        "checkpoint_step": step,
        "database": config.database,
        "band": config.band,
        "sampler": config.sampler,
        "steps": config.steps,
        "guidance": config.guidance,
        "seed": config.seed,
        "num_per_prompt": n,
        "prompts": [],
    }
    # every prompt's neighbours in one read of the shards (a read per prompt parsed every tar again: 4.4 s of 6.6)
    thumbs = thumbnails(db, found.ids.reshape(-1), mc.image_size) if found is not None else []
    for i, prompt in enumerate(prompts):
        entry: dict[str, Any] = {"prompt": prompt, "grid_row": i}
        if found is not None:
            ids = [int(v) for v in found.ids[i] if v >= 0]
            entry["neighbour_ids"] = ids
            entry["neighbour_scores"] = [
                float(s) for s, v in zip(found.scores[i], found.ids[i], strict=True) if v >= 0
            ]
            with contextlib.suppress(KeyError):  # a remote database knows only what its searches returned
                entry["neighbour_captions"] = [str(c) for c in db.metadata(np.array(ids)).get("caption", [])]
        record["prompts"].append(entry)
    if thumbs and any(t.any() for t in thumbs):
        save_png(grid(thumbs, cols=mc.k), os.path.join(config.output, "neighbours.png"))
        record["neighbours_png"] = "neighbours.png"
    write_atomic(os.path.join(config.output, "samples.json"), json_bytes(record))
    print(
        f"sample: {len(images)} images for {len(prompts)} prompts ({config.sampler}, {len(timesteps)} steps, "
        f"guidance {config.guidance}, database {config.database}"
        f"{'' if config.band is None else ' band ' + str(config.band)}) "
        f"in {time.time() - start:.1f}s -> {config.output}/grid.png",
        flush=True,
    )
    return record


def thumbnails(db: Any, ids: np.ndarray, size: int) -> list[np.ndarray]:
    """[size, size, 3] uint8 per id: the database's image when it has it, else blank."""
    from PIL import Image

    blank = np.full((size, size, 3), 255, np.uint8)
    try:
        found = db.images(ids[ids >= 0])
    except (AttributeError, FileNotFoundError, KeyError):
        return [blank for _ in ids]
    out = []
    for i in ids:
        if int(i) in found:
            img = Image.open(io.BytesIO(found[int(i)])).convert("RGB").resize((size, size))
            out.append(np.asarray(img, dtype=np.uint8))
        else:
            out.append(blank)
    return out
