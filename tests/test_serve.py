"""`knn-diffusion serve`: clip-retrieval's API on the demo's own database, with everything a web page or a request
could abuse shut: local files, internal addresses, other Hosts, other Origins, big bodies, malformed queries."""

from __future__ import annotations

import base64
import io
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tests.image_server import png_header


@pytest.fixture(scope="module")
def demo_db(quick_demo):
    out, _ = quick_demo
    return str(out / "db" / "main")


@pytest.fixture(scope="module")
def client(demo_db):
    from retrieval.serve import ServeConfig, make_app

    app = make_app(ServeConfig(db=demo_db, max_body_bytes=64 * 1024))
    return app.test_client()


def knn(client, headers=None, **body):
    return client.post(
        "/knn-service",
        json={"modality": "image", "num_images": 3, "indice_name": "db", **body},
        headers=headers,
    )


def test_serves_the_demo_database_whose_clip_is_a_config_json(client, demo_db):
    """The demo's CLIP is named open_clip:<config.json>/<clip.pt>; clip_back's own loader cannot load it."""
    from retrieval.database import Database

    db = Database.open(demo_db)
    assert ".json/" in db.info.clip_model
    r = knn(client, text="a large red circle in the centre on a plain blue background")
    assert r.status_code == 200, r.get_json()
    want = db.search_text(["a large red circle in the centre on a plain blue background"], k=3)
    assert [hit["image_id"] for hit in r.get_json()] == list(want.ids[0])
    emb = db.embeddings(db.ids[:1])[0]
    r = knn(client, embedding_input=emb.tolist())
    assert r.get_json()[0]["image_id"] == db.ids[0]
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (220, 40, 40)).save(buf, format="PNG")
    r = knn(client, image=base64.b64encode(buf.getvalue()).decode())
    assert r.status_code == 200 and len(r.get_json()) == 3


@pytest.mark.parametrize("url", ["file:///etc/passwd", "FILE", "LOOPBACK", "REDIRECT"])
def test_image_url_is_refused_and_nothing_is_read(client, image_server, monkeypatch, tmp_path, url):
    """With image_url off (the default) no file is opened and no server gets a request."""
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    url = {
        "FILE": f"file://{secret}",
        "LOOPBACK": image_server.image_url(3),
        "REDIRECT": f"{image_server.base}/redirect?to=file://{secret}",
    }.get(url, url)
    opened = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: opened.append(a) or pytest.fail("urlopen"))
    hits = dict(image_server.hits)
    r = knn(client, image_url=url)
    assert r.status_code == 400 and "image_url queries are off" in r.get_json()["error"]
    assert not opened and image_server.hits == hits


def test_opted_in_image_urls_go_through_the_download_guard(demo_db, image_server):
    """--allow-image-urls fetches public http(s) only: loopback, file:// and redirects to them are refused."""
    from retrieval.serve import ServeConfig, make_app

    client = make_app(ServeConfig(db=demo_db, allow_image_urls=True)).test_client()
    hits = dict(image_server.hits)
    for url in (
        image_server.image_url(3),
        "file:///etc/passwd",
        f"http://127.0.0.2:{image_server.port}/img/1.jpg",
    ):
        r = knn(client, image_url=url)
        assert r.status_code == 400 and "not fetched: refused" in r.get_json()["error"], (url, r.get_json())
    assert image_server.hits == hits


def test_other_hosts_and_origins_are_refused(client, demo_db):
    """DNS rebinding (a foreign Host) gets 400; no Origin is echoed unless configured, and then only that one."""
    from retrieval.serve import ServeConfig, make_app

    assert knn(client, text="a red circle", headers={"Host": "evil.example:1234"}).status_code == 400
    assert knn(client, text="a red circle", headers={"Host": "127.0.0.1:1234"}).status_code == 200
    r = knn(client, text="a red circle", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
    allowed = make_app(ServeConfig(db=demo_db, cors_origins=("http://127.0.0.1:3000",))).test_client()
    r = knn(allowed, text="a red circle", headers={"Origin": "http://127.0.0.1:3000"})
    assert r.headers.get("Access-Control-Allow-Origin") == "http://127.0.0.1:3000"
    r = knn(allowed, text="a red circle", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_bodies_are_capped_and_bad_queries_are_400(client):
    big = base64.b64encode(np.random.default_rng(0).bytes(100 * 1024)).decode()
    assert knn(client, image=big).status_code == 413
    assert client.post("/knn-service", data=b"not json").status_code == 400
    assert knn(client, embedding_input=[0.1, 0.2]).status_code == 400  # wrong dimension
    assert knn(client, text="x", num_images="many").status_code == 400
    assert knn(client, text="x", indice_name="other").status_code == 404
    assert knn(client).status_code == 400  # no query at all
    bomb = base64.b64encode(png_header(20_000, 20_000)).decode()
    r = knn(client, image=bomb)
    assert r.status_code == 400 and "DecompressionBomb" in r.get_json()["error"]
    assert client.post("/metadata", json={"indice_name": "db"}).status_code == 400
    r = client.post("/metadata", json={"ids": [0, 1], "indice_name": "db"})
    assert r.status_code == 200 and len(r.get_json()) == 2


def test_serve_cli_errors_are_one_line(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["serve", "--db", str(tmp_path)]) == 2
    assert "image.index does not exist" in capsys.readouterr().err
