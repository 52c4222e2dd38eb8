"""Procedural captioned images for the offline demo: scene attributes in, JPEGs + captions + ratings out.

Two generators live here:

* the original one (caption_for, make_image, write_images): a coloured shape on a noisy background per
  integer index, served by a 127.0.0.1 HTTP server (LocalServer, FolderServer) so the README's main command
  runs with no internet and the images enter the toolkit through the real download stage;
* the scene set (Scene, sample_scene, caption, render, rating, write_dataset): five shapes, six colours,
  three sizes, five positions and four background patterns, each image captioned with every attribute,
  drawn in one of two styles ("flat" or "neon") and given a documented, visible-only aesthetic rating.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from retrieval.storage import image_bytes, parquet_bytes, write_atomic

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "bar")


def caption_for(index: int) -> str:
    colour = list(COLOURS)[index % len(COLOURS)]
    shape = SHAPES[(index // len(COLOURS)) % len(SHAPES)]
    return f"a {colour} {shape} number {index}"


def make_image(index: int, size: int = 64) -> bytes:
    """A deterministic JPEG: a coloured shape on a noisy background, different for every index."""
    rng = np.random.default_rng(index)
    arr = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    colour = COLOURS[list(COLOURS)[index % len(COLOURS)]]
    shape = SHAPES[(index // len(COLOURS)) % len(SHAPES)]
    lo, hi = size // 4 + index % 7, 3 * size // 4 - index % 5
    yy, xx = np.mgrid[0:size, 0:size]
    if shape == "square":
        mask = (yy >= lo) & (yy < hi) & (xx >= lo) & (xx < hi)
    elif shape == "circle":
        mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < ((hi - lo) / 2) ** 2
    else:
        mask = (xx >= lo) & (xx < lo + size // 6)
    arr[mask] = colour
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_images(folder: str, num_images: int, size: int = 64) -> list[str]:
    """Write img_<i>.jpg files (skipping existing ones); returns their file names."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for i in range(num_images):
        name = f"img_{i}.jpg"
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            write_atomic(path, make_image(i, size))
        names.append(name)
    return names


class LocalServer:
    """An HTTP server on 127.0.0.1 (ephemeral port) run from a background thread; use as a context manager."""

    def __init__(self, handler: Any) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FolderServer(LocalServer):
    """Serve a folder's files."""

    def __init__(self, folder: str) -> None:
        class QuietHandler(SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

        super().__init__(functools.partial(QuietHandler, directory=folder))


# --------------------------------------------------------------------------------------------------------------
# The scene set: captioned, rated, two-style procedural images.
# --------------------------------------------------------------------------------------------------------------

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 50),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
}
SCENE_SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = ("small", "medium", "large")
POSITIONS = (
    "in the centre",
    "at the top left",
    "at the top right",
    "at the bottom left",
    "at the bottom right",
)
BACKGROUNDS = ("plain", "striped", "dotted", "checkered")
STYLES = ("flat", "neon")

# Shape "radius" (half its extent) as a fraction of the image side, before the +-6 % per-image jitter.
_RADIUS_FRACTION = {"small": 0.13, "medium": 0.19, "large": 0.26}
# Antialiasing: shapes are drawn at this many times the output side and box-filtered down.
_SUPERSAMPLE = 4
# A pixel-noise standard deviation (in 0..255 units) small enough to leave every attribute readable.
_PIXEL_NOISE_SD = 3.0
_NEON_DARK = np.array([10.0, 10.0, 18.0], dtype=np.float32)

# The rating rule's terms; see rating().
RATING_BASE = 5.0
RATING_SIZE = {"small": -1.0, "medium": 0.5, "large": 1.5}
RATING_POSITION = {"in the centre": 1.0} | {p: -0.5 for p in POSITIONS[1:]}
RATING_BACKGROUND = {"plain": 1.0, "striped": 0.0, "dotted": -0.75, "checkered": -1.5}
RATING_CONTRAST_WEIGHT = 4.0
RATING_CONTRAST_PIVOT = 0.6
RATING_NOISE_SD = 0.3


@dataclass(frozen=True)
class Scene:
    """One image's content. Every field is one of the module's named values (e.g. colour in PALETTE)."""

    shape: str  # SCENE_SHAPES
    colour: str  # PALETTE, the shape's colour
    size: str  # SIZES
    position: str  # POSITIONS, a phrase that reads after the shape: "a red star at the top left"
    background: str  # BACKGROUNDS, the background's pattern
    background_colour: str  # PALETTE, never equal to colour

    def __post_init__(self) -> None:
        for name, allowed in (
            ("shape", SCENE_SHAPES),
            ("colour", tuple(PALETTE)),
            ("size", SIZES),
            ("position", POSITIONS),
            ("background", BACKGROUNDS),
            ("background_colour", tuple(PALETTE)),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"Scene.{name}={value!r} is not one of {allowed}")
        if self.colour == self.background_colour:
            raise ValueError(
                f"Scene.colour and Scene.background_colour are both {self.colour!r}: the shape would be "
                "invisible; pick a different background_colour"
            )


