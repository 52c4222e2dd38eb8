"""Typed configuration of the generator (network sizes) and of a training run, with named presets and YAML.

A YAML file holds a `model:` mapping (a preset name under `preset:` plus any overrides) and the training
fields at the top level; see configs/small.yaml.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import yaml

# Editing defaults (diffusion/edit.py), measured on five whole demos' editing models, 128 edits each (README):
# strength: sampling starts from the source noised to this fraction of the schedule (1: from pure noise; 0.95
# kept the background a little more often and got the asked colour right less often);
# keep: outside the area the edit changed (pixels whose change exceeds this fraction of the largest, grown by a
# pixel) the original is kept: background kept 0.83-0.97 -> 0.90-0.99, asked colour 0.74-0.80 -> 0.70-0.79.
EDIT_STRENGTH = 1.0
EDIT_KEEP = 0.4


@dataclasses.dataclass
class ModelConfig:
    """The denoising network and its condition.

    arch: "unet" (diffusion/unet.py: a convolutional UNet, the default) or "dit" (diffusion/model.py: a
    transformer over image patches), or "autoencoder" (diffusion/tokenizer.py: the tokenizer stage's network,
    trained by the same loop). image_size [px], channels: the image.
    latent_factor, latent_channels: a denoiser with latent_channels > 0 works in a tokenizer's latent space
    (Rombach et al. 2022), a grid of image_size / latent_factor cells of latent_channels each; train fills
    both in from the tokenizer it is given. An autoencoder's latent has latent_channels channels and
    latent_factor = 2 ** (len(widths) - 1).
    fsq_levels: an autoencoder with levels quantises its latent by finite scalar quantisation (Mentzer et al.
    2023, vector-quantize-pytorch's FSQ), one level count per latent channel: a codebook of prod(levels) codes,
    the tokens of the discrete backbone.
    backbone: "continuous" (Gaussian diffusion on pixels or latents) or "discrete" (diffusion/discrete.py:
    VQ-Diffusion over a quantising tokenizer's codes; codebook_size is filled in from the tokenizer).
    edit: the editing model of mask-free text-driven editing (diffusion/edit.py): the UNet also reads a source
    image (its latents, for a latent model) as extra input channels beside x_t, and its query token is the CLIP
    embedding of the area to change (of an image's local area in training, of the edit text at inference).
    Continuous UNet only; trained on diffusion/edit_pairs.py's pairs.
    unet: widths [channels per level, one level per halving of the image], blocks_per_level, attn_resolution
    [px]: levels at or below this size get self-attention and cross-attention to the condition tokens.
    width: the condition tokens' (and timestep embedding's) width; for the DiT also its model width.
    num_heads: attention heads (every attention layer).
    cond_dim: CLIP embedding dimension D of the query and neighbour embeddings.
    k: neighbours per condition (the paper uses 10); use_knn=False is the paper's no-kNN ablation (query only).
    cond_drop_prob: probability of replacing the whole condition by learned null tokens in training (for
    classifier-free guidance). query_drop_prob: probability of replacing the query token alone (kNN models),
    so the network must draw from the neighbours; at inference the query is a text embedding, which the
    network never saw in training.
    """

    arch: str = "unet"
    image_size: int = 32
    channels: int = 3
    widths: list[int] = dataclasses.field(default_factory=lambda: [64, 128, 192])
    blocks_per_level: int = 1
    attn_resolution: int = 8
    patch_size: int | None = None
    width: int = 256
    depth: int = 6
    num_heads: int = 8
    mlp_ratio: float = 4.0
    cond_dim: int = 512
    k: int = 10
    use_knn: bool = True
    cond_drop_prob: float = 0.1
    query_drop_prob: float = 0.0
    latent_factor: int = 1
    latent_channels: int = 0
    fsq_levels: list[int] = dataclasses.field(default_factory=list)
    backbone: str = "continuous"
    codebook_size: int = 0
    edit: bool = False

    def __post_init__(self) -> None:
        self.widths = [int(w) for w in self.widths]
        self.fsq_levels = [int(v) for v in self.fsq_levels]
        if self.backbone not in ("continuous", "discrete"):
            raise ValueError(f"model backbone must be continuous or discrete, got {self.backbone!r}")
        if self.arch not in ("unet", "dit", "autoencoder"):
            raise ValueError(f"model arch must be unet, dit or autoencoder, got {self.arch!r}")
        if self.patch_size is None:  # the DiT's usual patches; the UNet's whole resolution
            self.patch_size = 4 if self.arch == "dit" else 1
        if self.arch == "autoencoder":
            self._check_autoencoder()
            return
        self._check_latent()
        if self.arch == "unet":
            self._check_unet()
        else:
            self._check_dit()
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        for name in ("cond_drop_prob", "query_drop_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.k < 0 or (self.use_knn and self.k == 0):
            raise ValueError(
                f"k must be >= 1 with use_knn (set use_knn: false for the no-kNN model), got {self.k}"
            )

    @property
    def grid_size(self) -> int:
        """Side of what the network denoises: the image, or its latent grid."""
        return self.image_size // self.latent_factor

    @property
    def grid_channels(self) -> int:
        return self.latent_channels or self.channels

    def _check_latent(self) -> None:
        if self.edit and (self.arch != "unet" or self.backbone != "continuous" or self.use_knn):
            raise ValueError(
                "an editing model (edit: true) is a continuous unet without kNN (use_knn: false): its condition is "
                f"the source image and one embedding; got arch {self.arch}, backbone {self.backbone}, "
                f"use_knn {self.use_knn}"
            )
        if self.latent_channels < 0 or self.latent_factor < 1:
            raise ValueError(
                f"latent_channels must be >= 0 and latent_factor >= 1, got {self.latent_channels}, "
                f"{self.latent_factor}"
            )
        if self.image_size % self.latent_factor:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of latent_factor {self.latent_factor}"
            )

    def _check_autoencoder(self) -> None:
        factor = 2 ** (len(self.widths) - 1)
        if not self.widths or self.image_size % factor or self.latent_channels < 1:
            raise ValueError(
                f"an autoencoder needs latent_channels >= 1 (got {self.latent_channels}) and an image_size "
                f"{self.image_size} that halves {len(self.widths) - 1} times (once per level after the first)"
            )
        if self.fsq_levels and (len(self.fsq_levels) != self.latent_channels or min(self.fsq_levels) < 2):
            raise ValueError(
                f"fsq_levels {self.fsq_levels} need one level count >= 2 per latent channel ({self.latent_channels})"
            )
        self.latent_factor = factor
        self.codebook_size = math.prod(self.fsq_levels) if self.fsq_levels else 0
        self.use_knn, self.k = False, 0  # it reads images only

    def _check_unet(self) -> None:
        levels = len(self.widths)
        if levels < 1 or self.grid_size % (self.patch_size * 2 ** (levels - 1)):
            raise ValueError(
                f"grid size {self.grid_size} (image_size {self.image_size} / latent_factor "
                f"{self.latent_factor}) must divide by patch_size {self.patch_size} and then halve "
                f"{levels - 1} times (one per level after the first of widths {self.widths})"
            )
        if any(w % self.num_heads or w < 4 for w in self.widths):
            raise ValueError(f"every unet width must be >= 4 and a multiple of num_heads {self.num_heads}")
        if self.blocks_per_level < 1:
            raise ValueError(f"blocks_per_level must be >= 1, got {self.blocks_per_level}")

    def _check_dit(self) -> None:
        if self.grid_size % self.patch_size:
            raise ValueError(f"grid size {self.grid_size} is not a multiple of patch_size {self.patch_size}")
        if self.width < self.patch_size**2 * self.grid_channels:
            raise ValueError(
                f"width {self.width} is below the {self.patch_size**2 * self.grid_channels} values of a patch: the "
                "network could not carry the noise through; raise width or lower patch_size"
            )


# the small UNet in the latent space of the tokenizer preset (16 x 16 x 4 for 32 px): see PRESETS["small-latent"]
_SMALL_LATENT: dict[str, Any] = dict(
    image_size=32,
    latent_factor=2,
    latent_channels=4,
    widths=[32, 64, 128],
    width=256,
    num_heads=4,
    k=10,
    query_drop_prob=0.3,
)

PRESETS: dict[str, dict[str, Any]] = {
    # for tests: a few thousand parameters' worth of everything
    "tiny": dict(image_size=16, widths=[16, 32], width=32, num_heads=2, k=4),
    # trains on a CPU in minutes at 32 px (the demo's)
    # (measured on the demo, 250 s of training on 2 cores: 32/64/128 at full resolution reaches the loss 0.017
    # and sharper samples where 64/128/192 on 2x2 patches, faster per sample, stays at 0.026)
    "small": dict(image_size=32, widths=[32, 64, 128], width=256, num_heads=4, k=10, query_drop_prob=0.3),
    # the same in the latent space of the tokenizer preset below (16 x 16 x 4 for 32 px), the demo's. Measured on
    # the full demo's data, 200 s of training on 2 cores each: 148 samples/s and shape accuracy 0.55 (all four
    # attributes 0.43), where the pixel-space small preset reaches 0.31 (0.26) and 64/128 channels here 0.35
    "small-latent": _SMALL_LATENT,
    # the tokenizer stage's autoencoder (diffusion/tokenizer.py): 32 px -> 16 x 16 x 4
    "tokenizer": dict(arch="autoencoder", image_size=32, widths=[32, 64], latent_channels=4),
    # its quantising variant for the discrete backbone: 16 x 16 tokens of a 240-code FSQ codebook
    "tokenizer-fsq": dict(
        arch="autoencoder", image_size=32, widths=[32, 64], latent_channels=3, fsq_levels=[8, 6, 5]
    ),
    # the discrete backbone (VQ-Diffusion) over those tokens: the small-latent UNet predicting x_0 per token
    "small-discrete": {**_SMALL_LATENT, "latent_channels": 3, "backbone": "discrete"},
    # the editing model (diffusion/edit.py): the small-latent UNet reading the source image's latents beside x_t,
    # conditioned on one embedding (a local area's in training, the edit text's at inference)
    "small-edit": {**_SMALL_LATENT, "k": 0, "use_knn": False, "query_drop_prob": 0.0, "edit": True},
    # the DiT at the small preset's scale (patch 4), for comparison
    "dit-small": dict(arch="dit", image_size=32, patch_size=4, width=192, depth=6, num_heads=6, k=10),
    # the paper's scale for GPU clusters: an ADM/GLIDE-sized UNet at 64 px
    "paper": dict(
        image_size=64,
        widths=[256, 512, 768, 768],
        blocks_per_level=3,
        attn_resolution=16,
        width=1024,
        num_heads=16,
        k=10,
        cond_dim=768,
        query_drop_prob=0.3,
    ),
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
    checkpoint_every, log_every: in steps. num_timesteps: diffusion steps T; schedule: its noise schedule
    (diffusion/schedule.py: cosine or linear). ema_decay: EMA of the weights.
    clip_model: the CLIP that embedded the database (filled in by train from database.json); sampling refuses a
    database embedded by another CLIP.
    prediction: what the network predicts, "v" or "eps" (diffusion/precond.py). min_snr_gamma: min-SNR loss
    weighting (0: off). exclude_parts: database parts (e.g. "00011") left out of training, such as the shards
    an evaluation holds out.
    precision: auto (bf16 autocast on CUDA/AMX CPUs), fp32 or bf16. max_failures: worker failures survived.
    cpus_per_worker: CPUs Ray reserves per worker; default: the worker's share of its node less one whole CPU,
    which is left to the data-loading tasks (Ray Data cannot run on CPUs the workers hold, and it is handed only
    whole CPUs); on a node with under 2 CPUs per worker, the share less half a CPU.
    torch_threads: intra-op threads per worker; default: the worker's whole share of the node (data loading is
    light), or cpus_per_worker rounded up when that is given.
    aux_weight: the discrete backbone's weight of the x_0 cross-entropy beside the variational bound (per token).
    tokenizer: a tokenizer file (`knn-diffusion tokenizer`, diffusion/tokenizer.py): the denoiser learns and samples
    in its latent space, and sampling decodes through it. None: pixel space. A model whose arch is
    "autoencoder" is the tokenizer itself, trained by the same loop on reconstruction.
    init_from: a run folder or state.pt whose EMA weights start a new run (fine-tuning; see train.init_weights),
    e.g. an editing model started from the no-kNN generator.
    edit_area: an editing model's pairs (diffusion/edit_pairs.py): the sides of the random area M, as fractions
    of the image side (each drawn uniformly between the two). edit_motion: ECC's motion model, affine or
    euclidean, aligning each image's nearest neighbour to it. edit_hue: the probability that the aligned neighbour's
    hue is turned by a random angle before it is pasted (on the demo's data the nearest neighbour shares the
    image's shape colour 98% of the time, so without it no pair asks for a change of colour).
    step_hook: "module:function" called by every worker after every step as function(step=, rank=, world=,
    config=); the tests inject faults with it (tests/faults.py). Imported in the worker, so the module must be
    importable there.
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
    schedule: str = "cosine"
    clip_model: str | None = None
    prediction: str = "v"
    min_snr_gamma: float = 5.0
    exclude_parts: list[str] = dataclasses.field(default_factory=list)
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
    tokenizer: str | None = None
    aux_weight: float = 1.0
    edit_area: list[float] = dataclasses.field(default_factory=lambda: [0.4, 0.8])
    edit_motion: str = "affine"
    edit_hue: float = 0.5
    init_from: str | None = None
    step_hook: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = model_config(**self.model)
        for name in ("steps", "batch_size_per_worker", "checkpoint_every", "log_every", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        from diffusion.precond import PREDICTIONS

        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.min_snr_gamma < 0:
            raise ValueError(
                f"min_snr_gamma must be >= 0 (0 turns the weighting off), got {self.min_snr_gamma}"
            )
        self.exclude_parts = [str(p) for p in self.exclude_parts]
        from diffusion.schedule import SCHEDULES

        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        if self.step_hook is not None and ":" not in self.step_hook:
            raise ValueError(f"step_hook must be 'module:function', got {self.step_hook!r}")
        self._check_tokenizer()
        self._check_edit()
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")

    def _check_edit(self) -> None:
        self.edit_area = [float(v) for v in self.edit_area]
        if len(self.edit_area) != 2 or not 0 < self.edit_area[0] <= self.edit_area[1] <= 1:
            raise ValueError(
                f"edit_area must be [min, max] side fractions with 0 < min <= max <= 1, got {self.edit_area}"
            )
        if not 0 <= self.edit_hue <= 1:
            raise ValueError(f"edit_hue is a probability in [0, 1], got {self.edit_hue}")
        if self.edit_motion not in ("affine", "euclidean"):
            raise ValueError(f"edit_motion must be affine or euclidean, got {self.edit_motion!r}")

    def _check_tokenizer(self) -> None:
        if self.model.backbone == "discrete" and not self.tokenizer:
            raise ValueError(
                "the discrete backbone denoises a tokenizer's codes: give a quantising tokenizer "
                "(`knn-diffusion tokenizer --preset tokenizer-fsq` writes one)"
            )
        if self.model.latent_channels and self.model.arch != "autoencoder" and not self.tokenizer:
            raise ValueError(
                f"the model denoises latents (latent_channels {self.model.latent_channels}): give the tokenizer "
                "(`knn-diffusion tokenizer` writes one), or set model: latent_channels: 0 for pixel space"
            )
        if self.tokenizer and self.model.arch == "autoencoder":
            raise ValueError(
                "a tokenizer (model arch autoencoder) is trained on images: leave tokenizer unset"
            )

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
