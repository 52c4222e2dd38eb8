"""Index stage (autofaiss on Ray) and retrieval.Database: recall against exact search, id mapping, errors."""

from __future__ import annotations

import os

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


def test_open_memory_maps_the_row_ids_and_reads_no_metadata(synthetic_db, monkeypatch):
    """Every process opening a database used to read every metadata part's ids; now image_ids.npy is mapped."""
    import pyarrow.parquet as pq

    path, _, ids, _, _ = synthetic_db

    def refuse(*args, **kwargs):
        raise AssertionError(f"Database.open read a parquet file: {args[:1]}")

    monkeypatch.setattr(pq, "read_table", refuse)
    db = Database.open(path)
    assert isinstance(db.ids, np.memmap) and np.array_equal(db.ids, ids)
    assert db.part_ends.tolist() == np.cumsum([len(p) for p in np.array_split(ids, 4)]).tolist()


def test_metadata_reads_only_the_parts_that_hold_the_ids(synthetic_db, monkeypatch):
    import pyarrow.parquet as pq

    path, _, ids, _, _ = synthetic_db
    db = Database.open(path)
    read = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda p, *a, **kw: read.append(p) or real(p, *a, **kw))
    wanted = ids[[40_000, 3, 45_000, 41_000]]  # parts 3, 0, 3, 3, out of order
    assert db.metadata(wanted).image_id.tolist() == wanted.tolist()
    assert sorted(p.rsplit("_", 1)[-1] for p in read) == ["00000.parquet", "00003.parquet"]


def test_stale_row_ids_are_refused(synthetic_db, tmp_path):
    import shutil

    path, _, _, _, _ = synthetic_db
    copy = tmp_path / "db"
    shutil.copytree(path, copy)
    shutil.copy(copy / "metadata" / "metadata_00003.parquet", copy / "metadata" / "metadata_00004.parquet")
    with pytest.raises(ValueError, match="parts.json lists other parts.*rerun `knn-diffusion embed`"):
        Database.open(str(copy))


def test_row_reads_match_the_arrays_and_map_no_file(synthetic_db, tmp_path, monkeypatch):
    """Embeddings are gathered with positioned reads: a memory map kept every touched page (and its
    read-ahead) resident, so random lookups grew the process towards the size of all embeddings."""
    from retrieval.database import NpyRows

    for dtype in (np.float32, np.float16):
        a = np.random.default_rng(0).standard_normal((300, 5)).astype(dtype)
        np.save(tmp_path / "a.npy", a)
        rows = np.array([7, 3, 4, 299, 0, 3, 100, 101, 102])  # unsorted, repeated, runs
        got = NpyRows(str(tmp_path / "a.npy")).take(rows)
        assert got.dtype == dtype and np.array_equal(got, a[rows])
        assert NpyRows(str(tmp_path / "a.npy")).take(np.zeros(0, np.int64)).shape == (0, 5)
    with pytest.raises(IndexError, match="rows outside"):
        NpyRows(str(tmp_path / "a.npy")).take(np.array([300]))
    path, base, ids, _, _ = synthetic_db
    real_load = np.load

    def no_maps(*args, **kwargs):
        assert kwargs.get("mmap_mode") is None or str(args[0]).endswith("image_ids.npy"), args[0]
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", no_maps)
    db = Database.open(path)
    pick = np.random.default_rng(1).choice(len(ids), 500, replace=False)
    np.testing.assert_array_equal(db.embeddings(ids[pick]), base[pick])


def test_rows_follow_part_numbers_past_the_zero_padding(ray_session, tmp_path):
    """Parts 99999 and 100000: autofaiss reads files in string order ("100000" first), the database in part
    order. Before, the index's rows came in the other order and every search answered with wrong ids."""
    import pandas as pd

    from pipelines.embed import write_row_ids
    from retrieval.database import DatabaseInfo

    emb = clustered_vectors(400, 32, num_clusters=20, seed=4)
    db = tmp_path / "db"
    for sub in ("img_emb", "metadata"):
        (db / sub).mkdir(parents=True)
    ids = []
    for part, rows in ((99999, slice(0, 150)), (100000, slice(150, 400))):
        part_ids = part * 10**4 + np.arange(len(emb[rows]), dtype=np.int64)
        np.save(db / "img_emb" / f"img_emb_{part}.npy", emb[rows])
        pd.DataFrame({"image_id": part_ids}).to_parquet(db / "metadata" / f"metadata_{part}.parquet")
        ids.append(part_ids)
    ids = np.concatenate(ids)
    write_row_ids(str(db))
    DatabaseInfo(clip_model="synthetic", dim=32, num_images=400, num_parts=2).write(str(db))
    build(IndexConfig(db=str(db), index_key="Flat", max_index_memory="1G", current_memory_available="4G"))
    found = Database.open(str(db)).search(emb, 1)
    assert np.array_equal(found.ids[:, 0], ids)
    assert not any(name.startswith(".tmp") for name in os.listdir(db))  # the scratch links are gone
