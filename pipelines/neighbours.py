"""Neighbour tables: db/img_emb/*.npy + an index (the database's or a band's) -> <output>/neighbours_N.parquet,
the k nearest neighbours of every image (itself and near-duplicates excluded), as a Ray job.

Each part of the database becomes one parquet shard, row for row with metadata_N.parquet:
    image_id int64, neighbour_ids fixed_size_list<int64>[k] (-1 where fewer were found),
    neighbour_scores fixed_size_list<float32>[k] (cosine; NaN where missing),
    neighbour_emb fixed_size_list<fixed_size_list<float16>[D]>[k] (with --store-embeddings; zeros where missing).
Actors load the index once (memory-mapped where faiss can) and search the parts they are handed; a shard
is written under a temporary name and renamed, so a rerun skips exactly the finished ones.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from retrieval.storage import atomic_write_bytes, check_settings, list_parts


@dataclasses.dataclass
class NeighboursConfig:
    """index: an aesthetic band's name or position to draw neighbours from; None = the whole database.
    duplicate_threshold: neighbours with cosine >= this are near-duplicates of the query and skipped.
    search_params: faiss ParameterSpace string applied to the index, e.g. "nprobe=64" or "efSearch=128";
    None keeps the parameters autofaiss tuned and saved in the index.
    """

    db: str
    output: str | None = None
    k: int = 10
    index: str | None = None
    duplicate_threshold: float = 0.98
    store_embeddings: bool = False
    search_params: str | None = None
    batch_size: int = 4096
    num_actors: int | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")
        if not -1.0 < self.duplicate_threshold <= 1.0:
            raise ValueError(f"--duplicate-threshold is a cosine in (-1, 1], got {self.duplicate_threshold}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.output is None:
            self.output = os.path.join(
                self.db, "neighbours" if self.index is None else f"neighbours_{self.index}"
            )

    def settings(self) -> dict[str, Any]:
        """What determines the table's content (a rerun with other settings must not mix into it)."""
        return {
            "db": os.path.abspath(self.db),
            "k": self.k,
            "index": self.index,
            "duplicate_threshold": self.duplicate_threshold,
            "store_embeddings": self.store_embeddings,
            "search_params": self.search_params,
        }


def index_identity(db: str, band: str | None) -> str:
    """Size and modification time of the index searched (and of bands.json for a band): a rebuilt index or
    re-cut bands make a different table, which must not be mixed with shards computed before."""
    files = [os.path.join(db, "image.index")]
    if band is not None:
        files = [os.path.join(db, "bands", "bands.json")]
    return ";".join(f"{os.path.basename(f)}:{os.path.getsize(f)}:{os.path.getmtime(f):.6f}" for f in files)


