"""ray_cluster.yaml is a config `ray up` accepts, and says what the docs around it claim.

Validation follows `ray up` (ray.autoscaler._private.commands._bootstrap_config) up to the point
where it needs the cloud: ``prepare_config`` (merge with the AWS defaults.yaml, merge setup commands,
check docker, fill per-type worker limits) then ``validate_config`` (Ray's ray-schema.json plus its
semantic checks). Skipped on purpose: the provider import, ``fillout_available_node_types_resources``
and ``bootstrap_config``, which import boto3 and call AWS (EC2 instance types, IAM, subnets, key pairs);
no network is needed here. Our node types declare ``resources`` explicitly, so the resource
autodetection that step would do is not needed for the schema to pass.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_PATH = REPO / "ray_cluster.yaml"


def load_config() -> dict:
    with CONFIG_PATH.open() as f:
        return yaml.safe_load(f)


def ray_up_validate(config: dict) -> dict:
    """What `ray up` does to the config before touching AWS; raises if Ray would reject it."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_config_is_valid_and_as_documented():
    raw = load_config()
    prepared = ray_up_validate(raw)

    assert prepared["cluster_name"] == "knn-diffusion"
    assert prepared["provider"]["type"] == "aws"

    types = prepared["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert prepared["head_node_type"] == "head"
    assert set(types["head"]["resources"]) == {"CPU"}
    assert types["cpu_worker"]["resources"].get("GPU", 0) == 0
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    for name in ("cpu_worker", "gpu_worker"):
        assert types[name]["min_workers"] == 0, f"{name} should scale to zero"
    assert sum(types[t]["max_workers"] for t in types) <= prepared["max_workers"]
    assert prepared["idle_timeout_minutes"] > 0

    # The repository is synced to ~/knn-diffusion, without the local venv (.gitignore is the filter).
    assert prepared["file_mounts"] == {"~/knn-diffusion": "."}
    assert ".gitignore" in prepared["rsync_filter"]
    assert ".venv/" in (REPO / ".gitignore").read_text().splitlines()

    # Every node installs the package with CI's exact pins, from a file that exists.
    setup = " ; ".join(raw["setup_commands"])
    assert "cd ~/knn-diffusion" in setup
    assert "pip install -c .ci/constraints.txt -e ." in setup
    assert (REPO / ".ci" / "constraints.txt").is_file()
    # prepare_config prepends setup_commands to the head's; the install must survive that merge.
    assert any(".ci/constraints.txt" in cmd for cmd in prepared["head_setup_commands"])

    # The container images must match the pinned Ray and the package's Python (3.11).
    pins = (REPO / ".ci" / "constraints.txt").read_text()
    ray_pin = re.search(r"^ray==(\S+)$", pins, re.MULTILINE).group(1)
    images = [prepared["docker"]["image"], types["gpu_worker"]["docker"]["worker_image"]]
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray_pin}-py311-"), image
    assert images[1].endswith("-gpu")

    # Dashboard on localhost only. Checked on the prepared config: Ray's AWS defaults.yaml binds
    # 0.0.0.0, so this also proves our head_start_ray_commands replace the defaults.
    head_start = " ; ".join(prepared["head_start_ray_commands"])
    assert "ray start --head --port=6379" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    worker_start = " ; ".join(prepared["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start
    assert "ray stop" in prepared["head_start_ray_commands"]
    assert "ray stop" in prepared["worker_start_ray_commands"]


def _unknown_top_level_key(config: dict) -> None:
    config["max_wrokers"] = 3


def _gpu_type_without_resources(config: dict) -> None:
    del config["available_node_types"]["gpu_worker"]["resources"]


def _head_type_not_defined(config: dict) -> None:
    config["head_node_type"] = "no_such_type"


def _min_workers_over_global_max(config: dict) -> None:
    config["available_node_types"]["gpu_worker"]["min_workers"] = config["max_workers"] + 1


@pytest.mark.parametrize(
    ("break_config", "error", "message"),
    [
        (_unknown_top_level_key, jsonschema.ValidationError, "'max_wrokers' was unexpected"),
        (_gpu_type_without_resources, jsonschema.ValidationError, "'resources' is a required property"),
        (_head_type_not_defined, ValueError, "must be one of `available_node_types`"),
        (_min_workers_over_global_max, ValueError, "sum of `min_workers`"),
    ],
)
def test_validator_rejects_broken_copies(break_config, error, message):
    broken = load_config()
    break_config(broken)
    with pytest.raises(error, match=re.escape(message)):
        ray_up_validate(broken)


def test_validator_rejects_missing_provider():
    # prepare_config cannot even start without a provider (it picks the defaults.yaml by
    # provider type), so check the schema alone on the raw config.
    broken = load_config()
    del broken["provider"]
    with pytest.raises(jsonschema.ValidationError, match="provider"):
        validate_config(broken)
