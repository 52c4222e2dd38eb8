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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def other_db(train_db, shards, tiny_clip, tmp_path_factory):
    """A second database, embedded by the same CLIP from shard 00002 alone: images the first run also saw,
    but a different collection to retrieve from (ids, size, index)."""
    import shutil

    from pipelines.embed import EmbedConfig, embed
    from pipelines.index import IndexConfig, build

    root = tmp_path_factory.mktemp("other")
    for name in ("00002.tar", "00002_stats.json", "00002.parquet"):
        if os.path.exists(os.path.join(shards, name)):
            shutil.copy(os.path.join(shards, name), root / name)
    db = str(root / "db")
    embed(EmbedConfig(shards=str(root), output=db, clip_model=tiny_clip, batch_size=16))
    build(IndexConfig(db=db, index_key="Flat", max_index_memory="1G", current_memory_available="4G"))
    return db


def test_sample_from_any_database_is_deterministic(train_db, other_db, tmp_path):
    """Trained on train_db, sampled against train_db and against another database: the neighbours (and so the
    images) come from the database asked for, and each is reproducible with a seed."""
    from PIL import Image

    from diffusion.sample import SampleConfig, sample
    from retrieval.database import Database

    run = str(tmp_path / "run")
    train(config_for(train_db, run, steps=3))
    grids, records = {}, {}
    for name, db in (("a", train_db), ("a2", train_db), ("b", other_db)):
        config = SampleConfig(
            checkpoint=run,
            database=db,
            output=str(tmp_path / name),
            prompts=["a red circle", "a blue square"],
            steps=5,
            num_per_prompt=2,
            seed=7,
        )
        records[name] = sample(config)
        grids[name] = np.asarray(Image.open(tmp_path / name / "grid.png"))
    assert np.array_equal(grids["a"], grids["a2"])  # same database, same seed: the same images
    other_ids = set(Database.open(other_db).ids.tolist())
    assert len(other_ids) < len(Database.open(train_db))
    for prompt in records["b"]["prompts"]:
        assert len(prompt["neighbour_ids"]) == 4 and set(prompt["neighbour_ids"]) <= other_ids
    swapped = [
        p["neighbour_ids"] != q["neighbour_ids"]
        for p, q in zip(records["a"]["prompts"], records["b"]["prompts"], strict=True)
    ]
    assert any(swapped)  # the other database answers differently, and the model's prediction follows it
    # (three steps barely move the PNGs, so this is checked on the network's output)
    from diffusion.sample import load_model, retrieval_condition
    from retrieval.clip_model import cached_encoder

    model, train_config, _ = load_model(
        run, False
    )  # the trained weights (the EMA has barely moved in 3 steps)
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.full((2,), 500)
    outs, conds = [], []
    for db in (train_db, other_db):
        database = Database.open(db)
        query = (
            cached_encoder(database.info.clip_model).encode_texts(["a red circle", "a blue square"]).numpy()
        )
        cond, _ = retrieval_condition(database, query, train_config)
        conds.append(cond["neighbours"])
        with torch.no_grad():
            outs.append(model(x, t, drop=torch.zeros(2, dtype=torch.bool), **cond))
    assert (conds[0] - conds[1]).abs().max() > 1e-3  # the other database's neighbour embeddings condition it
    assert not torch.equal(outs[0], outs[1])  # and the prediction depends on them
    with open(tmp_path / "a" / "samples.json") as f:
        saved = json.load(f)
    assert saved["prompts"][1]["neighbour_ids"] == records["a"]["prompts"][1]["neighbour_ids"]
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


@pytest.mark.slow
def test_run_folder_given_as_a_uri_checkpoints_and_resumes(train_db, tmp_path):
    """--output as a URI goes through fsspec and Ray Train's storage (file:// here; s3:// etc. the same way)."""
    uri = f"file://{tmp_path}/uri_run"
    train(config_for(train_db, uri, steps=3))
    train(config_for(train_db, uri, steps=6))
    rows = read_metrics(f"{uri}/metrics.csv")
    assert [(int(r["step"]), int(r["start_step"])) for r in rows] == [(3, 0), (6, 3)]
    assert latest_checkpoint(uri).startswith("file://") and state_of(uri)["step"] == 6
    assert (tmp_path / "uri_run" / "loss.png").exists()