def check_scene_values(sizes: Sequence[str], positions: Sequence[str]) -> None:
    """Raise ValueError unless sizes and positions are non-empty lists of the scene set's own values."""
    for name, values, allowed in (("sizes", sizes, SIZES), ("positions", positions, POSITIONS)):
        if not values or any(v not in allowed for v in values) or len(set(values)) != len(values):
            raise ValueError(f"{name}={list(values)!r}: expected distinct values out of {list(allowed)}")


def sample_scene(
    rng: np.random.Generator, sizes: Sequence[str] = SIZES, positions: Sequence[str] = POSITIONS
) -> Scene:
    """A uniformly drawn scene: every attribute uniform, background_colour uniform over the other colours.
    sizes, positions: the values drawn from (default: all of them; the demo draws one of each, see
    pipelines.run.DataSettings)."""
    colours = list(PALETTE)
    colour_index = int(rng.integers(len(colours)))
    # Uniform over the len-1 other colours, so the two colours are never equal.
    background_index = (colour_index + 1 + int(rng.integers(len(colours) - 1))) % len(colours)
    return Scene(
        shape=SCENE_SHAPES[int(rng.integers(len(SCENE_SHAPES)))],
        colour=colours[colour_index],
        size=sizes[int(rng.integers(len(sizes)))],
        position=positions[int(rng.integers(len(positions)))],
        background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        background_colour=colours[background_index],
    )


def caption(scene: Scene) -> str:
    """The scene in one English phrase naming every attribute, e.g.
    "a small red triangle at the top left on a striped green background"."""
    return (
        f"a {scene.size} {scene.colour} {scene.shape} {scene.position} "
        f"on a {scene.background} {scene.background_colour} background"
    )


_CAPTION_RE = re.compile(
    rf"^a ({'|'.join(SIZES)}) ({'|'.join(PALETTE)}) ({'|'.join(SCENE_SHAPES)}) ({'|'.join(POSITIONS)}) "
    rf"on a ({'|'.join(BACKGROUNDS)}) ({'|'.join(PALETTE)}) background$"
)
SCENE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SCENE_SHAPES,
    "colour": tuple(PALETTE),
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
    "background_colour": tuple(PALETTE),
}

# How a horizontal mirror changes a scene's attributes (every shape here is mirror-symmetric).
SCENE_HFLIP: dict[str, dict[str, str]] = {
    "position": {p: p.replace("left", "@").replace("right", "left").replace("@", "right") for p in POSITIONS}
}


def parse_caption(text: str) -> Scene | None:
    """The scene a caption() names (the inverse of caption), or None for text of another form."""
    m = _CAPTION_RE.match(text.strip().lower())
    if m is None or m.group(2) == m.group(6):
        return None
    size, colour, shape, position, background, background_colour = m.groups()
    return Scene(shape, colour, size, position, background, background_colour)


@dataclass(frozen=True)
class _Layout:
    """Where one image's shape and pattern fall, in output pixels (y grows downwards)."""

    cx: float
    cy: float
    radius: float
    angle: float  # radians, the shape's rotation
    phase: tuple[float, float]  # the pattern's offset, in pattern periods


def _layout(scene: Scene, size: int, rng: np.random.Generator) -> _Layout:
    radius_fraction = _RADIUS_FRACTION[scene.size] * rng.uniform(0.94, 1.06)
    if scene.position == "in the centre":
        fx, fy = 0.5 + rng.uniform(-0.03, 0.03, size=2)
    else:
        # 1.15 x radius bounds every shape's extent at any rotation used here, so corners never cut a shape.
        inset = 1.15 * radius_fraction + 0.03 + rng.uniform(0.0, 0.04, size=2)
        fx = inset[0] if scene.position.endswith("left") else 1.0 - inset[0]
        fy = inset[1] if "top" in scene.position else 1.0 - inset[1]
    angle = rng.uniform(-0.2, 0.2)  # about +-11 degrees: a square stays a square, not a diamond
    phase = rng.uniform(0.0, 1.0, size=2)
    return _Layout(
        cx=float(fx * size),
        cy=float(fy * size),
        radius=float(radius_fraction * size),
        angle=float(angle),
        phase=(float(phase[0]), float(phase[1])),
    )


