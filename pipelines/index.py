"""Index stage: <db>/img_emb/*.npy -> <db>/image.index + <db>/index_infos.json (autofaiss, on a Ray task).

autofaiss picks the index type and its search parameters (nprobe / efSearch, saved inside the index
file) for the memory and query-time budget. Faiss row i is the i-th embedding in lexicographic part
order, which is also the metadata row order, so retrieval maps rows to image ids through the metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import fsspec

log = logging.getLogger(__name__)


@dataclasses.dataclass
class IndexConfig:
    """Configuration of the index stage.

    max_index_memory: the index's size budget (autofaiss max_index_memory_usage, e.g. "4G").
    current_memory_available: memory the build may use (e.g. "16G").
    max_query_time_ms: per-query latency target autofaiss tunes the search parameters for.
    index_key: a faiss factory string to force (e.g. "HNSW32", "IVF4096,PQ64"); None lets autofaiss choose.
    modality: "image" or "text" embeddings to index.
    """

    db: str
    max_index_memory: str = "4G"
    current_memory_available: str = "16G"
    max_query_time_ms: float = 10.0
    index_key: str | None = None
    nb_cores: int | None = None
    modality: str = "image"

    def __post_init__(self) -> None:
        if self.modality not in ("image", "text"):
            raise ValueError(f"--modality must be 'image' or 'text', got {self.modality!r}")
        if self.max_query_time_ms <= 0:
            raise ValueError(f"--max-query-time-ms must be positive, got {self.max_query_time_ms}")


def index_file_names(modality: str) -> tuple[str, str]:
    """(index, infos) file names inside the database folder; clip-retrieval back reads image.index/text.index."""
    return f"{modality}.index", "index_infos.json" if modality == "image" else "text_index_infos.json"


def build_faiss_index(
    embeddings: Any, out_dir: str, index_name: str, infos_name: str, config: IndexConfig
) -> dict[str, Any]:
    """autofaiss on `embeddings` (a folder of .npy or an array [N, D]) into out_dir/index_name + infos_name.

    Built under temporary names and renamed into place, so a reader never sees half an index.
    """
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    with numeric_order(embeddings, f"{root}/.tmp-order-{index_name}") as embeddings:
        return _build_index(embeddings, fs, root, index_name, infos_name, config)


@contextlib.contextmanager
def numeric_order(embeddings: Any, scratch: str) -> Iterator[Any]:
    """The embeddings as autofaiss will read them in part-number order.

    autofaiss (embedding_reader) reads a folder's files in string order, and faiss row i must be metadata row
    i in part-number order (retrieval.storage.list_parts). The two differ once a part number has more digits
    than the zero padding (100000 sorts before 99999). Then the parts are presented through a scratch folder
    of links named by position, removed afterwards.
    """
    import re

    if not isinstance(embeddings, str):
        yield embeddings
        return
    fs, folder = fsspec.core.url_to_fs(embeddings)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{folder}/*.npy"))
    numeric = sorted(names, key=lambda n: [int(d) for d in re.findall(r"\d+", n)] or [-1])
    if names == numeric:
        yield embeddings
        return
    if "://" in embeddings:
        raise ValueError(
            f"{embeddings}: part numbers past the zero padding ({numeric[-1]}) need a local folder to be indexed "
            "in order; copy the database to local disk to build its index"
        )
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    try:
        for i, name in enumerate(numeric):
            os.symlink(os.path.abspath(os.path.join(folder, name)), os.path.join(scratch, f"{i:09d}.npy"))
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _build_index(
    embeddings: Any, fs: Any, root: str, index_name: str, infos_name: str, config: IndexConfig
) -> dict[str, Any]:
    from autofaiss import build_index

    tmp_index, tmp_infos = f"{root}/.tmp-{index_name}", f"{root}/.tmp-{infos_name}"
    source = embeddings if isinstance(embeddings, str) else f"{len(embeddings)} embeddings for {root}"
    hint = "raise --max-index-memory (or --current-memory-available), or force a smaller --index-key"
    try:
        index, infos = build_index(
            embeddings=embeddings,
            index_path=tmp_index,
            index_infos_path=tmp_infos,
            max_index_memory_usage=config.max_index_memory,
            current_memory_available=config.current_memory_available,
            max_index_query_time_ms=config.max_query_time_ms,
            index_key=config.index_key,
            metric_type="ip",
            nb_cores=config.nb_cores,
            verbose=logging.WARNING,
        )
    except IndexError as err:  # autofaiss 2.18 raises this when no index type fits the budget
        raise ValueError(
            f"autofaiss found no index for {source} within --max-index-memory {config.max_index_memory}: {hint}"
        ) from err
    if index is None:
        raise ValueError(
            f"autofaiss built no index for {source} (--max-index-memory {config.max_index_memory}, "
            f"--current-memory-available {config.current_memory_available}; the budget must be under 90% of the "
            f"available memory and fit the build): {hint}"
        )
    fs.mv(tmp_index, f"{root}/{index_name}")
    fs.mv(tmp_infos, f"{root}/{infos_name}")
    return dict(infos)


def _build(config: IndexConfig) -> dict[str, Any]:
    """Runs inside a Ray task."""
    index_name, infos_name = index_file_names(config.modality)
    emb_dir = f"{config.db}/{'img_emb' if config.modality == 'image' else 'text_emb'}"
    return build_faiss_index(emb_dir, config.db, index_name, infos_name, config)


def build(config: IndexConfig, ray_address: str | None = None) -> dict[str, Any]:
    """Build the index of a database on a Ray worker; returns autofaiss's index infos."""
    import ray

    from retrieval.ray_env import init_ray

    fs, root = fsspec.core.url_to_fs(config.db)
    from retrieval.database import DatabaseInfo

    info = DatabaseInfo.read(config.db)
    if config.modality == "text" and not info.has_text:
        raise ValueError(f"--db {config.db} has no text embeddings (no captions were embedded)")
    start = time.time()
    init_ray(ray_address)
    from retrieval.ray_env import node_cpus

    cpus = max(node_cpus())  # one task: it must fit on one node
    cores = min(config.nb_cores or cpus, cpus)
    task = ray.remote(num_cpus=cores)(_build)
    infos = ray.get(task.remote(dataclasses.replace(config, nb_cores=cores)))
    print(
        f"index: {infos.get('nb vectors')} vectors, {infos.get('index_key')} ({infos.get('index_param')}), "
        f"{infos.get('size in bytes', 0) / 2**20:.1f} MiB, "
        f"{infos.get('avg_search_speed_ms', float('nan')):.2f} ms/query "
        f"in {time.time() - start:.1f}s -> {config.db}/{index_file_names(config.modality)[0]}",
        flush=True,
    )
    return infos