def _one_step_state(step: int) -> tuple:
    """(config, model, optimizer, checkpoint state) of a tiny model after one Adam step."""
    from diffusion.train import new_training_state

    config = TrainConfig(db="db", neighbours="nb", output="out", model=model_config("tiny", cond_dim=8))
    model, ema, opt = new_training_state(config)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = {"model": model.state_dict(), "ema": ema.module.state_dict(), "optimizer": opt.state_dict()}
    state.update(step=step, config="{}")
    return config, model, opt, state


def test_ema_gives_timms_model_ema_v3_weights_and_its_warm_up():
    """diffusion.train.Ema replaces timm's ModelEmaV3(use_warmup=True) (so training workers do not import timm):
    the same decay at every step and the same averaged weights and buffers after updates of a changing model."""
    from timm.utils import ModelEmaV3

    from diffusion.train import Ema

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    ours, timms = Ema(model, decay=0.99), ModelEmaV3(model, decay=0.99, use_warmup=True)
    for step in (0, 1, 2, 5, 50, 10_000):
        assert ours.decay_at(step) == pytest.approx(timms.get_decay(step), abs=1e-12)
    assert ours.decay_at(10_000) == 0.99 and 0 < ours.decay_at(5) < 0.99
    for step in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(16, 4))  # moves the BatchNorm's running statistics and its counter
        ours.update(model, step=step)
        timms.update(model, step=step)
    theirs = timms.module.state_dict()
    for name, value in ours.module.state_dict().items():
        assert torch.equal(value, theirs[name]), name
    assert not torch.equal(ours.module[0].weight, model[0].weight)  # an average, not a copy


