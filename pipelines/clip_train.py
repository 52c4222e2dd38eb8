"""CLIP fit stage: download-stage shards -> a small CLIP trained by open_clip_train, loadable by clip-retrieval name.

open_clip's own training loop (``open_clip_train.main``) does the work, in one Ray task placed on a node
with enough CPUs (and a GPU when asked). The last shards, by shard number, are held out for evaluation.
Output folder::

    <config-name>.json        the open_clip model config the weights belong to
    clip.pt                   model weights only (a plain state dict; loads with torch.load(weights_only=True))
    open_clip_train/run-*/    open_clip_train's log (out.log), params.txt and resumable epoch checkpoints
    clip_train.json           settings, shard lists, losses, held-out recall, clip_model; written last (done marker)

Every later stage loads the result as ``open_clip:<output>/<config-name>.json/<output>/clip.pt`` through
retrieval.clip_model.ClipEncoder. retrieval_accuracy() measures text<->image recall@k on held-out shards.

How open_clip_train is driven (open_clip_torch 2.32.0 and webdataset 0.2.111, pinned in .ci/constraints.txt):
through its public entry point, ``open_clip_train.main.main(argv)``, in a Ray task, with the command line a user
would type. Three things that entry point cannot be told are patched for the duration of the call and undone
after (_open_clip_train_patches): its shard reader dies on webdataset 0.2.96+'s end-of-shard marker (open_clip
issue #935), its sample shuffle ignores --seed, and its logging setup stacks handlers on every call. The
training losses are read from its out.log (parse_losses): 2.32 writes them nowhere else unless tensorboard or
wandb is installed and asked for, and neither is a dependency here. Revisit all four when upgrading.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from retrieval.storage import json_bytes, setting_changes, torch_bytes, write_atomic

log = logging.getLogger(__name__)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_configs")
# The demo's CLIP: 64-px input in 16-px patches (16 tokens) through a 4-layer, 192-wide ViT; a 4-layer, 128-wide
# text transformer over 32 tokens with the standard open_clip tokenizer; 128-d embeddings. With the defaults
# below it fits ~3000 captioned 64-px demo images in about 2.5 minutes on 2 CPU cores.
DEFAULT_MODEL = os.path.join(CONFIG_DIR, "ViT-Tiny-16-64px.json")
MARKER = "clip_train.json"
CHECKPOINT = "clip.pt"
PRECISIONS = ("auto", "fp32", "amp", "amp_bf16")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Settings that change nothing in the trained weights; a rerun may differ in them and still skip.
COSMETIC_SETTINGS = ("log_every_n_steps",)
# Launcher variables open_clip_train reads to turn on torch.distributed (distributed.py: is_using_distributed,
# world_info_from_env). A Ray worker on a SLURM node inherits SLURM_NTASKS, which would start a DDP init.
DISTRIBUTED_ENV = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMI_RANK",
    "PMI_SIZE",
    "MPI_LOCALRANKID",
)


@dataclasses.dataclass
class ClipTrainConfig:
    """Configuration of the CLIP fit stage (open_clip_train on download-stage shards)."""

    shards: str
    """Local folder of download-stage shards (NNNNN.tar; only those whose NNNNN_stats.json exists are used)."""
    output: str
    """Local folder for the config copy, clip.pt, open_clip_train's logs and the clip_train.json marker."""
    model: str = DEFAULT_MODEL
    """open_clip model config: a JSON path (default: the small ViT shipped in pipelines/clip_configs) or a name."""
    epochs: int = 15
    """Epochs of ceil(num_train_samples / batch_size) steps each (about one pass over the training shards)."""
    batch_size: int = 128
    """Image-caption pairs per step; also the number of negatives each contrastive term sees."""
    lr: float = 2e-3
    """Peak AdamW learning rate (cosine decay to 0 after the warmup)."""
    warmup: int = 50
    """Linear learning-rate warmup, in steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (open_clip_train exempts gains, biases and logit_scale)."""
    image_size: int | None = None
    """Input side in pixels; None takes the config's vision_cfg.image_size (a value is written into the copy)."""
    context_length: int | None = None
    """Caption tokens; None takes the config's text_cfg.context_length (a value is written into the copy)."""
    holdout_fraction: float = 0.1
    """Fraction of the shards held out of training for evaluation: the last ones by shard number."""
    seed: int = 0
    """Seed of the initialisation and of the shard and sample shuffles."""
    precision: str = "auto"
    """auto (amp_bf16 on a CUDA GPU with bf16, else fp32), fp32, amp (float16, GPU only) or amp_bf16."""
    num_workers: int = 1
    """Data-loader processes decoding images (capped at the number of training shards)."""
    use_gpu: bool = False
    """Train on one GPU (the task asks Ray for num_gpus=1) instead of the CPUs."""
    log_every_n_steps: int = 10
    """How often open_clip_train logs a progress line (loss, learning rate, samples/s)."""

    def __post_init__(self) -> None:
        self._check_paths()
        for name in ("epochs", "batch_size", "log_every_n_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"--warmup (steps) must be >= 0, got {self.warmup}")
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"--holdout-fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        self._check_precision()
        for name in ("image_size", "context_length"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        self.model_config()  # fails now on an unknown name, a missing file or an image size the patches don't tile

    def _check_precision(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "amp" and not self.use_gpu:
            raise ValueError(
                "--precision amp (float16 autocast with a gradient scaler) needs --use-gpu; "
                "use fp32 or amp_bf16 on CPUs"
            )

    def _check_paths(self) -> None:
        for name in ("shards", "output"):
            value = getattr(self, name)
            if not value:
                raise ValueError(f"--{name} must name a folder")
            if "://" in value:
                raise ValueError(
                    f"--{name} {value!r}: open_clip_train reads and writes local files; pass a local or mounted folder"
                )
        for ch in ("{", "}", "::"):
            if ch in self.shards:
                raise ValueError(
                    f"--shards {self.shards!r} contains {ch!r}, which webdataset expands in shard lists; "
                    "rename the folder"
                )
        if ".json/" in self.output or self.output.endswith(".json"):
            raise ValueError(
                f"--output {self.output!r}: a folder name containing '.json' would make the clip-retrieval name "
                "ambiguous; choose another folder name"
            )

    def config_name(self) -> str:
        """The name the model config is saved and registered under: its JSON stem or open_clip name, plus overrides."""
        base = (
            os.path.splitext(os.path.basename(self.model))[0] if self.model.endswith(".json") else self.model
        )
        if self.image_size is not None:
            base += f"-img{self.image_size}"
        if self.context_length is not None:
            base += f"-ctx{self.context_length}"
        return base

    def model_config(self) -> dict[str, Any]:
        """The open_clip model config (embed_dim, vision_cfg, text_cfg, ...) with the size overrides applied."""
        if self.model.endswith(".json"):
            if not os.path.isfile(self.model):
                raise ValueError(f"--model {self.model}: no such model-config JSON file")
            with open(self.model) as f:
                cfg = json.load(f)
        else:
            import open_clip

            found = open_clip.get_model_config(self.model)
            if found is None:
                raise ValueError(
                    f"--model {self.model!r} is neither a JSON file nor an open_clip config; "
                    f"see open_clip.list_models(), e.g. ViT-S-32"
                )
            cfg = json.loads(json.dumps(found))  # a deep copy: open_clip returns its registry's own dict
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(
                f"--model {self.model}: an open_clip config needs embed_dim, vision_cfg and text_cfg"
            )
        if self.image_size is not None:
            cfg["vision_cfg"]["image_size"] = self.image_size
        if self.context_length is not None:
            cfg["text_cfg"]["context_length"] = self.context_length
        side, patch = cfg["vision_cfg"].get("image_size"), cfg["vision_cfg"].get("patch_size")
        if isinstance(side, int) and isinstance(patch, int) and side % patch:
            raise ValueError(
                f"--image-size {side} is not a multiple of the model's patch size {patch}; pick a multiple of {patch}"
            )
        return cfg


@dataclasses.dataclass
class ClipTrainResult:
    """What a fit produced (also recorded in <output>/clip_train.json)."""

    clip_model: str
    """clip-retrieval name of the fitted model: open_clip:<abs config JSON>/<abs clip.pt>."""
    output: str
    """The output folder (absolute)."""
    checkpoint: str
    """<output>/clip.pt: the model's plain state dict."""
    model_config_path: str
    """<output>/<config-name>.json: the open_clip config the checkpoint belongs to."""
    train_shards: list[str]
    """Tar paths trained on."""
    holdout_shards: list[str]
    """Tar paths held out (the last shards by number); never trained on."""
    num_train_samples: int
    """Image-caption pairs in the training shards (their _stats.json successes)."""
    num_holdout_samples: int
    """Image-caption pairs in the held-out shards."""
    epochs: int
    """Epochs trained."""
    steps: int
    """Optimizer steps over all epochs."""
    precision: str
    """The precision open_clip_train ran in (auto resolved on the training node)."""
    device: str
    """cpu or cuda."""
    seconds: float
    """Wall time of the training task: open_clip_train, export and held-out evaluation."""
    loss_first: float
    """Loss at the first logged step (about ln(batch_size) for a fresh model)."""
    loss_final: float
    """Mean of the losses logged during the last epoch."""
    losses: list[tuple[int, int, float]]
    """Every logged (epoch, samples seen in that epoch, loss)."""
    holdout_recall: dict[str, Any] | None
    """retrieval_accuracy() on the held-out shards, or None when nothing was held out."""
    skipped: bool = False
    """True when a previous run with the same settings had already finished and nothing was trained."""

    def line(self) -> str:
        return (
            f"clip_train: {self.num_train_samples} images, {self.epochs} epochs, "
            f"loss {self.loss_first:.3f} -> {self.loss_final:.3f} in {self.seconds:.1f}s -> {self.clip_model}"
        )


def list_done_shards(folder: str) -> list[tuple[str, int]]:
    """(tar path, images) of the finished shards with images (embed.finished_shards), by shard number."""
    from pipelines.embed import finished_shards

    return [shard for _, shard in sorted(finished_shards(folder).items())]


def split_shards(
    shards: list[tuple[str, int]], holdout_fraction: float
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, holdout): the last ceil(fraction * num_shards) shards by number are held out."""
    shards = [s for s in shards if s[1] > 0]
    if not shards:
        raise ValueError("no finished shard with images to train on; run `knn-diffusion download` first")
    num_holdout = math.ceil(holdout_fraction * len(shards)) if holdout_fraction > 0 else 0
    if len(shards) - num_holdout < 1:
        raise ValueError(
            f"{len(shards)} non-empty shard(s) cannot be split into training and a --holdout-fraction "
            f"{holdout_fraction}: download more shards (smaller --number-sample-per-shard) or use --holdout-fraction 0"
        )
    return shards[: len(shards) - num_holdout], shards[len(shards) - num_holdout :]


def _settings(config: ClipTrainConfig, train: list[str], holdout: list[str]) -> dict[str, Any]:
    settings = dataclasses.asdict(config)
    # Where the output sits is no setting (a moved folder still holds the same fit); the model is its name and
    # contents, not the path it was read from (the shipped config moves with the installation).
    del settings["output"]
    settings["shards"] = os.path.abspath(config.shards)
    settings["model"] = config.config_name()
    settings["model_config"] = config.model_config()
    settings["train_shards"] = [os.path.basename(p) for p in train]
    settings["holdout_shards"] = [os.path.basename(p) for p in holdout]
    return settings


def _run_name(settings: dict[str, Any]) -> str:
    """open_clip_train's experiment name: one per settings, so --resume latest only resumes a run like this one."""
    kept = {k: v for k, v in settings.items() if k not in COSMETIC_SETTINGS}
    return "run-" + hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def adam_betas_eps(model_config: dict[str, Any]) -> tuple[float, float, float]:
    """AdamW (beta1, beta2, eps) of the CLIP paper: (0.9, 0.98, 1e-6) for a ViT image tower, else (0.9, 0.999, 1e-8).

    open_clip_train picks these from the model's *name* (params.py get_default_params: "vit" in the name), so a
    ViT config saved as e.g. my-model.json would get the ResNet values; decide from the config instead.
    """
    vision = model_config.get("vision_cfg", {})
    is_vit = "patch_size" in vision or "vit" in str(vision.get("timm_model_name", "")).lower()
    return (0.9, 0.98, 1e-6) if is_vit else (0.9, 0.999, 1e-8)


def _resolve_precision(precision: str, device: str) -> str:
    import torch

    if precision != "auto":
        return precision
    return "amp_bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


@contextmanager
def _scrubbed_environment(num_threads: int) -> Iterator[None]:
    """No launcher variables (so open_clip_train stays single-process) and a fixed torch thread count."""
    import torch

    saved = {k: os.environ.pop(k) for k in DISTRIBUTED_ENV if k in os.environ}
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        os.environ.update(saved)
        torch.set_num_threads(threads)


class _ConsoleFilter(logging.Filter):
    """Keep open_clip_train's progress on the console; its model printout and 100 parameter lines go to out.log only."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg in ("Model:", "Params:") or msg.startswith("  ") or "\n" in msg)


def _tarfile_to_samples_nothrow(
    src: Iterator[dict[str, Any]], handler: Any = None
) -> Iterator[dict[str, Any]]:
    """open_clip_train.data.tarfile_to_samples_nothrow without webdataset's end-of-shard marker.

    webdataset >= 0.2.96 yields an empty dict after each tar (tar_file_expander's eof_value={}), which
    open_clip_train's group_by_keys_nothrow (data.py:195) indexes as a file and dies on with KeyError 'fname'
    (open_clip issue #935, webdataset issue #384). Samples are still split where the key changes.
    """
    import inspect

    import open_clip_train.data as otd
    from webdataset.tariterators import tar_file_expander, url_opener

    handler = handler or otd.log_and_continue
    streams = url_opener(src, handler=handler)
    no_eof = {"eof_value": None} if "eof_value" in inspect.signature(tar_file_expander).parameters else {}
    files = tar_file_expander(streams, handler=handler, **no_eof)
    return otd.group_by_keys_nothrow(files, handler=handler)


@contextmanager
def _open_clip_train_patches(seed: int) -> Iterator[None]:
    """Three fixes to open_clip_train 2.32, undone afterwards.

    data.py: the shard reader dies on webdataset's end-of-shard marker (see _tarfile_to_samples_nothrow).
    data.py: the sample shuffle (wds.shuffle, get_wds_dataset) gets no seed, and webdataset then seeds it from
    the pid and the clock, so --seed did not make a run repeatable; it now draws from a Random(seed).
    logger.py: setup_logging adds a console and a file handler to the root logger on every call and sets every
    logger to INFO; a second fit in the same worker process would print every line twice and keep the old file
    open. Its console handler also gets a filter that keeps the model printout and parameter list in out.log.
    """
    import open_clip_train.data as otd
    import open_clip_train.main as otm

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {
        name: lg.level for name, lg in root.manager.loggerDict.items() if isinstance(lg, logging.Logger)
    }
    original = otm.setup_logging

    def setup_logging(log_file: str | None, log_level: int, include_host: bool = False) -> None:
        original(log_file, log_level, include_host)
        for handler in root.handlers:
            if handler not in handlers and not isinstance(handler, logging.FileHandler):
                handler.addFilter(_ConsoleFilter())

    original_reader, original_shuffle = otd.tarfile_to_samples_nothrow, otd.wds.shuffle
    otm.setup_logging = setup_logging
    otd.tarfile_to_samples_nothrow = _tarfile_to_samples_nothrow
    # One generator for the whole run: each epoch (and each loader worker's copy) continues its stream.
    otd.wds.shuffle = functools.partial(original_shuffle, rng=random.Random(seed))
    try:
        yield
    finally:
        otm.setup_logging = original
        otd.tarfile_to_samples_nothrow = original_reader
        otd.wds.shuffle = original_shuffle
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
        for name, lvl in levels.items():
            logging.getLogger(name).setLevel(lvl)


_LOSS_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/\d+ .* Loss: (\S+) \(")


def parse_losses(log_path: str) -> list[tuple[int, int, float]]:
    """(epoch, samples seen in the epoch, loss) of every progress line in open_clip_train's out.log.

    A resumed run logs the interrupted epoch again; the later line wins.
    """
    found: dict[tuple[int, int], float] = {}
    with open(log_path) as f:
        for line in f:
            match = _LOSS_LINE.search(line)
            if match:
                found[(int(match.group(1)), int(match.group(2)))] = float(match.group(3))
    return [(e, n, loss) for (e, n), loss in sorted(found.items())]


def export_state_dict(train_checkpoint: str, config_name: str, path: str) -> None:
    """open_clip_train's checkpoint (epoch, optimizer, state_dict) -> the model's plain state dict at `path`.

    Prefixes of DDP ('module.') and torch.compile ('_orig_mod.') are stripped; the result must load strictly
    into a fresh model of the config before it is renamed into place.
    """
    import open_clip
    import torch

    checkpoint = torch.load(train_checkpoint, map_location="cpu", weights_only=True)
    state: dict[str, torch.Tensor] = {}
    for key, value in checkpoint["state_dict"].items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        state[key] = value.detach().to("cpu").clone().contiguous()
    open_clip.create_model(config_name).load_state_dict(state, strict=True)
    write_atomic(path, torch_bytes(state))


def _fit_task(
    config: ClipTrainConfig,
    output: str,
    settings: dict[str, Any],
    train: list[tuple[str, int]],
    holdout: list[tuple[str, int]],
    config_path: str,
    num_cpus: int,
) -> dict[str, Any]:
    """Runs inside the Ray task: open_clip_train's main, then export, held-out evaluation and the marker."""
    import open_clip
    import open_clip_train.main as otm
    import torch

    start = time.time()
    name = config.config_name()
    open_clip.add_model_config(config_path)  # the registry is per process: register here, in the worker
    device = "cuda" if config.use_gpu else "cpu"
    if config.use_gpu and not torch.cuda.is_available():
        raise RuntimeError(
            "--use-gpu: the Ray task was given a GPU but torch sees no CUDA device on this node"
        )
    precision = _resolve_precision(config.precision, device)
    # data.py (get_wds_dataset) asserts at least one shard per loader worker.
    workers = min(config.num_workers, len(train))
    if workers != config.num_workers:
        log.warning("clip_train: %d data workers for %d training shards", workers, len(train))
    num_samples = sum(n for _, n in train)
    logs, run = os.path.join(output, "open_clip_train"), _run_name(settings)
    beta1, beta2, eps = adam_betas_eps(settings["model_config"])
    argv = [
        "--model", name,
        "--dataset-type", "webdataset",
        "--train-data", "::".join(path for path, _ in train),
        "--train-num-samples", str(num_samples),
        "--batch-size", str(config.batch_size),
        "--epochs", str(config.epochs),
        "--lr", str(config.lr),
        "--warmup", str(config.warmup),
        "--wd", str(config.weight_decay),
        "--beta1", str(beta1),
        "--beta2", str(beta2),
        "--eps", str(eps),
        "--seed", str(config.seed),
        "--precision", precision,
        "--workers", str(workers),
        "--device", device,
        "--logs", logs,
        "--name", run,
        "--report-to", "",
        "--save-frequency", "0",
        "--save-most-recent",
        "--resume", "latest",
        "--log-every-n-steps", str(config.log_every_n_steps),
        "--zeroshot-frequency", "0",
    ]  # fmt: skip
    log.info("clip_train: open_clip_train %s", " ".join(argv))
    # Ray may hand out more CPUs than the node has cores (a test session's num_cpus); never oversubscribe.
    with (
        _scrubbed_environment(min(num_cpus, os.cpu_count() or num_cpus)),
        _open_clip_train_patches(config.seed),
    ):
        status = otm.main(argv)
    if status is not None:  # main prints its own errors and returns -1 rather than raising
        raise RuntimeError(f"open_clip_train failed (returned {status}); see {logs}/{run}/out.log")
    latest = os.path.join(logs, run, "checkpoints", otm.LATEST_CHECKPOINT_NAME)
    checkpoint = os.path.join(output, CHECKPOINT)
    export_state_dict(latest, name, checkpoint)
    # main.py always also saves the last epoch as epoch_<epochs>.pt, a copy of epoch_latest.pt (weights and
    # optimizer state, ~3x the model): keep one.
    final_copy = os.path.join(logs, run, "checkpoints", f"epoch_{config.epochs}.pt")
    if os.path.exists(final_copy):
        os.remove(final_copy)
    losses = parse_losses(os.path.join(logs, run, "out.log"))
    if not losses:
        raise RuntimeError(f"open_clip_train logged no training loss; see {logs}/{run}/out.log")
    last_epoch = losses[-1][0]
    clip_model = f"open_clip:{config_path}/{checkpoint}"
    holdout_recall = retrieval_accuracy(clip_model, [p for p, _ in holdout]) if holdout else None
    steps = steps_per_epoch(num_samples, config.batch_size, workers) * config.epochs
    record = {
        "settings": settings,
        "clip_model": clip_model,
        "output": output,
        "checkpoint": checkpoint,
        "model_config_path": config_path,
        "train_shards": [p for p, _ in train],
        "holdout_shards": [p for p, _ in holdout],
        "num_train_samples": num_samples,
        "num_holdout_samples": sum(n for _, n in holdout),
        "epochs": config.epochs,
        "steps": steps,
        "precision": precision,
        "device": device,
        "seconds": time.time() - start,
        "loss_first": losses[0][2],
        "loss_final": float(np.mean([loss for e, _, loss in losses if e == last_epoch])),
        "losses": losses,
        "holdout_recall": holdout_recall,
    }
    write_atomic(os.path.join(output, MARKER), json_bytes(record, indent=1))
    return record


def steps_per_epoch(num_samples: int, batch_size: int, workers: int) -> int:
    """open_clip_train's steps per epoch (data.py get_wds_dataset): whole batches, the same number per loader worker.

    An epoch is a fixed number of batches, not an exact pass: webdataset repeats the shards to fill the
    last batch, and a partial batch is never trained on.
    """
    workers = max(1, workers)
    return math.ceil(math.ceil(num_samples / batch_size) / workers) * workers


def _result(record: dict[str, Any], skipped: bool, output: str | None = None) -> ClipTrainResult:
    fields = {f.name for f in dataclasses.fields(ClipTrainResult)} - {"skipped"}
    values = {k: record[k] for k in fields}
    if (
        output is not None and output != record["output"]
    ):  # the folder was moved since: name the files where they are
        values["output"] = output
        values["checkpoint"] = os.path.join(output, CHECKPOINT)
        values["model_config_path"] = os.path.join(output, os.path.basename(record["model_config_path"]))
        values["clip_model"] = f"open_clip:{values['model_config_path']}/{values['checkpoint']}"
    values["losses"] = [tuple(x) for x in values["losses"]]
    if values["holdout_recall"] is not None:  # JSON turned the k keys into strings
        values["holdout_recall"] = _int_keys(values["holdout_recall"])
    return ClipTrainResult(**values, skipped=skipped)


def _int_keys(recall: dict[str, Any]) -> dict[str, Any]:
    return {k: {int(kk): vv for kk, vv in v.items()} if isinstance(v, dict) else v for k, v in recall.items()}


def _task_resources(use_gpu: bool) -> tuple[int, int]:
    """(num_cpus, num_gpus) for the one training task: all CPUs of the largest node that can run it."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if use_gpu:
        nodes = [r for r in nodes if r.get("GPU", 0) >= 1]
        if not nodes:
            raise ValueError(
                "--use-gpu: the Ray cluster has no node with a GPU; drop --use-gpu to train on CPUs"
            )
    cpus = max((int(r.get("CPU", 0)) for r in nodes), default=1)
    return max(cpus, 1), int(use_gpu)


def fit_clip(config: ClipTrainConfig, ray_address: str | None = None) -> ClipTrainResult:
    """Fit a CLIP on the shards' image-caption pairs with open_clip_train, in one Ray task; see the module doc.

    A rerun with the same settings whose clip_train.json exists returns the recorded result; other settings
    into the same output raise ValueError. An interrupted run resumes from its last finished epoch.
    """
    import ray

    from retrieval.ray_env import init_ray

    output = os.path.abspath(config.output)
    train, holdout = split_shards(list_done_shards(os.path.abspath(config.shards)), config.holdout_fraction)
    settings = _settings(config, [p for p, _ in train], [p for p, _ in holdout])
    marker = os.path.join(output, MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            record = json.load(f)
        differences = setting_changes(record["settings"], settings, ignore=tuple(COSMETIC_SETTINGS))
        if differences:
            raise ValueError(
                f"--output {output} holds a CLIP fitted with other settings ({'; '.join(differences)}); "
                "use a new --output folder or delete this one"
            )
        result = _result(record, skipped=True, output=output)
        print(f"clip_train: already done ({marker})", flush=True)
        print(result.line(), flush=True)
        return result
    log.info(
        "clip_train: %s",
        json.dumps({k: v for k, v in settings.items() if k not in ("train_shards", "holdout_shards")}),
    )
    os.makedirs(output, exist_ok=True)
    config_path = os.path.join(output, config.config_name() + ".json")
    write_atomic(config_path, json_bytes(settings["model_config"], indent=4))

    init_ray(ray_address)
    cpus, gpus = _task_resources(config.use_gpu)
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(_fit_task)
    print(
        f"clip_train: {sum(n for _, n in train)} training images in {len(train)} shards "
        f"({sum(n for _, n in holdout)} held out in {len(holdout)}), {config.epochs} epochs on "
        f"{'1 GPU' if gpus else f'{cpus} CPUs'}",
        flush=True,
    )
    record = ray.get(task.remote(config, output, settings, train, holdout, config_path, cpus))
    result = _result(record, skipped=False)
    if result.holdout_recall is not None:
        print(recall_line(result.holdout_recall, "held-out"), flush=True)
    print(result.line(), flush=True)
    return result


def recall_line(recall: dict[str, Any], what: str = "") -> str:
    """One line: text->image and image->text recall@k with the chance level."""
    ks = sorted(recall["text_to_image"])
    parts = [
        f"R@{k} {recall['text_to_image'][k]:.3f} / {recall['image_to_text'][k]:.3f} (chance {recall['chance'][k]:.3f})"
        for k in ks
    ]
    return (
        f"clip_train: {what} recall text->image / image->text on {recall['num_pairs']} pairs: "
        + ", ".join(parts)
    )


def read_pairs(shards: Sequence[str]) -> Iterator[tuple[str, bytes, str]]:
    """(key, image bytes, caption) of every sample with an image and a caption in the webdataset tars, in order."""
    import fsspec

    from retrieval.storage import tar_samples

    for shard in shards:
        with fsspec.open(shard, "rb") as f:
            samples = {
                key: {ext.lower(): data for ext, data in sample.items()}
                for key, sample in tar_samples(f, shard)
            }
        for key in sorted(samples):
            image = next((samples[key][e] for e in IMAGE_EXTENSIONS if e in samples[key]), None)
            if image is not None and "txt" in samples[key]:
                yield key, image, samples[key]["txt"].decode("utf-8")


def recall_at_k(sims: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of rows whose own column (the diagonal) is among the k highest of the row.

    sims [N, N]: row i scores query i against every candidate; ties with the true one count in its favour.
    """
    own = np.diag(sims)
    rank = (sims > own[:, None]).sum(axis=1)
    return {int(k): float((rank < k).mean()) for k in ks}


def retrieval_accuracy(
    clip_model: str,
    shards: list[str],
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 256,
    max_pairs: int = 10_000,
) -> dict[str, Any]:
    """Text->image and image->text recall@k among the image-caption pairs of `shards` (held-out tars; the first
    max_pairs of them).

    Returns {"num_pairs": N, "text_to_image": {k: recall}, "image_to_text": {k: recall}, "chance": {k: min(k/N, 1)}}.
    text->image@k: the fraction of captions whose own image is among the k images most similar to it.
    """
    import torch
    from PIL import Image

    from retrieval.clip_model import ClipEncoder

    if not shards:
        raise ValueError("retrieval_accuracy needs at least one shard (tar path)")
    if not ks or any(int(k) != k or k <= 0 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    encoder = ClipEncoder(clip_model)
    image_emb: list[torch.Tensor] = []
    text_emb: list[torch.Tensor] = []
    pixels: list[torch.Tensor] = []
    captions: list[str] = []

    def flush() -> None:
        if captions:
            image_emb.append(encoder.encode_images(torch.stack(pixels)))
            text_emb.append(encoder.encode_texts(captions))
            pixels.clear()
            captions.clear()

    for num_read, (_, image, caption) in enumerate(read_pairs(shards)):
        if num_read == max_pairs:  # the ranking holds N x N similarities: bounded memory for large hold-outs
            break
        pixels.append(encoder.preprocess(Image.open(io.BytesIO(image)).convert("RGB")))
        captions.append(caption)
        if len(captions) == batch_size:
            flush()
    flush()
    if not image_emb:
        raise ValueError(f"no image-caption pairs in {len(shards)} shard(s), e.g. {shards[0]}")
    img = torch.cat(image_emb).numpy()
    txt = torch.cat(text_emb).numpy()
    sims = txt @ img.T  # [N captions, N images]
    n = len(img)
    return {
        "num_pairs": n,
        "text_to_image": recall_at_k(sims, ks),
        "image_to_text": recall_at_k(sims.T, ks),
        "chance": {int(k): min(k / n, 1.0) for k in ks},
    }
