"""Training on Ray Train (local Ray, gloo on CPU) from real shards + neighbour tables, resume, recovery, sampling."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from diffusion.config import TrainConfig, model_config
from diffusion.train import STATE_FILE, latest_checkpoint, read_metrics, train


@pytest.fixture(scope="module")
def train_db(shards, tiny_clip, tmp_path_factory):
    """The test shards embedded by the tiny CLIP, indexed (Flat) and with k=4 neighbour tables."""
    from pipelines.embed import EmbedConfig, embed
    from pipelines.index import IndexConfig, build
    from pipelines.neighbours import NeighboursConfig, compute

    db = str(tmp_path_factory.mktemp("train") / "db")
    embed(EmbedConfig(shards=shards, output=db, clip_model=tiny_clip, batch_size=16))
    build(IndexConfig(db=db, index_key="Flat", max_index_memory="1G", current_memory_available="4G"))
    compute(NeighboursConfig(db=db, k=4))
    return db


def config_for(db: str, output: str, **overrides) -> TrainConfig:
    base = dict(
        db=db,
        neighbours=os.path.join(db, "neighbours"),
        output=output,
        model=model_config("tiny", cond_dim=384, k=4),
        steps=6,
        batch_size_per_worker=8,
        checkpoint_every=3,
        log_every=3,
        warmup_steps=1,
        shuffle_buffer=16,
    )
    return TrainConfig(**{**base, **overrides})


def state_of(run: str) -> dict:
    import fsspec

    with fsspec.open(latest_checkpoint(run), "rb") as f:  # a path or a URI
        return torch.load(f, map_location="cpu", weights_only=True)


def test_two_workers_train_in_lockstep(train_db, tmp_path):
    out = str(tmp_path / "run")
    result = train(config_for(train_db, out, num_workers=2))
    rows = read_metrics(os.path.join(out, "metrics.csv"))
    assert [int(r["step"]) for r in rows] == [3, 6]
    # DDP: after every step both workers hold the same weights (sums agree to float rounding)
    assert all(r["weight_disagreement"] <= 1e-6 * max(1.0, abs(r["loss"])) for r in rows), rows
    assert all(0 <= r["data_wait_fraction"] <= 1 and r["samples_per_s"] > 0 for r in rows)
    assert os.path.getsize(os.path.join(out, "loss.png")) > 0
    state = state_of(out)
    assert state["step"] == 6 and result["metrics"]["step"] == 6
    assert set(state) == {"model", "ema", "optimizer", "step", "config"}
    assert not torch.equal(state["model"]["out.0.weight"], torch.zeros_like(state["model"]["out.0.weight"]))


def test_rerun_resumes_with_optimizer_state_and_step_count(train_db, tmp_path):
    out = str(tmp_path / "run")
    train(config_for(train_db, out, steps=3))
    first = state_of(out)
    train(config_for(train_db, out, steps=6))  # the same run, asked to go further: resumes at step 3
    second = state_of(out)
    assert second["step"] == 6
    adam_steps = {float(s["step"]) for s in second["optimizer"]["state"].values()}
    assert adam_steps == {6.0}, adam_steps  # 3 restored + 3 new: the optimizer state was carried over
    rows = read_metrics(os.path.join(out, "metrics.csv"))
    assert [(int(r["step"]), int(r["start_step"])) for r in rows] == [(3, 0), (6, 3)]
    assert not torch.equal(first["model"]["out.0.weight"], second["model"]["out.0.weight"])
    with pytest.raises(ValueError, match="other settings"):
        train(config_for(train_db, out, lr=1.0))


def test_a_killed_worker_is_survived(train_db, tmp_path):
    """A worker SIGKILLed at step 5 (after the step-3 checkpoint): the group restarts from step 3 and finishes."""
    out = str(tmp_path / "run")
    hook = "tests.faults:kill_last_worker_once_at_step_5"
    train(config_for(train_db, out, steps=9, num_workers=2, log_every=1, step_hook=hook, max_failures=2))
    assert os.path.exists(os.path.join(out, ".crashed_once"))  # the worker did die
    rows = read_metrics(os.path.join(out, "metrics.csv"))
    assert [int(r["step"]) for r in rows] == list(range(1, 10))  # continuous step count
    assert [int(r["start_step"]) for r in rows] == [0, 0, 0] + [3] * 6  # steps 4-9 rerun from the checkpoint
    assert state_of(out)["step"] == 9


def test_sample_from_any_database_is_deterministic(train_db, tmp_path):
    from diffusion.sample import SampleConfig, sample

    run = str(tmp_path / "run")
    train(config_for(train_db, run, steps=3))
    outputs = []
    for name in ("a", "b"):
        config = SampleConfig(
            checkpoint=run,
            database=train_db,
            output=str(tmp_path / name),
            prompts=["a red circle", "a blue square"],
            steps=5,
            num_per_prompt=2,
            seed=7,
        )
        record = sample(config)
        outputs.append(np.asarray(__import__("PIL.Image").Image.open(tmp_path / name / "grid.png")))
    assert np.array_equal(outputs[0], outputs[1])
    assert len(record["prompts"]) == 2 and len(record["prompts"][0]["neighbour_ids"]) == 4
    with open(tmp_path / "a" / "samples.json") as f:
        saved = json.load(f)
    assert saved["prompts"][1]["neighbour_ids"] == record["prompts"][1]["neighbour_ids"]
    assert (tmp_path / "a" / "neighbours.png").exists()  # the retrieved images, read from the shards
    with pytest.raises(ValueError, match="k=4"):
        sample(
            SampleConfig(checkpoint=run, database=train_db, output=str(tmp_path / "c"), prompts=["x"], k=5)
        )
    assert STATE_FILE in os.listdir(os.path.dirname(latest_checkpoint(run)))


def test_epoch_stream_visits_every_part_once_per_epoch_in_a_new_order():
    from diffusion.data import epoch_items

    items = [{"tar": f"{i:05d}.tar"} for i in range(8)]
    stream = epoch_items(items, num_epochs=3, seed=0, first_epoch=2)
    epochs = [[it["tar"] for it in stream if it["epoch"] == e] for e in (2, 3, 4)]
    assert [sorted(e) for e in epochs] == [[it["tar"] for it in items]] * 3  # each part once per epoch
    assert len({tuple(e) for e in epochs}) == 3  # a new part order every epoch
    assert [it["epoch"] for it in stream] == sorted(it["epoch"] for it in stream)  # epochs one after another
    assert epoch_items(items, 3, seed=0, first_epoch=2) == stream  # seeded


def test_one_run_streams_several_epochs_with_rows_reshuffled(train_db, ray_session):
    """The dataset holds every epoch the run needs; each part's rows come in a new order each epoch."""
    from diffusion.data import load_part, make_dataset, num_rows, part_items

    config = config_for(train_db, "/unused", steps=12, batch_size_per_worker=8)
    items = part_items(config)
    rows = num_rows(items)
    ids = np.concatenate([b["image_id"] for b in make_dataset(config).iter_batches(batch_size=None)])
    assert len(ids) >= config.steps * config.batch_size_per_worker  # enough rows for the whole run
    _, counts = np.unique(ids, return_counts=True)
    assert len(counts) == rows and len(set(counts)) == 1 and counts[0] >= 2  # every image once per epoch
    batch = {k: np.array([v]) for k, v in items[0].items()}
    first, second = (
        load_part({**batch, "epoch": np.array([e])}, train_db, 16, 4)["image_id"] for e in (0, 1)
    )
    assert sorted(first) == sorted(second) and not np.array_equal(first, second)  # rows reshuffled


