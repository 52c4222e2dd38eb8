"""Scale benchmark: time and peak memory of the retrieval side as the database grows (1M -> 5M images).

What it measures, in one run, for each --sizes value:

1. write: a synthetic database in the toolkit's layout under --workdir (reused when already there):
   img_emb/ parts of --part-size rows of clustered, L2-normalised --dim float16 embeddings, metadata/
   parts (image_id, key, url, caption), aesthetic/ score parts, image_ids.npy + parts.json, database.json.
2. index: the index stage's own task function (autofaiss from the img_emb/ folder; --index-key forces a type).
3. open+search: Database.open, --num-searches image queries (k = 10) in batches of 1000, then metadata,
   aesthetic scores and embeddings of 1000 of the results: what a sampling worker or a service does.
4. bands: what `knn-diffusion aesthetic subindex --quantile-bins 2` runs: every score read for the
   quantiles, then each band's index built from a folder of that band's parts (the Ray task's function).
5. neighbours: the neighbour stage's actor (NeighbourSearcher, exact rescoring included) on the first
   parts, --num-queries queries in all; its time scaled to the whole table is printed beside it.

Each stage runs in a fresh subprocess (as a Ray task or actor would), which reports its wall time, its
peak RSS (VmHWM: resident pages, file-backed ones included, such as memory-mapped embeddings and index)
and its peak anonymous RSS (RssAnon sampled every 20 ms: the process's own heap, which is what must not
grow with the database). The table prints both for every size and the growth from the smallest size to
the largest; the goal is a peak RSS of every process <= 4 GB, independent of database size except for the
index itself.

Run from the repository root (about 30 minutes and 8 GB of disk for 1M and 5M on 2 cores)::

    .venv/bin/python bench/scale.py --sizes 1000000 5000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402

STAGES = ("write", "index", "open+search", "bands", "neighbours")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time and peak memory of each retrieval stage at two database sizes."
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000], help="database sizes")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default: %(default)s)")
    p.add_argument("--part-size", type=int, default=50_000, help="rows per part (default: %(default)s)")
    p.add_argument(
        "--index-key",
        default="Pad512,IVF4096_HNSW32,PQ64",
        help="faiss factory string (default: %(default)s)",
    )
    p.add_argument(
        "--band-index-key", default="Pad512,IVF1024_HNSW32,PQ64", help="band indexes (default: %(default)s)"
    )
    p.add_argument(
        "--num-searches", type=int, default=10_000, help="open+search queries (default: %(default)s)"
    )
    p.add_argument(
        "--num-queries", type=int, default=100_000, help="neighbour-table sample (default: %(default)s)"
    )
    p.add_argument(
        "--index-memory", default="2G", help="--max-index-memory of the builds (default: %(default)s)"
    )
    p.add_argument(
        "--memory",
        default="3G",
        help="--current-memory-available given to the index builds (default: %(default)s)",
    )
    p.add_argument("--workdir", default="/tmp/knn_bench_scale", help="where the databases live")
    p.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="comma-separated stages to run (default: all); write and "
        "index are skipped when their output exists, so later stages can be rerun alone",
    )
    p.add_argument("--json-out", default=None, help="also write the results as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--db", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


class MemoryWatch:
    """Peak RssAnon of this process, sampled every 20 ms on a thread; VmHWM read at the end."""

    def __init__(self) -> None:
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, self.status("RssAnon"))
            time.sleep(0.02)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, self.status("RssAnon"))
        return {"peak_rss_mb": self.status("VmHWM") / 2**20, "peak_anon_mb": self.peak_anon / 2**20}


def write_database(path: str, size: int, dim: int, part_size: int) -> dict[str, float]:
    """The toolkit's layout, part by part (one part in memory at a time); returns the bytes on disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.embed import write_row_ids
    from retrieval.database import DatabaseInfo

    if os.path.exists(os.path.join(path, "database.json")):
        return {"reused": 1.0}
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for sub in ("img_emb", "metadata", "aesthetic"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    num_parts = -(-size // part_size)
    for part in range(num_parts):
        n = min(part_size, size - part * part_size)
        prng = np.random.default_rng(part + 1)
        emb = (
            centres[prng.integers(0, len(centres), n)]
            + prng.standard_normal((n, dim)).astype(np.float32) * 0.04
        )
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        ids = part * 10**6 + np.arange(
            n, dtype=np.int64
        )  # shard id * 10**digits + row, as downloads make them
        name = f"{part:05d}"
        np.save(os.path.join(path, "img_emb", f"img_emb_{name}.npy"), emb.astype(np.float16))
        keys = [f"{i:011d}" for i in ids]
        pq.write_table(
            pa.table(
                {
                    "image_id": ids,
                    "key": keys,
                    "url": [f"https://example.com/images/{k}.jpg" for k in keys],
                    "caption": [f"a synthetic image number {k} of cluster" for k in keys],
                }
            ),
            os.path.join(path, "metadata", f"metadata_{name}.parquet"),
        )
        scores = (5.5 + emb[:, 0] * 3 + prng.standard_normal(n) * 0.5).astype(np.float32)
        pq.write_table(
            pa.table({"image_id": ids, "aesthetic": scores}),
            os.path.join(path, "aesthetic", f"aesthetic_{name}.parquet"),
        )
    write_row_ids(path)
    DatabaseInfo(clip_model="synthetic", dim=dim, num_images=size, num_parts=num_parts).write(path)
    return {
        "bytes_on_disk": float(
            sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
        )
    }


def index_config(args: argparse.Namespace, index_key: str) -> Any:
    """The index stage's configuration with this run's index type and memory budget, on both cores."""
    from pipelines.index import IndexConfig

    return IndexConfig(
        db=args.db,
        index_key=index_key,
        max_index_memory=args.index_memory,
        current_memory_available=args.memory,
        nb_cores=2,
    )


def stage_index(args: argparse.Namespace) -> dict[str, float]:
    from pipelines.index import _build

    if os.path.exists(os.path.join(args.db, "image.index")):
        return {"reused": 1.0}
    infos = _build(index_config(args, args.index_key))
    index_mb = os.path.getsize(os.path.join(args.db, "image.index")) / 2**20
    return {"index_mb": index_mb, "avg_search_ms": float(infos.get("avg_search_speed_ms", float("nan")))}


def stage_open_search(args: argparse.Namespace) -> dict[str, float]:
    from retrieval.database import Database

    t0 = time.time()
    db = Database.open(args.db)
    opened = time.time() - t0
    rng = np.random.default_rng(1)
    rows = rng.integers(0, len(db), args.num_searches)
    found = []
    for lo in range(0, len(rows), 1000):
        queries = db.embeddings_at_rows(rows[lo : lo + 1000])
        found.append(db.search(queries, 10).ids)
    ids = np.concatenate(found)
    sample = ids[ids >= 0][:1000]
    meta = db.metadata(sample)
    assert (meta["image_id"].to_numpy() == sample).all()
    db.aesthetic_scores(sample)
    db.embeddings(sample)
    self_found = float(np.mean(ids[:, 0] == np.asarray(db.ids)[rows]))
    return {"open_seconds": opened, "self_at_1": self_found}


def stage_bands(args: argparse.Namespace) -> dict[str, float]:
    from pipelines.aesthetic import _build_band, quantile_bands
    from retrieval.database import Database

    db = Database.open(args.db)
    bands = quantile_bands(db.aesthetic_scores(db.ids), 2)
    del db
    config = index_config(args, args.band_index_key)
    counts = [_build_band(os.path.abspath(args.db), band, config)["count"] for band in bands]
    return {"band_images": float(sum(counts))}


def stage_neighbours(args: argparse.Namespace) -> dict[str, float]:
    import shutil

    from pipelines.neighbours import NeighboursConfig, NeighbourSearcher
    from retrieval.database import Database

    out = os.path.join(args.workdir, f"neighbours-{args.size}")
    shutil.rmtree(out, ignore_errors=True)
    config = NeighboursConfig(db=args.db, output=out, k=10, search_params="nprobe=16")
    searcher = NeighbourSearcher(config, threads=2)
    db = Database.open(args.db)
    done, t0 = 0, time.time()
    for name, end in zip(db.part_names, db.part_ends, strict=True):
        searcher(name)
        done = int(end)
        if done >= args.num_queries:
            break
    seconds = time.time() - t0
    return {"queries": float(done), "full_table_hours": seconds * len(db) / done / 3600}


def run_child(args: argparse.Namespace) -> None:
    watch = MemoryWatch()
    start = time.time()
    if args.child == "write":
        extra = write_database(args.db, args.size, args.dim, args.part_size)
    else:
        extra = {
            "index": stage_index,
            "open+search": stage_open_search,
            "bands": stage_bands,
            "neighbours": stage_neighbours,
        }[args.child](args)
    result = {"seconds": time.time() - start, **watch.stop(), **extra}
    print("RESULT " + json.dumps(result), flush=True)


def run_stage(args: argparse.Namespace, stage: str, size: int) -> dict[str, float]:
    db = os.path.join(args.workdir, f"db-{size}")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        stage,
        "--db",
        db,
        "--size",
        str(size),
        "--dim",
        str(args.dim),
        "--part-size",
        str(args.part_size),
        "--index-key",
        args.index_key,
        "--band-index-key",
        args.band_index_key,
        "--num-searches",
        str(args.num_searches),
        "--num-queries",
        str(args.num_queries),
        "--memory",
        args.memory,
        "--index-memory",
        args.index_memory,
        "--workdir",
        args.workdir,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"stage {stage} at {size} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    extra = {k: v for k, v in result.items() if k not in ("seconds", "peak_rss_mb", "peak_anon_mb")}
    print(
        f"  {size:>9,} {stage:<12} {result['seconds']:8.1f} s  peak RSS {result['peak_rss_mb']:7.0f} MB  "
        f"peak anon {result['peak_anon_mb']:7.0f} MB  {json.dumps(extra)}",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return {}
    os.makedirs(args.workdir, exist_ok=True)
    results: dict[int, dict[str, dict[str, float]]] = {}
    stages = [s for s in STAGES if s in args.stages.split(",")]
    for size in args.sizes:
        results[size] = {stage: run_stage(args, stage, size) for stage in stages}
    lo, hi = min(args.sizes), max(args.sizes)
    print(
        f"\n| stage | {' | '.join(f'{s / 1e6:g}M: s, peak RSS MB, peak anon MB' for s in args.sizes)} | "
        f"anon growth {hi / 1e6:g}M / {lo / 1e6:g}M |"
    )
    print("|---|" + "---|" * (len(args.sizes) + 1))
    for stage in stages:
        cells = [
            f"{results[s][stage]['seconds']:.0f}, {results[s][stage]['peak_rss_mb']:.0f}, "
            f"{results[s][stage]['peak_anon_mb']:.0f}"
            for s in args.sizes
        ]
        growth = results[hi][stage]["peak_anon_mb"] / max(results[lo][stage]["peak_anon_mb"], 1)
        print(f"| {stage} | {' | '.join(cells)} | {growth:.2f}x |")
    worst = max(
        (r["peak_rss_mb"], stage, s)
        for s in args.sizes
        for stage, r in results[s].items()
        if stage != "write"
    )
    print(
        f"\nscale: largest peak RSS of any stage process {worst[0]:.0f} MB ({worst[1]} at {worst[2]:,} images); "
        f"goal <= 4096 MB: {'met' if worst[0] <= 4096 else 'NOT met'}",
        flush=True,
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({str(k): v for k, v in results.items()}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
