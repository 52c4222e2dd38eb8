"""Download stage on a local Ray against a local image server: exact counts, refusals, resume."""

from __future__ import annotations

import glob
import json
import os
import tarfile

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines.download import DownloadConfig, download
from tests.image_server import caption_for, make_image, png_header

NUM_GOOD = 40


def bad_urls(server, tmp_path) -> dict[str, str]:
    """url -> expected status for every kind of bad input."""
    secret = tmp_path / "on_disk.jpg"  # a real image on disk: it must never be read
    secret.write_bytes(make_image(3))
    return {
        f"{server.base}/missing.jpg": "failed_to_download",
        f"{server.base}/slow": "failed_to_download",
        f"{server.base}/corrupt.jpg": "failed_to_resize",
        f"{server.base}/page.html": "failed_to_resize",
        f"{server.base}/huge": "failed_to_download",
        f"{server.base}/huge-declared": "failed_to_download",
        f"{server.base}/bomb.png": "failed_to_resize",
        f"{server.base}/redirect?to=http://127.0.0.2:{server.port}/img/1.jpg": "failed_to_download",
        f"file://{secret}": "failed_to_download",
    }


def write_url_list(path, server, tmp_path, fmt: str) -> dict[str, str]:
    expected = {server.image_url(i): "success" for i in range(NUM_GOOD)}
    expected.update(bad_urls(server, tmp_path))
    df = pd.DataFrame(
        {"url": list(expected), "caption": [caption_for(i) for i in range(len(expected))], "source": "test"}
    )
    if fmt == "parquet":
        df.to_parquet(path)
    elif fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    return expected


def config_for(url_list, out, **kw) -> DownloadConfig:
    defaults = dict(
        image_size=64,
        number_sample_per_shard=16,
        thread_count=8,
        timeout=2,
        allow_network=["127.0.0.1/32"],
        max_image_bytes=1_000_000,
        max_image_pixels=4_000_000,
    )
    defaults.update(kw)
    return DownloadConfig(url_list=str(url_list), output_folder=str(out), **defaults)


def read_status(out) -> pd.DataFrame:
    return pd.concat([pq.read_table(p).to_pandas() for p in sorted(glob.glob(f"{out}/*.parquet"))])


def tar_keys(out) -> list[str]:
    keys = []
    for p in sorted(glob.glob(f"{out}/*.tar")):
        with tarfile.open(p) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".jpg")]
    return keys


def test_download_statuses_exact(ray_session, image_server, tmp_path):
    url_list = tmp_path / "urls.parquet"
    expected = write_url_list(url_list, image_server, tmp_path, "parquet")
    summary = download(config_for(url_list, tmp_path / "shards"))
    status = read_status(tmp_path / "shards")

    assert len(status) == len(expected)
    assert dict(zip(status.url, status.status, strict=True)) == expected
    assert summary.successes == NUM_GOOD
    assert summary.count == len(expected)
    assert summary.failed_to_download == sum(v == "failed_to_download" for v in expected.values())
    assert summary.num_shards == -(-len(expected) // 16)
    # refusals carry a reason a user can act on
    reasons = dict(zip(status.url, status.error_message, strict=True))
    assert "scheme 'file'" in reasons[next(u for u in expected if u.startswith("file://"))]
    assert "127.0.0.2" in reasons[next(u for u in expected if "redirect" in u)]
    assert "limit" in reasons[f"{image_server.base}/huge"]
    assert "decompression bomb" in reasons[f"{image_server.base}/bomb.png"]
    # extra columns are kept, captions land in the tar
    assert (status.source == "test").all()
    keys = tar_keys(tmp_path / "shards")
    assert sorted(keys) == sorted(status.key[status.status == "success"])
    with tarfile.open(sorted(glob.glob(f"{tmp_path}/shards/*.tar"))[0]) as tar:
        meta = json.load(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))))
        assert meta["source"] == "test" and meta["caption"].startswith("a ")
    assert not os.path.exists(tmp_path / "shards" / "_tmp")