def _outline(shape: str, layout: _Layout) -> np.ndarray:
    """The shape's closed outline, [K, 2] float (x, y) output pixels."""
    r = layout.radius
    if shape == "circle":
        t = np.linspace(0.0, 2.0 * np.pi, 72, endpoint=False)
        points = 0.92 * r * np.stack([np.cos(t), np.sin(t)], axis=1)
    elif shape == "square":
        h = 0.85 * r
        points = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    elif shape == "triangle":
        big = (
            1.15 * r
        )  # a triangle covers less than its circumcircle: enlarge it to look as large as the rest
        t = np.deg2rad([-90.0, 30.0, 150.0])
        # Shift down by a quarter so the bounding box (apex -R .. base +R/2) is centred on the position.
        points = big * np.stack([np.cos(t), np.sin(t) + 0.25], axis=1)
    elif shape == "star":
        t = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radii = 1.05 * r * np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        points = np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)
    elif shape == "cross":
        a, w = 0.95 * r, 0.3 * r
        points = np.array(
            [
                [-w, -a],
                [w, -a],
                [w, -w],
                [a, -w],
                [a, w],
                [w, w],
                [w, a],
                [-w, a],
                [-w, w],
                [-a, w],
                [-a, -w],
                [-w, -w],
            ]
        )
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SCENE_SHAPES}")
    c, s = math.cos(layout.angle), math.sin(layout.angle)
    rotated = points @ np.array([[c, s], [-s, c]])
    return rotated + np.array([layout.cx, layout.cy])


