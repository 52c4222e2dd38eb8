"""Neighbour-table benchmark: our Ray neighbours stage vs exact faiss search, on synthetic clustered vectors.

What it measures, in one run:

1. Data: --num-vectors clustered L2-normalised --dim vectors (bench.synthetic) written as a database in
   the embed stage's layout under --workdir (reused when already there), indexed by our index stage
   (autofaiss; --index-key forces a type). Index build time is printed but not part of the ratio.
2. Ours: ``pipelines.neighbours.compute`` (k nearest of every image, self and near-duplicates excluded),
   timed after a local Ray is up, with its peak memory: the summed PSS (proportional set size, so shared
   memory-mapped pages count once) of this process and every process started after the benchmark
   (Ray's raylet, GCS, workers, object store), sampled every 0.5 s, above the level before the stage.
3. Exact: faiss IndexFlatIP (BLAS, same threads) on --num-queries sampled images, the same exclusion rule;
   its time scaled by num_vectors / num_queries estimates exact search for the whole set.
4. Recall@k of ours against exact on that sample.

Run from the repository root::

    .venv/bin/python bench/neighbours.py --num-vectors 1000000 --dim 512 --search-params nprobe=16
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time our neighbour tables against exact faiss search.")
    p.add_argument("--num-vectors", type=int, default=1_000_000, help="database size (default: %(default)s)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default: %(default)s)")
    p.add_argument("--num-clusters", type=int, default=1000, help="synthetic clusters (default: %(default)s)")
    p.add_argument("--num-parts", type=int, default=20, help="database parts (default: %(default)s)")
    p.add_argument("--k", type=int, default=10, help="neighbours per image (default: %(default)s)")
    p.add_argument(
        "--num-queries", type=int, default=10_000, help="exact-search sample (default: %(default)s)"
    )
    p.add_argument(
        "--index-key", default=None, help="faiss factory string to force; default: autofaiss chooses"
    )
    p.add_argument("--max-index-memory", default="6G", help="autofaiss index budget (default: %(default)s)")
    p.add_argument("--search-params", default=None, help="faiss search parameters, e.g. nprobe=16")
    p.add_argument("--workdir", default="/tmp/knn_bench_neighbours", help="where the database lives")
    p.add_argument("--json-out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def _start_ticks(pid: str) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def _pss_bytes(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Summed PSS of this process and every process started after it, sampled in a thread."""

    def __init__(self, interval: float = 0.5) -> None:
        self.me = str(os.getpid())
        self.since = _start_ticks(self.me)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def sample(self) -> int:
        total = 0
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                if pid == self.me or _start_ticks(pid) >= self.since:
                    total += _pss_bytes(pid)
            except (OSError, IndexError, ValueError):
                continue
        return total

    def __enter__(self) -> PeakMemory:
        self.base = self.sample()

        def run() -> None:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, self.sample())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def make_db(args: argparse.Namespace) -> str:
    from bench.synthetic import clustered_vectors, write_synthetic_db

    path = os.path.join(args.workdir, f"db_{args.num_vectors}_{args.dim}_{args.num_clusters}")
    if not os.path.exists(os.path.join(path, "database.json")):
        t = time.time()
        emb = clustered_vectors(args.num_vectors, args.dim, num_clusters=args.num_clusters, seed=0)
        write_synthetic_db(path, emb, num_parts=args.num_parts)
        del emb
        print(
            f"data: {args.num_vectors} x {args.dim} written in {time.time() - t:.0f}s -> {path}", flush=True
        )
    return path


