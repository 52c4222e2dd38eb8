"""RemoteDatabase: what a search engine's results may contain never crashes sampling."""

from __future__ import annotations

import numpy as np


def test_embeddings_skip_a_decompression_bomb(image_server, tiny_clip):
    """A result whose image declares 400M pixels is a missing neighbour (zero row), not an exception."""
    from retrieval.remote import RemoteDatabase

    remote = RemoteDatabase("http://127.0.0.1:1", "db", tiny_clip, timeout=5, allow_network=("127.0.0.1/32",))
    remote._seen = {1: {"url": f"{image_server.base}/bomb-header.png"}, 2: {"url": image_server.image_url(2)}}
    out = remote.embeddings(np.array([1, 2]))
    assert not out[0].any()
    assert np.linalg.norm(out[1]) > 0.99