def _coverage(points: np.ndarray, size: int, line_width: float | None = None) -> np.ndarray:
    """Antialiased coverage [size, size] float32 in [0, 1] of the filled outline, or of its stroke if line_width
    (output pixels) is given."""
    big = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    xy = [(float(x) * _SUPERSAMPLE, float(y) * _SUPERSAMPLE) for x, y in points]
    if line_width is None:
        draw.polygon(xy, fill=255)
    else:
        # Two extra points so the closing corner gets a rounded joint like the others.
        draw.line(xy + xy[:2], fill=255, width=max(1, round(line_width * _SUPERSAMPLE)), joint="curve")
    return np.asarray(big.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _pattern(background: str, size: int, phase: tuple[float, float], thin: bool) -> np.ndarray:
    """Where the background pattern's ink falls, [size, size] float32 in [0, 1]. thin=True gives the neon
    style's line-art version (hairline stripes, small dots); checkers are whole cells either way."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if background == "plain":
        return np.zeros((size, size), dtype=np.float32)
    if background == "striped":
        period = size / 8.0
        u = (xx + yy) / (math.sqrt(2.0) * period) + phase[0]
        distance = np.abs(u - np.floor(u) - 0.5) * period  # pixels from the stripe's middle line
        half_width = 0.75 if thin else period / 4.0
        return np.clip(half_width - distance + 0.5, 0.0, 1.0)
    if background == "dotted":
        # Staggered rows (polka dots), so that downscaled dots never line up into a checkerboard.
        period = size / 5.0
        fy = yy / period + phase[1]
        fx = xx / period + phase[0] + 0.5 * (np.floor(fy) % 2)
        distance = np.hypot(fx - np.floor(fx) - 0.5, fy - np.floor(fy) - 0.5) * period
        dot_radius = period * (0.15 if thin else 0.25)
        return np.clip(dot_radius - distance + 0.5, 0.0, 1.0)
    if background == "checkered":
        cell = max(2, round(size / 8.0))
        # Whole-pixel offsets keep the checker edges crisp.
        ox, oy = int(phase[0] * 2 * cell), int(phase[1] * 2 * cell)
        ix = ((xx - 0.5 + ox) // cell).astype(np.int64)
        iy = ((yy - 0.5 + oy) // cell).astype(np.int64)
        # Whole inked cells are far brighter than lines: tone them down in the line-art (neon) version.
        return ((ix + iy) % 2).astype(np.float32) * (0.6 if thin else 1.0)
    raise ValueError(f"unknown background {background!r}; expected one of {BACKGROUNDS}")


def _pattern_ink(background: np.ndarray) -> np.ndarray:
    """The flat style's second pattern colour: a pale tint of the background colour, or for a light one
    (yellow) a darker shade, since a pale tint of yellow is too close to yellow to see."""
    luminance = float(background @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)) / 255.0
    return background * 0.7 if luminance > 0.7 else background + 0.5 * (255.0 - background)


def shape_mask(scene: Scene, size: int = 64, seed: int = 0) -> np.ndarray:
    """The pixels render(scene, size, seed=seed) covers with the filled shape, [size, size] bool (same jitter)."""
    layout = _layout(scene, size, np.random.default_rng(seed))
    return _coverage(_outline(scene.shape, layout), size) >= 0.5


def render(scene: Scene, size: int = 64, style: str = "flat", seed: int = 0) -> np.ndarray:
    """One image of the scene, [size, size, 3] uint8 RGB.

    seed (int >= 0) draws the per-image jitter: the exact position (+-3 % of the side around the named spot,
    corners inset so the shape is never cut off), radius (+-6 %), rotation (+-11 degrees), pattern offset and
    pixel noise (sd 3). The jitter depends on seed only, not on style, so one seed draws the same layout in
    both styles.

    style="flat": a solid shape in its colour over a crisp pattern of the background colour and a pale tint of
    it (a darker shade for yellow). style="neon": a dark background washed with the background colour
    (brighter towards the middle), its pattern as dim lines/dots/cells in the background colour, and the shape
    as a thick glowing outline in its colour (hollow inside).
    """
    if style not in STYLES:
        raise ValueError(f"style={style!r}: expected one of {STYLES}")
    if size < 16:
        raise ValueError(f"size={size}: images under 16 px cannot show the patterns; use size >= 16")
    rng = np.random.default_rng(seed)
    layout = _layout(scene, size, rng)
    points = _outline(scene.shape, layout)
    colour = np.array(PALETTE[scene.colour], dtype=np.float32)
    background = np.array(PALETTE[scene.background_colour], dtype=np.float32)
    ink = _pattern(scene.background, size, layout.phase, thin=style == "neon")[..., None]
    if style == "flat":
        image = background * (1.0 - ink) + _pattern_ink(background) * ink
        cover = _coverage(points, size)[..., None]
        image = image * (1.0 - cover) + colour * cover
    else:
        # A soft wash of the background colour, brightest in the middle, so its hue reads even when plain.
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        wash = 0.32 - 0.18 * ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (size**2 / 2)
        base = _NEON_DARK + wash[..., None] * background
        lines = _NEON_DARK + 0.65 * background
        image = base * (1.0 - ink) + lines * ink
        stroke_width = max(size / 32.0, 0.16 * layout.radius)
        stroke = _coverage(points, size, line_width=stroke_width)
        glow_radius = max(1.5, 0.22 * layout.radius)
        blurred = Image.fromarray((stroke * 255.0).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(glow_radius)
        )
        glow = np.clip(np.asarray(blurred, dtype=np.float32) / 255.0 * 1.8, 0.0, 1.0)[..., None] * 0.8
        image = image * (1.0 - glow) + colour * glow
        core = colour + 0.35 * (255.0 - colour)  # a tube's bright core, still clearly its colour
        image = image * (1.0 - stroke[..., None]) + core * stroke[..., None]
    image = image + rng.normal(0.0, _PIXEL_NOISE_SD, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def contrast(colour_a: str, colour_b: str) -> float:
    """Colour contrast in (0, 1]: the Euclidean distance between the two PALETTE RGB triples divided by the
    largest such distance in the palette (yellow vs blue = 1.0). E.g. orange/yellow 0.28, red/orange 0.35,
    blue/purple 0.36, red/green 0.75, orange/blue 0.96."""
    return _colour_distance(colour_a, colour_b) / _max_colour_distance()


def _colour_distance(colour_a: str, colour_b: str) -> float:
    return float(np.linalg.norm(np.subtract(PALETTE[colour_a], PALETTE[colour_b], dtype=np.float64)))


@functools.cache
def _max_colour_distance() -> float:
    return max(_colour_distance(a, b) for a in PALETTE for b in PALETTE)


def expected_rating(scene: Scene) -> float:
    """rating() without its noise: the unclipped sum of the rule's terms (see rating)."""
    return (
        RATING_BASE
        + RATING_SIZE[scene.size]
        + RATING_POSITION[scene.position]
        + RATING_BACKGROUND[scene.background]
        + RATING_CONTRAST_WEIGHT * (contrast(scene.colour, scene.background_colour) - RATING_CONTRAST_PIVOT)
    )


def rating(scene: Scene, seed: int) -> float:
    """The image's "aesthetic rating" in [1, 10]: a fixed rule over what the image shows, plus a little noise.

    rating = clip(5
                  + size:        small -1.0, medium +0.5, large +1.5
                  + position:    in the centre +1.0, any corner -0.5
                  + background:  plain +1.0, striped 0.0, dotted -0.75, checkered -1.5  (busier is worse)
                  + contrast:    4.0 * (contrast(colour, background_colour) - 0.6)
                  + noise:       Normal(0, 0.3) drawn from seed,
                  1, 10)

    contrast() is the RGB distance between the two palette colours over the palette's largest (yellow/blue),
    so the contrast term runs from -1.3 (orange on yellow) to +1.6 (yellow on blue). The noise-free part
    (expected_rating) therefore spans about 0.7 .. 10.1 before clipping; over uniformly sampled scenes the
    ratings have mean ~5.1, sd ~1.7 and 5th..95th percentiles ~2.2 .. 7.9, with both clip ends reached.
    The rule is the same for both styles: style does not change the rating.
    seed is an int >= 0 (write_dataset passes each image's render seed).
    """
    noise = np.random.default_rng([seed, 0x5EED]).normal(0.0, RATING_NOISE_SD)
    return float(np.clip(expected_rating(scene) + noise, 1.0, 10.0))


DATASET_COLUMNS = (
    "file",
    "caption",
    "rating",
    "shape",
    "colour",
    "size",
    "position",
    "background",
    "background_colour",
    "style",
)


def dataset_scene(
    seed: int, index: int, sizes: Sequence[str] = SIZES, positions: Sequence[str] = POSITIONS
) -> tuple[Scene, int]:
    """Image `index` of write_dataset(seed=seed): its scene and its render/rating seed (style-independent)."""
    scene_stream, render_stream = np.random.SeedSequence([seed, index]).spawn(2)
    scene = sample_scene(np.random.default_rng(scene_stream), sizes, positions)
    return scene, int(render_stream.generate_state(1)[0])


def write_dataset(
    folder: str,
    num_images: int,
    style: str = "flat",
    seed: int = 0,
    size: int = 64,
    sizes: Sequence[str] = SIZES,
    positions: Sequence[str] = POSITIONS,
) -> pd.DataFrame:
    """Write num_images JPEGs (quality 90) {style}_{i:06d}.jpg into folder and {style}_captions.parquet next
    to them; returns that frame, one row per image with DATASET_COLUMNS.

    Image i is a function of (seed, i, style, sizes, positions) only, and its scene (so its caption and rating)
    of (seed, i, sizes, positions) only: the same seed in another style draws the same scenes, with the same
    layout, in that style. sizes and positions: the values scenes are drawn from (sample_scene). Files already
    present are not rewritten, so a rerun (or a larger num_images) only adds what is missing; a rerun whose
    scenes differ from the folder's parquet (another seed, sizes or positions) is refused. Every file goes to a
    temporary name first and is renamed into place.
    """
    if style not in STYLES:
        raise ValueError(f"style={style!r}: expected one of {STYLES}")
    if num_images < 0:
        raise ValueError(f"num_images={num_images}: expected >= 0")
    if seed < 0:
        raise ValueError(f"seed={seed}: expected an int >= 0")
    check_scene_values(sizes, positions)
    os.makedirs(folder, exist_ok=True)
    parquet_path = os.path.join(folder, f"{style}_captions.parquet")
    drawn = [dataset_scene(seed, i, sizes, positions) for i in range(num_images)]
    rows = [
        {
            "file": f"{style}_{i:06d}.jpg",
            "caption": caption(scene),
            "rating": rating(scene, image_seed),
            "style": style,
        }
        | dataclasses.asdict(scene)
        for i, (scene, image_seed) in enumerate(drawn)
    ]
    frame = pd.DataFrame(rows, columns=list(DATASET_COLUMNS))
    # Checked before anything is written, so a refused rerun leaves the folder's images as they are.
    if os.path.exists(parquet_path):
        before = pd.read_parquet(parquet_path, columns=["file", "caption"])
        common = min(len(before), len(frame))
        changed = np.flatnonzero(
            before["caption"].to_numpy()[:common] != frame["caption"].to_numpy()[:common]
        )
        if len(changed):
            first = changed[0]
            raise ValueError(
                f"{parquet_path}: image {before['file'].iloc[first]} was drawn as {before['caption'].iloc[first]!r}, "
                f"these settings draw {frame['caption'].iloc[first]!r}; write into a new folder (or delete this "
                "one) to change seed, sizes or positions"
            )
    for row, (scene, image_seed) in zip(rows, drawn, strict=True):
        path = os.path.join(folder, row["file"])
        if not os.path.exists(path):
            write_atomic(
                path, image_bytes(render(scene, size, style, seed=image_seed), format="JPEG", quality=90)
            )
    write_atomic(parquet_path, parquet_bytes(frame))
    return frame
