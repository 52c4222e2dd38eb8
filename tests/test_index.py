"""Index stage (autofaiss on Ray) and retrieval.Database: recall against exact search, id mapping, errors."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from bench.synthetic import clustered_vectors, write_synthetic_db
from pipelines.index import IndexConfig, build
from retrieval.database import Database


@pytest.fixture(scope="module")
def synthetic_db(ray_session, tmp_path_factory):
    """50k clustered 256-d vectors plus 500 held-out queries from the same distribution."""
    data = clustered_vectors(50_500, 256, num_clusters=200, seed=1)
    path = str(tmp_path_factory.mktemp("synthetic") / "db")
    ids = write_synthetic_db(path, data[:50_000])
    infos = build(IndexConfig(db=path, max_index_memory="1G", current_memory_available="8G"))
    return path, data[:50_000], ids, data[50_000:], infos


def test_recall_at_10_against_exact_search(synthetic_db):
    path, base, ids, queries, infos = synthetic_db
    db = Database.open(path)
    assert len(db) == 50_000 and infos["nb vectors"] == 50_000
    found = db.search(queries, 10)
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    _, exact_rows = exact.search(queries, 10)
    exact_ids = ids[exact_rows]
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found.ids, exact_ids, strict=True)])
    assert recall >= 0.95, f"recall@10 {recall:.3f} with {infos['index_key']} {infos['index_param']}"
    assert (np.diff(found.scores, axis=1) <= 1e-6).all()  # best first


def test_results_are_image_ids_and_embeddings_round_trip(synthetic_db):
    path, base, ids, _, _ = synthetic_db
    db = Database.open(path)
    res = db.search(base[123], 1)
    assert res.ids[0, 0] == ids[123]  # a stored vector finds itself, reported by its image id
    assert np.allclose(db.embeddings(res.ids[0]), base[123:124])
    with pytest.raises(KeyError, match="not in"):
        db.embeddings(np.array([ids[0] + 1]))
    with pytest.raises(ValueError, match="dimension 3"):
        db.search(np.ones(3, np.float32), 5)


def test_nothing_fits_is_a_clear_error(synthetic_db):
    path = synthetic_db[0]
    with pytest.raises(ValueError, match="--max-index-memory"):
        build(IndexConfig(db=path, max_index_memory="1K", current_memory_available="8G"))
    with pytest.raises(ValueError, match="--max-index-memory"):
        build(IndexConfig(db=path, max_index_memory="8G", current_memory_available="8G"))
    assert Database.open(path).index.ntotal == 50_000  # the existing index is untouched


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="knn-diffusion embed"):
        build(IndexConfig(db=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="no database.json"):
        Database.open(str(tmp_path))
