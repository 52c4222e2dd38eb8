"""Training benchmark: our Ray Train loop (Ray Data streaming from shards + neighbour tables) vs a bare PyTorch
loop over the same rows held in memory, same model, optimizer, loss, EMA and batch size, in one run.

1. Data: --num-images generated captioned images served on 127.0.0.1, through our download, embed (a
   random-init ViT-S-32, 384-d), index and neighbours (k = the model's) stages under --workdir (reused).
2. Ours: diffusion.train.train with one worker; samples/s and data-wait fraction from its metrics, first
   report window (start-up, first batches) excluded.
3. Bare: diffusion.data.load_part on every part into memory once (not timed), then a plain loop drawing
   shuffled batches; samples/s over the same windows, the first excluded.
Prints both rates, the ratio (target >= 0.9) and our data-wait fraction (target < 5%).

    .venv/bin/python bench/train.py --num-images 1024 --steps 120 --preset small
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Ray Train loop vs bare PyTorch loop: samples/s and data wait.")
    p.add_argument(
        "--num-images", type=int, default=1024, help="images in the database (default: %(default)s)"
    )
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per loop (default: %(default)s)")
    p.add_argument(
        "--windows", type=int, default=6, help="report windows; the first is excluded (default: 6)"
    )
    p.add_argument("--preset", default="small", help="model preset (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default: %(default)s)")
    p.add_argument("--workdir", default="/tmp/knn_bench_train", help="where data and runs live")
    p.add_argument("--json-out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def make_data(workdir: str, num_images: int, k: int) -> tuple[str, str]:
    import pandas as pd

    from pipelines.demo import random_init_checkpoint
    from pipelines.demo_data import FolderServer, caption_for, write_images
    from pipelines.download import DownloadConfig, download
    from pipelines.embed import EmbedConfig, embed
    from pipelines.index import IndexConfig, build
    from pipelines.neighbours import NeighboursConfig, compute

    db = os.path.join(workdir, f"db_{num_images}")
    neighbours = os.path.join(db, f"neighbours_k{k}")
    if os.path.exists(os.path.join(neighbours, "neighbours.json")):
        return db, neighbours
    names = write_images(os.path.join(workdir, "images"), num_images)
    clip = random_init_checkpoint(os.path.join(workdir, "clip_random_vit_s_32.pt"))
    with FolderServer(os.path.join(workdir, "images")) as server:
        urls = pd.DataFrame(
            {
                "url": [f"{server.base}/{n}" for n in names],
                "caption": list(map(caption_for, range(num_images))),
            }
        )
        urls.to_parquet(os.path.join(workdir, "urls.parquet"))
        download(
            DownloadConfig(
                url_list=os.path.join(workdir, "urls.parquet"),
                output_folder=os.path.join(workdir, f"shards_{num_images}"),
                image_size=64,
                number_sample_per_shard=128,
                allow_network=["127.0.0.1/32"],
            )
        )
    embed(EmbedConfig(shards=os.path.join(workdir, f"shards_{num_images}"), output=db, clip_model=clip))
    build(IndexConfig(db=db, index_key="Flat", max_index_memory="1G", current_memory_available="4G"))
    compute(NeighboursConfig(db=db, k=k, output=neighbours))
    return db, neighbours


def bare_loop(config, windows: int) -> list[float]:  # type: ignore[no-untyped-def]
    """samples/s per window of a plain PyTorch loop over in-memory rows (same model, optimizer, loss, EMA)."""
    from timm.utils import ModelEmaV3

    from diffusion.data import load_part, part_items
    from diffusion.loss import diffusion_loss
    from diffusion.model import KnnDenoiser
    from diffusion.schedule import cosine_alphas_cumprod
    from diffusion.train import autocast_dtype, condition_of

    parts = [
        load_part(
            {k: np.array([v]) for k, v in item.items()}, config.db, config.model.image_size, config.model.k
        )
        for item in part_items(config)
    ]
    rows = {k: torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in parts[0]}
    n = len(rows["image"])
    torch.manual_seed(config.seed)
    model = KnnDenoiser(config.model)
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True)  # short runs: the decay ramps up
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    abar = cosine_alphas_cumprod(config.num_timesteps).float()
    gen = torch.Generator().manual_seed(config.seed)
    amp = autocast_dtype(torch.device("cpu"), config.precision)
    bs = config.batch_size_per_worker
    per_window = config.steps // windows
    rates, order, pos, step = [], torch.randperm(n), 0, 0
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(per_window):
            if pos + bs > n:
                order, pos = torch.randperm(n), 0
            idx = order[pos : pos + bs]
            pos += bs
            batch = {k: v[idx] for k, v in rows.items()}
            x0 = batch["image"].permute(0, 3, 1, 2).float() / 127.5 - 1
            with torch.autocast("cpu", dtype=amp) if amp else torch.autocast("cpu", enabled=False):
                loss = diffusion_loss(
                    model,
                    x0,
                    condition_of(batch, config.model.use_knn),
                    abar,
                    config.model.cond_drop_prob,
                    gen,
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            ema.update(model, step=step)
            step += 1
        rates.append(per_window * bs / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> dict:
    from diffusion.config import TrainConfig, model_config
    from diffusion.train import read_metrics, train
    from pipelines.ray_env import init_ray

    args = parse_args(argv)
    mc = model_config(args.preset, cond_dim=384)
    init_ray(None)
    db, neighbours = make_data(args.workdir, args.num_images, mc.k)
    out = os.path.join(args.workdir, "run")
    shutil.rmtree(out, ignore_errors=True)
    per_window = args.steps // args.windows
    config = TrainConfig(
        db=db,
        neighbours=neighbours,
        output=out,
        model=mc,
        steps=per_window * args.windows,
        batch_size_per_worker=args.batch_size,
        log_every=per_window,
        checkpoint_every=per_window * args.windows,
        num_workers=1,
    )
    train(config)
    rows = read_metrics(os.path.join(out, "metrics.csv"))[1:]
    ours = float(np.mean([r["samples_per_s"] for r in rows]))
    wait = float(np.mean([r["data_wait_fraction"] for r in rows]))
    bare = float(np.mean(bare_loop(config, args.windows)[1:]))
    result = {
        "preset": args.preset,
        "num_images": args.num_images,
        "steps": config.steps,
        "batch_size": args.batch_size,
        "ours_samples_per_s": ours,
        "bare_samples_per_s": bare,
        "ratio": ours / bare,
        "ours_data_wait_fraction": wait,
        "torch_threads_driver": torch.get_num_threads(),
    }
    print(f"\n{'':24s}{'ours (Ray Train + Ray Data)':>30s}{'bare PyTorch (in memory)':>28s}")
    print(f"{'samples/s':24s}{ours:>30.1f}{bare:>28.1f}")
    print(f"{'data wait fraction':24s}{wait:>30.1%}{'0 (preloaded)':>28s}")
    print(
        f"\ntrain bench: {args.preset} model, batch {args.batch_size}, {config.steps} steps: ours {ours:.1f} vs bare "
        f"{bare:.1f} samples/s = {ours / bare:.2f}x, data wait {wait:.1%}"
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
