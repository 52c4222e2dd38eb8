"""The whole pipeline from one config: config loading, the quick demo end to end, manifests and resume."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from pipelines.run import QUICK, PipelineConfig, load_config, with_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = [
    "data",
    "download",
    "clip",
    "embed",
    "index",
    "aesthetic",
    "neighbours",
    "train",
    "sample",
    "evaluate",
    "edit",
]


def test_configs_demo_yaml_is_the_demo_default():
    assert load_config(os.path.join(REPO, "configs", "demo.yaml")) == PipelineConfig()


def test_configs_demo_edit_yaml_is_the_demo_with_its_edit_stage():
    config = load_config(os.path.join(REPO, "configs", "demo_edit.yaml"))
    assert config.edit.steps > 0 and PipelineConfig().edit.steps == 0
    assert dataclasses.replace(config, edit=PipelineConfig().edit) == PipelineConfig()


def test_laion_config_switches_encoder_and_head_only():
    config = load_config(os.path.join(REPO, "configs", "demo_laion.yaml"))
    assert config.clip.model == "open_clip:ViT-B-32/openai" and config.aesthetic.head == "laion-v1"
    assert config.data == PipelineConfig().data and config.generator == PipelineConfig().generator


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generator:\n  stepz: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml.generator: unknown keys \['stepz'\]"):
        load_config(str(bad))
    bad.write_text("data:\n  source: ftp\n")
    with pytest.raises(ValueError, match="data.source must be procedural or url_list"):
        load_config(str(bad))
    bad.write_text("generator:\n  preset: huge\n")
    with pytest.raises(ValueError, match="preset must be one of"):
        load_config(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("generator:\n  steps: abc\n", "generator.steps must be a whole number, got 'abc'"),
        ("generator:\n  steps: -5\n", "generator.steps must be >= 1, got -5"),
        ("generator:\n  num_workers: 0\n", "generator.num_workers must be >= 1"),
        ("generator:\n  lr: fast\n", "generator.lr must be a number, got 'fast'"),
        ("generator:\n  use_gpu: 'no'\n", "generator.use_gpu must be true or false, got 'no'"),
        ("generator:\n  ema_decay: 1.5\n", "generator.ema_decay must be in"),
        ("sample:\n  prompts: a red circle\n", "sample.prompts must be a list"),
        (
            "sample:\n  prompts: [a red circle, 3]\n",
            "sample.prompts must be a list of which each item is a string",
        ),
        ("sample:\n  guidance: -1\n", "sample.guidance must be >= 0"),
        ("clip:\n  epochs: 0\n", "clip.epochs must be >= 1"),
        ("data:\n  num_images: 1e3\n", "data.num_images must be a whole number"),
        ("data:\n  allow_network: [bogus]\n", "is not a network"),
        ("data:\n  sizes: [huge]\n", "data.sizes=['huge']: expected distinct values out of"),
        ("evaluate:\n  guidance: .nan\n", "evaluate.guidance must be a number"),
    ],
)
def test_config_types_and_ranges_are_checked_before_any_stage(tmp_path, yaml_text, message):
    """Every wrong value is refused when the config is loaded, naming the file and the key."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_config(str(path))
    assert "c.yaml" in str(err.value)


def test_quick_keeps_the_users_settings_it_does_not_shrink(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "generator:\n  model:\n    use_knn: false\n    num_heads: 2\n"
        "sample:\n  prompts: [a red circle, a blue square, a green star]\n"
    )
    quick = load_config(str(path), quick=True)
    assert quick.generator.model["use_knn"] is False and quick.generator.model["num_heads"] == 2  # merged
    assert quick.generator.model["k"] == QUICK["generator"]["model"]["k"] and quick.generator.preset == "tiny"
    assert quick.sample.prompts == ["a red circle", "a blue square"]  # the user's own, the first two


def test_quick_overrides_shrink_every_section():
    quick = with_overrides(PipelineConfig(), QUICK)
    assert quick.data.num_images < PipelineConfig().data.num_images
    assert quick.generator.preset == "tiny" and quick.generator.steps < PipelineConfig().generator.steps
    assert quick.sample.prompts == PipelineConfig().sample.prompts[: len(quick.sample.prompts)]


