"""Neighbour tables on Ray: recall against exact faiss search, self and near-duplicates excluded, resume."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pytest

from bench.synthetic import clustered_vectors, write_synthetic_db
from pipelines.index import IndexConfig, build
from pipelines.neighbours import NeighboursConfig, compute, select_neighbours
from retrieval.database import Database, read_neighbour_table

NUM = 20_000
K = 10


@pytest.fixture(scope="module")
def ivf_db(ray_session, tmp_path_factory):
    """20k clustered 64-d vectors, 50 of them exact copies of others, under an approximate IVF index."""
    emb = clustered_vectors(NUM, 64, num_clusters=50, seed=5)
    emb[NUM - 50 :] = emb[:50]  # planted duplicates (different ids, identical embeddings)
    path = str(tmp_path_factory.mktemp("neighbours") / "db")
    ids = write_synthetic_db(path, emb, num_parts=4)
    build(IndexConfig(db=path, index_key="IVF256,Flat", max_index_memory="1G", current_memory_available="4G"))
    return path, emb, ids


def exact_neighbours(emb: np.ndarray, ids: np.ndarray, k: int, threshold: float) -> np.ndarray:
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    scores, rows = index.search(emb, k + 60)
    return select_neighbours(ids, ids[rows], scores, k, threshold)[0]


def test_recall_against_exact_search_and_self_excluded(ivf_db, tmp_path):
    path, emb, ids = ivf_db
    out = str(tmp_path / "nb")
    summary = compute(NeighboursConfig(db=path, output=out, k=K, search_params="nprobe=16"))
    table = read_neighbour_table(out)
    assert summary["num_images"] == NUM and np.array_equal(table["image_id"], ids)
    got = table["neighbour_ids"]
    assert got.shape == (NUM, K)
    assert not (got == ids[:, None]).any(), "an image is its own neighbour"
    assert (table["neighbour_scores"][got >= 0] < 0.98).all(), "a near-duplicate was kept"
    dup_ids = ids[NUM - 50 :]
    assert not (got[:50] == dup_ids[:, None]).any()  # image i's planted copy is never its neighbour
    assert not (got[NUM - 50 :] == ids[:50, None]).any()
    exact = exact_neighbours(emb, ids, K, 0.98)
    recall = np.mean([len(set(g) & set(e)) / K for g, e in zip(got, exact, strict=True)])
    assert recall >= 0.95, f"recall@10 {recall:.3f}"
    # scores are the true cosines of the neighbours, best first
    db = Database.open(path)
    i = 123
    np.testing.assert_allclose(table["neighbour_scores"][i], db.embeddings(got[i]) @ emb[i], atol=1e-5)
    assert (np.diff(table["neighbour_scores"][i]) <= 1e-6).all()


def test_rerun_skips_finished_shards_and_refuses_other_settings(ivf_db, tmp_path):
    path, _, _ = ivf_db
    out = str(tmp_path / "nb")
    config = NeighboursConfig(db=path, output=out, k=3)
    compute(config)
    os.remove(os.path.join(out, "neighbours_00002.parquet"))
    mtime = os.path.getmtime(os.path.join(out, "neighbours_00000.parquet"))
    again = compute(config)
    assert (again["parts_written"], again["parts_skipped"]) == (1, 3)
    assert os.path.getmtime(os.path.join(out, "neighbours_00000.parquet")) == mtime
    assert len(read_neighbour_table(out)["image_id"]) == NUM
    with pytest.raises(ValueError, match="other settings"):
        compute(NeighboursConfig(db=path, output=out, k=5))
    index_path = os.path.join(path, "image.index")  # a rebuilt index must not be mixed into the old table
    stat = os.stat(index_path)
    os.utime(index_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        with pytest.raises(ValueError, match="other settings .*index_identity"):
            compute(config)
    finally:
        os.utime(index_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_inline_embeddings_and_band_source(ivf_db, tmp_path):
    """Neighbour embeddings stored inline (float16) equal the database's; a band restricts the source."""
    import json

    path, emb, ids = ivf_db
    out = str(tmp_path / "nb")
    compute(NeighboursConfig(db=path, output=out, k=4, store_embeddings=True))
    table = read_neighbour_table(out)
    assert table["neighbour_emb"].dtype == np.float16 and table["neighbour_emb"].shape == (NUM, 4, 64)
    rows = np.array([0, 777, NUM - 1])
    want = Database.open(path).embeddings(table["neighbour_ids"][rows].ravel()).reshape(3, 4, 64)
    np.testing.assert_allclose(table["neighbour_emb"][rows], want, atol=1e-3)
    # a hand-made band holding every other image: neighbours come from it only, and may be fewer than k
    band_ids = ids[::2]
    folder = os.path.join(path, "bands", "even")
    os.makedirs(folder)
    index = faiss.IndexFlatIP(64)
    index.add(emb[::2])
    faiss.write_index(index, os.path.join(folder, "image.index"))
    np.save(os.path.join(folder, "ids.npy"), band_ids)
    with open(os.path.join(path, "bands", "bands.json"), "w") as f:
        json.dump(
            {"head": "x", "bands": [{"name": "even", "lower": 0, "upper": 1, "count": len(band_ids)}]}, f
        )
    summary = compute(NeighboursConfig(db=path, index="even", k=K))
    table = read_neighbour_table(os.path.join(path, "neighbours_even"))
    assert np.isin(table["neighbour_ids"], band_ids).all()
    assert summary["num_short"] == 0
    assert not (table["neighbour_ids"] == ids[:, None]).any()