def test_file_url_never_read(ray_session, image_server, tmp_path):
    """file:// is refused even with every private address allowed."""
    real = tmp_path / "real.jpg"
    real.write_bytes(make_image(5))
    before = os.stat(real).st_atime_ns
    (tmp_path / "urls.txt").write_text(f"file://{real}\n{image_server.image_url(5)}\n")
    download(
        config_for(tmp_path / "urls.txt", tmp_path / "out", allow_network=None, allow_private_network=True)
    )
    status = read_status(tmp_path / "out").set_index("url")
    assert status.loc[f"file://{real}", "status"] == "failed_to_download"
    assert "scheme 'file'" in status.loc[f"file://{real}", "error_message"]
    assert status.loc[image_server.image_url(5), "status"] == "success"
    assert os.stat(real).st_atime_ns == before


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_input_formats(ray_session, image_server, tmp_path, fmt):
    url_list = tmp_path / f"urls.{fmt}"
    expected = write_url_list(url_list, image_server, tmp_path, fmt)
    summary = download(config_for(url_list, tmp_path / "out", number_sample_per_shard=100))
    assert summary.successes == NUM_GOOD and summary.count == len(expected)


def test_rerun_skips_done_shards(ray_session, image_server, tmp_path):
    url_list = tmp_path / "urls.parquet"
    pd.DataFrame({"url": [image_server.image_url(i) for i in range(20)]}).to_parquet(url_list)
    download(config_for(url_list, tmp_path / "out", number_sample_per_shard=10))
    hits = dict(image_server.hits)
    summary = download(config_for(url_list, tmp_path / "out", number_sample_per_shard=10))
    assert summary.num_shards_skipped == 2 and summary.successes == 20
    assert image_server.hits == hits  # nothing fetched again
    # a rerun that would shard the list differently is refused, naming the setting; nothing is touched
    before = {p: os.path.getmtime(p) for p in glob.glob(f"{tmp_path}/out/*")}
    with pytest.raises(ValueError, match=r"number_sample_per_shard: 10 -> 7.*same settings"):
        download(config_for(url_list, tmp_path / "out", number_sample_per_shard=7))
    assert {p: os.path.getmtime(p) for p in glob.glob(f"{tmp_path}/out/*")} == before
    assert image_server.hits == hits


def test_foreign_output_folder_is_refused_untouched(tmp_path):
    """A folder holding files no download wrote (an unfinished-looking tar, a _tmp/) is left exactly as it was."""
    url_list = tmp_path / "urls.parquet"
    pd.DataFrame({"url": ["http://example.com/a.jpg"]}).to_parquet(url_list)
    out = tmp_path / "mine"
    (out / "_tmp").mkdir(parents=True)
    (out / "_tmp" / "notes.txt").write_text("keep me")
    (out / "00000.tar").write_bytes(b"my own archive")
    with pytest.raises(
        ValueError, match=r"already holds files that no download wrote.*00000.tar.*new or empty"
    ):
        download(config_for(url_list, out, number_sample_per_shard=10))
    assert (out / "_tmp" / "notes.txt").read_text() == "keep me"
    assert (out / "00000.tar").read_bytes() == b"my own archive"
    assert sorted(os.listdir(out)) == ["00000.tar", "_tmp"]


def test_bad_input_is_a_clear_error(tmp_path):
    pd.DataFrame({"link": ["http://x"]}).to_parquet(tmp_path / "u.parquet")
    with pytest.raises(ValueError, match=r"no column 'url'.*--url-col"):
        download(DownloadConfig(url_list=str(tmp_path / "u.parquet"), output_folder=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        download(DownloadConfig(url_list=str(tmp_path / "nope.parquet"), output_folder=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="--input-format"):
        DownloadConfig(url_list=str(tmp_path / "u.xyz"), output_folder=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="--allow-network"):
        DownloadConfig(url_list=str(tmp_path / "u.parquet"), output_folder="o", allow_network=["nonsense"])


@pytest.mark.parametrize("side", [12_000, 20_000])  # 144M pixels (PIL warns), 400M (PIL's own error)
def test_resizer_refuses_bombs_past_pils_limit(side):
    """Above 2x PIL's MAX_IMAGE_PIXELS, Image.open itself raises; that must still be refused as a bomb."""
    import io

    from pipelines.download import GuardedResizer

    resizer = GuardedResizer(
        image_size=64, resize_mode="border", resize_only_if_bigger=False, upscale_interpolation="lanczos",
        downscale_interpolation="area", encode_quality=95, encode_format="jpg", skip_reencode=False,
        disable_all_reencoding=False, min_image_size=0, max_image_area=float("inf"), max_aspect_ratio=float("inf"),
        blurrer=None, max_pixels=1_000_000,
    )  # fmt: skip
    *_, error = resizer(io.BytesIO(png_header(side, side)))
    assert error is not None and "decompression bomb refused" in error
