"""The procedural scene set: captions, determinism, the two styles, the rating rule, write_dataset's files."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines import demo_data as dd

STYLE2 = "neon"


def _scenes(num_scenes: int, seed: int = 0) -> list[dd.Scene]:
    rng = np.random.default_rng(seed)
    return [dd.sample_scene(rng) for _ in range(num_scenes)]


def _read(folder: str, name: str) -> np.ndarray:
    with Image.open(os.path.join(folder, name)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_caption_names_every_attribute():
    scene = dd.Scene("triangle", "red", "small", "at the top left", "striped", "green")
    assert dd.caption(scene) == "a small red triangle at the top left on a striped green background"
    for scene in _scenes(300):
        text = dd.caption(scene)
        for value in (scene.shape, scene.colour, scene.size, scene.position, scene.background):
            assert value in text, (value, text)
        assert text.endswith(f"{scene.background_colour} background"), text
        # The background colour word belongs to the background, not to the shape.
        assert text.split(" on a ")[0].split()[2] == scene.colour


def test_sample_scene_covers_every_value_and_never_repeats_the_colour():
    scenes = _scenes(3000)
    assert all(s.colour != s.background_colour for s in scenes)
    for name, allowed in (
        ("shape", dd.SCENE_SHAPES),
        ("colour", tuple(dd.PALETTE)),
        ("size", dd.SIZES),
        ("position", dd.POSITIONS),
        ("background", dd.BACKGROUNDS),
        ("background_colour", tuple(dd.PALETTE)),
    ):
        counts = pd.Series([getattr(s, name) for s in scenes]).value_counts()
        assert set(counts.index) == set(allowed), name
        # Uniform: 3000 draws over <= 6 values put at least ~400 in each (binomial sd ~20).
        assert counts.min() > 0.75 * len(scenes) / len(allowed), (name, counts.to_dict())
    assert len(dd.SCENE_SHAPES) >= 5 and len(dd.BACKGROUNDS) >= 4 and len(dd.PALETTE) >= 6


def test_scene_rejects_bad_values():
    with pytest.raises(ValueError, match="background_colour"):
        dd.Scene("star", "red", "small", "in the centre", "plain", "red")
    with pytest.raises(ValueError, match="shape"):
        dd.Scene("hexagon", "red", "small", "in the centre", "plain", "blue")
    with pytest.raises(ValueError, match="style"):
        dd.render(dd.Scene("star", "red", "small", "in the centre", "plain", "blue"), style="watercolour")


def test_render_is_deterministic_per_seed_and_jittered_across_seeds():
    scene = dd.Scene("star", "blue", "medium", "in the centre", "dotted", "yellow")
    for style in dd.STYLES:
        image = dd.render(scene, 64, style, seed=7)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, dd.render(scene, 64, style, seed=7))
        assert not np.array_equal(image, dd.render(scene, 64, style, seed=8))
    # The jitter moves the shape itself, not just the noise.
    assert not np.array_equal(dd.shape_mask(scene, 64, seed=7), dd.shape_mask(scene, 64, seed=8))


def test_write_dataset_same_seed_same_files_other_seed_differs(tmp_path):
    a = dd.write_dataset(str(tmp_path / "a"), 12, seed=3)
    b = dd.write_dataset(str(tmp_path / "b"), 12, seed=3)
    c = dd.write_dataset(str(tmp_path / "c"), 12, seed=4)
    pd.testing.assert_frame_equal(a, b)
    for name in a.file:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (a.caption != c.caption).sum() >= 10  # 2 of 12 could coincide by chance (p ~ 1/5400 each)
    assert all((tmp_path / "a" / n).read_bytes() != (tmp_path / "c" / n).read_bytes() for n in a.file)
    assert list(a.columns) == list(dd.DATASET_COLUMNS)
    assert list(a.file) == [f"flat_{i:06d}.jpg" for i in range(12)]


def test_styles_share_scenes_but_look_clearly_different(tmp_path):
    flat = dd.write_dataset(str(tmp_path), 16, style="flat", seed=5)
    other = dd.write_dataset(str(tmp_path), 16, style=STYLE2, seed=5)
    for column in set(dd.DATASET_COLUMNS) - {"file", "style"}:  # the scene, its caption and rating
        assert list(flat[column]) == list(other[column]), column
    assert set(other["style"]) == {STYLE2} and set(flat["style"]) == {"flat"}
    for flat_name, other_name in zip(flat.file, other.file, strict=True):
        difference = np.abs(_read(str(tmp_path), flat_name) - _read(str(tmp_path), other_name)).mean()
        # JPEG round trips and the sd-3 pixel noise move a pixel by ~4 levels on average; flat's bright
        # saturated background against neon's dark one moves it by 60+ (measured 62..110 over 50 images).
        assert difference > 40.0, (flat_name, difference)


def test_neon_shape_is_hollow_where_flat_is_filled():
    scene = dd.Scene("square", "yellow", "large", "in the centre", "plain", "blue")
    mask = dd.shape_mask(scene, 64, seed=0)
    flat = dd.render(scene, 64, "flat", seed=0).astype(np.float32)
    neon = dd.render(scene, 64, "neon", seed=0).astype(np.float32)
    yellow = np.array(dd.PALETTE["yellow"], dtype=np.float32)
    # The flat shape is its colour exactly where shape_mask says (up to the noise and antialiased edge).
    close = np.abs(flat - yellow).max(axis=-1) < 20
    assert (close == mask).mean() > 0.97
    # Neon's centre is the dark background wash (about (25, 35, 90) here), not the shape's colour.
    assert np.abs(flat[28:36, 28:36] - yellow).mean() < 10
    assert np.abs(neon[28:36, 28:36] - yellow).mean() > 100


@pytest.mark.parametrize("size", [64, 32])
def test_shapes_are_distinguishable(size):
    for image_size, seed in itertools.product(dd.SIZES, range(5)):
        masks = {
            shape: dd.shape_mask(
                dd.Scene(shape, "red", image_size, "in the centre", "plain", "blue"), size, seed
            )
            for shape in dd.SCENE_SHAPES
        }
        for a, b in itertools.combinations(dd.SCENE_SHAPES, 2):
            differ, union = int((masks[a] ^ masks[b]).sum()), int((masks[a] | masks[b]).sum())
            # Circle vs square is the closest pair: their 4 corners (14 % of the union at 64 px, small).
            if size == 64:
                assert differ >= 0.12 * union and differ >= 20, (image_size, seed, a, b, differ, union)
            else:
                assert differ >= 4, (image_size, seed, a, b, differ, union)


def test_positions_and_sizes_are_true_and_shapes_never_cut_off():
    side = 64
    areas: dict[str, list[int]] = {s: [] for s in dd.SIZES}
    for i, scene in enumerate(_scenes(400, seed=1)):
        mask = dd.shape_mask(scene, side, seed=i)
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()), scene
        ys, xs = np.nonzero(mask)
        cy, cx = ys.mean(), xs.mean()
        if scene.position == "in the centre":
            assert abs(cx - side / 2) < 0.1 * side and abs(cy - side / 2) < 0.1 * side, scene
        else:
            assert (cy < side / 2) == ("top" in scene.position), scene
            assert (cx < side / 2) == scene.position.endswith("left"), scene
        areas[scene.size].append(int(mask.sum()))
    # Sizes do not overlap within a shape type on average: small < medium < large by clear factors.
    assert np.mean(areas["small"]) * 1.6 < np.mean(areas["medium"])
    assert np.mean(areas["medium"]) * 1.6 < np.mean(areas["large"])


def test_rating_follows_the_documented_rule():
    scene = dd.Scene("square", "red", "medium", "at the bottom right", "striped", "green")
    # contrast = |red - green| / |yellow - blue| in RGB, computed by hand from the palette.
    contrast = np.linalg.norm([220 - 40, 40 - 170, 40 - 70]) / np.linalg.norm([240 - 40, 220 - 80, 50 - 220])
    assert dd.contrast("red", "green") == pytest.approx(contrast)
    assert dd.expected_rating(scene) == pytest.approx(5.0 + 0.5 - 0.5 + 0.0 + 4.0 * (contrast - 0.6))
    ratings = np.array([dd.rating(scene, seed) for seed in range(2000)])
    assert ratings.mean() == pytest.approx(dd.expected_rating(scene), abs=0.03)
    assert ratings.std() == pytest.approx(0.3, abs=0.03)
    assert dd.rating(scene, 11) == dd.rating(scene, 11)

    # Busier backgrounds score lower, all else equal.
    by_background = [
        dd.expected_rating(dd.Scene("star", "red", "large", "in the centre", b, "blue"))
        for b in dd.BACKGROUNDS
    ]
    assert by_background == sorted(by_background, reverse=True) and dd.BACKGROUNDS[0] == "plain"


def test_good_scenes_outscore_bad_ones_and_spread_is_wide():
    rng = np.random.default_rng(0)
    scenes = _scenes(3000, seed=2)
    good = [
        s
        for s in scenes
        if s.size == "large" and s.position == "in the centre" and s.background == "plain"
        if dd.contrast(s.colour, s.background_colour) >= 0.7
    ]
    bad = [
        s
        for s in scenes
        if s.size == "small" and s.position != "in the centre" and s.background == "checkered"
        if dd.contrast(s.colour, s.background_colour) <= 0.6
    ]
    assert len(good) >= 3 and len(bad) >= 5
    for _ in range(300):
        g, b = good[rng.integers(len(good))], bad[rng.integers(len(bad))]
        assert dd.rating(g, int(rng.integers(2**31))) > dd.rating(b, int(rng.integers(2**31))) + 3.0
    ratings = np.array([dd.rating(s, i) for i, s in enumerate(scenes)])
    assert ratings.min() >= 1.0 and ratings.max() <= 10.0
    low, high = np.quantile(ratings, [0.05, 0.95])
    assert low < 3.0 and high > 7.0, (low, high)


def test_write_dataset_is_idempotent_and_writes_a_matching_parquet(tmp_path):
    folder = str(tmp_path)
    frame = dd.write_dataset(folder, 6, style=STYLE2, seed=9)
    parquet = os.path.join(folder, f"{STYLE2}_captions.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), frame)
    # Backdate every file: a rerun that rewrote one would give it a fresh mtime.
    old_ns = 1_000_000_000 * 10**9
    for name in frame.file:
        os.utime(os.path.join(folder, name), ns=(old_ns, old_ns))
    first = (tmp_path / frame.file[0]).read_bytes()
    os.remove(os.path.join(folder, frame.file[0]))

    again = dd.write_dataset(folder, 8, style=STYLE2, seed=9)
    pd.testing.assert_frame_equal(again.iloc[:6], frame)
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), again)
    for name in frame.file[1:]:
        assert os.stat(os.path.join(folder, name)).st_mtime_ns == old_ns, name
    assert (tmp_path / frame.file[0]).read_bytes() == first  # the deleted file comes back identical
    assert sorted(os.listdir(folder)) == sorted([*again.file, f"{STYLE2}_captions.parquet"])  # no temp files
    with Image.open(os.path.join(folder, again.file[7])) as image:
        assert image.format == "JPEG" and image.size == (64, 64)


def test_write_dataset_draws_only_the_sizes_and_positions_it_is_given(tmp_path):
    """The demo's scene set (one size, one position): every other attribute still varies, and a value that is
    not the scene set's own is refused, naming it."""
    frame = dd.write_dataset(str(tmp_path), 40, seed=2, sizes=["large"], positions=["in the centre"])
    assert set(frame["size"]) == {"large"} and set(frame["position"]) == {"in the centre"}
    for column in ("shape", "colour", "background", "background_colour"):
        assert frame[column].nunique() > 2, column
    assert all(c.startswith("a large ") and " in the centre on a " in c for c in frame["caption"])
    with pytest.raises(ValueError, match=r"sizes=\['huge'\]"):
        dd.write_dataset(str(tmp_path / "x"), 3, sizes=["huge"])
    with pytest.raises(ValueError, match="positions=\\[\\]"):
        dd.write_dataset(str(tmp_path / "x"), 3, positions=[])
    assert not os.path.exists(tmp_path / "x")


def test_a_rerun_that_would_draw_other_scenes_is_refused_and_keeps_the_folder(tmp_path):
    folder = str(tmp_path)
    first = dd.write_dataset(folder, 6, seed=1)
    parquet = os.path.join(folder, "flat_captions.parquet")
    with open(parquet, "rb") as f:
        saved = f.read()
    with pytest.raises(ValueError, match="flat_captions.parquet: image flat_000000.jpg was drawn as"):
        dd.write_dataset(folder, 9, seed=1, sizes=["large"], positions=["in the centre"])
    with open(parquet, "rb") as f:
        assert f.read() == saved  # the captions still describe the images on disk
    assert sorted(n for n in os.listdir(folder) if n.endswith(".jpg")) == list(first["file"])  # none added
    assert dd.write_dataset(folder, 8, seed=1)["caption"][:6].tolist() == first["caption"].tolist()
