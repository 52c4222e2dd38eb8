"""The stage runner: once per settings, refusals that name what changed, and invalidation of dependants only."""

from __future__ import annotations

import json

import pytest

from pipelines.stages import StageRunner


def run_all(folder, calls, settings=None):
    """Stages a <- b <- d and a <- c; returns the runner. calls records which functions ran."""
    settings = settings or {}
    runner = StageRunner(str(folder))

    def fn(name):
        def work():
            calls.append(name)
            return {"value": name, "outputs": [f"/out/{name}"]}

        return work

    runner.run("a", settings.get("a", {"x": 1}), fn("a"))
    runner.run("b", settings.get("b", {}), fn("b"), deps=("a",))
    runner.run("c", settings.get("c", {}), fn("c"), deps=("a",))
    runner.run("d", settings.get("d", {}), fn("d"), deps=("b",))
    return runner


def test_stages_run_once_and_return_their_recorded_result(tmp_path):
    calls = []
    run_all(tmp_path, calls)
    assert calls == ["a", "b", "c", "d"]
    runner = run_all(tmp_path, calls)
    assert calls == ["a", "b", "c", "d"]  # nothing ran again
    assert all(t["skipped"] for t in runner.timings.values())
    record = json.loads((tmp_path / "d.json").read_text())
    assert record["result"] == {"value": "d"} and record["outputs"] == ["/out/d"]
    assert record["settings"]["depends_on"] == {"b": runner.ids["b"]}


def test_changed_settings_are_refused_by_name(tmp_path):
    run_all(tmp_path, [])
    with pytest.raises(ValueError, match=r"stage a .* other settings \(\['x'\]\).*delete .*a.json"):
        run_all(tmp_path, [], settings={"a": {"x": 2}})


def test_redoing_a_stage_invalidates_only_its_dependants(tmp_path):
    """b is redone: d (made from b) is refused; a and c (not made from b) are skipped as they were."""
    run_all(tmp_path, [])
    before = {n: (tmp_path / f"{n}.json").read_text() for n in "acd"}
    (tmp_path / "b.json").unlink()
    calls = []
    with pytest.raises(ValueError, match=r"stage d .*stages it depends on were redone since \(\['b'\]\)"):
        run_all(tmp_path, calls)
    assert calls == ["b"]  # only the deleted stage ran
    assert {n: (tmp_path / f"{n}.json").read_text() for n in "acd"} == before
    (tmp_path / "d.json").unlink()  # the user redoes d too, as the message says
    calls.clear()
    run_all(tmp_path, calls)
    assert calls == ["d"]


def test_a_dependency_must_have_run_first(tmp_path):
    with pytest.raises(RuntimeError, match="depends on"):
        StageRunner(str(tmp_path)).run("b", {}, dict, deps=("a",))
