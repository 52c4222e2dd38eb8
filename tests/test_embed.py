"""Embed stage: layout, ids, resume, and agreement with clip-retrieval inference on the same shards."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from bench.peers import load_embedding_folder
from pipelines.embed import EmbedConfig, embed
from tests.conftest import NUM_TEST_IMAGES


@pytest.fixture(scope="module")
def db(shards, tiny_clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("db") / "db"
    summary = embed(EmbedConfig(shards=shards, output=str(out), clip_model=tiny_clip, batch_size=16))
    return out, summary


@pytest.fixture(scope="module")
def indexed_db(db):
    """The db with its faiss index built (once), for every test that searches it, whatever order they run in."""
    from pipelines.index import IndexConfig, build

    out, _ = db
    build(IndexConfig(db=str(out), max_index_memory="100M", current_memory_available="2G"))
    return out


def load_db(out):
    return load_embedding_folder(str(out))


def test_layout_counts_and_ids(db):
    out, summary = db
    img, text, meta = load_db(out)
    assert summary.num_images == NUM_TEST_IMAGES and summary.num_parts == 3
    assert img.shape == text.shape == (NUM_TEST_IMAGES, 384) and img.dtype == np.float32
    assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-4)
    assert np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-4)
    assert len(meta) == NUM_TEST_IMAGES
    ids = meta.image_id.to_numpy()
    assert (np.diff(ids) > 0).all()  # unique, sorted: position <-> id is monotonic
    assert (ids == meta.key.astype(int).to_numpy()).all()
    assert {"url", "caption", "image_id", "width"} <= set(meta.columns)
    info = json.loads((out / "database.json").read_text())
    assert info["num_images"] == NUM_TEST_IMAGES and info["dim"] == 384


def test_caption_embedding_matches_query_time_encoder(db, tiny_clip):
    from retrieval.clip_model import ClipEncoder

    out, _ = db
    _, text, meta = load_db(out)
    enc = ClipEncoder(tiny_clip)
    again = enc.encode_texts(list(meta.caption[:4])).numpy()
    assert (np.sum(again * text[:4], axis=1) > 0.999).all()


def test_rerun_skips_done_parts(db, shards, tiny_clip):
    out, _ = db
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(f"{out}/img_emb/*.npy")}
    summary = embed(EmbedConfig(shards=shards, output=str(out), clip_model=tiny_clip))
    assert summary.num_parts_skipped == 3 and summary.num_images == NUM_TEST_IMAGES
    assert {p: os.stat(p).st_mtime_ns for p in before} == before


def test_pieces_of_a_killed_run_are_not_merged_into_the_rerun(db, shards, tiny_clip):
    out, _ = db
    marker = out / "_parts" / "00001.json"
    num_images = json.loads(marker.read_text())["num_images"]
    before = np.load(out / "img_emb" / "img_emb_00001.npy")
    marker.unlink()  # as if the run died after the actors wrote some pieces of shard 1
    (out / "_pieces" / "00001").mkdir(parents=True)
    np.savez(
        out / "_pieces" / "00001" / "left-behind.npz",
        key=np.array(["000010000"]),
        ok=np.array([True]),
        meta=np.array(["{}"]),
        img_emb=np.zeros((1, 384), np.float32),
        text_emb=np.zeros((1, 384), np.float32),
    )
    summary = embed(EmbedConfig(shards=shards, output=str(out), clip_model=tiny_clip, batch_size=16))
    assert summary.num_parts_skipped == 2 and summary.num_images == NUM_TEST_IMAGES
    assert json.loads(marker.read_text())["num_images"] == num_images
    np.testing.assert_allclose(np.load(out / "img_emb" / "img_emb_00001.npy"), before, atol=1e-5)
    assert not (out / "_pieces" / "00001").exists()


@pytest.mark.slow
def test_matches_clip_retrieval_inference(db, shards, tiny_clip, tmp_path):
    """Same shards, same checkpoint: per-image cosine with clip-retrieval's embeddings >= 0.999."""
    from bench.peers import run_clip_retrieval_inference

    out, _ = db
    run_clip_retrieval_inference(shards, str(tmp_path / "ref"), tiny_clip, batch_size=16, timeout=600)
    ref_img, ref_text, ref_meta = load_embedding_folder(str(tmp_path / "ref"))
    img, text, meta = load_db(out)
    by_key = {k: i for i, k in enumerate(meta.key)}
    order = [by_key[k] for k in ref_meta.image_path]
    assert len(order) == NUM_TEST_IMAGES
    img_cos = np.sum(img[order] * ref_img, axis=1) / np.linalg.norm(ref_img, axis=1)
    text_cos = np.sum(text[order] * ref_text, axis=1) / np.linalg.norm(ref_text, axis=1)
    assert img_cos.min() >= 0.999, img_cos.min()
    assert text_cos.min() >= 0.999, text_cos.min()


