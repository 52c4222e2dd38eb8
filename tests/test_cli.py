"""The command line: every subcommand and flag documented, flags map onto the stage configs, clear errors."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from pipelines.cli import build_parser, config_from_args, main


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def all_subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found = {}
    for name, sub in subparsers(parser).items():
        found[prefix + name] = sub
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            found.update(all_subcommands(sub, prefix + name + " "))
    return found


def test_every_flag_has_help():
    subs = all_subcommands(build_parser())
    assert {"download", "embed", "index", "serve", "demo", "neighbours", "catalogue", "app"} <= set(subs)
    assert {"aesthetic score", "aesthetic fit", "aesthetic subindex"} <= set(subs)
    for name, sub in subs.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and action.help.strip(), f"{name} {action.option_strings} has no help"


def test_flags_map_onto_config():
    args = build_parser().parse_args(
        [
            "download",
            "--url-list",
            "u.parquet",
            "--output-folder",
            "o",
            "--allow-network",
            "127.0.0.1/32,10.0.0.0/8",
            "--no-resize-only-if-bigger",
            "--timeout",
            "3",
        ]
    )
    config = config_from_args(args.config_cls, args)
    assert config.allow_network == ["127.0.0.1/32", "10.0.0.0/8"]
    assert config.timeout == 3.0 and config.input_format == "parquet" and not config.allow_private_network


def test_bad_input_exits_2_with_the_flag_named(tmp_path, capsys):
    assert (
        main(["download", "--url-list", str(tmp_path / "missing.parquet"), "--output-folder", str(tmp_path)])
        == 2
    )
    assert "--url-list" in capsys.readouterr().err
    assert (
        main(
            ["embed", "--shards", str(tmp_path), "--output", str(tmp_path / "db"), "--clip-model", "ViT-B/32"]
        )
        == 2
    )
    assert "--clip-model" in capsys.readouterr().err


def test_help_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["index", "--help"])
    assert exit_info.value.code == 0
    assert "--max-index-memory" in capsys.readouterr().out


def test_aesthetic_and_neighbour_errors_name_the_flag(tmp_path, capsys):
    from bench.synthetic import write_synthetic_db

    db = str(tmp_path / "db")
    write_synthetic_db(
        db, np.eye(4, 384, dtype=np.float32), num_parts=1, clip_model="open_clip:ViT-S-32//x.pt"
    )
    assert main(["aesthetic", "score", "--db", db, "--head", "laion-v1"]) == 2
    assert "no laion-v1 head for ViT-S-32" in capsys.readouterr().err
    assert main(["aesthetic", "subindex", "--db", db, "--quantile-bins", "5", "--bands", "0-1"]) == 2
    assert "--quantile-bins" in capsys.readouterr().err
    assert main(["neighbours", "--db", db, "--k", "0"]) == 2
    assert "--k" in capsys.readouterr().err
    assert main(["neighbours", "--db", db]) == 2  # no index built yet
    assert "knn-diffusion index" in capsys.readouterr().err


def test_train_and_sample_errors_name_the_flag(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml"), "--db", "d", "--neighbours", "n"]) == 2
    assert "--config" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: tiny\nstepz: 3\n")
    assert main(["train", "--config", str(bad), "--db", "d", "--neighbours", "n", "--output", "o"]) == 2
    assert "unknown keys ['stepz']" in capsys.readouterr().err
    args = [
        "sample",
        "--checkpoint",
        str(tmp_path),
        "--database",
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main([*args, "--prompt", "x", "--sampler", "euler"]) == 2
    assert "--sampler" in capsys.readouterr().err
    assert main([*args, "--prompt", "x"]) == 2  # no checkpoint there
    assert "knn-diffusion train" in capsys.readouterr().err


def test_app_refuses_a_missing_checkpoint_or_database_before_starting(tmp_path, capsys):
    assert main(["app", "--checkpoint", str(tmp_path / "no-run"), "--database", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    state = tmp_path / "state.pt"
    state.write_bytes(b"")
    assert main(["app", "--checkpoint", str(state), "--database", str(tmp_path / "no-db")]) == 2
    err = capsys.readouterr().err
    assert "--database" in err and "catalogue name" in err


def test_broken_yaml_and_a_catalogue_folder_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "config.yaml"
    bad.write_text("generator:\n  steps: [1\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"config {bad} line 3, column 1: not valid YAML" in err and "Traceback" not in err
    folder = tmp_path / "cat"
    folder.mkdir()
    assert main(["catalogue", "list", "--catalogue", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"catalogue {folder} is a folder" in err


def one_error_line(capsys) -> str:
    """The CLI's stderr must be exactly one error line (logging aside), with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("knn-diffusion ")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def test_damaged_shards_are_one_line_errors_naming_the_file(tmp_path, capsys):
    import json

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    (shards / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 3}))
    args = [
        "embed",
        "--shards",
        str(shards),
        "--output",
        str(tmp_path / "db"),
        "--clip-model",
        "open_clip:ViT-S-32/x",
    ]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert "00000.tar is not a readable tar" in line and "rerun `knn-diffusion download`" in line
    (shards / "00000_stats.json").write_text('{"count": 3, "succ')
    assert main(args) == 2
    assert "00000_stats.json is not a download stage's stats file" in one_error_line(capsys)
    with pytest.raises(ValueError, match="stats file"):
        main(["--debug", *args])


