"""A whole pipeline from one YAML config -> two retrieval databases, a fitted CLIP, aesthetic bands, neighbour
tables, a trained kNN-Diffusion generator, samples and <output>/report.html.

Stages, in order (each is the toolkit's own stage function; nothing is special-cased for the demo):

  data        procedural captioned images in two styles + their URL lists (or the user's URL lists)
  download    URL list -> webdataset shards, for each database (img2dataset through the guarded fetcher)
  clip        fit a small CLIP on the main shards with open_clip_train, or name a pretrained one
  embed       shards -> CLIP embeddings + metadata, for each database
  index       embeddings -> faiss index (autofaiss), for each database
  aesthetic   fit a head to the data's ratings (or take LAION's), score every image, quantile-band sub-indexes
  neighbours  the k nearest neighbours of every image of the main database
  tokenizer   an autoencoder on the main database's images, when the generator works in a latent space
              (diffusion/tokenizer.py); its reconstructions and error go into the report
  train       the generator on Ray Train
  sample      the prompts against the main database, the second one (database swap) and every band
  evaluate    the generators' samples for the held-out captions: attribute accuracy (procedural data), Fréchet
              distance, KID and CLIP score against the held-out images (diffusion/evaluate.py), kNN against
              no-kNN; and the encoder's text->image retrieval accuracy on the same held-out shards
  report      report.html with the pictures

Every stage writes <output>/manifests/<stage>.json last, with its settings, inputs, outputs, wall time and the
ids of the stages it depends on (pipelines/stages.py). A rerun skips a stage whose manifest holds the same
settings and dependencies, and refuses one whose settings changed or whose dependency was redone (naming
them), so nothing already made is overwritten by a different run; stages that do not depend on a redone stage
are unaffected. The demo is this config with its defaults.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
import numpy as np
import yaml

from diffusion.config import EDIT_KEEP, EDIT_STRENGTH
from retrieval.storage import atomic_write_bytes

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = [
    "a large red circle in the centre on a plain blue background",
    "a large yellow star in the centre on a striped purple background",
    "a large green triangle in the centre on a dotted yellow background",
    "a large blue square in the centre on a checkered orange background",
    "a large orange cross in the centre on a plain purple background",
    "a large purple star in the centre on a striped green background",
]


def _at_least(section: str, obj: Any, minimum: float, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) >= minimum:
            raise ValueError(f"{section}.{name} must be >= {minimum:g}, got {getattr(obj, name)!r}")


def _positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) > 0:
            raise ValueError(f"{section}.{name} must be positive, got {getattr(obj, name)!r}")


@dataclasses.dataclass
class DataSettings:
    """Where the images come from.

    source: "procedural" (the toolkit draws captioned shapes, serves them on 127.0.0.1 for the download
    stage) or "url_list" (url_list and, for the database swap, ood_url_list: the user's URL lists).
    num_images, num_images_ood: procedural images in the main and in the second database.
    style, ood_style: procedural drawing styles of the two databases (the same kind of scenes, another look).
    image_size: side of the downloaded images [px]. images_per_shard: URLs per shard (unit of work).
    rating_col: the URL list column holding per-image ratings (for aesthetic.head = fit). seed: scenes.
    sizes, positions: the shape sizes and positions procedural scenes are drawn from (pipelines.demo_data.SIZES,
    POSITIONS). The demo draws large shapes in the centre only. With all three sizes and five positions, the
    captions held 1,800 combinations besides the shape, so a random batch of the fitted CLIP held almost no
    two images that differed only in shape, and the CLIP never learned shape (retrieval agreed on shape 0.23,
    chance 0.20). With one size and position, 3000 images hold each such combination about 25 times, and the
    same fit retrieves the right shape 0.58 of the time (README, Evaluate generators).
    allow_network, allow_private_network: non-public addresses the download of a url_list may fetch from, as
    `download --allow-network` (CIDRs, e.g. [10.0.0.0/8] for a mirror on your network) and
    `--allow-private-network`. Procedural images are served on 127.0.0.1 and only that address is allowed.
    """

    source: str = "procedural"
    url_list: str | None = None
    ood_url_list: str | None = None
    num_images: int = 3000
    num_images_ood: int = 600
    style: str = "flat"
    ood_style: str = "neon"
    image_size: int = 64
    images_per_shard: int = 250
    rating_col: str = "rating"
    seed: int = 0
    sizes: list[str] = dataclasses.field(default_factory=lambda: ["large"])
    positions: list[str] = dataclasses.field(default_factory=lambda: ["in the centre"])
    allow_network: list[str] = dataclasses.field(default_factory=list)
    allow_private_network: bool = False

    def __post_init__(self) -> None:
        from retrieval.safe_fetch import FetchPolicy

        FetchPolicy(allowed_networks=tuple(self.allow_network))  # a bad CIDR fails now
        if self.source not in ("procedural", "url_list"):
            raise ValueError(f"data.source must be procedural or url_list, got {self.source!r}")
        if self.source == "url_list" and not self.url_list:
            raise ValueError("data.source is url_list but data.url_list is not set")
        _at_least("data", self, 1, "num_images", "image_size", "images_per_shard")
        _at_least("data", self, 0, "num_images_ood")
        from pipelines.demo_data import check_scene_values

        try:
            check_scene_values(self.sizes, self.positions)
        except ValueError as err:
            raise ValueError(f"data.{err}") from err


@dataclasses.dataclass
class ClipSettings:
    """The encoder. model: "fit" (train a small CLIP on the main shards with open_clip_train) or a
    clip-retrieval name, e.g. open_clip:ViT-B-32/openai (needs the internet once). The rest apply to "fit":
    model_config (open_clip config name or JSON path; default: the toolkit's small one), epochs, batch_size,
    lr, holdout_fraction (shards kept out of the CLIP's training; the retrieval accuracy is measured on them).
    """

    model: str = "fit"
    model_config: str | None = None
    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-3
    holdout_fraction: float = 0.1

    def __post_init__(self) -> None:
        _at_least("clip", self, 1, "epochs", "batch_size")
        _positive("clip", self, "lr")
        if self.model != "fit":
            from retrieval.clip_model import ClipSpec

            try:
                ClipSpec.parse(self.model)
            except ValueError as err:
                raise ValueError(
                    f"clip.model must be fit or an open_clip:<config>/<weights> name: {err}"
                ) from err
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(
                "clip.holdout_fraction must be in (0, 1) (the encoder is evaluated on the held-out shards), "
                f"got {self.holdout_fraction}"
            )


@dataclasses.dataclass
class AestheticSettings:
    """head: "fit" (a linear head fitted to data.rating_col), laion-v1 / laion-v2, or a fitted .pt.
    head_dir: folder holding the LAION head files (offline). allow_other_weights: as `aesthetic score`.
    quantile_bins: equal-count aesthetic bands (the paper uses 5). fit_epochs: epochs of the fitted head.
    """

    head: str = "fit"
    head_dir: str | None = None
    allow_other_weights: bool = False
    quantile_bins: int = 5
    fit_epochs: int = 200

    def __post_init__(self) -> None:
        _at_least("aesthetic", self, 1, "quantile_bins", "fit_epochs")


@dataclasses.dataclass
class GeneratorSettings:
    """The generator's training. preset: tiny, small or paper (diffusion/config.py); model: overrides of the
    preset's fields (cond_dim is taken from the database). compare_no_knn: also train the paper's no-kNN
    ablation (use_knn: false) with the same settings and budget, for the evaluate stage to compare.
    compare_backbones: also train the discrete backbone's kNN generator (VQ-Diffusion over the codes of a
    tokenizer-fsq tokenizer, which the tokenizer stage then trains too) with the same settings and budget (a
    continuous latent generator only). The rest as in diffusion.config.TrainConfig. All leave the CLIP's held-out
    shards out (the evaluation's reference)."""

    preset: str = "small-latent"
    # k = 5, not the paper's 10: the demo's 2,500 training images hold about 4 of each caption's combination of
    # attributes, so the 5 nearest name the prompt's shape 0.64 of the time and the 10 nearest 0.50; trained
    # with equal budgets, k = 5 scored "all" 0.55 and k = 10 0.42 (bench/ablation.py, README). Set k by how
    # many near-copies of a prompt the database holds; the paper's database held millions.
    model: dict[str, Any] = dataclasses.field(default_factory=lambda: {"k": 5})
    backbone: str = "continuous"  # or discrete: VQ-Diffusion over a quantising tokenizer's codes (T = 100)
    compare_no_knn: bool = True
    compare_backbones: bool = False
    # Measured on the demo's data (evaluate stage, README): in pixel space (preset small) no setting drew shapes
    # in the budget (shape accuracy 0.31, chance 0.20); in the tokenizer's 16 x 16 x 4 latents, 464 steps of 64
    # at lr 2e-3 (200 s) reach shape 0.55 (lr 3e-3: 0.52). 400 steps keep the full demo within 15 minutes.
    steps: int = 400
    batch_size_per_worker: int = 64
    lr: float = 2e-3
    warmup_steps: int = 20
    prediction: str = "v"
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    num_workers: int = 1
    use_gpu: bool = False
    log_every: int = 20
    checkpoint_every: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        from diffusion.config import model_config

        _at_least(
            "generator",
            self,
            1,
            "steps",
            "batch_size_per_worker",
            "num_workers",
            "log_every",
            "checkpoint_every",
        )
        _at_least("generator", self, 0, "warmup_steps", "seed")
        _positive("generator", self, "lr", "min_snr_gamma")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"generator.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.prediction not in ("v", "eps"):
            raise ValueError(f"generator.prediction must be v or eps, got {self.prediction!r}")
        if self.backbone not in ("continuous", "discrete"):
            raise ValueError(f"generator.backbone must be continuous or discrete, got {self.backbone!r}")
        mc = model_config(
            self.preset, **{**self.model, "backbone": self.backbone}
        )  # fail now, not an hour later
        if (self.backbone == "discrete" or self.compare_backbones) and not mc.latent_channels:
            raise ValueError(
                f"generator.backbone: discrete (or compare_backbones) denoises a tokenizer's codes; preset "
                f"{self.preset} is in pixel space (use preset: small-latent)"
            )
        if self.compare_backbones and self.backbone != "continuous":
            raise ValueError(
                "generator.compare_backbones trains the discrete beside the continuous backbone: "
                f"set generator.backbone: continuous (got {self.backbone})"
            )

    def train_fields(self, backbone: str | None = None) -> dict[str, Any]:
        """The diffusion.config.TrainConfig fields these settings give (all but the model's) for this backbone
        (default: the settings' own); the discrete backbone runs VQ-Diffusion's T = 100."""
        fields = dataclasses.asdict(self)
        for name in ("preset", "model", "compare_no_knn", "compare_backbones", "backbone"):
            del fields[name]
        if (backbone or self.backbone) == "discrete":
            fields["num_timesteps"] = 100
        return fields


@dataclasses.dataclass
class TokenizerSettings:
    """The tokenizer stage (diffusion/tokenizer.py), run when the generator's preset works in a latent space
    (latent_channels > 0, e.g. small-latent). preset and model: the autoencoder (diffusion/config.py); the rest
    as in diffusion.config.TrainConfig. Trained on the main database's images less the held-out shards."""

    preset: str = "tokenizer"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: int = 260  # held-out PSNR 30.4 dB (300: 31.0), 10 s less of the demo
    batch_size_per_worker: int = 64
    lr: float = 2e-3
    warmup_steps: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        from diffusion.config import model_config

        _at_least("tokenizer", self, 1, "steps", "batch_size_per_worker")
        _at_least("tokenizer", self, 0, "warmup_steps", "seed")
        _positive("tokenizer", self, "lr")
        if model_config(self.preset, **self.model).arch != "autoencoder":
            raise ValueError(
                f"tokenizer.preset must be an autoencoder preset (e.g. tokenizer), got {self.preset!r}"
            )

    def train_fields(self) -> dict[str, Any]:
        """The diffusion.config.TrainConfig fields these settings give (all but the model's)."""
        fields = dataclasses.asdict(self)
        del fields["preset"], fields["model"]
        return fields


@dataclasses.dataclass
class SampleSettings:
    """prompts; guidance (classifier-free scale); steps, sampler (ddim, ddpm, dpmpp_2m, dpmpp_2m_sde);
    num_per_prompt; seed."""

    prompts: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_PROMPTS))
    guidance: float = 3.0  # the latent generators: shape 0.55 at 3.0, 0.46 at 1.5, the same Fréchet distance
    steps: int = 20
    sampler: str = "dpmpp_2m_sde"
    num_per_prompt: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        from diffusion.samplers import SAMPLERS

        if not self.prompts:
            raise ValueError("sample.prompts is empty")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sample.sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        _at_least("sample", self, 1, "num_per_prompt", "steps")
        _at_least("sample", self, 0, "guidance")


@dataclasses.dataclass
class EvaluateSettings:
    """The evaluate stage (diffusion/evaluate.py). num_prompts: held-out captions, one sample each per generator;
    sampler, steps, guidance: how they are sampled. eval_clip: the CLIP whose features and scores judge the samples:
    "fit" (a second CLIP fitted like the first, with another seed, so the generator is not graded by its own
    encoder), "same" (the conditioning CLIP), or a clip-retrieval name. classifier_epochs: the attribute
    classifier's (procedural data only). inception_weights: a local Inception-v3 weights file for real FID."""

    num_prompts: int = 120
    sampler: str = "dpmpp_2m_sde"
    steps: int = 20
    guidance: float = 3.0
    eval_clip: str = "same"
    classifier_epochs: int = 5  # held-out accuracy 1.000 on every attribute (8 epochs: the same, 8 s more)
    inception_weights: str | None = None

    def __post_init__(self) -> None:
        from diffusion.samplers import SAMPLERS

        if self.sampler not in SAMPLERS:
            raise ValueError(f"evaluate.sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        _at_least("evaluate", self, 2, "num_prompts")
        _at_least("evaluate", self, 1, "steps", "classifier_epochs")
        _at_least("evaluate", self, 0, "guidance")
        if self.eval_clip not in ("same", "fit") and not self.eval_clip.startswith("open_clip:"):
            raise ValueError(
                f"evaluate.eval_clip must be same, fit or an open_clip:... name, got {self.eval_clip!r}"
            )


@dataclasses.dataclass
class EditSettings:
    """The edit stage (mask-free text-driven editing, diffusion/edit.py): an editing model trained on pairs built
    from each image and its ECC-aligned nearest neighbour, then edits of held-out images judged by the evaluate
    stage's attribute classifier (procedural data: recolour the shape). steps: 0 turns the stage off. preset and
    model: the editing network (diffusion/config.py; a latent preset learns in the tokenizer stage's latents).
    init: "no-knn" starts it from the no-kNN generator's weights (fine-tuning: the same network, plus the source's
    input channels, zero at first; it needs generator.compare_no_knn) or "scratch". area, motion, hue: TrainConfig's
    edit_area, edit_motion, edit_hue. num_trials, guidance, strength, keep, sampler, sample_steps: the edits
    (diffusion.edit.edit_images and keep_unchanged).

    Measured on the full demo's data (128 recolouring edits of held-out images, guidance 3, strength 0.95, keep 0):
    fine-tuned from the no-kNN generator for 60 / 80 / 100 / 150 steps, the asked colour 0.73 / 0.72 / 0.74 / 0.77,
    background kept 0.94 / 0.94 / 0.97 / 0.92, its colour 0.90 / 0.93 / 0.93 / 0.92; from scratch, 300 steps:
    colour 0.44; without the hue jitter (neighbours share the image's colours 98% of the time): 0.03. The
    defaults (strength 1, keep 0.4) on four whole demos' editing models: README, "Edit images by text"."""

    preset: str = "small-edit"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    init: str = "no-knn"
    # 0 turns the stage off, as in the full demo: with it (80 steps, 93 s) whole demos took 14 min 2 s and, on a
    # slower run, 15 min 50 s, past the 15-minute budget; configs/demo_edit.yaml turns it on (150 steps)
    steps: int = 0
    batch_size_per_worker: int = 64
    lr: float = 2e-3
    warmup_steps: int = 20
    area: list[float] = dataclasses.field(default_factory=lambda: [0.4, 0.8])
    motion: str = "affine"
    hue: float = 0.5
    num_trials: int = 64
    guidance: float = 3.0
    strength: float = EDIT_STRENGTH
    keep: float = EDIT_KEEP
    sampler: str = "dpmpp_2m"
    sample_steps: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        from diffusion.config import model_config
        from diffusion.samplers import SAMPLERS

        _at_least("edit", self, 0, "steps", "warmup_steps", "seed")
        _at_least("edit", self, 1, "batch_size_per_worker", "num_trials", "sample_steps")
        _positive("edit", self, "lr")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"edit.sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"edit.strength must be in (0, 1], got {self.strength}")
        if not 0 <= self.keep < 1:
            raise ValueError(
                f"edit.keep must be in [0, 1) (0: keep nothing of the original), got {self.keep}"
            )
        if self.init not in ("no-knn", "scratch"):
            raise ValueError(f"edit.init must be no-knn or scratch, got {self.init!r}")
        if not model_config(self.preset, **self.model).edit:
            raise ValueError(
                f"edit.preset must be an editing model (edit: true, e.g. small-edit), got {self.preset!r}"
            )

    def train_fields(self) -> dict[str, Any]:
        """The diffusion.config.TrainConfig fields these settings give (not the model, data paths or init_from)."""
        return {
            "steps": self.steps,
            "batch_size_per_worker": self.batch_size_per_worker,
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "edit_area": self.area,
            "edit_motion": self.motion,
            "edit_hue": self.hue,
            "seed": self.seed,
            "log_every": max(1, min(20, self.steps)),
            "checkpoint_every": max(1, self.steps),
        }

    def model_config(self, cond_dim: int | None = None) -> Any:
        from diffusion.config import model_config

        return model_config(self.preset, **{**self.model, **({"cond_dim": cond_dim} if cond_dim else {})})


@dataclasses.dataclass
class PipelineConfig:
    """The whole pipeline. output: the folder receiving everything. ray_address: as every stage's."""

    output: str = "demo_out"
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    clip: ClipSettings = dataclasses.field(default_factory=ClipSettings)
    aesthetic: AestheticSettings = dataclasses.field(default_factory=AestheticSettings)
    tokenizer: TokenizerSettings = dataclasses.field(default_factory=TokenizerSettings)
    generator: GeneratorSettings = dataclasses.field(default_factory=GeneratorSettings)
    sample: SampleSettings = dataclasses.field(default_factory=SampleSettings)
    evaluate: EvaluateSettings = dataclasses.field(default_factory=EvaluateSettings)
    edit: EditSettings = dataclasses.field(default_factory=EditSettings)
    ray_address: str | None = None

    def __post_init__(self) -> None:
        from diffusion.config import model_config

        if (
            self.generator.backbone == "discrete"
            and not model_config(self.tokenizer.preset, **self.tokenizer.model).fsq_levels
        ):
            raise ValueError(
                f"generator.backbone: discrete needs a quantising tokenizer; tokenizer.preset {self.tokenizer.preset} "
                "has no fsq_levels (use tokenizer.preset: tokenizer-fsq)"
            )
        if self.clip.model == "fit" and self.aesthetic.head.startswith("laion"):
            raise ValueError(
                f"aesthetic.head {self.aesthetic.head} scores only the CLIP LAION trained it on; with clip.model: fit "
                "use aesthetic.head: fit (a head fitted to data.rating_col), or name that CLIP in clip.model"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# A 2-3 minute smoke version of the demo (the test suite runs it): the same stages, everything smaller.
QUICK: dict[str, dict[str, Any]] = {
    "data": {"num_images": 400, "num_images_ood": 100, "images_per_shard": 100},
    "clip": {"epochs": 3, "batch_size": 64},
    "aesthetic": {"quantile_bins": 3, "fit_epochs": 100},
    "generator": {
        "preset": "tiny",
        "model": {"k": 4},
        "steps": 100,
        "batch_size_per_worker": 32,
        "lr": 2e-3,
        "log_every": 25,
        "checkpoint_every": 100,
        "warmup_steps": 10,
    },
    # the first two prompts; guidance 1.5 suits the tiny pixel model (the quick test's colour check)
    "sample": {"prompts": lambda prompts: prompts[:2], "steps": 10, "num_per_prompt": 2, "guidance": 1.5},
    "evaluate": {"num_prompts": 60, "steps": 10, "classifier_epochs": 30, "guidance": 1.5},
    # a pixel-space editing model (the quick generator has no tokenizer), trained briefly: the stage runs, no more
    "edit": {
        "preset": "tiny",
        "init": "no-knn",
        "model": {"k": 0, "use_knn": False, "edit": True},
        "steps": 20,
        "batch_size_per_worker": 32,
        "num_trials": 16,
        "sample_steps": 10,
    },
}

T = TypeVar("T")


def _type_error(value: Any, annotation: Any) -> str | None:
    """Why value does not fit a settings field's annotation (None when it fits). YAML gives bools for true/false,
    ints and floats for numbers, so a string where a number or bool belongs ("abc", "no") is an error."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        if value is None and type(None) in args:
            return None
        annotation = next(a for a in args if a is not type(None))
        args = typing.get_args(annotation)
    origin = typing.get_origin(annotation) or annotation
    if origin is bool:
        return None if isinstance(value, bool) else "true or false"
    if origin is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a number"
    if origin is str:
        return None if isinstance(value, str) else "a string"
    if origin is list:
        if not isinstance(value, list):
            return "a list, e.g. [a, b]"
        return next(
            (f"a list of which each item is {e}" for v in value if (e := _type_error(v, args[0]))), None
        )
    if origin is dict:
        return None if isinstance(value, dict) else "a mapping"
    return None


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str) -> T:
    """A (nested) settings dataclass from a mapping. Unknown keys and values of the wrong type are errors that
    name their place (ranges are checked by each dataclass's __post_init__)."""
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__} {data!r}")
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(fields)})")
    hints = typing.get_type_hints(cls)
    for name, field in fields.items():
        sub = field.default_factory if field.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if name in data and dataclasses.is_dataclass(sub):
            data[name] = from_dict(sub, data[name], f"{where}.{name}")  # type: ignore[arg-type]
        elif name in data and (expected := _type_error(data[name], hints[name])):
            raise ValueError(f"{where}.{name} must be {expected}, got {data[name]!r}")
    try:
        return cls(**data)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from err


def _merge(base: Any, override: Any) -> Any:
    """override merged into base, mappings key by key at every depth; a callable override maps base's value."""
    if callable(override):
        return override(base)
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}
    return override


