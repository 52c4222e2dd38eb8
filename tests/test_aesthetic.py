"""Aesthetic heads (real LAION weights), scoring a database, fitting a head, band sub-indexes, the catalogue."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from bench.synthetic import clustered_vectors, write_synthetic_db
from pipelines.aesthetic import FitConfig, ScoreConfig, SubindexConfig, fit, parse_bands, score, subindex
from pipelines.index import IndexConfig, build
from retrieval import catalogue
from retrieval.aesthetic import PUBLISHED, load_head
from retrieval.database import Database

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "aesthetic")
needs_shared = pytest.mark.skipif(
    not os.path.isdir(SHARED), reason=f"the published LAION heads are not at {SHARED} (../shared/aesthetic)"
)

# ../shared/aesthetic/README.md: scores of LAION's mean embeddings of images rated 0..9.
REFERENCE = {
    ("laion-v1", "ViT-B-32", "vit_b_32"): [
        -1.470,
        0.273,
        1.990,
        3.611,
        5.087,
        6.393,
        7.668,
        8.915,
        9.917,
        11.006,
    ],
    ("laion-v1", "ViT-L-14", "vit_l_14"): [
        -2.458,
        -0.138,
        1.895,
        3.585,
        5.100,
        6.470,
        7.787,
        9.048,
        10.226,
        11.304,
    ],
    ("laion-v2", "ViT-L-14", "vit_l_14"): [
        1.655,
        2.359,
        3.070,
        3.672,
        4.238,
        4.701,
        5.073,
        5.365,
        5.577,
        5.747,
    ],
}


@needs_shared
@pytest.mark.parametrize(("head", "config", "folder"), list(REFERENCE))
def test_published_heads_score_laion_reference_values(head, config, folder):
    rated = os.path.join(SHARED, "laion_rating_embeddings", f"{folder}_embeddings")
    emb = np.concatenate([np.load(os.path.join(rated, f"rating{i}.npy")) for i in range(10)])
    loaded = load_head(head, f"open_clip:{config}/openai", head_dir=SHARED)
    np.testing.assert_allclose(loaded.score(emb), REFERENCE[(head, config, folder)], atol=1e-3)


@needs_shared
def test_every_published_head_loads_with_its_checksum():
    for name, spec in PUBLISHED.items():
        head = load_head(name, spec.clip_model, head_dir=SHARED)
        assert head.dim == spec.dim and head.score(np.ones((2, spec.dim))).shape == (2,)


@needs_shared
def test_head_refuses_another_model(tmp_path):
    with pytest.raises(ValueError, match="no laion-v1 head for ViT-S-32"):
        load_head("laion-v1", "open_clip:ViT-S-32//x.pt", head_dir=SHARED)
    head = load_head("laion-v1:ViT-B-32", "open_clip:ViT-B-32/openai", head_dir=SHARED)
    with pytest.raises(ValueError, match="ViT-L-14"):
        head.check_model("open_clip:ViT-L-14/openai", 768)
    with pytest.raises(ValueError, match="--allow-other-weights"):
        head.check_model("open_clip:ViT-B-32/laion2b_s34b_b79k", 512)
    head.check_model("open_clip:ViT-B-32/laion2b_s34b_b79k", 512, allow_other_weights=True)
    with pytest.raises(ValueError, match="512-d"):
        head.score(np.ones((1, 768)))
    # a file that is not the published one is refused, not scored with
    shutil.copy(os.path.join(SHARED, "sa_0_4_vit_b_32_linear.pth"), tmp_path / "sa_0_4_vit_b_32_linear.pth")
    with open(tmp_path / "sa_0_4_vit_b_32_linear.pth", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="sha256"):
        load_head("laion-v1", "open_clip:ViT-B-32/openai", head_dir=str(tmp_path))


@pytest.fixture(scope="module")
def scored_db(ray_session, tmp_path_factory):
    """2000 clustered 512-d vectors presented as ViT-B-32/openai embeddings, indexed and scored by laion-v1."""
    if not os.path.isdir(SHARED):
        pytest.skip(f"the published LAION heads are not at {SHARED}")
    root = tmp_path_factory.mktemp("aesthetic")
    path = str(root / "db")
    emb = clustered_vectors(2000, 512, num_clusters=20, spread=1.0, seed=3)
    ids = write_synthetic_db(path, emb, num_parts=3, clip_model="open_clip:ViT-B-32/openai")
    build(IndexConfig(db=path, index_key="Flat", max_index_memory="1G", current_memory_available="4G"))
    before = {p: _sha(p) for p in _files(path, "img_emb")}
    summary = score(ScoreConfig(db=path, head="laion-v1", head_dir=SHARED))
    assert {p: _sha(p) for p in _files(path, "img_emb")} == before  # embeddings untouched
    return path, emb, ids, summary, root


def _files(path: str, sub: str) -> list[str]:
    return sorted(os.path.join(path, sub, f) for f in os.listdir(os.path.join(path, sub)))


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_scores_are_a_column_beside_the_metadata(scored_db):
    path, emb, ids, summary, _ = scored_db
    head = load_head("laion-v1", "open_clip:ViT-B-32/openai", head_dir=SHARED)
    db = Database.open(path)
    np.testing.assert_allclose(db.aesthetic_scores(ids), head.score(emb), rtol=1e-6, atol=1e-6)
    for meta, aes in zip(
        _files(path, "metadata"), _files(path, "aesthetic")[:-1], strict=True
    ):  # last: head.json
        assert (pd.read_parquet(meta).image_id.to_numpy() == pd.read_parquet(aes).image_id.to_numpy()).all()
    assert summary["num_images"] == 2000
    again = score(ScoreConfig(db=path, head="laion-v1", head_dir=SHARED))  # rerun: nothing to do
    assert again["parts_skipped"] == 3
    with pytest.raises(ValueError, match="ViT-B-16"):  # a head for another model is refused outright
        score(ScoreConfig(db=path, head="laion-v1:ViT-B-16", head_dir=SHARED))


@pytest.mark.parametrize("bands", [None, "-5-4.6,4.6-4.8,4.8-20,100-200"])
def test_bands_hold_exactly_the_ids_in_their_range(scored_db, bands):
    path, emb, ids, _, root = scored_db
    cat = str(root / "catalogue.json")
    config = SubindexConfig(
        db=path, quantile_bins=None if bands else 5, bands=bands, index_key="Flat", catalogue=cat
    )
    subindex(config)
    db = Database.open(path)
    s = db.aesthetic_scores(ids)
    expected = parse_bands(bands) if bands else None
    assert len(db.bands) == (len(expected) if expected else 5)
    for pos, band in enumerate(db.bands):
        lo = -np.inf if band.lower is None else band.lower
        hi = np.inf if band.upper is None else band.upper
        want = ids[(s >= lo) & (s < hi)]
        _, band_ids = db.index_and_ids(pos)
        assert np.array_equal(np.sort(band_ids), want) and band.count == len(want)
        if expected:
            assert (band.lower, band.upper) == (expected[pos]["lower"], expected[pos]["upper"])
        if len(want):  # search inside the band answers with the band's global ids only
            found = db.search(emb[:5], k=min(10, len(want)), band=band.name)
            assert set(found.ids.ravel()) <= set(want.tolist())
            member = np.flatnonzero(np.isin(ids, want))[0]
            assert db.search(emb[member], k=1, band=pos).ids[0, 0] == ids[member]
        else:
            assert (db.search(emb[:2], k=3, band=pos).ids == -1).all()
    if not bands:  # equal quantile bins: 400 images each, together all of them
        assert [b.count for b in db.bands] == [400] * 5
    entry = catalogue.load(cat)["databases"]["db"]
    assert entry["kind"] == "local" and [b["count"] for b in entry["bands"]] == [b.count for b in db.bands]
    opened = catalogue.open_database("db", catalogue=cat)
    assert isinstance(opened, Database) and opened.path == os.path.abspath(path)
    other = root / "elsewhere" / "db"  # another database may not silently take the name
    shutil.copytree(path, other)
    with pytest.raises(ValueError, match="already names 'db'"):
        subindex(SubindexConfig(db=str(other), quantile_bins=2, index_key="Flat", catalogue=cat))
    shutil.rmtree(other.parent)
    with pytest.raises(ValueError, match="no band"):
        db.search(emb[:1], 3, band="nope")


def test_fit_learns_a_rating_rule_and_reports_held_out_error(scored_db, tmp_path):
    path, emb, ids, _, _ = scored_db
    direction = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    ratings = 5 + 40 * emb @ direction / np.linalg.norm(direction)
    ratings += np.random.default_rng(1).normal(0, 0.05, len(ratings))
    pd.DataFrame({"image_id": ids, "rating": ratings}).to_parquet(tmp_path / "ratings.parquet")
    out = str(tmp_path / "head.pt")
    report = fit(
        FitConfig(ratings=str(tmp_path / "ratings.parquet"), output_head=out, db=path, epochs=150, lr=1e-2)
    )
    assert report["holdout_mse"] < 0.1 * report["holdout_mse_of_mean"]
    head = load_head(out, "open_clip:ViT-B-32/openai")
    assert head.clip_model == "open_clip:ViT-B-32/openai"
    assert np.corrcoef(head.score(emb), ratings)[0, 1] > 0.95
    with open(tmp_path / "head.json") as f:
        assert json.load(f)["num_holdout"] == 200
    # the MLP shape trains through the same path
    mlp = fit(
        FitConfig(
            ratings=str(tmp_path / "ratings.parquet"),
            output_head=str(tmp_path / "mlp.pt"),
            db=path,
            epochs=20,
            head_kind="mlp",
        )
    )
    assert mlp["holdout_mse"] < mlp["holdout_mse_of_mean"]
    # ratings given with their embeddings (no database) train the same way
    with_emb = tmp_path / "with_emb.parquet"
    pd.DataFrame({"embedding": list(emb[:300]), "rating": ratings[:300]}).to_parquet(with_emb)
    direct = fit(
        FitConfig(
            ratings=str(with_emb),
            output_head=str(tmp_path / "direct.pt"),
            clip_model="open_clip:ViT-B-32/openai",
        )
    )
    assert direct["num_train"] == 270 and direct["clip_model"] == "open_clip:ViT-B-32/openai"
    # scoring the database with the fitted head replaces the LAION scores only when asked to
    with pytest.raises(ValueError, match="--overwrite"):
        score(ScoreConfig(db=path, head=out))
    score(ScoreConfig(db=path, head=out, overwrite=True))
    np.testing.assert_allclose(
        Database.open(path).aesthetic_scores(ids), head.score(emb), rtol=1e-5, atol=1e-5
    )


def test_fit_refuses_bad_ratings(scored_db, tmp_path):
    path, _, ids, _, _ = scored_db
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"image_id": ids[:20], "score": np.ones(20)}).to_parquet(bad)
    with pytest.raises(ValueError, match="no column 'rating'"):
        fit(FitConfig(ratings=str(bad), output_head=str(tmp_path / "h.pt"), db=path))
    pd.DataFrame({"image_id": [ids[0], 12345678] * 10, "rating": np.ones(20)}).to_parquet(bad)
    with pytest.raises(ValueError, match="12345678"):
        fit(FitConfig(ratings=str(bad), output_head=str(tmp_path / "h.pt"), db=path))
    pd.DataFrame({"image_id": ids[:20], "rating": [np.nan] + [1.0] * 19}).to_parquet(bad)
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        fit(FitConfig(ratings=str(bad), output_head=str(tmp_path / "h.pt"), db=path))
    assert not (tmp_path / "h.pt").exists()


def test_band_flags_are_checked():
    with pytest.raises(ValueError, match="exactly one"):
        SubindexConfig(db="x", quantile_bins=5, bands="0-5")
    with pytest.raises(ValueError, match="LOWER-UPPER"):
        parse_bands("0-4.5,high")
    with pytest.raises(ValueError, match="below"):
        parse_bands("5-4")


@needs_shared
def test_published_head_is_fetched_once_into_the_cache(tmp_path):
    """The real download path, against a local mirror: checked, cached, then served from the cache."""
    from pipelines.demo_data import FolderServer
    from retrieval.aesthetic import fetch_published

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(os.path.join(SHARED, "sa_0_4_vit_b_32_linear.pth"), mirror / "good.pth")
    (mirror / "bad.pth").write_bytes(b"not the published weights")
    cache = str(tmp_path / "cache")
    with FolderServer(str(mirror)) as server:
        with pytest.raises(ValueError, match="127.0.0.1"):  # a private address is refused by default
            fetch_published("laion-v1:ViT-B-32", cache=cache, url=f"{server.base}/good.pth")
        with pytest.raises(ValueError, match="sha256"):
            fetch_published(
                "laion-v1:ViT-B-32",
                cache=cache,
                url=f"{server.base}/bad.pth",
                allow_network=("127.0.0.1/32",),
            )
        assert not os.path.exists(cache) or not os.listdir(cache)
        path = fetch_published(
            "laion-v1:ViT-B-32", cache=cache, url=f"{server.base}/good.pth", allow_network=("127.0.0.1/32",)
        )
    assert path == os.path.join(cache, "sa_0_4_vit_b_32_linear.pth")
    assert fetch_published("laion-v1:ViT-B-32", cache=cache) == path  # server gone: the cache answers


def test_band_index_is_built_from_a_folder_of_band_parts_not_an_array_in_memory(scored_db, monkeypatch):
    """autofaiss gets a folder it reads in batches (the index stage's way), holding exactly the band's
    embeddings part by part; before, the band's embeddings were gathered into one array in RAM."""
    import pipelines.index
    from pipelines.aesthetic import _build_band

    path, emb, ids, _, _ = scored_db
    db = Database.open(path)
    seen = {}
    real = pipelines.index.build_faiss_index

    def spy(embeddings, *args, **kwargs):
        assert isinstance(embeddings, str), "the band's embeddings must reach autofaiss as a folder"
        files = sorted(os.listdir(embeddings))
        seen["parts"] = files
        seen["emb"] = np.concatenate([np.load(os.path.join(embeddings, f)) for f in files])
        return real(embeddings, *args, **kwargs)

    monkeypatch.setattr(pipelines.index, "build_faiss_index", spy)
    band = {"name": "probe", "lower": 4.7, "upper": None}
    record = _build_band(os.path.abspath(path), band, IndexConfig(db=path, index_key="Flat"))
    inside = db.aesthetic_scores(ids) >= 4.7
    assert record["count"] == inside.sum() > 0
    assert len(seen["parts"]) == 3  # one file per database part that has band members
    np.testing.assert_allclose(seen["emb"], emb[inside], atol=1e-6)
    band_dir = os.path.join(path, "bands", "probe")
    assert not os.path.exists(os.path.join(band_dir, "emb"))  # the copy is gone once the index is built
    assert np.array_equal(np.load(os.path.join(band_dir, "ids.npy")), ids[inside])
    shutil.rmtree(band_dir)