def select_neighbours(
    query_ids: np.ndarray, ids: np.ndarray, scores: np.ndarray, k: int, duplicate_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From candidates ids/scores [Q, m] (best first), the first k that are not the query itself, not a
    near-duplicate (score >= threshold) and not missing (-1). Returns (ids [Q, k], scores [Q, k], found [Q])."""
    keep = (ids >= 0) & (ids != query_ids[:, None]) & (scores < duplicate_threshold)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    sel_ids = np.take_along_axis(ids, order, axis=1)
    sel_scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    sel_keep = np.take_along_axis(keep, order, axis=1)
    if sel_ids.shape[1] < k:  # fewer candidates than k
        pad = k - sel_ids.shape[1]
        sel_ids = np.pad(sel_ids, ((0, 0), (0, pad)), constant_values=-1)
        sel_scores = np.pad(sel_scores, ((0, 0), (0, pad)), constant_values=np.nan)
        sel_keep = np.pad(sel_keep, ((0, 0), (0, pad)), constant_values=False)
    sel_ids = np.where(sel_keep, sel_ids, -1)
    sel_scores = np.where(sel_keep, sel_scores, np.nan).astype(np.float32)
    return sel_ids, sel_scores, sel_keep.sum(axis=1)


def apply_search_params(index: Any, params: str | None) -> None:
    """Set faiss ParameterSpace parameters ("nprobe=64,efSearch=128") on index; refuse ones it does not have."""
    import faiss

    if index is None or not params:
        return
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as err:
        reason = str(err).rsplit(":", 1)[-1].strip()  # faiss prefixes the C++ function signature
        raise ValueError(
            f"--search-params {params!r} do not apply to this index ({reason}); use parameters of its type, e.g. "
            "nprobe=64 for IVF or efSearch=128 for HNSW (see the index's key in index_infos.json)"
        ) from err


class NeighbourSearcher:
    """Holds one index (opened once, memory-mapped where possible); __call__(part) writes that part's table."""

    MAX_FETCH = 1024

    def __init__(self, config: NeighboursConfig, threads: int | None = None) -> None:
        import faiss

        from retrieval.database import Database

        if threads:
            faiss.omp_set_num_threads(threads)
        self.config = config
        self.database = Database.open(config.db)
        self.index, self.index_ids = self.database.index_and_ids(config.index)
        apply_search_params(self.index, config.search_params)

    def search(self, query_ids: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(neighbour ids [Q, k], scores [Q, k], number found [Q]); widens the search where too many are skipped."""
        from retrieval.database import map_rows

        k = self.config.k
        if self.index is None:
            empty = np.zeros((len(queries), 0))
            return select_neighbours(
                query_ids, empty.astype(np.int64), empty, k, self.config.duplicate_threshold
            )
        fetch = min(k + 1 + max(4, k // 2), max(self.index.ntotal, 1))
        _, rows = self.index.search(queries, fetch)
        cand, exact = self.rescored(queries, map_rows(rows, self.index_ids))
        ids, sc, found = select_neighbours(query_ids, cand, exact, k, self.config.duplicate_threshold)
        short = np.flatnonzero(found < k)
        while len(short) and fetch < min(self.MAX_FETCH, self.index.ntotal):
            fetch = min(fetch * 4, self.MAX_FETCH, self.index.ntotal)
            _, rows = self.index.search(queries[short], fetch)
            cand, exact = self.rescored(queries[short], map_rows(rows, self.index_ids))
            ids[short], sc[short], found[short] = select_neighbours(
                query_ids[short], cand, exact, k, self.config.duplicate_threshold
            )
            short = short[found[short] < k]
        return ids, sc, found

    def rescored(self, queries: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The candidates [Q, F] reordered by their exact cosine to the query, with those cosines.

        An IVF-PQ index (autofaiss's choice at scale) ranks by compressed-vector scores: a near-duplicate can
        score under the threshold and be kept, and the stored scores would not be the true cosines. The
        candidates' own embeddings (memory-mapped) give the exact ones."""
        valid = ids >= 0
        exact = np.full(ids.shape, -np.inf, np.float32)
        if valid.any():
            emb = self.database.embeddings(ids[valid])
            exact[valid] = np.einsum("nd,nd->n", np.repeat(queries, valid.sum(axis=1), axis=0), emb)
        order = np.argsort(-exact, axis=1, kind="stable")
        return np.take_along_axis(ids, order, axis=1), np.take_along_axis(exact, order, axis=1)

    def __call__(self, part: str) -> dict[str, Any]:
        start = time.time()
        db, out = self.config.db, self.config.output
        emb = np.load(os.path.join(db, "img_emb", f"img_emb_{part}.npy"), mmap_mode="r")
        query_ids = pq.read_table(
            os.path.join(db, "metadata", f"metadata_{part}.parquet"), columns=["image_id"]
        )
        query_ids = query_ids["image_id"].to_numpy().astype(np.int64)
        if len(query_ids) != len(emb):
            raise ValueError(
                f"part {part} of {db} has {len(emb)} embeddings but {len(query_ids)} metadata rows; re-embed it"
            )
        all_ids, all_scores, num_found = [], [], []
        for lo in range(0, len(emb), self.config.batch_size):
            q = np.ascontiguousarray(emb[lo : lo + self.config.batch_size], dtype=np.float32)
            ids, scores, found = self.search(query_ids[lo : lo + len(q)], q)
            all_ids.append(ids)
            all_scores.append(scores)
            num_found.append(found)
        k = self.config.k
        ids = np.concatenate(all_ids) if all_ids else np.zeros((0, k), np.int64)
        scores = np.concatenate(all_scores) if all_scores else np.zeros((0, k), np.float32)
        found = np.concatenate(num_found) if num_found else np.zeros(0, np.int64)
        columns = {
            "image_id": pa.array(query_ids),
            "neighbour_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), k),
            "neighbour_scores": pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1)), k),
        }
        if self.config.store_embeddings:
            dim = self.database.dim
            nemb = np.zeros((len(ids), k, dim), np.float16)
            valid = ids >= 0
            if valid.any():
                nemb[valid] = self.database.embeddings(ids[valid]).astype(np.float16)
            inner = pa.FixedSizeListArray.from_arrays(pa.array(nemb.reshape(-1)), dim)
            columns["neighbour_emb"] = pa.FixedSizeListArray.from_arrays(inner, k)
        buf = io.BytesIO()
        pq.write_table(pa.table(columns), buf)
        fs, root = fsspec.core.url_to_fs(out)
        atomic_write_bytes(fs, f"{root}/neighbours_{part}.parquet", buf.getvalue())
        return {
            "part": part,
            "num_images": len(ids),
            "num_short": int((found < k).sum()),
            "seconds": time.time() - start,
        }


