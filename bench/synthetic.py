"""Synthetic clustered embeddings (a stand-in for CLIP embeddings of a real collection) for tests and benchmarks."""

from __future__ import annotations

import numpy as np


def clustered_vectors(
    num: int, dim: int, num_clusters: int = 100, spread: float = 0.5, seed: int = 0
) -> np.ndarray:
    """[num, dim] float32, L2-normalised: Gaussian blobs around random unit centres (cluster sizes vary)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.dirichlet(np.ones(num_clusters))
    labels = rng.choice(num_clusters, size=num, p=weights)
    x = centres[labels] + rng.standard_normal((num, dim)).astype(np.float32) * spread / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def write_synthetic_db(
    path: str, emb: np.ndarray, num_parts: int = 4, clip_model: str = "synthetic"
) -> np.ndarray:
    """A database folder in the embed stage's layout holding `emb`; returns the image ids (sparse, sorted)."""
    import os

    import pandas as pd

    from pipelines.embed import write_row_ids
    from retrieval.database import DatabaseInfo

    ids = np.arange(len(emb), dtype=np.int64) * 3 + 7  # sparse on purpose: ids are not row numbers
    for sub in ("img_emb", "metadata", "_parts"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    for part, rows in enumerate(np.array_split(np.arange(len(emb)), num_parts)):
        np.save(os.path.join(path, "img_emb", f"img_emb_{part:05d}.npy"), emb[rows])
        pd.DataFrame({"image_id": ids[rows]}).to_parquet(
            os.path.join(path, "metadata", f"metadata_{part:05d}.parquet")
        )
    write_row_ids(path)
    DatabaseInfo(clip_model=clip_model, dim=emb.shape[1], num_images=len(emb), num_parts=num_parts).write(
        path
    )
    return ids