def test_run_folder_given_as_a_uri_checkpoints_and_resumes(train_db, tmp_path):
    """--output as a URI goes through fsspec and Ray Train's storage (file:// here; s3:// etc. the same way)."""
    uri = f"file://{tmp_path}/uri_run"
    train(config_for(train_db, uri, steps=3))
    train(config_for(train_db, uri, steps=6))
    rows = read_metrics(f"{uri}/metrics.csv")
    assert [(int(r["step"]), int(r["start_step"])) for r in rows] == [(3, 0), (6, 3)]
    assert latest_checkpoint(uri).startswith("file://") and state_of(uri)["step"] == 6
    assert (tmp_path / "uri_run" / "loss.png").exists()


def test_resume_puts_the_model_on_its_device_before_loading_the_optimizer():
    """On a GPU, Optimizer.load_state_dict puts each Adam moment on its parameter's device at load time: the model
    must already be there, or the moments stay on the CPU. The order of the calls is what a CPU can check."""
    from diffusion.train import new_training_state, restore_training_state

    config = TrainConfig(db="db", neighbours="nb", output="out", model=model_config("tiny", cond_dim=8))
    model, ema, opt = new_training_state(config)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = {"model": model.state_dict(), "ema": ema.module.state_dict(), "optimizer": opt.state_dict()}
    state.update(step=7, config="{}")
    model2, ema2, opt2 = new_training_state(config)
    calls = []
    for name, obj, method in (
        ("model.to", model2, "to"),
        ("ema.to", ema2.module, "to"),
        ("load", opt2, "load_state_dict"),
    ):
        original = getattr(obj, method)
        setattr(obj, method, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    assert restore_training_state(model2, ema2, opt2, state, torch.device("cpu")) == 7
    assert calls.index("model.to") < calls.index("load") and calls.index("ema.to") < calls.index("load")
    params = list(model2.parameters())
    assert all(opt2.state[p]["exp_avg"].device == p.device for p in params)
    assert all(any(p is q for q in opt2.param_groups[0]["params"]) for p in params[:3])
    torch.testing.assert_close(
        opt2.state[params[0]]["exp_avg"], opt.state[list(model.parameters())[0]]["exp_avg"]
    )


def test_sampling_refuses_a_database_embedded_by_another_clip(tmp_path):
    """Same architecture and width, other weights: refused. The same checkpoint copied elsewhere: accepted."""
    import shutil
    from types import SimpleNamespace

    from diffusion.sample import check_clip
    from retrieval.database import DatabaseInfo

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "clip.pt").write_bytes(b"x" * 100)
    (tmp_path / "b" / "clip.pt").write_bytes(b"y" * 120)
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    trained = f"open_clip:ViT-B-32/{tmp_path}/a/clip.pt"
    config = TrainConfig(db="db", neighbours="nb", output="out", model=model_config("tiny", cond_dim=8))
    config.clip_model = trained

    def db(name):
        return SimpleNamespace(info=DatabaseInfo(clip_model=name, dim=8), path="db")

    check_clip(db(trained), config)
    check_clip(db(f"open_clip:ViT-B-32/{tmp_path}/moved/clip.pt"), config)  # relocated copy: the same model
    with pytest.raises(
        ValueError, match="trained on embeddings of .*a/clip.pt but db is embedded with .*b/clip.pt"
    ):
        check_clip(db(f"open_clip:ViT-B-32/{tmp_path}/b/clip.pt"), config)
    with pytest.raises(ValueError, match="retrieve from a database embedded with the training CLIP"):
        check_clip(db("open_clip:ViT-B-32/openai"), config)


def test_linear_schedule_stays_a_schedule_for_short_chains():
    from diffusion.schedule import alphas_cumprod

    for t in (10, 20, 49, 1000):
        abar = alphas_cumprod("linear", t)
        assert (abar > 0).all() and (abar[1:] < abar[:-1]).all(), t
    with pytest.raises(ValueError, match="schedule must be one of"):
        alphas_cumprod("quadratic", 10)


def test_checkpoint_discovery_memory_maps_local_states(tmp_path, monkeypatch):
    """Finding the latest of several checkpoints reads each one's step, not its gigabytes of tensors."""
    import fsspec

    from diffusion.train import _step_of

    path = tmp_path / "state.pt"
    state = {"model": {"w": torch.zeros(1000)}, "ema": {}, "optimizer": {}, "step": 3, "config": "{}"}
    torch.save(state, path)
    seen, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("mmap")) or real(*a, **k))
    assert _step_of(fsspec.filesystem("file"), str(path)) == 3
    assert seen == [True]
