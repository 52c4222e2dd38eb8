"""Mask-free text-driven editing: the ECC pair builder, the editing network, the edit command and stage."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch

from diffusion.config import TrainConfig, model_config
from diffusion.edit_pairs import align_ecc, area_pixels, manipulate, random_area


def demo_image(size: int = 64) -> np.ndarray:
    from pipelines.demo_data import Scene, render

    return render(Scene("star", "red", "large", "in the centre", "striped", "blue"), size, seed=3)


def test_ecc_recovers_a_known_affine_warp_of_a_demo_image_within_half_a_pixel():
    image = demo_image()
    h, w = image.shape[:2]
    angle, scale, shift = np.deg2rad(4.0), 1.04, (1.7, -2.2)
    known = np.array(
        [
            [scale * np.cos(angle), -scale * np.sin(angle), shift[0]],
            [scale * np.sin(angle), scale * np.cos(angle), shift[1]],
        ],
        np.float32,
    )
    # warpAffine without WARP_INVERSE_MAP draws dst(p) = src(M^-1 p): here moving(p) = image(known @ p), so
    # image(p) = moving(inverse @ p), and the warp ECC finds (fixed's pixel coordinates -> moving's) is `inverse`
    inverse = cv2.invertAffineTransform(known)
    moving = cv2.warpAffine(image, inverse, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    assert np.abs(moving.astype(int) - image).mean() > 5  # the warp really moved the picture
    aligned, warp, converged = align_ecc(moving, image, "affine")
    assert converged
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], np.float32)
    error = np.linalg.norm(corners @ warp.T - corners @ inverse.T, axis=1).max()
    assert error < 0.5, f"corner error {error:.3f} px"
    inner = (slice(8, -8), slice(8, -8))
    assert (
        np.abs(aligned[inner].astype(int) - image[inner]).mean()
        < np.abs(moving[inner].astype(int) - image[inner]).mean() / 3
    )


def test_ecc_falls_back_to_the_unwarped_neighbour_when_it_cannot_align():
    flat = np.full((32, 32, 3), 128, np.uint8)  # no gradient: ECC cannot converge
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out, warp, converged = align_ecc(noise, flat, "euclidean")
    assert not converged and np.array_equal(out, noise) and np.array_equal(warp, np.eye(2, 3))
    with pytest.raises(ValueError, match="motion"):
        align_ecc(noise, flat, "projective")


def test_outside_the_area_the_manipulated_image_is_the_original_bit_for_bit():
    rng = np.random.default_rng(0)
    image = demo_image(32)
    donor = rng.integers(0, 256, image.shape, dtype=np.uint8)
    for _ in range(50):
        box = random_area(rng, (0.3, 0.7))
        top, left, bh, bw = box
        assert (
            top >= 0
            and top + bh <= 1
            and left >= 0
            and left + bw <= 1
            and 0.3 <= min(bh, bw) <= max(bh, bw) <= 0.7
        )
        out = manipulate(image, donor, box)
        inside = np.zeros(image.shape[:2], bool)
        inside[area_pixels(box, 32)] = True
        assert np.array_equal(out[~inside], image[~inside])
        assert np.array_equal(out[inside], donor[inside]) and inside.sum() >= 9 * 9


def test_the_editing_unet_reads_the_source_and_needs_it():
    from diffusion.unet import KnnUNet

    config = model_config("tiny", k=0, use_knn=False, edit=True, cond_dim=8)
    net = KnnUNet(config).eval()
    for p in net.parameters():  # zero-initialised output layers would hide the dependence
        torch.nn.init.normal_(p, std=0.05)
    x, t, q = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 8)
    a = net(x, t, q, source=torch.zeros_like(x))
    b = net(x, t, q, source=torch.ones_like(x))
    assert (a - b).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="source"):
        net(x, t, q)
    for bad in (dict(use_knn=True, k=4), dict(arch="dit"), dict(backbone="discrete")):
        with pytest.raises(ValueError, match="editing model"):
            model_config("tiny", **{"k": 0, "use_knn": False, "edit": True, **bad})


def test_pairs_stream_from_a_part_and_its_neighbour_table(quick_demo):
    from diffusion.data import part_items
    from diffusion.edit_pairs import load_edit_part
    from diffusion.train import TrainConfig
    from retrieval.database import DatabaseInfo

    out, _ = quick_demo
    db = str(out / "db" / "main")
    config = TrainConfig(
        db=db,
        neighbours=os.path.join(db, "neighbours"),
        output=str(out / "x"),
        model=model_config("tiny", k=0, use_knn=False, edit=True, cond_dim=DatabaseInfo.read(db).dim),
    )
    item = part_items(config)[0]
    batch = {k: np.array([v]) for k, v in item.items()}
    kwargs = dict(
        db=db,
        image_size=16,
        clip_model=DatabaseInfo.read(db).clip_model,
        area=(0.4, 0.6),
        motion="affine",
        seed=0,
    )
    rows = load_edit_part(batch, **kwargs)
    n = len(rows["image_id"])
    assert rows["image"].shape == rows["source"].shape == (n, 16, 16, 3) and rows["query"].shape[0] == n
    np.testing.assert_allclose(np.linalg.norm(rows["query"], axis=1), 1.0, atol=1e-4)
    for image, source in zip(rows["image"], rows["source"], strict=True):
        changed = np.argwhere((image != source).any(-1))
        if len(changed):  # every change lies in one box of at most 0.6 of the side (+ rounding)
            extent = changed.max(0) - changed.min(0) + 1
            assert extent.max() <= round(0.6 * 16) + 1
    assert rows["aligned"].any()  # ECC aligned some neighbours
    again = load_edit_part(
        batch, **kwargs
    )  # a part and epoch draw the same pairs (resume sees the same data)
    assert np.array_equal(again["source"], rows["source"])


def test_edit_refuses_a_generator_trained_without_editing(quick_demo, tmp_path, capsys):
    from diffusion.sample import save_png
    from pipelines.cli import main

    out, _ = quick_demo
    save_png(demo_image(32), str(tmp_path / "in.png"))
    code = main(
        [
            "edit",
            "--checkpoint",
            str(out / "run"),
            "--image",
            str(tmp_path / "in.png"),
            "--text",
            "a blue star",
            "--output",
            str(tmp_path / "e"),
        ]
    )
    assert code == 2
    assert "trained without editing" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_the_edit_stage_and_command_on_the_quick_demo(quick_demo, tmp_path):
    from diffusion.sample import save_png
    from pipelines.cli import main

    out, _ = quick_demo
    record = json.loads((out / "edit" / "edits.json").read_text())
    assert record["num_trials"] >= 8 and record["asked_attributes"] == ["colour"]
    assert 0 <= record["edit_accuracy"] <= 1 and set(record["kept"]) >= {"background", "background_colour"}
    assert "Editing" in (out / "report.html").read_text()
    metrics = (out / "edit_run" / "metrics.csv").read_text().splitlines()
    assert "aligned_fraction" in metrics[0] and metrics[-1].split(",")[-1] != ""
    save_png(demo_image(64), str(tmp_path / "in.png"))
    args = [
        "edit",
        "--checkpoint",
        str(out / "edit_run"),
        "--image",
        str(tmp_path / "in.png"),
        "--text",
        "a large blue star in the centre on a striped blue background",
        "--steps",
        "4",
    ]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    assert main([*args, "--output", str(tmp_path / "b")]) == 0
    for name in ("before.png", "after.png", "heatmap.png", "edit.png", "edit.json"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    from PIL import Image

    a, b = (np.asarray(Image.open(tmp_path / d / "after.png")) for d in "ab")
    assert np.array_equal(a, b)  # deterministic for a seed
    before = np.asarray(Image.open(tmp_path / "a" / "before.png"))
    assert before.shape == a.shape == (16, 16, 3)


def test_an_editing_model_fine_tuned_from_a_generator_starts_as_that_generator(tmp_path):
    from diffusion.train import checkpoint_state, init_weights, new_training_state

    base = TrainConfig(
        db="db",
        neighbours="nb",
        output=str(tmp_path),
        model=model_config("tiny", k=0, use_knn=False, cond_dim=8),
    )
    generator, ema, opt = new_training_state(base)
    for p in ema.module.parameters():  # trained-looking weights, not the zero-initialised output layers
        torch.nn.init.normal_(p, std=0.05)
    torch.save(checkpoint_state(generator, ema, opt, 5, base), tmp_path / "state.pt")
    editor_config = model_config("tiny", k=0, use_knn=False, edit=True, cond_dim=8)
    from diffusion.unet import KnnUNet

    editor = KnnUNet(editor_config)
    init_weights(editor, str(tmp_path / "state.pt"))
    x, t, q = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.randn(2, 8)
    with torch.no_grad():
        expected = ema.module.eval()(x, t, q)
        got = editor.eval()(x, t, q, source=torch.randn_like(x))
    torch.testing.assert_close(got, expected)  # the source's new input channels start at zero
    with pytest.raises(ValueError, match="same network"):
        init_weights(
            KnnUNet(model_config("tiny", k=0, use_knn=False, edit=True, cond_dim=8, widths=[8, 16])),
            str(tmp_path / "state.pt"),
        )


def test_strength_starts_sampling_from_the_noised_image():
    from diffusion.edit import EditConfig, edit_images
    from diffusion.schedule import sampling_timesteps
    from diffusion.unet import KnnUNet

    assert sampling_timesteps(1000, 20)[0] == 999
    steps = sampling_timesteps(1000, 20, strength=0.5)
    assert steps[0] == 500 and steps[-1] == 0 and len(steps) == 20 and steps == sorted(steps, reverse=True)
    assert sampling_timesteps(1000, 20, strength=1 / 999) == [1, 0]  # never more steps than timesteps
    with pytest.raises(ValueError, match="strength"):
        sampling_timesteps(1000, 20, strength=0)
    with pytest.raises(ValueError, match="--strength"):
        EditConfig(checkpoint="c", image="i", text="a red star", output="o", strength=1.5)

    config = TrainConfig(
        db="db",
        neighbours="nb",
        output="o",
        model=model_config("tiny", k=0, use_knn=False, edit=True, cond_dim=8),
    )
    net = KnnUNet(config.model).eval()
    for p in net.parameters():  # an untrained network that does not output zeros
        torch.nn.init.normal_(p, std=0.05)
    images = np.stack([demo_image(16), demo_image(16)[::-1]])
    text = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    # from the image at timestep 1 the network's prediction can barely move it; from noise it redraws it
    kept = edit_images(net, config, images, text, guidance=3.0, steps=1, strength=1 / 999)
    redrawn = edit_images(net, config, images, text, guidance=3.0, steps=4, strength=1.0)
    assert np.abs(kept.astype(int) - images).mean() < 1.5 and np.abs(kept.astype(int) - images).max() <= 8
    assert np.abs(redrawn.astype(int) - images).mean() > 20


def test_keep_takes_the_edit_where_it_changed_the_image_and_the_original_elsewhere():
    from diffusion.edit import keep_unchanged

    rng = np.random.default_rng(0)
    before = np.stack([demo_image(32), demo_image(32)])
    drift = rng.integers(-6, 7, size=before.shape)  # the redrawn background: small changes everywhere
    after = np.clip(before.astype(int) + drift, 0, 255).astype(np.uint8)
    after[0, 10:20, 12:22] = (255 - before[0, 10:20, 12:22].astype(int)).astype(np.uint8)  # the edit proper
    kept, masks = keep_unchanged(before, after, keep=0.4)
    inside, box = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    inside[11:19, 13:21] = True  # the block's interior
    box[7:23, 9:25] = True  # the block grown by the blur, the dilation and the feathered edge
    assert np.array_equal(kept[0][inside], after[0][inside]) and (masks[0][inside] == 1).all()
    assert np.array_equal(kept[0][~box], before[0][~box]) and (masks[0][~box] == 0).all()
    # an edit that changed nothing by more than a few grey levels keeps the original whole
    assert np.array_equal(kept[1], before[1]) and (masks[1] == 0).all()
    same, ones = keep_unchanged(before, after, keep=0.0)
    assert np.array_equal(same, after) and (ones == 1).all()
    unchanged, _ = keep_unchanged(before, before.copy(), keep=0.4)
    assert np.array_equal(unchanged, before)
