"""Where jobs run: the one place that connects to (or starts) Ray. Every stage calls init_ray first."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and notices a
# finished run only at its next poll: a run took 3-5 s from its last step to fit() returning, 1-2 s at 0.5 s
# (measured on 2 cores; the demo trains three to four times). A value the user set wins.
JOB_ENV_VARS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def job_runtime_env() -> dict:
    """The runtime_env every job of ours starts Ray with: the JOB_ENV_VARS the user has not set. One they set is
    left out: their environment (a local Ray's processes inherit it; a submitted job's runtime_env sets it)
    carries it, and a key in both a submitted job's runtime_env and ray.init's is an error in Ray."""
    return {"env_vars": {k: v for k, v in JOB_ENV_VARS.items() if k not in os.environ}}


def init_ray(address: str | None = None) -> None:
    """Connect to Ray at `address` ("auto", "ray://host:10001", "host:6379"), or start a local Ray if None.

    A Ray already initialised in this process (a test session, a notebook) is reused as it is.
    """
    if ray.is_initialized():
        return
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address is None:
        log.info("starting a local Ray")
        ray.init(
            address="local",
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=True,
            runtime_env=job_runtime_env(),
        )
    else:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, configure_logging=False, runtime_env=job_runtime_env())


def node_cpus() -> list[int]:
    """CPU counts of the live nodes (a task needing more than the largest can never be scheduled)."""
    counts = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return [c for c in counts if c > 0] or [1]
