"""Training on Ray Train: image shards + neighbour tables -> checkpoints (model, EMA, optimizer, step, config),
metrics.csv and loss.png in the run folder.

TorchTrainer runs `train_loop_per_worker` on each worker under DDP (gloo on CPU, nccl on GPU); data is
streamed to the workers by Ray Data (diffusion.data). Rerunning the same command (same --output) resumes
from the latest checkpoint (Ray Train restores a run by its storage path and name); a failed worker is
replaced and training resumes from the last checkpoint (FailureConfig).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import pickle
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import fsspec
import torch

from diffusion.config import TrainConfig
from retrieval.storage import atomic_write_bytes, check_settings

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"
RESUMABLE_CHANGES = (
    "steps",
    "num_workers",
    "cpus_per_worker",
    "torch_threads",
    "use_gpu",
    "max_failures",
    "step_hook",
)
METRIC_FIELDS = (
    "step",
    "loss",
    "samples_per_s",
    "data_wait_fraction",
    "lr",
    "weight_disagreement",
    "start_step",
    "time",
    "aligned_fraction",  # an editing model's pairs whose neighbour ECC aligned (diffusion/edit_pairs.py)
)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 autocast where the hardware computes it fast (CUDA with bf16, CPUs with AMX), else none."""
    from retrieval.clip_model import cpu_flags

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if "amx_bf16" in cpu_flags() else None


def condition_of(batch: dict[str, torch.Tensor], use_knn: bool) -> dict[str, torch.Tensor]:
    cond = {"query": batch["query"].float()}
    if use_knn:
        cond["neighbours"] = batch["neighbours"].float()
        cond["valid"] = batch["valid"].bool()
    return cond


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (what the EMA tracks and checkpoints hold)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def new_training_state(config: TrainConfig) -> tuple[Any, Any, torch.optim.Optimizer]:
    """(model, its EMA, optimizer) as a run starts them, seeded by config.seed."""
    from diffusion.model import build_network

    torch.manual_seed(config.seed)
    model = build_network(config.model, config.num_timesteps)
    # fine-tuning: a trained network's weights start the run (a resumed run then loads its own)
    if config.init_from:
        init_weights(model, config.init_from)
    ema = Ema(model, decay=config.ema_decay)  # short runs: the decay ramps up
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return model, ema, opt