def manifest(out, stage: str) -> dict:
    with open(out / "manifests" / f"{stage}.json") as f:
        return json.load(f)


def test_quick_demo_runs_every_stage_and_reports_them(quick_demo):
    out, result = quick_demo
    assert list(result["timings"]) == STAGES and not any(t["skipped"] for t in result["timings"].values())
    for stage in STAGES:
        m = manifest(out, stage)
        assert m["stage"] == stage and m["seconds"] > 0
        assert all(os.path.exists(p) for p in m["outputs"]), (stage, m["outputs"])
    html = (out / "report.html").read_text()
    srcs = re.findall(r'src="([^"]+)"', html)
    assert all((out / s).is_file() for s in srcs)
    bands = [b["name"] for b in manifest(out, "aesthetic")["result"]["bands"]]
    assert len(bands) == QUICK["aesthetic"]["quantile_bins"]
    for target in ["main", "ood"] + [f"band_{b}" for b in bands]:
        for i in range(len(with_overrides(PipelineConfig(), QUICK).sample.prompts)):
            assert f"report/{target}_grid_{i}.png" in srcs and f"report/{target}_neighbours_{i}.png" in srcs
    assert "report/loss.png" in srcs
    for stage in STAGES:
        assert f"<td>{stage}</td>" in html


def test_quick_demo_encoder_retrieves_better_than_chance(quick_demo):
    out, result = quick_demo
    acc = result["evaluation"]["retrieval"]
    r, chance = acc["text_to_image"], acc["chance"]
    assert acc["num_pairs"] == 100  # the held-out shard (10% of 4 shards of 100, rounded up to one)
    assert 0 <= r["1"] <= r["5"] <= r["10"] <= 1
    assert r["10"] > 2 * chance["10"], acc  # a fitted CLIP, not a random one
    held_out = set(manifest(out, "clip")["result"]["holdout_shards"])
    with open(out / "clip" / "clip_train.json") as f:
        trained_on = set(json.load(f)["train_shards"])
    assert held_out and not held_out & trained_on


def test_quick_demo_samples_follow_the_prompts_colour_well_above_chance(quick_demo):
    """The evaluate stage: the quick generator's samples for held-out captions have the caption's background
    colour far more often than chance (1 in 6), by an attribute classifier that reads real held-out images well
    (the 100-step, 16 px quick model has not learnt the small shapes' colours yet); the no-kNN ablation was
    trained and scored beside the kNN model, and the report shows the table."""
    out, result = quick_demo
    record = result["evaluation"]["generators"]
    assert set(record["models"]) == {"knn", "no-knn"}
    classifier = record["classifier"]["heldout_accuracy"]
    assert classifier["background_colour"] > 0.9, classifier  # what the assertion below relies on
    knn = record["models"]["knn"]
    assert knn["attribute_accuracy"]["background_colour"] > 2 / 6, knn  # chance: 1/6
    assert knn["frechet_distance"] > 0 and knn["kid"] == knn["kid"] and 0 <= knn["clip_score"] <= 100
    agree = knn["neighbour_agreement"]  # what the retrieved neighbours say of the prompts; no-kNN has none
    assert (
        set(agree) == set(knn["attribute_accuracy"])
        and "neighbour_agreement" not in record["models"]["no-knn"]
    )
    assert agree["background_colour"] > 2 / 6, agree  # the fitted CLIP retrieves colours well above chance
    assert 0 < record["text_image_cosine"] <= 1  # the fitted CLIP aligns captions with their images
    with open(out / "manifests" / "train.json") as f:
        heldout = json.load(f)["settings"]["heldout"]
    assert heldout == record["heldout_parts"] and heldout
    with open(out / "run" / "config.json") as f:
        assert json.load(f)["exclude_parts"] == heldout  # no generator saw the reference images
    html = (out / "report.html").read_text()
    assert "Generator evaluation" in html and "report/evaluation_knn.png" in html
    assert "What the retrieved neighbours tell a kNN model" in html and "The text-image gap" in html


