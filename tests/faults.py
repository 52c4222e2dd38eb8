"""Fault injection for the training tests, through TrainConfig.step_hook (the training loop has no fault branch)."""

from __future__ import annotations

import os
import time
from typing import Any

import fsspec


def kill_last_worker_once_at_step_5(step: int, rank: int, world: int, config: Any) -> None:
    """The last worker SIGKILLs itself once, after step 5 (a marker in the run folder makes it once)."""
    if step != 5 or rank != world - 1:
        return
    fs, marker = fsspec.core.url_to_fs(f"{config.output.rstrip('/')}/.crashed_once")
    if fs.exists(marker):
        return
    fs.touch(marker)
    time.sleep(2)  # let the controller register the reports so far, as it would before a real loss
    os.kill(os.getpid(), 9)  # SIGKILL: no cleanup, as a lost node would