def test_select_neighbours_pads_when_too_few_remain():
    ids = np.array([[5, 1, 2, -1]])
    scores = np.array([[1.0, 0.99, 0.5, -np.inf]], np.float32)
    got, sc, found = select_neighbours(np.array([5]), ids, scores, 3, 0.98)
    assert got.tolist() == [[2, -1, -1]] and found.tolist() == [1] and np.isnan(sc[0, 1:]).all()


def test_near_duplicates_are_judged_by_exact_cosines_under_a_pq_index(ray_session, tmp_path):
    """IVF-PQ scores are approximate: a near-duplicate (cosine 0.99) can score under the 0.98 threshold there. The
    candidates are rescored exactly, so none is kept, and the stored scores are the true cosines, best first."""
    rng = np.random.default_rng(3)
    emb = clustered_vectors(4000, 64, num_clusters=20, seed=7)
    noise = rng.normal(size=(100, 64)).astype(np.float32)
    noise -= (noise * emb[:100]).sum(1, keepdims=True) * emb[:100]  # orthogonal to the original
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    emb[-100:] = 0.99 * emb[:100] + np.sqrt(1 - 0.99**2) * noise  # cosine 0.99 to images 0..99
    path = str(tmp_path / "db")
    ids = write_synthetic_db(path, emb, num_parts=2)
    build(
        IndexConfig(
            db=path,
            index_key="Pad64,IVF16_HNSW32,PQ8x4",
            max_index_memory="1G",
            current_memory_available="4G",
        )
    )
    out = str(tmp_path / "nb")
    compute(NeighboursConfig(db=path, output=out, k=5, search_params="nprobe=16"))
    table = read_neighbour_table(out)
    got, scores = table["neighbour_ids"], table["neighbour_scores"]
    assert not (got[:100] == ids[-100:, None]).any() and not (got[-100:] == ids[:100, None]).any()
    exact = np.einsum("qkd,qd->qk", Database.open(path).embeddings(got.ravel()).reshape(*got.shape, 64), emb)
    np.testing.assert_allclose(scores, exact, atol=1e-5)
    assert (scores < 0.98).all() and (np.diff(scores, axis=1) <= 1e-6).all()
