"""The generation app: the service itself, its HTTP API on Ray Serve, and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from diffusion.app import MAX_BODY_BYTES, MAX_PROMPT_CHARS, GenerateRequest, GenerationService

PROMPT = "a large red circle in the centre on a plain blue background"
ARTIFACTS = os.environ.get("KNN_DIFFUSION_TEST_ARTIFACTS", os.path.join(os.getcwd(), "test-artifacts"))


def decode(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


@pytest.fixture(scope="module")
def demo_paths(quick_demo):
    out, _ = quick_demo
    return str(out / "run"), str(out / "db" / "main"), str(out / "db" / "ood")


@pytest.fixture(scope="module")
def service(demo_paths):
    run, main, ood = demo_paths
    return GenerationService(run, [main, ood])


def test_generate_many_batches_requests_and_keeps_each_requests_seed(service, demo_paths):
    _, main, _ = demo_paths
    size = service.config.model.image_size
    a = GenerateRequest(prompt=PROMPT, num_images=2, seed=1, steps=4)
    b = GenerateRequest(
        prompt="a small green star at the top left on a striped yellow background", seed=2, steps=4
    )
    both = service.generate_many([a, b])
    assert [len(r["images"]) for r in both] == [2, 1] and all(r["batch_requests"] == 2 for r in both)
    assert all(decode(im).shape == (size, size, 3) for r in both for im in r["images"])
    # neighbours: the model's k nearest images of the prompt's text embedding, with thumbnails and captions
    db = service.databases[main]
    query = service.encoder.encode_texts([PROMPT]).numpy()
    expected = [int(i) for i in db.search(query, service.config.model.k).ids[0]]
    assert both[0]["neighbour_ids"] == expected
    assert all(t is not None and decode(t).shape[2] == 3 for t in both[0]["neighbour_thumbnails"])
    assert len(both[0]["neighbour_captions"]) == len(expected)
    # a request's images come from its own seed, not from its batch companions
    alone = service.generate_many([a])[0]
    diff = [
        np.abs(decode(x).astype(int) - decode(y).astype(int)).mean()
        for x, y in zip(alone["images"], both[0]["images"], strict=True)
    ]
    assert max(diff) < 1.0, diff
    other_seed = service.generate_many([a.model_copy(update={"seed": 3})])[0]
    assert (
        np.abs(decode(other_seed["images"][0]).astype(int) - decode(alone["images"][0]).astype(int)).mean()
        > 2
    )


def test_fewer_neighbours_and_bad_requests(service, demo_paths):
    _, _, ood = demo_paths
    k = service.config.model.k
    out = service.generate_many([GenerateRequest(prompt=PROMPT, k=2, steps=2, database=ood)])[0]
    assert len(out["neighbour_ids"]) == 2 and out["database"] == ood
    with pytest.raises(ValueError, match="at most"):
        service.validate(GenerateRequest(prompt=PROMPT, k=k + 1))
    with pytest.raises(LookupError, match="not served"):
        service.validate(GenerateRequest(prompt=PROMPT, database="elsewhere"))
    with pytest.raises(LookupError, match="not a band"):
        service.validate(GenerateRequest(prompt=PROMPT, band="no-such-band"))
    with pytest.raises(ValueError):
        GenerateRequest(prompt="x" * (MAX_PROMPT_CHARS + 1))
    with pytest.raises(ValueError):
        GenerateRequest(prompt=PROMPT, image_url="file:///etc/passwd")  # unknown fields are refused


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(demo_paths, ray_session):
    from ray import serve

    from diffusion.app import AppConfig, run_app

    run, main, ood = demo_paths
    url = run_app(AppConfig(checkpoint=run, databases=[main, ood], port=free_port()), blocking=False)
    yield url
    serve.shutdown()


def call(url: str, body: dict | bytes | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            raw, status, kind = resp.read(), resp.status, resp.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        raw, status, kind = err.read(), err.code, err.headers.get("content-type", "")
    return status, json.loads(raw) if "json" in kind else raw.decode()


def test_api_page_search_generate_and_limits(app_url, demo_paths):
    _, main, ood = demo_paths
    assert app_url.startswith("http://127.0.0.1:")
    status, page = call(app_url)
    assert status == 200 and "<title>kNN-Diffusion</title>" in page
    assert "http://" not in page and "https://" not in page  # self-contained: no CDN, works offline
    status, info = call(app_url + "databases")
    assert status == 200 and [d["name"] for d in info["databases"]] == [main, ood] and info["k"] >= 1
    status, found = call(app_url + "search?" + urllib.parse.urlencode({"q": PROMPT, "k": 5}))
    assert status == 200 and len(found["ids"]) == len(found["captions"]) == len(found["thumbnails"]) == 5
    from retrieval.clip_model import cached_encoder
    from retrieval.database import Database

    db = Database.open(main)  # the API answers what the database's own search answers
    expected = db.search(cached_encoder(db.info.clip_model).encode_texts([PROMPT]).numpy(), 5)
    assert found["ids"] == [int(i) for i in expected.ids[0]]
    assert found["captions"] == list(
        db.metadata(expected.ids[0]).set_index("image_id").loc[found["ids"], "caption"]
    )
    status, out = call(app_url + "generate", {"prompt": PROMPT, "num_images": 2, "steps": 4, "seed": 5})
    assert status == 200 and len(out["images"]) == 2 and len(out["neighbour_ids"]) == info["k"]
    assert decode(out["images"][0]).shape[:2] == (info["image_size"], info["image_size"])
    # bad input: 4xx with a message, never a traceback
    cases = [
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, 422),
        ({"prompt": PROMPT, "steps": 10_000}, 422),
        ({"prompt": PROMPT, "num_images": 100}, 422),
        ({"prompt": PROMPT, "image_url": "http://127.0.0.1:1/x.png"}, 422),
        ({"prompt": PROMPT, "database": "/etc"}, 404),
        ({"prompt": PROMPT, "k": info["k"] + 1}, 400),
    ]
    for body, code in cases:
        status, out = call(app_url + "generate", body)
        assert status == code and "detail" in out, (body, status, out)
    status, out = call(app_url + "generate", b"{" + b" " * MAX_BODY_BYTES + b"}")
    assert status == 413 and "bytes" in out["detail"]
    status, out = call(app_url + "search?q=" + "x" * (MAX_PROMPT_CHARS + 1))
    assert status == 400


def test_32_concurrent_requests_all_succeed_and_are_batched(app_url):
    bodies = [{"prompt": PROMPT, "steps": 4, "seed": i} for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda b: call(app_url + "generate", b), bodies))
    assert all(status == 200 and len(out["images"]) == 1 for status, out in results)
    assert max(out["batch_requests"] for _, out in results) > 1  # serve.batch grouped concurrent requests


def test_page_in_headless_chromium(app_url):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver packages (.ci/setup installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver), options=options)  # the system driver: no download
    try:
        browser.get(app_url)
        WebDriverWait(browser, 60).until(lambda b: "checkpoint step" in b.find_element(By.ID, "about").text)
        browser.find_element(By.ID, "prompt").send_keys(PROMPT)
        browser.find_element(By.ID, "steps").clear()
        browser.find_element(By.ID, "steps").send_keys("4")
        browser.find_element(By.ID, "generate").click()
        rendered = "return Array.from(document.querySelectorAll(arguments[0])).map(i => i.complete && i.naturalWidth)"
        WebDriverWait(browser, 300).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".result .samples img"))
        samples = browser.execute_script(rendered, ".result .samples img")
        neighbours = browser.execute_script(rendered, ".result .neighbours img")
        assert samples and all(w and w > 0 for w in samples), samples
        assert neighbours and all(w and w > 0 for w in neighbours), neighbours
        assert "error" not in browser.find_element(By.ID, "gen-status").get_attribute("class")
        os.makedirs(ARTIFACTS, exist_ok=True)
        browser.save_screenshot(os.path.join(ARTIFACTS, "app.png"))
        # the search view shows thumbnails with captions
        browser.find_element(By.ID, "tab-search").click()
        browser.find_element(By.ID, "query").send_keys(PROMPT)
        browser.find_element(By.ID, "search").click()
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#hits figure"))
        hits = browser.execute_script(rendered, "#hits img")
        assert hits and all(w and w > 0 for w in hits)
        # what the page shows is what the API answers (which test_api_page_search_generate_and_limits ties to the
        # database's own search), caption by caption, in order
        shown = [f.text.split(" (id ")[0] for f in browser.find_elements(By.CSS_SELECTOR, "#hits figcaption")]
        status, found = call(app_url + "search?" + urllib.parse.urlencode({"q": PROMPT, "k": len(shown)}))
        assert status == 200 and shown == found["captions"], (shown, found["captions"])
        browser.save_screenshot(os.path.join(ARTIFACTS, "app_search.png"))
    finally:
        browser.quit()
