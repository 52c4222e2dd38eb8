"""Open a retrieval database folder (index + embeddings + metadata) and search it by embedding or text.

A database is the folder the embed and index stages write (docs/architecture.md). Results are global
image ids (int64), never faiss row numbers, so they stay valid for every later stage.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from functools import cached_property

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq


@dataclasses.dataclass
class SearchResult:
    """ids [Q, k] int64 global image ids (-1 where fewer than k results); scores [Q, k] float32 cosine."""

    ids: np.ndarray
    scores: np.ndarray


def normalize(queries: np.ndarray) -> np.ndarray:
    """[Q, D] float32, L2-normalised (a single [D] vector becomes [1, D])."""
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)


class Database:
    """A local database folder. Open with Database.open(path); see search() and search_text()."""

    def __init__(self, path: str, index: faiss.Index, ids: np.ndarray, info: dict) -> None:
        self.path = path
        self.index = index
        self.ids = ids
        self.info = info
        self.dim = int(info["dim"])

    @classmethod
    def open(cls, path: str, modality: str = "image", mmap: bool = True) -> Database:
        """Load <path>/<modality>.index (memory-mapped when possible) and the image id of every row."""
        info_path = os.path.join(path, "database.json")
        index_path = os.path.join(path, f"{modality}.index")
        if not os.path.exists(info_path):
            raise FileNotFoundError(
                f"{path} is not a database (no database.json); run `knn-diffusion embed` first"
            )
        if not os.path.exists(index_path):
            raise FileNotFoundError(
                f"{index_path} does not exist; run `knn-diffusion index --db {path}` first"
            )
        with open(info_path) as f:
            info = json.load(f)
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(index_path, flags)
        except RuntimeError:  # some index types cannot be memory-mapped
            index = faiss.read_index(index_path)
        parts = sorted(glob.glob(os.path.join(path, "metadata", "*.parquet")))
        ids = np.concatenate([pq.read_table(p, columns=["image_id"])["image_id"].to_numpy() for p in parts])
        if len(ids) != index.ntotal:
            raise ValueError(
                f"{path}: the index holds {index.ntotal} vectors but the metadata {len(ids)} rows; "
                f"rebuild it with `knn-diffusion index --db {path}`"
            )
        return cls(path, index, ids.astype(np.int64), info)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """k nearest images of each query embedding ([Q, D] or [D]; normalised here) by cosine similarity."""
        q = normalize(queries)
        if q.shape[1] != self.dim:
            raise ValueError(
                f"query dimension {q.shape[1]} does not match the database's {self.dim} ({self.path})"
            )
        scores, rows = self.index.search(q, k)
        ids = np.where(rows >= 0, self.ids[np.clip(rows, 0, None)], -1)
        return SearchResult(ids=ids, scores=scores.astype(np.float32))

    def search_text(self, texts: list[str], k: int) -> SearchResult:
        """Embed texts with the database's own CLIP model, then search()."""
        from retrieval.clip_model import cached_encoder

        return self.search(cached_encoder(self.info["clip_model"]).encode_texts(texts).numpy(), k)

    def rows_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Row positions of image ids (ids are sorted within and across parts)."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        rows = np.searchsorted(self.ids, image_ids)
        if (rows >= len(self.ids)).any() or (
            self.ids[np.minimum(rows, len(self.ids) - 1)] != image_ids
        ).any():
            raise KeyError(
                f"image ids not in {self.path}: {image_ids[self.ids[np.minimum(rows, len(self.ids) - 1)] != image_ids][:5]}"
            )
        return rows

    @cached_property
    def _embeddings(self) -> np.ndarray:
        parts = sorted(glob.glob(os.path.join(self.path, "img_emb", "*.npy")))
        return np.concatenate([np.load(p, mmap_mode="r") for p in parts])

    def embeddings(self, image_ids: np.ndarray) -> np.ndarray:
        """[n, D] float32 image embeddings of the given ids."""
        return np.asarray(self._embeddings[self.rows_of(image_ids)], dtype=np.float32)

    @cached_property
    def _metadata(self) -> pd.DataFrame:
        parts = sorted(glob.glob(os.path.join(self.path, "metadata", "*.parquet")))
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)

    def metadata(self, image_ids: np.ndarray) -> pd.DataFrame:
        """Metadata rows (url, caption, ...) of the given ids, in the given order."""
        return self._metadata.iloc[self.rows_of(image_ids)].reset_index(drop=True)