class Ema:
    """An exponential moving average of a model's weights and buffers, whose decay ramps up as training
    starts: decay(step) = min(decay, 1 - step ** (-2/3)), 0 at steps 0 and 1 (K. Crowson's warm-up, as in
    k-diffusion's EMAWarmup and timm's ModelEmaV3(use_warmup=True), which gives the same weights:
    tests/test_train.py). Written here because importing timm adds 1.6-1.8 s to every training worker's start
    (a slow 2-core VM). .module: the averaged copy."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        import copy

        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    def decay_at(self, step: int) -> float:
        return 0.0 if step <= 1 else min(self.decay, 1 - step ** (-2 / 3))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = self.decay_at(step)
        averaged, current = [], []
        for ema_v, model_v in zip(
            self.module.state_dict().values(), model.state_dict().values(), strict=True
        ):
            if ema_v.is_floating_point():
                averaged.append(ema_v)
                current.append(model_v.to(ema_v.dtype))
            else:
                ema_v.copy_(model_v)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - decay)


def init_weights(model: torch.nn.Module, checkpoint: str) -> None:
    """Start model from a checkpoint's EMA weights (fine-tuning). A tensor that differs only in its input channels
    (dim 1: an editing model's stem reads the source beside x_t) gets the trained weights in its first channels
    and zeros in the new ones, so the network starts as the trained one; any other mismatch is an error."""
    path = latest_checkpoint(checkpoint)
    weights = read_state(path)["ema"]
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in weights:
            raise ValueError(
                f"init_from {path}: it has no {name}; start from a checkpoint of the same network"
            )
        src = weights[name]
        if src.shape == tensor.shape:
            own[name] = src
        elif (
            src.dim() == tensor.dim() >= 2
            and src.shape[0] == tensor.shape[0]
            and src.shape[2:] == tensor.shape[2:]
        ):
            grown = torch.zeros_like(tensor)
            grown[:, : src.shape[1]] = src
            own[name] = grown
        else:
            raise ValueError(
                f"init_from {path}: {name} is {tuple(src.shape)} there and {tuple(tensor.shape)} here; start from a "
                "checkpoint of the same network"
            )
    model.load_state_dict(own)


def restore_training_state(
    model: torch.nn.Module, ema: Any, opt: torch.optim.Optimizer, state: dict[str, Any] | None, device: Any
) -> int:
    """Move model and EMA to device, then load a checkpoint's weights and optimizer state into them; returns its
    step (0 without a state). The order matters on a GPU: Optimizer.load_state_dict puts each moment on its
    parameter's device at load time, so loading before the move would leave Adam's moments on the CPU."""
    model.to(device)
    ema.module.to(device)
    if state is None:
        return 0
    load_weights(model, state["model"], STATE_FILE)
    load_weights(ema.module, state["ema"], STATE_FILE, "EMA")
    opt.load_state_dict(state["optimizer"])
    return int(state["step"])


def training_step(
    model: torch.nn.Module,
    ema: Any,
    opt: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    step: int,
    config: TrainConfig,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator,
    amp: torch.dtype | None,
    tokenizer: Any = None,
) -> tuple[torch.Tensor, float]:
    """One optimizer step on a batch of rows (diffusion.data): warmup lr, loss under autocast when amp is set,
    clipped gradients, the EMA update. Returns (the detached loss, the lr used). The loss is the diffusion loss
    on the images (or on their latents, given the tokenizer), or an autoencoder's reconstruction loss."""
    from diffusion.loss import diffusion_loss
    from diffusion.tokenizer import autoencoder_loss

    x0 = batch["image"].permute(0, 3, 1, 2).float() / 127.5 - 1
    lr = config.lr * min(1.0, (step + 1) / max(config.warmup_steps, 1))
    for group in opt.param_groups:
        group["lr"] = lr
    discrete = config.model.backbone == "discrete"
    autoencoder = config.model.arch == "autoencoder"  # reads images only
    cond = {} if autoencoder else condition_of(batch, config.model.use_knn)
    if config.model.edit:  # the manipulated image, in the space x0 is in
        source = batch["source"].permute(0, 3, 1, 2).float() / 127.5 - 1
        cond["source"] = tokenizer.encode(source) if tokenizer is not None else source
    if tokenizer is not None:
        x0 = tokenizer.tokens(x0) if discrete else tokenizer.encode(x0)
    with torch.autocast(x0.device.type, dtype=amp) if amp else nullcontext():
        if autoencoder:
            loss = autoencoder_loss(model, x0)
        elif discrete:
            from diffusion.discrete import MaskSchedule, discrete_diffusion_loss

            loss = discrete_diffusion_loss(
                model,
                x0,
                cond,
                MaskSchedule(config.model.codebook_size, config.num_timesteps),
                config.model.cond_drop_prob,
                generator,
                query_drop_prob=config.model.query_drop_prob,
                aux_weight=config.aux_weight,
            )
        else:
            loss = diffusion_loss(
                model,
                x0,
                cond,
                alphas_cumprod,
                config.model.cond_drop_prob,
                generator,
                prediction=config.prediction,
                query_drop_prob=config.model.query_drop_prob,
                min_snr_gamma=config.min_snr_gamma,
            )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    opt.step()
    ema.update(unwrap(model), step=step)
    return loss.detach(), lr


def checkpoint_state(
    model: torch.nn.Module, ema: Any, opt: torch.optim.Optimizer, step: int, config: TrainConfig
) -> dict[str, Any]:
    """What a checkpoint's state.pt holds (model is the unwrapped module)."""
    return {
        "model": model.state_dict(),
        "ema": ema.module.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "config": json.dumps(config.to_dict()),
    }


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """One worker's loop (also runs alone with one CPU worker)."""
    import ray.train
    import ray.train.torch

    from diffusion.schedule import alphas_cumprod

    config = TrainConfig.from_dict(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if config.torch_threads and torch.get_num_threads() != config.torch_threads:
        # normally OMP_NUM_THREADS (set for the workers by train()) has done this; set_num_threads also turns
        # MKL's dynamic threading off, which costs the small model 5-10% (bench/train.py)
        torch.set_num_threads(config.torch_threads)
    model, ema, opt = new_training_state(config)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = read_state(os.path.join(d, STATE_FILE))
    step = restore_training_state(model, ema, opt, state, device)
    start_step = step
    hook = step_hook(config.step_hook)
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    raw = unwrap(model)
    abar = alphas_cumprod(config.schedule, config.num_timesteps).to(device=device, dtype=torch.float32)
    gen = torch.Generator(device=device).manual_seed(config.seed + 1_000_003 * rank + step)
    amp = autocast_dtype(device, config.precision)
    tokenizer = worker_tokenizer(config, device)
    shard = ray.train.get_dataset_shard("train")
    window = new_window()
    while step < config.steps:  # the stream holds the epochs needed; it restarts only if a split ran short
        tic = time.perf_counter()
        for batch in shard.iter_torch_batches(
            batch_size=config.batch_size_per_worker,
            local_shuffle_buffer_size=config.shuffle_buffer or None,
            local_shuffle_seed=config.seed + rank + step,
            drop_last=True,
            device=device,
            prefetch_batches=8,
        ):
            window["wait"] += time.perf_counter() - tic
            loss, lr = training_step(model, ema, opt, batch, step, config, abar, gen, amp, tokenizer)
            step += 1
            window["loss"] += float(loss)
            window["n"] += 1
            window["aligned"] += float(batch["aligned"].float().mean()) if "aligned" in batch else 0.0
            due_ckpt = step % config.checkpoint_every == 0 or step == config.steps
            if step % config.log_every == 0 or due_ckpt:
                metrics = window_metrics(window, step, lr, start_step, raw, config)
                if due_ckpt:
                    with tempfile.TemporaryDirectory() as d:
                        if rank == 0:
                            torch.save(
                                checkpoint_state(raw, ema, opt, step, config), os.path.join(d, STATE_FILE)
                            )
                        ckpt = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
                        ray.train.report(metrics, checkpoint=ckpt)
                else:
                    ray.train.report(metrics)
                window = new_window()
            if step >= config.steps:
                break
            if hook is not None:
                hook(step=step, rank=rank, world=world, config=config)
            tic = time.perf_counter()


def new_window() -> dict[str, float]:
    """A worker's sums since its last report (window_metrics turns them into one)."""
    return {"loss": 0.0, "n": 0, "wait": 0.0, "aligned": 0.0, "start": time.perf_counter()}


def window_metrics(
    window: dict[str, float], step: int, lr: float, start_step: int, raw: torch.nn.Module, config: TrainConfig
) -> dict[str, float]:
    """A worker's report over the steps since its last one."""
    seconds = time.perf_counter() - window["start"]
    metrics = {
        "step": step,
        "loss": window["loss"] / window["n"],
        "samples_per_s": window["n"] * config.batch_size_per_worker / seconds,
        "data_wait_fraction": window["wait"] / seconds,
        "lr": lr,
        "param_sum": float(sum(p.detach().double().sum() for p in raw.parameters())),
        "start_step": start_step,
    }
    if config.model.edit:
        metrics["aligned_fraction"] = window["aligned"] / window["n"]
    return metrics


def worker_tokenizer(config: TrainConfig, device: Any) -> Any:
    """The frozen tokenizer whose latents a latent model learns, on the worker's device (None: pixel space)."""
    if not config.tokenizer:
        return None
    from diffusion.tokenizer import load_tokenizer

    return load_tokenizer(config.tokenizer).to(device)


def step_hook(name: str | None) -> Any:
    """The callable a "module:function" step_hook names (None: no hook)."""
    if not name:
        return None
    import importlib

    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def _metrics_callback(config: TrainConfig) -> Any:
    from ray.train import UserCallback
    from tqdm import tqdm

    class MetricsLog(UserCallback):
        """On the controller: average the workers' reports into <output>/metrics.csv and show progress."""

        def __init__(self) -> None:
            self.path = _join(config.output, "metrics.csv")
            self.bar: Any = None
            self.last_step: int | None = None
            self.start = time.time()

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            step = int(metrics[0]["step"])
            row = {
                "step": step,
                "loss": sum(m["loss"] for m in metrics) / len(metrics),
                "samples_per_s": sum(m["samples_per_s"] for m in metrics),
                "data_wait_fraction": max(m["data_wait_fraction"] for m in metrics),
                "lr": metrics[0]["lr"],
                "weight_disagreement": max(m["param_sum"] for m in metrics)
                - min(m["param_sum"] for m in metrics),
                "start_step": min(m["start_step"] for m in metrics),
                "time": time.time() - self.start,
            }
            if "aligned_fraction" in metrics[0]:
                row["aligned_fraction"] = sum(m["aligned_fraction"] for m in metrics) / len(metrics)
            if self.last_step is None or step <= self.last_step:
                # a resumed run, or a worker group restarted from a checkpoint: drop the rows it repeats, once
                write_metrics(self.path, [r for r in read_metrics(self.path) if r["step"] < step] + [row])
            else:  # then one line per report: the file is not read back or rewritten while training goes on
                append_metrics(self.path, row)
            self.last_step = step
            if self.bar is None:
                self.bar = tqdm(total=config.steps, initial=step, desc="train", unit="step")
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.0f}")

    return MetricsLog()


def _join(run: str, name: str) -> str:
    return f"{run.rstrip('/')}/{name}"


def read_metrics(path: str) -> list[dict[str, float]]:
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return []
    with fs.open(p, "r") as f:
        # columns a row leaves empty (aligned_fraction outside editing runs) are left out
        return [{k: float(v) for k, v in r.items() if k and v not in ("", None)} for r in csv.DictReader(f)]


def write_metrics(path: str, rows: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    fs, p = fsspec.core.url_to_fs(path)
    atomic_write_bytes(fs, p, buf.getvalue().encode())


def append_metrics(path: str, row: dict[str, float]) -> None:
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=METRIC_FIELDS, restval="").writerow(row)
    fs, p = fsspec.core.url_to_fs(path)
    try:
        with fs.open(p, "ab") as f:
            f.write(buf.getvalue().encode())
    except (NotImplementedError, ValueError):  # object stores cannot append: rewrite the file instead
        write_metrics(path, read_metrics(path) + [row])


def plot_loss(rows: list[dict[str, float]], path: str, size: tuple[int, int] = (640, 360)) -> None:
    """A PNG line plot of loss against step (PIL only; no plotting library in the dependency set)."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, w - 20, 20, h - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    if rows:
        steps = [r["step"] for r in rows]
        losses = [r["loss"] for r in rows]
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1e-6
        s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1

        def xy(s: float, v: float) -> tuple[float, float]:
            return left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - lo) / (hi - lo) * (
                bottom - top
            )

        draw.line([xy(s, v) for s, v in zip(steps, losses, strict=True)], fill=(31, 119, 180), width=2)
        draw.text((5, top), f"{hi:.4f}", fill="black")
        draw.text((5, bottom - 10), f"{lo:.4f}", fill="black")
        draw.text((left, bottom + 8), f"step {int(s0)}", fill="black")
        draw.text((right - 80, bottom + 8), f"step {int(s1)}", fill="black")
    draw.text((left + 5, 3), "training loss", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    fs, p = fsspec.core.url_to_fs(path)
    atomic_write_bytes(fs, p, buf.getvalue())


def train(config: TrainConfig, ray_address: str | None = None) -> dict[str, Any]:
    """Train (or resume) the run in config.output; returns the last metrics row and the checkpoint path."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from diffusion.data import make_dataset, part_items
    from retrieval.ray_env import init_ray

    start = time.time()
    # check the inputs (files, dimensions, k) before anything is written or started
    items = part_items(config)
    from retrieval.database import DatabaseInfo

    config.clip_model = DatabaseInfo.read(
        config.db
    ).clip_model  # recorded: sampling checks its databases' CLIP
    if config.tokenizer:
        use_tokenizer(config)
    if config.init_from and "://" not in config.init_from:
        config.init_from = os.path.abspath(latest_checkpoint(config.init_from))  # the workers open it
    output = config.output if "://" in config.output else os.path.abspath(config.output)
    config.output = output
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    check_settings(
        f"{output}/config.json",
        config.to_dict(),
        f"--output {output} holds a run",
        "use another --output",
        ignore=tuple(RESUMABLE_CHANGES),
    )
    init_ray(ray_address)
    if config.torch_threads is None and config.cpus_per_worker is not None:
        config.torch_threads = max(1, math.ceil(config.cpus_per_worker))  # the share the user gave it
    if config.cpus_per_worker is None:
        from retrieval.ray_env import node_cpus

        cpus = node_cpus()
        share = min(cpus) / -(-config.num_workers // len(cpus))  # per worker, on the most loaded node
        # Whole CPUs, one per worker left to data loading: Ray Data (2.55) is handed the CPUs Train leaves free
        # floored to whole numbers (its autoscaling coordinator divides them with //), so a worker holding
        # 1.5 of 2 CPUs would leave it none, and it would load one part at a time, on demand.
        config.cpus_per_worker = float(math.floor(share) - 1) if share >= 2 else max(0.5, share - 0.5)
        if config.torch_threads is None:
            config.torch_threads = max(1, math.floor(share))  # decoding is light: torch uses the whole share
    dataset = make_dataset(config, start_step=_latest_state(output)[1], items=items)
    log.info("training %s", json.dumps(config.to_dict()))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        run_config=RunConfig(
            name="ray_train",
            storage_path=output,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[_metrics_callback(config)],
            # torch sizes its thread pool from this at start-up; Ray would otherwise set it to the reserved CPUs
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(config.torch_threads)}},
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    rows = read_metrics(_join(output, "metrics.csv"))
    plot_loss(rows, _join(output, "loss.png"))
    last = rows[-1] if rows else {}
    ckpt = result.checkpoint.path if result.checkpoint else None
    print(
        f"train: step {int(last.get('step', 0))}/{config.steps}, loss {last.get('loss', float('nan')):.4f}, "
        f"{last.get('samples_per_s', float('nan')):.0f} samples/s, data wait {last.get('data_wait_fraction', 0):.1%} "
        f"in {time.time() - start:.0f}s -> {ckpt}",
        flush=True,
    )
    return {"metrics": last, "checkpoint": ckpt}


def use_tokenizer(config: TrainConfig) -> None:
    """Point the denoiser at the tokenizer's latent space (latent_factor, latent_channels from its file), after
    checking that it encodes the images the model is trained on."""
    from diffusion.config import ModelConfig
    from diffusion.tokenizer import read_tokenizer

    config.tokenizer = os.path.abspath(config.tokenizer)  # the workers open it
    tok = ModelConfig(**json.loads(read_tokenizer(config.tokenizer)["config"]))
    mc = config.model
    if tok.image_size != mc.image_size or tok.channels != mc.channels:
        raise ValueError(
            f"tokenizer {config.tokenizer} encodes {tok.image_size} px images with {tok.channels} channels but the "
            f"model generates {mc.image_size} px with {mc.channels}; set model: image_size: {tok.image_size}"
        )
    if mc.backbone == "discrete" and not tok.codebook_size:
        raise ValueError(
            f"the discrete backbone needs a quantising tokenizer (fsq_levels, e.g. preset tokenizer-fsq); "
            f"{config.tokenizer} has none"
        )
    mc.latent_factor, mc.latent_channels = tok.latent_factor, tok.latent_channels
    mc.codebook_size = tok.codebook_size if mc.backbone == "discrete" else 0
    mc.__post_init__()  # the network must fit the latent grid


def latest_checkpoint(run: str) -> str:
    """The state.pt of the highest step under a run folder or URI (or the path itself if it is a state.pt)."""
    fs, root = fsspec.core.url_to_fs(run)
    if fs.isfile(root):
        return run
    path, _ = _latest_state(run)
    if path is None:
        raise FileNotFoundError(
            f"--checkpoint {run} holds no {STATE_FILE}; train first (`knn-diffusion train`)"
        )
    return path


def _latest_state(run: str) -> tuple[str | None, int]:
    """(the state.pt of the highest step under a run folder or URI, that step), or (None, 0) for a new run."""
    fs, root = fsspec.core.url_to_fs(run)
    found = [p for p in fs.find(root) if p.rsplit("/", 1)[-1] == STATE_FILE] if fs.exists(root) else []
    if not found:
        return None, 0
    # checkpoint folders are named checkpoint_<timestamp>; the step inside decides, the newest wins a tie
    step, best = max((_step_of(fs, p), p) for p in found)
    return (fs.unstrip_protocol(best) if "://" in run else best), step


def _step_of(fs: Any, path: str) -> int:
    """The step a state.pt holds. Local files are memory-mapped, so only the small pickle is read, not the
    tensors (gigabytes for the paper preset); other filesystems read the file."""
    return int(read_state(path, fs, mmap=True)["step"])


STATE_KEYS = ("model", "ema", "optimizer", "step", "config")


def read_state(path: str, fs: Any = None, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's state dict (weights_only: tensors and plain containers, no code). A file that is empty,
    truncated, not a torch file or not one of our checkpoints is a ValueError that names it."""
    if fs is None:
        fs, path = fsspec.core.url_to_fs(path)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    try:
        if mmap and local:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            with fs.open(path) as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
    except (EOFError, OSError, RuntimeError, pickle.UnpicklingError, ValueError) as err:
        reason = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"checkpoint {path} cannot be read ({reason}): it is empty, truncated or not a torch file; "
            "delete it to fall back to the previous checkpoint, or pass another --checkpoint"
        ) from err
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} is not a kNN-Diffusion training state (no {missing})")
    return state


def load_weights(module: torch.nn.Module, weights: dict[str, Any], path: str, what: str = "model") -> None:
    """module.load_state_dict(weights), with a one-line error naming the checkpoint when they do not fit."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        raise ValueError(
            f"checkpoint {path}: the {what} weights do not fit the network its config describes "
            f"({len(lines)} problems, first: {lines[0][:200] if lines else err}); the file was changed or mixed up"
        ) from err