def _parts(db: str) -> list[str]:
    parts = list_parts(os.path.join(db, "img_emb"), "img_emb_", ".npy")
    if not parts:
        raise FileNotFoundError(f"--db {db} has no img_emb/*.npy; run `knn-diffusion embed` first")
    return parts


def compute(config: NeighboursConfig, ray_address: str | None = None) -> dict[str, Any]:
    """Write the neighbour table of every image of config.db; returns a summary."""
    import ray

    from retrieval.database import Database
    from retrieval.ray_env import init_ray

    start = time.time()
    output = config.output or ""
    config = dataclasses.replace(
        config, db=os.path.abspath(config.db), output=output if "://" in output else os.path.abspath(output)
    )
    database = Database.open(config.db)  # fail here, not in an actor, on a missing index or band
    if config.index is not None:
        database.band(config.index)
    apply_search_params(database.index_and_ids(config.index)[0], config.search_params)
    out = config.output
    fs, root = fsspec.core.url_to_fs(out)
    settings = {**config.settings(), "index_identity": index_identity(config.db, config.index)}
    check_settings(
        f"{out}/neighbours.json",
        settings,
        f"--output {out} holds neighbours",
        "choose another --output or delete it",
    )
    parts = _parts(config.db)
    todo = [p for p in parts if not fs.exists(f"{root}/neighbours_{p}.parquet")]
    init_ray(ray_address)
    from retrieval.ray_env import node_cpus

    cpus_per_node = node_cpus()
    if config.num_actors:  # as many as asked, each with an equal share that fits on the smallest node
        num_actors = config.num_actors
        cpus = max(1, min(sum(cpus_per_node) // num_actors, min(cpus_per_node)))
    else:  # one per node, each with all of the smallest node's CPUs
        num_actors, cpus = len(cpus_per_node), min(cpus_per_node)
    fits = sum(c // cpus for c in cpus_per_node)
    if num_actors > fits:
        raise ValueError(
            f"--num-actors {num_actors} do not fit the cluster ({cpus_per_node} CPUs per node); use <= {fits}"
        )
    num_actors = min(num_actors, max(len(todo), 1))
    actor_cls = ray.remote(num_cpus=cpus)(NeighbourSearcher)
    results: list[dict[str, Any]] = []
    if todo:
        pool = ray.util.ActorPool([actor_cls.remote(config, cpus) for _ in range(num_actors)])
        for part in todo:
            pool.submit(lambda actor, p: actor.__call__.remote(p), part)
        with tqdm(total=len(todo), desc="neighbours", unit="part") as bar:
            while pool.has_next():
                results.append(pool.get_next_unordered())
                bar.update(1)
    num_images = sum(r["num_images"] for r in results)
    num_short = sum(r["num_short"] for r in results)
    seconds = time.time() - start
    summary = {
        "num_images": num_images,
        "num_short": num_short,
        "parts_written": len(todo),
        "parts_skipped": len(parts) - len(todo),
        "seconds": seconds,
    }
    source = "the whole database" if config.index is None else f"band {config.index}"
    print(
        f"neighbours: k={config.k} from {source} for {num_images} images in {len(todo)} parts "
        f"({len(parts) - len(todo)} already done; {num_short} images with fewer than k) in {seconds:.1f}s "
        f"({num_images / max(seconds, 1e-9):.0f} images/s) -> {out}",
        flush=True,
    )
    return summary
