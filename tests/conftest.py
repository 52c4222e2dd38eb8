"""Shared fixtures: one local Ray per session, a local image server, tiny random-init CLIP checkpoints."""

from __future__ import annotations

import os

import pytest

from tests.image_server import ImageServer

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory):
    """No test reads or writes the user's catalogue, head folder or cache."""
    names = ("KNN_DIFFUSION_CATALOGUE", "KNN_DIFFUSION_AESTHETIC_DIR", "KNN_DIFFUSION_CACHE")
    saved = {k: os.environ.pop(k, None) for k in names}
    os.environ["KNN_DIFFUSION_CATALOGUE"] = str(tmp_path_factory.mktemp("catalogue") / "catalogue.json")
    os.environ["KNN_DIFFUSION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    os.environ.pop("KNN_DIFFUSION_CATALOGUE", None)
    os.environ.pop("KNN_DIFFUSION_CACHE", None)
    os.environ.update({k: v for k, v in saved.items() if v is not None})


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    from retrieval.ray_env import job_runtime_env

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, runtime_env=job_runtime_env())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def image_server():
    with ImageServer(slow_seconds=4.0, huge_bytes=3_000_000, bomb_side=3000) as server:
        yield server


TEST_CLIP_CONFIG = "ViT-S-32"


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A random-init open_clip checkpoint saved locally, named as users name real ones."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(TEST_CLIP_CONFIG)
    path = tmp_path_factory.mktemp("clip") / "vit_s_32_random.pt"
    torch.save(model.state_dict(), path)
    return f"open_clip:{TEST_CLIP_CONFIG}/{path}"


NUM_TEST_IMAGES = 48


@pytest.fixture(scope="session")
def shards(ray_session, image_server, tmp_path_factory):
    """Downloaded webdataset shards: NUM_TEST_IMAGES good images (3 shards of 20) plus 4 bad URLs."""
    import pandas as pd

    from pipelines.download import DownloadConfig, download
    from tests.image_server import caption_for

    root = tmp_path_factory.mktemp("shards")
    urls = [image_server.image_url(i) for i in range(NUM_TEST_IMAGES)]
    urls[5:5] = [f"{image_server.base}/missing.jpg", f"{image_server.base}/corrupt.jpg"]
    urls += [f"{image_server.base}/page.html", "file:///etc/hostname"]
    captions = [caption_for(int(u.rsplit("/", 1)[-1].split(".")[0])) if "/img/" in u else "bad" for u in urls]
    pd.DataFrame({"url": urls, "caption": captions}).to_parquet(root / "urls.parquet")
    config = DownloadConfig(
        url_list=str(root / "urls.parquet"),
        output_folder=str(root / "shards"),
        image_size=64,
        number_sample_per_shard=20,
        thread_count=8,
        timeout=5,
        allow_network=["127.0.0.1/32"],
    )
    summary = download(config)
    assert summary.successes == NUM_TEST_IMAGES
    return str(root / "shards")


@pytest.fixture(scope="session")
def quick_demo(ray_session, tmp_path_factory):
    """The quick demo's whole output (one run per session: test_run.py checks it, test_app.py serves it)."""
    from pipelines.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "out"
    result = run_demo(str(out), quick=True)
    return out, result