def test_chain_download_embed_index_search(indexed_db):
    """download -> embed -> index: every downloaded image is indexed once and finds itself by its image id."""
    from retrieval.database import Database

    out = indexed_db
    database = Database.open(str(out))
    img, _, meta = load_db(out)
    assert len(database) == NUM_TEST_IMAGES
    res = database.search(img, 1)
    assert (res.ids[:, 0] == meta.image_id.to_numpy()).all()
    assert list(database.metadata(res.ids[:3, 0]).url) == list(meta.url[:3])


def test_clip_retrieval_back_serves_the_database(indexed_db, tmp_path):
    """`clip-retrieval back` (via knn-diffusion serve, bound to 127.0.0.1) answers kNN queries on our output."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    out = indexed_db
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "serve", "--db", str(out), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/indices-list", timeout=2) as r:
                    assert json.load(r) == ["db"]
                break
            except OSError:
                assert proc.poll() is None, "serve exited early"
                assert time.time() < deadline, "serve did not come up in 180 s"
                time.sleep(1)
        img, _, meta = load_db(out)
        body = json.dumps(
            {"embedding_input": img[7].tolist(), "modality": "image", "num_images": 3, "indice_name": "db"}
        ).encode()
        req = urllib.request.Request(
            f"{base}/knn-service", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            results = json.load(r)
        assert results[0]["image_id"] == meta.image_id.iloc[7]
        assert results[0]["url"] == meta.url.iloc[7]
        assert results[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
        check_remote_database(base, out, tmp_path)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def check_remote_database(base, out, tmp_path):
    """The running back, added to a catalogue by the CLI, opens by name and answers like the local database."""
    from pipelines.cli import main
    from retrieval.catalogue import open_database
    from retrieval.database import Database, DatabaseInfo
    from retrieval.remote import RemoteDatabase

    cat = str(tmp_path / "catalogue.json")
    info = DatabaseInfo.read(str(out))
    assert (
        main(["catalogue", "add", "--catalogue", cat, "--name", "web", "--url", base]) == 2
    )  # no --clip-model
    args = [
        "catalogue",
        "add",
        "--catalogue",
        cat,
        "--name",
        "web",
        "--url",
        base,
        "--clip-model",
        info.clip_model,
    ]
    assert main(args) == 0
    remote = open_database("web", catalogue=cat, allow_network=("127.0.0.1/32",))
    assert isinstance(remote, RemoteDatabase) and remote.indice_name == "db"
    local = Database.open(str(out))
    img, _, meta = load_db(out)
    got, want = remote.search(img[[3, 11, 30]], k=5), local.search(img[[3, 11, 30]], k=5)
    assert np.array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)
    assert list(remote.metadata(got.ids[0]).url) == list(local.metadata(want.ids[0]).url)
    # neighbour embeddings of a search engine: the images are fetched (guarded) and embedded here
    fetched = remote.embeddings(got.ids[0, :2])
    assert (np.sum(fetched * local.embeddings(got.ids[0, :2]), axis=1) > 0.99).all()
    with pytest.raises(ValueError, match="no aesthetic bands"):
        remote.search(img[:1], k=1, band=0)
    refusing = open_database("web", catalogue=cat)  # private addresses refused by default: a missing row
    assert not refusing.embeddings(refusing.search(img[:1], k=1).ids[0]).any()


def test_rerun_with_another_model_is_refused(db, shards):
    out, _ = db
    with pytest.raises(ValueError, match="another --output"):
        embed(
            EmbedConfig(shards=shards, output=str(out), clip_model="open_clip:ViT-S-32//elsewhere/other.pt")
        )


@pytest.mark.slow
def test_int8_database_agrees_with_fp32(db, shards, tiny_clip, tmp_path):
    out, _ = db
    img, text, meta = load_db(out)
    summary = embed(
        EmbedConfig(
            shards=shards,
            output=str(tmp_path / "int8"),
            clip_model=tiny_clip,
            batch_size=16,
            precision="int8",
        )
    )
    assert summary.num_images == NUM_TEST_IMAGES
    img8, text8, meta8 = load_db(tmp_path / "int8")
    assert (meta8.image_id.to_numpy() == meta.image_id.to_numpy()).all()
    cos = np.sum(img8 * img, axis=1)
    assert cos.min() > 0.999 and not np.allclose(img8, img, atol=1e-6)  # close, and really the int8 tower
    text_cos = np.sum(text8 * text, axis=1)  # captions run on the int8 text tower too
    assert text_cos.min() > 0.998 and not np.allclose(text8, text, atol=1e-6)


@pytest.mark.parametrize("fmt", ["png", "webp", "jpg"])
def test_preprocess_reads_every_format_download_writes(tiny_clip, fmt):
    """download --encode-format png/webp writes <key>.png/.webp into the shards; embed must read them too."""
    import io

    from PIL import Image

    from pipelines.embed import preprocess

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format={"jpg": "JPEG"}.get(fmt, fmt.upper()))
    batch = {
        "__key__": np.array(["000000001", "000000002"]),
        fmt: np.array([buf.getvalue(), b"not an image"], dtype=object),
        "json": np.array(['{"caption": "a red box"}', '{"caption": "broken"}']),
        "path": np.array(["/x/00000.tar", "/x/00000.tar"]),
    }
    out = preprocess(batch, tiny_clip, enable_text=False)
    assert list(out["ok"]) == [True, False]
    assert out["pixels"].shape[0] == 2 and np.abs(out["pixels"][0]).sum() > 0


def test_actors_write_embeddings_and_the_driver_gets_only_counts(tiny_clip, tmp_path):
    """Embeddings no longer travel through the driver: the actor writes them as pieces of their shard and
    returns (shard, rows); merging a shard's pieces gives the part the driver used to write."""
    import io
    import pickle

    import pandas as pd
    import torch
    from PIL import Image

    from pipelines.embed import Embedder, merge_part, preprocess
    from retrieval.clip_model import ClipEncoder, SplitTransform, load_transforms

    def jpeg(colour):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buf, format="JPEG")
        return buf.getvalue()

    keys = ["000010002", "000010000", "000020000", "000010001"]  # shards 1 and 2, out of order
    batch = {
        "__key__": np.array(keys),
        "jpg": np.array([jpeg((40 * i, 200, 0)) for i in range(4)], dtype=object),
        "json": np.array([json.dumps({"caption": f"box {k}", "status": "success"}) for k in keys]),
        "path": np.array(["/s/00001.tar", "/s/00001.tar", "/s/00002.tar", "/s/00001.tar"]),
    }
    batch["jpg"][2] = b"broken"
    out = str(tmp_path / "db")
    actor = Embedder(tiny_clip, "fp32", 1, out)
    split = SplitTransform.of(load_transforms(tiny_clip)[0])  # what embed() hands the decoding tasks
    split = pickle.loads(pickle.dumps(split))  # as Ray ships it; open_clip is not needed to read it
    half = {k: v[:2] for k, v in preprocess(batch, tiny_clip, enable_text=True, split=split).items()}
    rest = {k: v[2:] for k, v in preprocess(batch, tiny_clip, enable_text=True, split=split).items()}
    assert half["pixels"].dtype == np.uint8 and list(half["caption"]) == ["box 000010002", "box 000010000"]
    returned = [actor(half), actor(rest)]
    assert all(set(r) == {"shard", "rows"} for r in returned)  # no embedding goes back
    assert [(r["shard"].tolist(), r["rows"].tolist()) for r in returned] == [([1], [2]), ([1, 2], [1, 1])]
    assert len(os.listdir(tmp_path / "db" / "_pieces" / "00001")) == 2
    marker = merge_part(out, 1, tiny_clip)
    assert marker["num_images"] == 3 and not os.path.exists(tmp_path / "db" / "_pieces" / "00001")
    img = np.load(tmp_path / "db" / "img_emb" / "img_emb_00001.npy")
    meta = pd.read_parquet(tmp_path / "db" / "metadata" / "metadata_00001.parquet")
    assert meta.image_id.tolist() == [10000, 10001, 10002] and "status" not in meta
    # the queue carries uint8 pixels, normalised in the actor; the result is the whole transform's
    reference = ClipEncoder(tiny_clip, precision="fp32")
    pixels = torch.stack([reference.preprocess(Image.open(io.BytesIO(batch["jpg"][i]))) for i in (1, 3, 0)])
    expected = reference.encode_images(pixels).numpy()
    np.testing.assert_allclose(img, expected, atol=1e-5)
    text = np.load(tmp_path / "db" / "text_emb" / "text_emb_00001.npy")  # captions tokenized by the actor
    captions = [f"box {k}" for k in ("000010000", "000010001", "000010002")]
    np.testing.assert_allclose(text, reference.encode_texts(captions).numpy(), atol=1e-5)
    assert merge_part(out, 2, tiny_clip)["num_failed"] == 1  # the broken image: counted, not a row