def test_evaluate_with_image_queries_conditions_on_the_images_own_embeddings(quick_demo, tmp_path, capsys):
    """knn-diffusion evaluate --query image: the generators and the retrieval read the held-out images' own image
    embeddings instead of their captions' text embeddings (the text-image gap's cost is the rows' difference);
    the same prompts and seed with text queries give other samples, and the text-image cosine is the same."""
    from pipelines.cli import main

    out, _ = quick_demo
    with open(out / "manifests" / "train.json") as f:
        heldout = json.load(f)["settings"]["heldout"]
    records = {}
    for query in ("text", "image"):
        args = ["evaluate", "--checkpoint", f"knn={out / 'run'}", "--database", str(out / "db" / "main")]
        args += ["--heldout-parts", ",".join(heldout), "--attributes", "procedural", "--num-prompts", "16"]
        args += ["--classifier", str(out / "evaluation" / "classifier.pt"), "--steps", "5"]
        args += ["--output", str(tmp_path / query), "--query", query]
        assert main(args) in (0, None)
        with open(tmp_path / query / "evaluation.json") as f:
            records[query] = json.load(f)
    text, image = records["text"], records["image"]
    assert text["query"] == "text" and image["query"] == "image"
    assert image["text_image_cosine"] == pytest.approx(text["text_image_cosine"])
    assert (tmp_path / "image" / "samples_knn.png").read_bytes() != (
        tmp_path / "text" / "samples_knn.png"
    ).read_bytes()
    assert "conditioned on the held-out images' own image embeddings" in capsys.readouterr().out


def test_database_swap_and_bands_change_the_neighbours_and_samples(quick_demo):
    from retrieval.database import Database

    out, _ = quick_demo

    def record(target: str) -> dict:
        with open(out / "samples" / target / "samples.json") as f:
            return json.load(f)

    main_ids = set(Database.open(str(out / "db" / "main")).ids.tolist())
    ood_ids = set(Database.open(str(out / "db" / "ood")).ids.tolist())
    for p in record("ood")["prompts"]:
        assert set(p["neighbour_ids"]) <= ood_ids
    for p in record("main")["prompts"]:
        assert set(p["neighbour_ids"]) <= main_ids
    for band in manifest(out, "aesthetic")["result"]["bands"]:
        band_ids = set(np.load(out / "db" / "main" / "bands" / band["name"] / "ids.npy").tolist())
        assert all(set(p["neighbour_ids"]) <= band_ids for p in record(f"band_{band['name']}")["prompts"])
    grids = {t: np.asarray(Image.open(out / "samples" / t / "grid.png")) for t in ("main", "ood")}
    # same model, prompts and seed: only the retrieved neighbours differ, and they reach the samples (how much
    # they change them depends on training; the 30-step quick model has barely learnt to use them)
    assert not np.array_equal(grids["main"], grids["ood"])


def test_rerun_skips_finished_stages_and_refuses_changed_settings(quick_demo):
    from pipelines.demo import demo_config, run_demo

    out, _ = quick_demo
    before = {s: os.path.getmtime(out / "manifests" / f"{s}.json") for s in STAGES}
    checkpoint = manifest(out, "train")["result"]["checkpoint"]
    ckpt_mtime = os.path.getmtime(os.path.join(checkpoint, "state.pt"))
    result = run_demo(str(out), quick=True)
    assert all(t["skipped"] for t in result["timings"].values())
    assert before == {s: os.path.getmtime(out / "manifests" / f"{s}.json") for s in STAGES}
    assert os.path.getmtime(os.path.join(checkpoint, "state.pt")) == ckpt_mtime
    changed = demo_config(str(out), quick=True)
    changed.generator.steps += 5
    with pytest.raises(ValueError, match=r"stage train .* other settings \(\['steps'\]\)"):
        from pipelines.run import run_pipeline

        run_pipeline(changed)


def test_a_redone_stage_leaves_stages_that_do_not_depend_on_it(quick_demo):
    """Redoing sample (its manifest and outputs deleted) reruns it alone: evaluate does not read the samples."""
    import shutil

    from pipelines.demo import demo_config
    from pipelines.run import run_pipeline

    out, _ = quick_demo
    evaluate_before = manifest(out, "evaluate")
    (out / "manifests" / "sample.json").unlink()
    shutil.rmtree(out / "samples")
    result = run_pipeline(demo_config(str(out), quick=True))
    assert not result["timings"]["sample"]["skipped"] and result["timings"]["evaluate"]["skipped"]
    assert manifest(out, "evaluate") == evaluate_before
    assert (out / "samples" / "main" / "grid.png").exists()


