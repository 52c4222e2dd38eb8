"""A small stage runner: each stage runs once per settings, and redoing one invalidates only its dependants.

A stage is a name, its settings (a JSON-able dict), the stages it depends on, and a function that does the work
and returns a result dict (with optional "inputs" and "outputs" lists of paths). When it finishes, the runner
writes <folder>/<name>.json last (the manifest: settings, inputs, outputs, result, wall time, a fresh id).

On a rerun a stage whose manifest holds the same settings, and the same ids of the stages it depends on, is
skipped and its recorded result returned. One whose settings changed, or whose dependency was redone since, is
refused with the names of what changed: nothing already made is overwritten by a different run. A stage that
does not depend on a redone stage is unaffected by it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from retrieval.storage import json_bytes, write_atomic


class StageRunner:
    """Runs stages against the manifests in `folder` (see the module docstring)."""

    def __init__(self, folder: str) -> None:
        self.folder = os.path.abspath(folder)
        self.ids: dict[str, str] = {}  # stage -> the id of its manifest, for stages run or skipped so far
        self.timings: dict[str, dict[str, Any]] = {}

    def manifest_path(self, name: str) -> str:
        return os.path.join(self.folder, f"{name}.json")

    def run(
        self,
        name: str,
        settings: dict[str, Any],
        fn: Callable[[], dict[str, Any]],
        deps: Sequence[str] = (),
    ) -> dict[str, Any]:
        missing = [d for d in deps if d not in self.ids]
        if missing:
            raise RuntimeError(f"stage {name} depends on {missing}, which have not run yet; run them first")
        recorded = json.loads(json.dumps({**settings, "depends_on": {d: self.ids[d] for d in deps}}))
        path = self.manifest_path(name)
        if os.path.exists(path):
            with open(path) as f:
                done = json.load(f)
            if done["settings"] == recorded:
                print(f"[{name}] done earlier in {done['seconds']:.1f}s; skipped", flush=True)
                self.timings[name] = {"seconds": done["seconds"], "skipped": True}
                self.ids[name] = done["id"]
                return done["result"]
            raise ValueError(self._refusal(name, recorded, done))
        print(f"[{name}] ...", flush=True)
        start = time.time()
        result = fn()
        seconds = time.time() - start
        record = {
            "stage": name,
            "settings": recorded,
            "inputs": result.pop("inputs", []),
            "outputs": result.pop("outputs", []),
            "result": result,
            "seconds": seconds,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "id": uuid.uuid4().hex,
        }
        write_atomic(path, json_bytes(record))
        self.timings[name] = {"seconds": seconds, "skipped": False}
        self.ids[name] = record["id"]
        print(f"[{name}] finished in {seconds:.1f}s", flush=True)
        return result

    def _refusal(self, name: str, recorded: dict[str, Any], done: dict[str, Any]) -> str:
        before = done["settings"]
        changed = sorted(
            k for k in set(recorded) | set(before) if k != "depends_on" and recorded.get(k) != before.get(k)
        )
        deps_now, deps_then = recorded["depends_on"], before.get("depends_on", {})
        redone = sorted(d for d in set(deps_now) | set(deps_then) if deps_now.get(d) != deps_then.get(d))
        why = []
        if changed:
            why.append(f"other settings ({changed})")
        if redone:
            why.append(f"stages it depends on were redone since ({redone})")
        return (
            f"stage {name} in {os.path.dirname(self.folder)} ran with {' and '.join(why)}; use another --output, or "
            f"delete {self.manifest_path(name)} and the stage's outputs ({', '.join(done['outputs']) or 'none'}) "
            "to redo it"
        )