def test_unreachable_catalogue_service_is_one_line(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["catalogue", "add", "--catalogue", str(tmp_path / "c.json"), "--name", "web"]
    assert (
        main([*args, "--url", f"http://127.0.0.1:{port}", "--clip-model", "open_clip:ViT-B-32/openai"]) == 2
    )
    assert f"http://127.0.0.1:{port} did not answer /indices-list" in one_error_line(capsys)


class RunsCode:
    """A pickle that runs a shell command when loaded (what weights_only must refuse)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_bad_search_params_and_checkpoints_are_one_line(quick_demo, tmp_path, capsys):
    """On the quick demo's database and run: faiss parameters the index lacks; checkpoints that are empty,
    truncated, another file's, or hold weights of other shapes."""
    import glob
    import pathlib

    import torch

    out, _ = quick_demo
    db = str(out / "db" / "main")
    args = [
        "neighbours",
        "--db",
        db,
        "--k",
        "2",
        "--output",
        str(tmp_path / "nb"),
        "--search-params",
        "bogus=1",
    ]
    assert main(args) == 2
    assert (
        "--search-params 'bogus=1' do not apply to this index (could not set parameter bogus)"
        in one_error_line(capsys)
    )
    assert not (tmp_path / "nb").exists()  # refused before anything was written

    state = sorted(glob.glob(f"{out}/run/**/state.pt", recursive=True))[-1]
    good = torch.load(state, weights_only=True)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(pathlib.Path(state).read_bytes()[:50_000])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    torch.save({"model": RunsCode(str(tmp_path / "pwned"))}, tmp_path / "evil.pt")
    name = next(k for k, v in good["ema"].items() if v.ndim == 2)
    good["ema"][name] = torch.zeros(3, 3)
    torch.save(good, tmp_path / "shape.pt")
    for ckpt, message in (
        ("empty.pt", "cannot be read"),
        ("truncated.pt", "cannot be read"),
        ("other.pt", "is not a kNN-Diffusion training state"),
        ("evil.pt", "cannot be read"),
        (
            "shape.pt",
            f"the EMA weights do not fit the network its config describes (1 problems, first: size mismatch for {name}",
        ),
    ):
        sample = [
            "sample",
            "--checkpoint",
            str(tmp_path / ckpt),
            "--database",
            db,
            "--output",
            str(tmp_path / "s"),
        ]
        assert main([*sample, "--prompt", "a red circle"]) == 2
        line = one_error_line(capsys)
        assert f"checkpoint {tmp_path / ckpt}" in line and message in line, line
    assert not (tmp_path / "pwned").exists()  # the pickle's code never ran