def test_settings_that_cannot_work_are_refused_before_anything_runs(tmp_path):
    for yaml_text, message in (
        ("aesthetic:\n  head: laion-v1\n", "scores only the CLIP LAION trained it on"),
        ("clip:\n  holdout_fraction: 0\n", "clip.holdout_fraction must be in"),
        ("clip:\n  model: open_clip:ViT-B-32\n", "names no weights"),
        ("sample:\n  sampler: dpm\n", "sample.sampler must be one of"),
        ("generator: 600\n", "config.yaml.generator must be a mapping"),
    ):
        path = tmp_path / "config.yaml"
        path.write_text(yaml_text)
        with pytest.raises(ValueError, match=message):
            load_config(str(path))


def test_cli_run_reports_bad_config(tmp_path, capsys):
    from pipelines.cli import main

    bad = tmp_path / "c.yaml"
    bad.write_text("clip:\n  model: ViT-B-32\n")
    assert main(["run", str(bad)]) == 2
    assert "clip.model must be fit or an open_clip" in capsys.readouterr().err


def test_a_download_that_fetched_nothing_is_not_done(ray_session, image_server, tmp_path):
    """All URLs refused (a private mirror without data.allow_network): the stage fails and leaves no manifest and no
    shards, so rerunning with the config fixed fetches them instead of skipping to a misleading later error."""
    import dataclasses

    import pandas as pd

    from pipelines.run import Pipeline, from_dict

    urls = tmp_path / "urls.parquet"
    pd.DataFrame(
        {"url": [image_server.image_url(i) for i in range(6)], "caption": ["a red square"] * 6}
    ).to_parquet(urls)
    data = {"source": "url_list", "url_list": str(urls), "images_per_shard": 3}
    out = tmp_path / "out"
    config = from_dict(PipelineConfig, {"output": str(out), "data": data}, "test")
    pipeline = Pipeline(config)
    with pytest.raises(
        ValueError, match=r"fetched no image from 6 URLs.*non-public address.*data.allow_network"
    ):
        pipeline.stage("download", dataclasses.asdict(config.data), pipeline.download)
    assert not (out / "manifests" / "download.json").exists() and not (out / "shards" / "main").exists()

    config = from_dict(
        PipelineConfig, {"output": str(out), "data": {**data, "allow_network": ["127.0.0.1/32"]}}, "test"
    )
    pipeline = Pipeline(config)
    result = pipeline.stage("download", dataclasses.asdict(config.data), pipeline.download)
    assert result["main"]["successes"] == 6 and (out / "manifests" / "download.json").exists()


def test_a_copied_database_reads_its_own_shards_and_clip(quick_demo, tmp_path):
    """database.json stores paths relative to the database, so a copy (db + shards + clip) uses its own files."""
    import shutil

    from retrieval.database import Database, DatabaseInfo

    out, _ = quick_demo
    moved = tmp_path / "moved"
    for sub in ("db", "shards", "clip"):
        shutil.copytree(out / sub, moved / sub)
    info = DatabaseInfo.read(str(moved / "db" / "main"))
    assert info.shards == str(moved / "shards" / "main")
    assert str(moved / "clip") in info.clip_model and str(out) not in info.clip_model
    db = Database.open(str(moved / "db" / "main"))
    assert len(db.images(db.ids[:3])) == 3
    assert db.search_text(["a red circle"], k=3).ids.shape == (1, 3)


@pytest.mark.parametrize("use_knn", [True, False])
def test_a_no_knn_model_samples_only_the_main_database(tmp_path, monkeypatch, use_knn):
    """Other databases and bands change only the neighbours, which a no-kNN model never reads."""
    import diffusion.sample
    from pipelines.run import Pipeline, from_dict

    config = from_dict(
        PipelineConfig, {"output": str(tmp_path), "generator": {"model": {"use_knn": use_knn}}}, "t"
    )
    called = []
    monkeypatch.setattr(
        diffusion.sample, "sample", lambda c: called.append((os.path.basename(c.database), c.band))
    )
    bands = [{"name": "q0", "count": 5}, {"name": "q1", "count": 5}]
    result = Pipeline(config).sample(bands)
    expected = (
        [("main", None), ("ood", None), ("main", "q0"), ("main", "q1")] if use_knn else [("main", None)]
    )
    assert called == expected and len(result["targets"]) == len(expected)


