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
