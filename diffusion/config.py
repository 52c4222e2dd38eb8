"""Typed configuration of the generator (network sizes) and of a training run, with named presets and YAML.

A YAML file holds a `model:` mapping (a preset name under `preset:` plus any overrides) and the training
fields at the top level; see configs/small.yaml.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml


@dataclasses.dataclass
class ModelConfig:
    """The denoiser: a transformer over image patches, cross-attending to the condition tokens.

    image_size [px], channels, patch_size [px]: the image and its patching (image_size % patch_size == 0).
    width, depth, num_heads, mlp_ratio: transformer sizes.
    cond_dim: CLIP embedding dimension D of the query and neighbour embeddings.
    k: neighbours per condition (the paper uses 10); use_knn=False is the paper's no-kNN ablation (query only).
    cond_drop_prob: probability of replacing the whole condition by learned null tokens in training (for
    classifier-free guidance).
    """

    image_size: int = 32
    channels: int = 3
    patch_size: int = 4
    width: int = 256
    depth: int = 6
    num_heads: int = 8
    mlp_ratio: float = 4.0
    cond_dim: int = 512
    k: int = 10
    use_knn: bool = True
    cond_drop_prob: float = 0.1

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.width < self.patch_size**2 * self.channels:
            raise ValueError(
                f"width {self.width} is below the {self.patch_size**2 * self.channels} values of a patch: the network "
                "could not carry the noise through; raise width or lower patch_size"
            )
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if self.k < 0 or (self.use_knn and self.k == 0):
            raise ValueError(
                f"k must be >= 1 with use_knn (set use_knn: false for the no-kNN model), got {self.k}"
            )


PRESETS: dict[str, dict[str, Any]] = {
    # for tests: a few thousand parameters' worth of everything
    "tiny": dict(image_size=16, patch_size=2, width=32, depth=2, num_heads=2, k=4),
    # trains on a CPU in minutes at 32 px
    "small": dict(image_size=32, patch_size=4, width=192, depth=6, num_heads=6, k=10),
    # the paper's scale (~400M parameters at 64 px) for GPU clusters
    "paper": dict(image_size=64, patch_size=2, width=1024, depth=15, num_heads=16, k=10, cond_dim=768),
}


def model_config(preset: str = "small", **overrides: Any) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"model preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return ModelConfig(**{**PRESETS[preset], **overrides})


@dataclasses.dataclass
class TrainConfig:
    """A training run.

    db: the database folder (its CLIP embeddings condition the model); neighbours: its neighbour tables.
    shards: the image shards (default: the ones database.json records). output: run folder (checkpoints, logs).
    steps: optimizer steps in total; batch_size_per_worker: images per worker per step.
    shuffle_buffer: rows mixed across parts on each worker (0: parts come in a new order each epoch and
    their rows shuffled, which is enough when shards are random subsets of the URL list).
    checkpoint_every, log_every: in steps. num_timesteps: diffusion steps T. ema_decay: EMA of the weights.
    precision: auto (bf16 autocast on CUDA/AMX CPUs), fp32 or bf16. max_failures: worker failures survived.
    cpus_per_worker: CPUs Ray reserves per worker; default: the worker's share of its node less one whole CPU,
    which is left to the data-loading tasks (Ray Data cannot run on CPUs the workers hold, and it is handed only
    whole CPUs); on a node with under 2 CPUs per worker, the share less half a CPU.
    torch_threads: intra-op threads per worker; default: the worker's whole share of the node (data loading is
    light), or cpus_per_worker rounded up when that is given.
    crash_at_step: fault injection for recovery tests: the last worker SIGKILLs itself once at this step.
    """

    db: str
    neighbours: str
    output: str
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    shards: str | None = None
    steps: int = 2000
    batch_size_per_worker: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    num_timesteps: int = 1000
    checkpoint_every: int = 500
    log_every: int = 25
    num_workers: int = 1
    cpus_per_worker: float | None = None
    torch_threads: int | None = None
    use_gpu: bool = False
    precision: str = "auto"
    max_failures: int = 3
    shuffle_buffer: int = 0
    seed: int = 0
    crash_at_step: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = model_config(**self.model)
        for name in ("steps", "batch_size_per_worker", "checkpoint_every", "log_every", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**d)


def load_yaml(path: str, **overrides: Any) -> TrainConfig:
    """A TrainConfig from YAML; keyword overrides (e.g. from the command line) win; None values are ignored."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--config {path} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must be a YAML mapping")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    data.update({k: v for k, v in overrides.items() if v is not None})
    model = data.pop("model", {}) or {}
    try:
        return TrainConfig(**data, model=model_config(**model))
    except TypeError as err:
        raise ValueError(f"--config {path}: {err}") from err
