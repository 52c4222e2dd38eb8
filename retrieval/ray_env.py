"""Where jobs run: the one place that connects to (or starts) Ray. Every stage calls init_ray first."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


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
        ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=True)
    else:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, configure_logging=False)


def node_cpus() -> list[int]:
    """CPU counts of the live nodes (a task needing more than the largest can never be scheduled)."""
    counts = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return [c for c in counts if c > 0] or [1]