def with_overrides(config: PipelineConfig, overrides: dict[str, dict[str, Any]]) -> PipelineConfig:
    """config with overrides merged in at every depth: --quick changes sizes, and leaves the user's other
    settings (generator.model.use_knn, the prompts themselves) as they were."""
    return from_dict(PipelineConfig, _merge(config.to_dict(), overrides), "config")


def load_config(path: str, output: str | None = None, quick: bool = False) -> PipelineConfig:
    """A PipelineConfig from YAML (missing keys take the demo's defaults); --output and --quick win."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config {path} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or err
            raise ValueError(f"config {path}{where}: not valid YAML ({problem}); fix it and rerun") from err
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a YAML mapping")
    try:
        config = from_dict(PipelineConfig, data, path)
    except ValueError as err:
        raise ValueError(str(err) if str(err).startswith(path) else f"config {path}: {err}") from err
    if quick:
        config = with_overrides(config, QUICK)
    if output:
        config.output = output
    return config


# ------------------------------------------------------------------------------------------------ stages


class Pipeline:
    """Runs the stages of a PipelineConfig in order, each once (see the module docstring)."""

    def __init__(self, config: PipelineConfig) -> None:
        from pipelines.stages import StageRunner

        self.config = config
        self.out = os.path.abspath(config.output)
        self.runner = StageRunner(self.path("manifests"))
        self.timings = self.runner.timings

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def stage(
        self,
        name: str,
        settings: dict[str, Any],
        fn: Callable[[], dict[str, Any]],
        deps: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Run fn once (pipelines/stages.py): skipped when done with these settings and these dependencies."""
        return self.runner.run(name, settings, fn, deps)

    # -------------------------------------------------------------------------------------------- the run

    def run(self) -> dict[str, Any]:
        from retrieval.ray_env import init_ray

        start = time.time()
        c = self.config
        os.makedirs(self.out, exist_ok=True)
        init_ray(c.ray_address)
        dbs = self.databases()
        # Each stage's settings are its own section; the stages it reads from are its dependencies, whose
        # manifest ids it records (pipelines/stages.py): redoing a stage invalidates only what was made from it.
        data = dataclasses.asdict(c.data)
        self.stage("data", data, self.make_data)
        self.stage("download", data, self.download, deps=("data",))
        clip = self.stage("clip", dataclasses.asdict(c.clip), self.clip, deps=("download",))
        encoder = {"clip_model": clip["clip_model"]}
        self.stage("embed", encoder, lambda: self.embed(clip["clip_model"]), deps=("download", "clip"))
        self.stage("index", encoder, self.index, deps=("embed",))
        aesthetic = self.stage(
            "aesthetic", dataclasses.asdict(c.aesthetic), self.aesthetic, deps=("embed", "index")
        )
        model = self.model_config()
        self.stage("neighbours", {"k": model.k}, lambda: self.neighbours(model.k), deps=("embed", "index"))
        heldout = [os.path.basename(tar)[: -len(".tar")] for tar in clip["holdout_shards"]]
        tokenizer = None
        edit_model = c.edit.model_config() if c.edit.steps else None
        if model.latent_channels or (edit_model is not None and edit_model.latent_channels):
            tokenizer = self.stage(
                "tokenizer",
                # with compare_backbones the stage also trains the discrete backbone's tokenizer
                {**dataclasses.asdict(c.tokenizer), "heldout": heldout, "fsq": c.generator.compare_backbones},
                lambda: self.tokenizer(heldout),
                deps=("download", "embed"),
            )
        trained = self.stage(
            "train",
            {**dataclasses.asdict(c.generator), "heldout": heldout},
            lambda: self.train(model, heldout, tokenizer),
            deps=("download", "clip", "embed", "neighbours", *(("tokenizer",) if tokenizer else ())),
        )
        samples = self.stage(
            "sample",
            dataclasses.asdict(c.sample),
            lambda: self.sample(aesthetic["bands"]),
            deps=("train", "index", "aesthetic"),
        )
        evaluation = self.stage(
            "evaluate",
            {**dataclasses.asdict(c.evaluate), **encoder},
            lambda: self.evaluate(clip, trained, heldout),
            deps=("train", "clip", "index"),
        )
        edits = None
        if edit_model is not None:
            edits = self.stage(
                "edit",
                {**dataclasses.asdict(c.edit), "heldout": heldout},
                lambda: self.edit(heldout, tokenizer, trained),
                deps=(
                    "download",
                    "embed",
                    "neighbours",
                    "train",
                    "evaluate",
                    *(("tokenizer",) if tokenizer else ()),
                ),
            )
        from pipelines.report import write_report

        report = write_report(
            self.out, c, self.timings, clip, aesthetic, trained, samples, evaluation, tokenizer, edits
        )
        atomic_write_bytes(  # the config of the run that made this report (a refused run leaves it alone)
            fsspec.filesystem("file"),
            self.path("config.yaml"),
            yaml.safe_dump(c.to_dict(), sort_keys=False).encode(),
        )
        total = sum(t["seconds"] for t in self.timings.values() if not t["skipped"])
        accuracy = evaluation["retrieval"]
        r = accuracy["text_to_image"]
        models = evaluation["generators"]["models"]
        scores = ", ".join(
            f"{name} all-attributes {m['attribute_accuracy']['all']:.2f}"
            if "attribute_accuracy" in m
            else f"{name} FD {m['frechet_distance']:.4f}"
            for name, m in models.items()
        )
        print(
            f"run: {len(dbs)} databases, {self.num_images('main')} + {self.num_images('ood')} images, "
            f"CLIP text->image R@1 {r['1']:.2f} R@10 {r['10']:.2f} (chance {accuracy['chance']['10']:.3f}), "
            f"generators: {scores}; stages {total:.0f}s, this run {time.time() - start:.0f}s -> {report}",
            flush=True,
        )
        return {"report": report, "timings": self.timings, "evaluation": evaluation, "train": trained}

    def databases(self) -> list[str]:
        d = self.config.data
        has_ood = d.num_images_ood > 0 if d.source == "procedural" else bool(d.ood_url_list)
        return ["main", "ood"] if has_ood else ["main"]

    def num_images(self, db: str) -> int:
        from retrieval.database import DatabaseInfo

        folder = self.path("db", db)
        return (
            DatabaseInfo.read(folder).num_images
            if os.path.exists(os.path.join(folder, DatabaseInfo.FILE))
            else 0
        )

    def make_data(self) -> dict[str, Any]:
        """Procedural captioned images for each database (a user's URL lists need nothing made)."""
        d = self.config.data
        if d.source == "url_list":
            return {"inputs": [d.url_list, d.ood_url_list], "outputs": []}
        from pipelines.demo_data import write_dataset

        counts = {}
        for i, db in enumerate(self.databases()):
            style, n = (d.style, d.num_images) if db == "main" else (d.ood_style, d.num_images_ood)
            frame = write_dataset(
                self.path("data", db),
                n,
                style=style,
                seed=d.seed + i,
                size=d.image_size,
                sizes=d.sizes,
                positions=d.positions,
            )
            counts[db] = len(frame)
        return {"outputs": [self.path("data")], "num_images": counts}

    def download(self) -> dict[str, Any]:
        """Each database's URL list through the real download stage. Procedural images are served on
        127.0.0.1 for the duration, and only that loopback address is allowed (--allow-network 127.0.0.1/32)."""
        import pandas as pd

        from pipelines.demo_data import FolderServer
        from pipelines.download import DownloadConfig, download

        d = self.config.data
        results = {}

        def fetch(db: str, url_list: str, allow: list[str], allow_private: bool = False) -> None:
            summary = download(
                DownloadConfig(
                    url_list=url_list,
                    output_folder=self.path("shards", db),
                    image_size=d.image_size,
                    number_sample_per_shard=d.images_per_shard,
                    thread_count=16,
                    allow_network=allow,
                    allow_private_network=allow_private,
                ),
                ray_address=self.config.ray_address,
            )
            if summary.successes == 0:
                # Not done: no manifest, and the shards (status files only) go, so a rerun fetches again
                # instead of skipping them and failing later with a misleading message.
                shutil.rmtree(self.path("shards", db))
                errors = (
                    "; ".join(f"{n}x {msg[:120]}" for msg, n in summary.top_errors[:3]) or "none recorded"
                )
                raise ValueError(
                    f"download of the {db} database fetched no image from {summary.count} URLs (errors: {errors}). "
                    "URLs on a private network need data.allow_network (CIDRs) or data.allow_private_network: "
                    "true; fix the config and rerun"
                )
            if summary.failed_shards:
                raise ValueError(
                    f"download of the {db} database gave up on shards {summary.failed_shards}; run the same "
                    "command again to retry them (finished shards are kept)"
                )
            results[db] = {
                "successes": summary.successes,
                "failed": summary.failed_to_download + summary.failed_to_resize,
            }

        if d.source == "url_list":
            for db in self.databases():
                url_list = d.url_list if db == "main" else d.ood_url_list
                fetch(db, url_list, list(d.allow_network), d.allow_private_network)  # type: ignore[arg-type]
        else:
            with FolderServer(self.path("data")) as server:
                for db in self.databases():
                    style = d.style if db == "main" else d.ood_style
                    frame = pd.read_parquet(self.path("data", db, f"{style}_captions.parquet"))
                    urls = pd.DataFrame(
                        {
                            "url": [f"{server.base}/{db}/{f}" for f in frame["file"]],
                            "caption": frame["caption"],
                            d.rating_col: frame["rating"],
                        }
                    )
                    url_list = self.path("data", db, "urls.parquet")  # the port changes every run
                    urls.to_parquet(url_list)
                    fetch(db, url_list, ["127.0.0.1/32"])
        return {"outputs": [self.path("shards", db) for db in self.databases()], **results}

    def clip(self) -> dict[str, Any]:
        """Fit a small CLIP on the main database's shards with open_clip_train, or take the named one."""
        c = self.config.clip
        shards = self.path("shards", "main")
        if c.model != "fit":
            return {"clip_model": c.model, "holdout_shards": holdout_shards(shards, c.holdout_fraction)}
        from pipelines.clip_train import ClipTrainConfig, fit_clip

        settings = {"model": c.model_config} if c.model_config else {}
        result = fit_clip(
            ClipTrainConfig(
                shards=shards,
                output=self.path("clip"),
                epochs=c.epochs,
                batch_size=c.batch_size,
                lr=c.lr,
                holdout_fraction=c.holdout_fraction,
                seed=self.config.data.seed,
                **settings,
            ),
            ray_address=self.config.ray_address,
        )
        return {
            "inputs": [shards],
            "outputs": [self.path("clip")],
            "clip_model": result.clip_model,
            "holdout_shards": result.holdout_shards,
            "holdout_recall": result.holdout_recall,  # measured by the fit, on the same held-out shards
            "loss": result.loss_final,
        }

    def embed(self, clip_model: str) -> dict[str, Any]:
        from pipelines.embed import EmbedConfig, embed

        out = {}
        for db in self.databases():
            summary = embed(
                EmbedConfig(
                    shards=self.path("shards", db), output=self.path("db", db), clip_model=clip_model
                ),
                ray_address=self.config.ray_address,
            )
            out[db] = summary.num_images
        return {"outputs": [self.path("db", db) for db in self.databases()], "num_images": out}

    def index(self) -> dict[str, Any]:
        from pipelines.index import IndexConfig, build

        out = {}
        for db in self.databases():
            infos = build(
                IndexConfig(db=self.path("db", db), max_index_memory="1G", current_memory_available="4G"),
                ray_address=self.config.ray_address,
            )
            out[db] = infos.get("index_key")
        return {"outputs": [self.path("db", db, "image.index") for db in self.databases()], "index_key": out}

    def aesthetic(self) -> dict[str, Any]:
        """Score the main database (a head fitted to the data's ratings, or LAION's), then quantile bands."""
        from pipelines.aesthetic import FitConfig, ScoreConfig, SubindexConfig, fit, score, subindex
        from retrieval.database import Database

        a, db = self.config.aesthetic, self.path("db", "main")
        fitted: dict[str, Any] = {}
        head = a.head
        if a.head == "fit":
            col = self.config.data.rating_col
            database = Database.open(db)
            meta = database.metadata(database.ids)
            if col not in meta.columns:
                raise ValueError(
                    f"aesthetic.head is fit but the main URL list has no {col!r} column; add ratings there "
                    "(data.rating_col) or set aesthetic.head to laion-v1"
                )
            ratings = self.path("aesthetic", "ratings.parquet")
            os.makedirs(os.path.dirname(ratings), exist_ok=True)
            meta[["image_id", col]].to_parquet(ratings)
            head = self.path("aesthetic", "head.pt")
            fitted = fit(
                FitConfig(ratings=ratings, output_head=head, db=db, rating_col=col, epochs=a.fit_epochs)
            )
        scored = score(
            ScoreConfig(db=db, head=head, head_dir=a.head_dir, allow_other_weights=a.allow_other_weights)
        )
        bands = subindex(
            SubindexConfig(
                db=db,
                quantile_bins=a.quantile_bins,
                catalogue=self.path("catalogue.json"),
                name="main",
                max_index_memory="1G",
                current_memory_available="4G",
            ),
            ray_address=self.config.ray_address,
        )
        return {
            "outputs": [os.path.join(db, "aesthetic"), os.path.join(db, "bands")],
            "head": head,
            "fit": fitted,
            "score": {k: v for k, v in scored.items() if isinstance(v, int | float | str)},
            "bands": bands["bands"],
        }

    def model_config(self, backbone: str | None = None) -> Any:
        """The generator's ModelConfig (for this backbone; default: generator.backbone's)."""
        from diffusion.config import model_config

        g = self.config.generator
        from retrieval.database import DatabaseInfo

        folder = self.path("db", "main")
        overrides = {**g.model, "backbone": backbone or g.backbone}
        if os.path.exists(os.path.join(folder, DatabaseInfo.FILE)):
            overrides["cond_dim"] = DatabaseInfo.read(folder).dim
        return model_config(g.preset, **overrides)

    def neighbours(self, k: int) -> dict[str, Any]:
        from pipelines.neighbours import NeighboursConfig, compute

        db = self.path("db", "main")
        compute(NeighboursConfig(db=db, k=k), ray_address=self.config.ray_address)
        return {"outputs": [os.path.join(db, "neighbours")], "k": k}

    def tokenizer(self, heldout: list[str]) -> dict[str, Any]:
        """The autoencoder in tokenizer/ (its training run, tokenizer.pt, tokenizer.json, reconstructions.png)
        and, with generator.compare_backbones, the quantising one of the discrete backbone in tokenizer_fsq/
        (preset tokenizer-fsq, the same training settings) under "fsq"."""
        from diffusion.tokenizer import tokenizer_config, train_tokenizer

        t = self.config.tokenizer
        db = self.path("db", "main")

        def trained(folder: str, preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
            config = tokenizer_config(
                preset,
                overrides,
                db=db,
                neighbours=os.path.join(db, "neighbours"),
                output=self.path(folder),
                exclude_parts=heldout,
                **t.train_fields(),
            )
            result = train_tokenizer(config, ray_address=self.config.ray_address)
            return {
                "tokenizer": result["tokenizer"],
                "reconstructions": self.path(folder, "reconstructions.png"),
                "figures": result["figures"],
                "samples_per_s": result["metrics"].get("samples_per_s", float("nan")),
            }

        out = {"outputs": [self.path("tokenizer")], **trained("tokenizer", t.preset, t.model)}
        if self.config.generator.compare_backbones:  # the same sizes, quantised to the preset's FSQ codes
            sizes = {k: v for k, v in t.model.items() if k not in ("latent_channels", "fsq_levels")}
            out["fsq"] = trained("tokenizer_fsq", "tokenizer-fsq", sizes)
            out["outputs"].append(self.path("tokenizer_fsq"))
        return out

    def train(
        self, model: Any, heldout: list[str], tokenizer: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The kNN generator in run/ and, with generator.compare_no_knn, the no-kNN ablation in run_noknn/ (and with
        compare_backbones the discrete kNN generator in run_discrete/), all with the same settings and steps,
        leaving the held-out parts out. The tokenizer stage's result, when given, is the latent space they learn
        in (the discrete one: its "fsq" tokenizer's codes)."""
        from diffusion.config import TrainConfig
        from diffusion.train import train

        g = self.config.generator
        db = self.path("db", "main")
        latent = tokenizer["tokenizer"] if tokenizer else None
        runs = {"knn": ("run", model, latent)}
        if g.compare_no_knn and model.use_knn:
            no_knn = dataclasses.replace(model, use_knn=False, query_drop_prob=0.0)
            runs["no-knn"] = ("run_noknn", no_knn, latent)
        if g.compare_backbones:
            discrete = self.model_config(backbone="discrete")
            runs["discrete"] = ("run_discrete", discrete, tokenizer["fsq"]["tokenizer"])
        out: dict[str, Any] = {"outputs": [], "runs": {}}
        for name, (folder, model_config, latent) in runs.items():
            result = train(
                TrainConfig(
                    db=db,
                    neighbours=os.path.join(db, "neighbours"),
                    output=self.path(folder),
                    model=model_config,
                    exclude_parts=heldout,
                    tokenizer=latent,
                    **g.train_fields(model_config.backbone),
                ),
                ray_address=self.config.ray_address,
            )
            m = result["metrics"]
            out["outputs"].append(self.path(folder))
            out["runs"][name] = {
                "folder": self.path(folder),
                "checkpoint": result["checkpoint"],
                "loss": m.get("loss", float("nan")),
                "samples_per_s": m.get("samples_per_s", float("nan")),
                "data_wait_fraction": m.get("data_wait_fraction", float("nan")),
            }
        out.update(
            {k: out["runs"]["knn"][k] for k in ("checkpoint", "loss", "samples_per_s", "data_wait_fraction")}
        )
        return out

    def sample(self, bands: list[dict[str, Any]]) -> dict[str, Any]:
        """The prompts against the main database, the second database, and each aesthetic band of the main. A
        no-kNN model never reads its database's images, so it samples the main database alone (the others would
        give the same pictures)."""
        from diffusion.sample import SampleConfig, sample

        targets: list[tuple[str, str, str | None]] = [("main", "main", None)]
        if not self.model_config().use_knn:
            bands = []
        elif "ood" in self.databases():
            targets.append(("ood", "ood", None))
        targets += [(f"band_{b['name']}", "main", b["name"]) for b in bands if b["count"] > 0]
        done = {}
        for name, db, band in targets:
            sample(
                SampleConfig(
                    checkpoint=self.path("run"),
                    database=self.path("db", db),
                    band=band,
                    output=self.path("samples", name),
                    **dataclasses.asdict(self.config.sample),  # SampleConfig's fields of the same names
                )
            )
            done[name] = {"database": db, "band": band, "folder": self.path("samples", name)}
        return {"outputs": [self.path("samples")], "targets": done}

    def evaluate(self, clip: dict[str, Any], trained: dict[str, Any], heldout: list[str]) -> dict[str, Any]:
        """The generators' samples for held-out captions (diffusion.evaluate), and the encoder's text->image
        retrieval accuracy on the same held-out shards (the fit measured it already; a named CLIP is measured
        here)."""
        from diffusion.evaluate import EvaluateConfig, evaluate
        from pipelines.clip_train import retrieval_accuracy

        e = self.config.evaluate
        acc = clip.get("holdout_recall") or retrieval_accuracy(clip["clip_model"], clip["holdout_shards"])
        acc = {k: {str(n): v for n, v in r.items()} if isinstance(r, dict) else r for k, r in acc.items()}
        record = evaluate(
            EvaluateConfig(
                checkpoints={name: run["folder"] for name, run in trained["runs"].items()},
                database=self.path("db", "main"),
                heldout_parts=heldout,
                output=self.path("evaluation"),
                eval_clip_model=self.eval_clip(clip),
                inception_weights=e.inception_weights,
                num_prompts=e.num_prompts,
                sampler=e.sampler,
                steps=e.steps,
                guidance=e.guidance,
                seed=self.config.sample.seed,
                classifier_epochs=e.classifier_epochs,
            ),
            attributes=procedural_attributes() if self.config.data.source == "procedural" else None,
        )
        return {
            "inputs": clip["holdout_shards"],
            "outputs": [self.path("evaluation")],
            "retrieval": acc,
            "generators": record,
        }

    def edit(
        self, heldout: list[str], tokenizer: dict[str, Any] | None, trained: dict[str, Any]
    ) -> dict[str, Any]:
        """The editing model in edit_run/ (pairs from the main database less the held-out parts; fine-tuned from the
        no-kNN generator with edit.init no-knn) and, for procedural data, edits of held-out images in edit/ judged
        by the evaluate stage's classifier."""
        from diffusion.config import TrainConfig
        from diffusion.edit import evaluate_edits
        from diffusion.train import train
        from retrieval.database import DatabaseInfo

        e = self.config.edit
        db = self.path("db", "main")
        model = e.model_config(cond_dim=DatabaseInfo.read(db).dim)
        init_from = None
        if e.init == "no-knn":
            if "no-knn" not in trained["runs"]:
                raise ValueError(
                    "edit.init: no-knn fine-tunes the no-kNN generator, which was not trained; set "
                    "generator.compare_no_knn: true or edit.init: scratch"
                )
            init_from = trained["runs"]["no-knn"]["folder"]
        result = train(
            TrainConfig(
                db=db,
                neighbours=os.path.join(db, "neighbours"),
                output=self.path("edit_run"),
                model=model,
                exclude_parts=heldout,
                tokenizer=tokenizer["tokenizer"] if tokenizer and model.latent_channels else None,
                init_from=init_from,
                **e.train_fields(),
            ),
            ray_address=self.config.ray_address,
        )
        out: dict[str, Any] = {
            "outputs": [self.path("edit_run")],
            "run": self.path("edit_run"),
            "aligned_fraction": result["metrics"].get("aligned_fraction", float("nan")),
            "samples_per_s": result["metrics"].get("samples_per_s", float("nan")),
        }
        classifier = self.path("evaluation", "classifier.pt")
        if self.config.data.source == "procedural" and os.path.exists(classifier + ".json"):
            out["edits"] = evaluate_edits(
                self.path("edit_run"),
                db,
                heldout,
                classifier,
                procedural_edits(),
                self.path("edit"),
                num_trials=e.num_trials,
                guidance=e.guidance,
                steps=e.sample_steps,
                sampler=e.sampler,
                seed=e.seed,
                strength=e.strength,
                keep=e.keep,
            )
            out["outputs"].append(self.path("edit"))
        return out

    def eval_clip(self, clip: dict[str, Any]) -> str:
        """The evaluation CLIP's name: evaluate.eval_clip "same", a name, or "fit" (fitted here with another seed
        on the same shards, when the conditioning CLIP was fitted too; else the conditioning one)."""
        e = self.config.evaluate
        if e.eval_clip == "same" or (e.eval_clip == "fit" and self.config.clip.model != "fit"):
            return clip["clip_model"]
        if e.eval_clip != "fit":
            return e.eval_clip
        from pipelines.clip_train import ClipTrainConfig, fit_clip

        c = self.config.clip
        settings = {"model": c.model_config} if c.model_config else {}
        result = fit_clip(
            ClipTrainConfig(
                shards=self.path("shards", "main"),
                output=self.path("clip_eval"),
                epochs=c.epochs,
                batch_size=c.batch_size,
                lr=c.lr,
                holdout_fraction=c.holdout_fraction,
                seed=self.config.data.seed + 1,
                **settings,
            ),
            ray_address=self.config.ray_address,
        )
        return result.clip_model


def read_finished(demo: str) -> tuple[PipelineConfig, list[str]]:
    """(the config, the held-out parts) of a finished run's output folder, for the benches that build on it."""
    with open(os.path.join(demo, "config.yaml")) as f:
        config = from_dict(PipelineConfig, yaml.safe_load(f), "config.yaml")
    with open(os.path.join(demo, "manifests", "train.json")) as f:
        heldout = json.load(f)["settings"]["heldout"]
    return config, heldout


def procedural_attributes() -> Any:
    """The procedural scenes' captions as an attribute vocabulary for the evaluate stage."""
    from diffusion.evaluate import AttributeSpec
    from pipelines.demo_data import SCENE_ATTRIBUTES, SCENE_HFLIP, parse_caption

    def parse(text: str) -> dict[str, str] | None:
        scene = parse_caption(text)
        return None if scene is None else dataclasses.asdict(scene)

    return AttributeSpec(SCENE_ATTRIBUTES, parse, SCENE_HFLIP)


def procedural_edits() -> Any:
    """Edits of procedural scenes for the edit stage: recolour the shape (its caption with another colour, never
    the background's), judged outside the shape's pixels (those near its palette colour, grown by one pixel)."""
    import cv2

    from diffusion.edit import EditSpec
    from pipelines.demo_data import PALETTE, caption, parse_caption

    def make(text: str, rng: np.random.Generator) -> tuple[str, dict[str, str]] | None:
        scene = parse_caption(text)
        if scene is None:
            return None
        colours = [c for c in PALETTE if c not in (scene.colour, scene.background_colour)]
        colour = colours[int(rng.integers(len(colours)))]
        return caption(dataclasses.replace(scene, colour=colour)), {"colour": colour}

    def area(image: np.ndarray, text: str) -> np.ndarray:
        scene = parse_caption(text)
        if scene is None:
            return np.zeros(image.shape[:2], bool)
        near = (
            np.linalg.norm(image.astype(np.float32) - np.array(PALETTE[scene.colour], np.float32), axis=-1)
            < 80
        )
        return cv2.dilate(near.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)

    return EditSpec(make, area)


def holdout_shards(shards: str, fraction: float) -> list[str]:
    """The shards a CLIP fit with this fraction would hold out (the last ones by number; see clip_train)."""
    from pipelines.clip_train import list_done_shards, split_shards

    return [tar for tar, _ in split_shards(list_done_shards(shards), fraction)[1]]


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    return Pipeline(config).run()