def main(argv: list[str] | None = None) -> dict:
    import faiss

    from pipelines.index import IndexConfig, build
    from pipelines.neighbours import NeighboursConfig, compute, select_neighbours
    from retrieval.database import Database, read_neighbour_table
    from retrieval.ray_env import init_ray

    args = parse_args(argv)
    path = make_db(args)
    init_ray(None)
    index_key = args.index_key or "auto"
    infos_path = os.path.join(path, "index_infos.json")
    built = os.path.exists(infos_path) and _read_json(infos_path).get("bench_index_key") == index_key
    t = time.time()
    if not built:
        infos = build(IndexConfig(db=path, index_key=args.index_key, max_index_memory=args.max_index_memory))
        infos["bench_index_key"] = index_key
        with open(infos_path, "w") as f:
            json.dump(infos, f)
    infos = _read_json(infos_path)
    build_s = time.time() - t if not built else float("nan")

    out = os.path.join(args.workdir, "neighbours_out")
    for f in glob.glob(os.path.join(out, "*")):
        os.remove(f)
    config = NeighboursConfig(db=path, output=out, k=args.k, search_params=args.search_params)
    with PeakMemory() as mem:
        t = time.time()
        summary = compute(config)
        ours_s = time.time() - t
    table = read_neighbour_table(out)

    db = Database.open(path)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(db), size=min(args.num_queries, len(db)), replace=False))
    emb = db.embeddings_at_rows(np.arange(len(db)))
    exact = faiss.IndexFlatIP(db.dim)
    exact.add(np.ascontiguousarray(emb, dtype=np.float32))
    queries = np.ascontiguousarray(emb[sample], dtype=np.float32)
    t = time.time()
    scores, rows = exact.search(queries, args.k + 20)
    exact_sample_s = time.time() - t
    exact_ids = select_neighbours(db.ids[sample], db.ids[rows], scores, args.k, config.duplicate_threshold)[0]
    exact_full_s = exact_sample_s * len(db) / len(sample)
    ours_ids = table["neighbour_ids"][sample]
    recall = float(
        np.mean([len(set(a) & set(b) - {-1}) / args.k for a, b in zip(ours_ids, exact_ids, strict=True)])
    )
    self_present = int((table["neighbour_ids"] == table["image_id"][:, None]).sum())

    result = {
        "num_vectors": len(db),
        "dim": db.dim,
        "k": args.k,
        "index_key": infos.get("index_key"),
        "index_param": infos.get("index_param"),
        "search_params": args.search_params,
        "index_build_s": build_s,
        "ours_s": ours_s,
        "ours_images_per_s": len(db) / ours_s,
        "peak_memory_gib": (mem.peak - mem.base) / 2**30,
        "peak_memory_total_gib": mem.peak / 2**30,
        "exact_sample_queries": len(sample),
        "exact_sample_s": exact_sample_s,
        "exact_full_estimated_s": exact_full_s,
        "speedup": exact_full_s / ours_s,
        "recall_at_k": recall,
        "self_present": self_present,
        "num_short": summary["num_short"],
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    print()
    print(f"{'':28s}{'ours (neighbours stage)':>26s}{'exact faiss (IndexFlatIP)':>28s}")
    print(
        f"{'index':28s}{result['index_key'] + ' ' + str(args.search_params or result['index_param']):>26s}{'Flat':>28s}"
    )
    print(f"{'wall time, all images (s)':28s}{ours_s:>26.1f}{exact_full_s:>28.1f}")
    print(f"{'':28s}{'':>26s}{f'({exact_sample_s:.1f}s for {len(sample)} queries)':>28s}")
    print(f"{'recall@' + str(args.k):28s}{recall:>26.4f}{1.0:>28.4f}")
    print(f"{'peak memory (GiB, PSS)':28s}{result['peak_memory_gib']:>26.2f}{'':>28s}")
    print(f"{'index build (s)':28s}{build_s:>26.1f}{'':>28s}")
    print(
        f"\nneighbours bench: {len(db)} x {db.dim}, k={args.k}: ours {ours_s:.0f}s vs exact {exact_full_s:.0f}s "
        f"(estimated) = {result['speedup']:.1f}x faster at recall@{args.k} {recall:.4f}, peak "
        f"{result['peak_memory_gib']:.2f} GiB, self present {self_present} times"
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
