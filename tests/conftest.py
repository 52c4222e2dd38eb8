"""Shared fixtures: one local Ray per session, a local image server, tiny random-init CLIP checkpoints."""

from __future__ import annotations

import os

import pytest

from tests.image_server import ImageServer

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def image_server():
    with ImageServer(slow_seconds=4.0, huge_bytes=3_000_000, bomb_side=3000) as server:
        yield server
