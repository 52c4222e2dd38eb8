"""Training benchmark: our Ray Train loop (Ray Data streaming from shards + neighbour tables) against two bare
PyTorch loops on the same machine with no Ray running: same model, optimizer, loss, EMA, batch size and
checkpoint, in one run.

1. Data: --num-images generated captioned images served on 127.0.0.1, through our download, embed (a
   random-init ViT-S-32, 384-d), index and neighbours (k = the model's) stages under --workdir (reused).
2. Bare, DataLoader: a torch DataLoader with one worker process streaming the same parts in the same order
   through the same load_part (what a plain PyTorch script reading these shards would do).
3. Bare, in memory: every part decoded once up front (not timed), then shuffled batches drawn; an upper bound
   with no data loading at all.
4. Ours: diffusion.train.train with one worker (Ray started afresh); samples/s and data-wait fraction from its
   metrics.
The three loops take turns, --repeats times, so a slow spell of the machine hits all of them; the first report
window (start-up, first batches) is left out of every mean. Prints each repeat's means, the medians, our ratio
to each bare loop (target >= 0.9) and our data-wait fraction (target < 5%).

    .venv/bin/python bench/train.py --num-images 1024 --steps 240 --preset small
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
    p.add_argument("--steps", type=int, default=240, help="optimizer steps per loop (default: %(default)s)")
    p.add_argument(
        "--windows", type=int, default=6, help="report windows; the first is excluded (default: 6)"
    )
    p.add_argument("--preset", default="small", help="model preset (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default: %(default)s)")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="intra-op threads in all three loops (default: ours picks them, the bare loops use the same number)",
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="runs of each loop, alternating; medians reported (default: 3)"
    )
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


class PartStream(torch.utils.data.IterableDataset):
    """The rows of our stream (diffusion.data.epoch_items, load_part) for a plain PyTorch DataLoader."""

    def __init__(self, config, items: list[dict]) -> None:  # type: ignore[no-untyped-def]
        self.config, self.items = config, items

    def __iter__(self):  # type: ignore[no-untyped-def]
        from diffusion.data import epoch_items, load_part

        c = self.config
        for item in epoch_items(self.items, 10**6, c.seed):
            part = load_part({k: np.array([v]) for k, v in item.items()}, c.db, c.model.image_size, c.model.k)
            for i in range(len(part["image"])):
                yield {k: v[i] for k, v in part.items()}


def bare_batches(config, source: str):  # type: ignore[no-untyped-def]
    """Endless batches: "memory" (every part decoded once up front, untimed, then shuffled batches drawn) or
    "dataloader" (a torch DataLoader with one worker process streaming the parts as our pipeline does)."""
    from diffusion.data import load_part, part_items

    items = part_items(config)
    bs = config.batch_size_per_worker
    if source == "dataloader":
        loader = torch.utils.data.DataLoader(
            PartStream(config, items), batch_size=bs, num_workers=1, prefetch_factor=8, drop_last=True
        )
        yield from loader
        return
    parts = [
        load_part(
            {k: np.array([v]) for k, v in item.items()}, config.db, config.model.image_size, config.model.k
        )
        for item in items
    ]
    rows = {k: torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in parts[0]}
    n = len(rows["image"])
    while True:
        order = torch.randperm(n)
        for pos in range(0, n - bs + 1, bs):
            idx = order[pos : pos + bs]
            yield {k: v[idx] for k, v in rows.items()}


def bare_loop(config, windows: int, checkpoint_dir: str, source: str) -> tuple[list[float], float]:  # type: ignore[no-untyped-def]
    """(samples/s per window, data-wait fraction after the first window) of a plain PyTorch loop (same model,
    optimizer, loss, EMA, and the same checkpoint written at the same steps) fed by bare_batches(source)."""
    from diffusion.schedule import alphas_cumprod
    from diffusion.train import autocast_dtype, checkpoint_state, new_training_state, training_step

    model, ema, opt = new_training_state(config)
    abar = alphas_cumprod(config.schedule, config.num_timesteps).float()
    gen = torch.Generator().manual_seed(config.seed)
    amp = autocast_dtype(torch.device("cpu"), config.precision)
    per_window = config.steps // windows
    batches = bare_batches(config, source)
    rates, waits, step = [], [], 0
    for _ in range(windows):
        start, wait = time.perf_counter(), 0.0
        for _ in range(per_window):
            tic = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - tic
            training_step(model, ema, opt, batch, step, config, abar, gen, amp)
            step += 1
            if step % config.checkpoint_every == 0 or step == config.steps:
                tmp = os.path.join(checkpoint_dir, "state.pt.tmp")
                torch.save(checkpoint_state(model, ema, opt, step, config), tmp)
                os.replace(tmp, os.path.join(checkpoint_dir, "state.pt"))
        seconds = time.perf_counter() - start
        rates.append(per_window * config.batch_size_per_worker / seconds)
        waits.append(wait / seconds)
    batches.close()  # stops the DataLoader's worker process
    return rates, float(np.mean(waits[1:]))


def main(argv: list[str] | None = None) -> dict:
    from diffusion.config import TrainConfig, model_config
    from diffusion.train import read_metrics, train
    from retrieval.ray_env import init_ray

    args = parse_args(argv)
    mc = model_config(args.preset, cond_dim=384)
    init_ray(None)  # for the stages that build the data
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
        torch_threads=args.torch_threads,
    )
    import ray

    threads = args.torch_threads or os.cpu_count() or 1  # ours, by default: the whole node for one worker
    if (
        torch.get_num_threads() != threads
    ):  # as our workers do: set_num_threads turns MKL's dynamic threading off
        torch.set_num_threads(threads)
    bare_dir = os.path.join(args.workdir, "bare_run")
    os.makedirs(bare_dir, exist_ok=True)
    arms = ("ours", "bare_dataloader", "bare_memory")
    windows: dict[str, list[list[float]]] = {arm: [] for arm in arms}
    waits: dict[str, list[float]] = {"ours": [], "bare_dataloader": []}
    for repeat in range(args.repeats):  # the arms alternate, so a slow spell of the machine hits all of them
        ray.shutdown()  # the bare loops run with no Ray on the machine, as a plain PyTorch script would
        rates, wait = bare_loop(config, args.windows, bare_dir, "dataloader")
        windows["bare_dataloader"].append(rates)
        waits["bare_dataloader"].append(wait)
        windows["bare_memory"].append(bare_loop(config, args.windows, bare_dir, "memory")[0])
        config.output = os.path.join(out, f"repeat_{repeat}")
        train(config)  # starts its own Ray
        rows = read_metrics(os.path.join(config.output, "metrics.csv"))
        windows["ours"].append([r["samples_per_s"] for r in rows])
        waits["ours"].append(float(np.mean([r["data_wait_fraction"] for r in rows[1:]])))
    means = {arm: [float(np.mean(w[1:])) for w in windows[arm]] for arm in arms}  # window 1 (start-up) out
    ours, loader, memory = (float(np.median(means[arm])) for arm in arms)
    ours_wait = float(np.median(waits["ours"]))
    result = {
        "preset": args.preset,
        "num_images": args.num_images,
        "steps": config.steps,
        "batch_size": args.batch_size,
        "torch_threads": threads,
        "repeats": args.repeats,
        "windows": windows,
        "means": means,
        "ours_samples_per_s": ours,
        "bare_dataloader_samples_per_s": loader,
        "bare_memory_samples_per_s": memory,
        "ratio_to_dataloader": ours / loader,
        "ratio_to_memory": ours / memory,
        "ours_data_wait_fraction": ours_wait,
        "bare_dataloader_data_wait_fraction": float(np.median(waits["bare_dataloader"])),
    }
    cols = ("ours: Ray Train + Ray Data", "bare: DataLoader", "bare: in memory")
    print(f"\n{'samples/s':24s}" + "".join(f"{c:>30s}" for c in cols))
    for r in range(args.repeats):
        print(
            f"{f'  repeat {r + 1}, windows 2-{args.windows}':24s}"
            + "".join(f"{means[arm][r]:>30.1f}" for arm in arms)
        )
    print(f"{'  median':24s}" + "".join(f"{v:>30.1f}" for v in (ours, loader, memory)))
    print(
        f"{'data wait (median)':24s}{ours_wait:>30.1%}{result['bare_dataloader_data_wait_fraction']:>30.1%}"
    )
    print(
        f"\ntrain bench: {args.preset} model, batch {args.batch_size}, {config.steps} steps, {args.num_images} images, "
        f"{threads} torch threads, {args.repeats} repeats: ours {ours:.1f} samples/s = {ours / loader:.2f}x a bare "
        f"DataLoader loop ({loader:.1f}), {ours / memory:.2f}x a bare in-memory loop ({memory:.1f}); "
        f"data wait {ours_wait:.1%}"
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