def test_a_unet_training_worker_does_not_import_timm():
    """Building the UNet's training state (network, EMA, optimizer) leaves timm unimported: its import would add
    1.6-1.8 s to every training worker's start on a slow 2-core VM (the DiT imports it when it is built)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from diffusion.config import TrainConfig, model_config\n"
        "from diffusion.train import new_training_state\n"
        "config = TrainConfig(db='db', neighbours='nb', output='out', model=model_config('tiny'))\n"
        "new_training_state(config)\n"
        "print('timm' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_resume_puts_the_model_on_its_device_before_loading_the_optimizer():
    """On a GPU, Optimizer.load_state_dict puts each Adam moment on its parameter's device at load time: the model
    must already be there, or the moments stay on the CPU. The order of the calls is what a CPU can check."""
    from diffusion.train import new_training_state, restore_training_state

    config, model, opt, state = _one_step_state(step=7)
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


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU test above checks the order"
)
def test_resume_on_a_gpu_keeps_the_adam_moments_on_the_gpu():
    from diffusion.train import new_training_state, restore_training_state

    config, _, _, state = _one_step_state(step=3)
    model2, ema2, opt2 = new_training_state(config)
    restore_training_state(model2, ema2, opt2, state, torch.device("cuda"))
    assert all(opt2.state[p]["exp_avg"].device.type == "cuda" for p in model2.parameters())
    for p in model2.parameters():  # and a step runs there
        p.grad = torch.ones_like(p)
    opt2.step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CPU sampling is tested above")
def test_generate_on_the_gpu_matches_the_cpu():
    from diffusion.model import build_network
    from diffusion.sample import generate

    config = TrainConfig(db="db", neighbours="nb", output="out", model=model_config("tiny", cond_dim=8, k=4))
    torch.manual_seed(0)
    model = build_network(config.model).eval()
    g = torch.Generator().manual_seed(1)
    cond = {
        "query": torch.randn(2, 8, generator=g),
        "neighbours": torch.randn(2, 4, 8, generator=g),
        "valid": torch.ones(2, 4, dtype=torch.bool),
    }
    on_cpu = generate(model, config, cond, "ddim", steps=4, guidance=2.0, seed=3)
    on_gpu = generate(model.cuda(), config, cond, "ddim", steps=4, guidance=2.0, seed=3)
    assert np.abs(on_cpu.astype(int) - on_gpu.astype(int)).max() <= 2


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


def test_metrics_log_appends_a_line_per_report_and_trims_once_on_resume(tmp_path):
    """metrics.csv used to be read and rewritten whole at every report (quadratic in the run's length)."""
    from diffusion.train import _metrics_callback

    out = str(tmp_path / "run")
    os.makedirs(out)
    config = TrainConfig(db="db", neighbours="nb", output=out, steps=10)

    def report(log, step):
        worker = {
            "step": step,
            "loss": 1.0 / step,
            "samples_per_s": 5.0,
            "data_wait_fraction": 0.1,
            "lr": 1e-3,
            "param_sum": 2.0,
            "start_step": 0,
        }
        log.after_report(None, [worker, dict(worker, loss=3.0 / step)], None)

    log = _metrics_callback(config)
    path = os.path.join(out, "metrics.csv")
    for step in (1, 2, 3):
        report(log, step)
        if step == 1:
            inode = os.stat(path).st_ino
    assert os.stat(path).st_ino == inode  # appended in place, never replaced
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["loss"] == pytest.approx(1.0)
    report(log, 3)  # the worker group restarted from the step-2 checkpoint: step 3 is replaced, not repeated
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    resumed = _metrics_callback(config)  # a resumed run restarts at step 2: rows 2 and 3 are replaced
    report(resumed, 2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    report(resumed, 3)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


# ------------------------------------------------------------------ the tokenizer stage and latent generators


def test_autoencoder_config_gives_its_latent_grid_and_refuses_what_cannot_halve():
    from diffusion.model import build_network

    mc = model_config("tokenizer")
    assert (mc.arch, mc.latent_factor, mc.latent_channels, mc.use_knn) == ("autoencoder", 2, 4, False)
    net = build_network(mc)
    z = net.encode(torch.zeros(2, 3, 32, 32))
    assert z.shape == (2, 4, 16, 16) and net.decode(z).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="latent_channels >= 1"):
        model_config("tokenizer", latent_channels=0)
    with pytest.raises(ValueError, match="halves 2 times"):
        model_config("tokenizer", image_size=30, widths=[8, 16, 32])
    latent = model_config("small-latent")
    assert (latent.grid_size, latent.grid_channels) == (16, 4)
    assert build_network(latent).stem[1].in_channels == 4  # the denoiser reads latents, not pixels


def test_a_latent_model_needs_a_tokenizer_and_a_tokenizer_needs_none():
    with pytest.raises(ValueError, match="give the tokenizer"):
        TrainConfig(db="d", neighbours="n", output="o", model=model_config("small-latent"))
    with pytest.raises(ValueError, match="quantising tokenizer"):
        TrainConfig(db="d", neighbours="n", output="o", model=model_config("small-discrete"))
    with pytest.raises(ValueError, match="leave tokenizer unset"):
        TrainConfig(db="d", neighbours="n", output="o", model=model_config("tokenizer"), tokenizer="t.pt")


def test_autoencoder_learns_to_reconstruct_scenes_in_the_training_loop():
    """training_step's reconstruction objective: 80 steps on 64 demo scenes cut the loss by more than half."""
    from diffusion.train import new_training_state, training_step
    from pipelines.demo_data import render, sample_scene

    rng = np.random.default_rng(0)
    images = np.stack([render(sample_scene(rng), size=16, seed=i) for i in range(64)])
    config = TrainConfig(
        db="d",
        neighbours="n",
        output="o",
        model=model_config("tokenizer", image_size=16, widths=[16, 32]),
        lr=3e-3,
        warmup_steps=5,
    )
    model, ema, opt = new_training_state(config)
    batch = {"image": torch.from_numpy(images)}
    losses = [float(training_step(model, ema, opt, batch, s, config, None, None, None)[0]) for s in range(80)]
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_tokenizer_stage_exports_and_a_latent_generator_trains_and_samples_through_it(train_db, tmp_path):
    from diffusion.sample import generate, load_model, retrieval_condition
    from diffusion.tokenizer import load_tokenizer, read_tokenizer, tokenizer_config, train_tokenizer
    from diffusion.train import use_tokenizer
    from retrieval.database import Database

    out = str(tmp_path / "tokenizer")
    db = Database.open(train_db)
    result = train_tokenizer(
        tokenizer_config(
            model={"image_size": 16, "widths": [8, 16]},
            db=train_db,
            neighbours=os.path.join(train_db, "neighbours"),
            output=out,
            steps=6,
            batch_size_per_worker=8,
            exclude_parts=[db.part_names[-1]],
        )
    )
    state = read_tokenizer(result["tokenizer"])  # weights_only
    figures = json.loads(state["figures"])
    assert figures["latent_shape"] == [4, 8, 8] and figures["heldout_parts"] == [db.part_names[-1]]
    assert os.path.getsize(os.path.join(out, "reconstructions.png")) > 0
    # the latents the generator sees are standardised by the statistics of the training images
    from diffusion.evaluate import part_images

    _, images, _ = part_images(db, db.part_names[:-1], 16)
    z = load_tokenizer(result["tokenizer"]).encode(
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    )
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05

    run = str(tmp_path / "latent")
    train(config_for(train_db, run, tokenizer=result["tokenizer"]))
    model, config, step = load_model(run)
    assert step == 6 and (config.model.latent_factor, config.model.latent_channels) == (2, 4)
    assert model.stem[1].in_channels == 4
    cond, _ = retrieval_condition(db, db.embeddings(db.ids[:3]), config)
    images = generate(model, config, cond, "ddim", steps=4, guidance=2.0, seed=1)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8  # decoded to pixels
    wrong = config_for(
        train_db, str(tmp_path / "x"), tokenizer=result["tokenizer"], model=model_config("small")
    )
    with pytest.raises(ValueError, match="encodes 16 px"):
        use_tokenizer(wrong)


@pytest.mark.slow
def test_discrete_backbone_trains_on_fsq_tokens_resumes_and_samples_deterministically(train_db, tmp_path):
    from diffusion.sample import generate, load_model, retrieval_condition
    from diffusion.tokenizer import tokenizer_config, train_tokenizer
    from retrieval.database import Database

    db = Database.open(train_db)
    result = train_tokenizer(
        tokenizer_config(
            "tokenizer-fsq",
            model={"image_size": 16, "widths": [8, 16], "latent_channels": 2, "fsq_levels": [4, 3]},
            db=train_db,
            neighbours=os.path.join(train_db, "neighbours"),
            output=str(tmp_path / "fsq"),
            steps=4,
            batch_size_per_worker=8,
        )
    )
    figures = result["figures"]
    assert figures["codebook_size"] == 12 and 0 < figures["codebook_usage"] <= 1
    assert 1 <= figures["perplexity"] <= 12
    run = str(tmp_path / "discrete")
    model = model_config("tiny", cond_dim=384, k=4, backbone="discrete")
    train(config_for(train_db, run, model=model, tokenizer=result["tokenizer"], num_timesteps=20, steps=3))
    train(config_for(train_db, run, model=model, tokenizer=result["tokenizer"], num_timesteps=20, steps=6))
    state = state_of(run)
    assert state["step"] == 6
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {6.0}  # resumed, not restarted
    net, config, _ = load_model(run)
    assert (config.model.backbone, config.model.codebook_size, config.model.latent_channels) == (
        "discrete",
        12,
        2,
    )
    assert net.head.out_channels == 12  # x_0 logits over the codebook
    cond, _ = retrieval_condition(db, db.embeddings(db.ids[:2]), config)
    first = generate(net, config, cond, steps=5, guidance=2.0, seed=3, truncation=0.9)
    assert first.shape == (2, 16, 16, 3)
    assert np.array_equal(first, generate(net, config, cond, steps=5, guidance=2.0, seed=3, truncation=0.9))


def test_rays_jobs_poll_train_workers_every_half_second_unless_the_user_says(ray_session, monkeypatch):
    """Ray Train's controller notices a finished run at its next health check (2 s apart by default)."""
    import ray

    from retrieval.ray_env import job_runtime_env

    @ray.remote(num_cpus=0)
    def interval() -> str | None:
        return os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

    assert ray.get(interval.remote()) == "0.5"  # what an actor of this session (the controller) reads
    monkeypatch.setenv(
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3"
    )  # the user's own: their environment carries it
    assert job_runtime_env() == {"env_vars": {}}
