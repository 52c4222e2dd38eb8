"""A download killed midway and rerun ends with exactly the expected samples, none twice; plus a 2-node run."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.test_download import read_status, tar_keys


@pytest.mark.slow
def test_kill_midway_then_rerun_is_exact(ray_session, image_server, tmp_path):
    n = 120
    pd.DataFrame({"url": [image_server.image_url(i, delay=0.15) for i in range(n)]}).to_parquet(
        tmp_path / "u.parquet"
    )
    out = tmp_path / "out"
    gcs = ray_session.get_runtime_context().gcs_address
    cmd = [
        sys.executable, "-m", "pipelines.cli", "download", "--url-list", str(tmp_path / "u.parquet"),
        "--output-folder", str(out), "--number-sample-per-shard", "10", "--thread-count", "2",
        "--allow-network", "127.0.0.1/32", "--image-size", "32", "--ray-address", gcs,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while len(glob.glob(f"{out}/*_stats.json")) < 2:
        assert proc.poll() is None and time.time() < deadline, (
            "download ended or stalled before it could be killed"
        )
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(glob.glob(f"{out}/*_stats.json"))
    assert done_before < n // 10, "the run finished before the kill: nothing was interrupted"
    # every file in the output folder belongs to a finished shard: no half-written tar is visible
    for tar in glob.glob(f"{out}/*.tar"):
        assert os.path.exists(tar[:-4] + "_stats.json")

    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    keys = tar_keys(out)
    assert len(keys) == n and len(set(keys)) == n
    status = read_status(out)
    assert len(status) == n and (status.status == "success").all()


def test_stage_on_two_node_cluster(image_server, tmp_path):
    """The download stage connected to a local two-node Ray cluster (1 CPU each): counts exact."""
    script = f"""
import pandas as pd, ray
from ray.cluster_utils import Cluster
from pipelines.download import DownloadConfig, download
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
cluster.wait_for_nodes()
assert len([n for n in ray.nodes() if n["Alive"]]) == 2
urls = [f"{image_server.base}/img/{{i}}.jpg?delay=0.05" for i in range(40)]
pd.DataFrame({{"url": urls}}).to_parquet("{tmp_path}/u.parquet")
s = download(DownloadConfig(url_list="{tmp_path}/u.parquet", output_folder="{tmp_path}/out", number_sample_per_shard=5,
                            thread_count=2, allow_network=["127.0.0.1/32"], image_size=32))
print("RESULT", s.successes, s.num_shards)
ray.shutdown(); cluster.shutdown()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "RESULT 40 8" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