def test_generator_and_tokenizer_settings_give_train_configs():
    """The pipeline and the benches build their TrainConfigs from these fields: every one must be a TrainConfig
    field (a settings-only key, like backbone, must not leak in), and the discrete backbone runs T = 100."""
    from diffusion.config import TrainConfig, model_config
    from pipelines.run import GeneratorSettings, TokenizerSettings

    paths = {"db": "d", "neighbours": "n", "output": "o"}
    for backbone, steps in (("continuous", 1000), ("discrete", 100)):
        g = GeneratorSettings(backbone=backbone)
        fields = g.train_fields()
        assert "backbone" not in fields and fields["steps"] == g.steps
        config = TrainConfig(model=model_config(g.preset), tokenizer="t.pt", **paths, **fields)
        assert config.num_timesteps == steps
    t = TokenizerSettings()
    assert TrainConfig(model=model_config(t.preset), **paths, **t.train_fields()).steps == t.steps


@pytest.mark.slow
def test_compare_backbones_trains_and_scores_the_discrete_generator_beside_the_continuous_one(
    quick_demo, tmp_path
):
    """generator.compare_backbones: the tokenizer stage also trains an FSQ tokenizer, the train stage a discrete kNN
    generator on its codes, and the evaluate table and report score it beside the continuous latent ones. Runs on
    a copy of the quick demo whose generator stages are cleared (the data stages are reused)."""
    import shutil

    from pipelines.run import run_pipeline

    src, _ = quick_demo
    out = tmp_path / "out"
    shutil.copytree(src, out)
    for stage in ("train", "sample", "evaluate", "edit"):
        (out / "manifests" / f"{stage}.json").unlink()
    for folder in ("run", "run_noknn", "samples", "evaluation", "edit_run", "edit"):
        shutil.rmtree(out / folder)
    tiny_latent = {"image_size": 16, "widths": [8, 16]}
    config = with_overrides(
        load_config(os.path.join(REPO, "configs", "demo.yaml"), output=str(out), quick=True),
        {
            "tokenizer": {
                "model": {**tiny_latent, "latent_channels": 2},
                "steps": 6,
                "batch_size_per_worker": 16,
            },
            "generator": {
                "model": {"latent_channels": 2, "latent_factor": 2},
                "compare_backbones": True,
                "steps": 6,
            },
            "edit": {"steps": 0},
        },
    )
    result = run_pipeline(config)
    assert set(result["train"]["runs"]) == {"knn", "no-knn", "discrete"}
    fsq = json.loads((out / "tokenizer_fsq" / "tokenizer.json").read_text())
    assert fsq["codebook_size"] == 240 and 0 < fsq["codebook_usage"] <= 1  # tokenizer-fsq's 8 x 6 x 5 codes
    discrete = json.loads((out / "run_discrete" / "config.json").read_text())
    assert discrete["model"]["backbone"] == "discrete" and discrete["num_timesteps"] == 100
    assert discrete["tokenizer"].endswith(os.path.join("tokenizer_fsq", "tokenizer.pt"))
    continuous = json.loads((out / "run" / "config.json").read_text())
    assert continuous["model"]["backbone"] == "continuous" and continuous["tokenizer"].endswith(
        os.path.join("tokenizer", "tokenizer.pt")
    )
    models = result["evaluation"]["generators"]["models"]
    assert set(models) == {"knn", "no-knn", "discrete"}
    assert models["discrete"]["seconds_per_image"] > 0 and "all" in models["discrete"]["attribute_accuracy"]
    html = (out / "report.html").read_text()
    assert "report/reconstructions_fsq.png" in html and (out / "report" / "reconstructions_fsq.png").is_file()
    assert "<td>discrete</td>" in html
