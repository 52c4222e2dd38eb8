"""The evaluation's metrics on inputs whose answers are known: closed-form Fréchet distances of Gaussians, a set
against itself, CLIP score against a brute-force cosine, attribute accuracy counted by hand, and the attribute
classifier learning a vocabulary it can see."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from diffusion.metrics import AttributeAccuracy, ClipScore, ImageFeatures, frechet_distance, kernel_distance


class PixelFeatures(nn.Module):
    """The 12 values of a [B, 3, 2, 2] uint8 image as its features (so the features are what we draw)."""

    num_features = 12

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.double().flatten(1)


class ScaledPixelFeatures(PixelFeatures):
    """The same, centred and scaled to about unit variance (KID's cubic kernel is scale-sensitive)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.double().flatten(1) - 120) / 15


def gaussian_images(n: int, mean: float, sd: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (mean + sd * torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64)).round().clamp(0, 255)
    return x.to(torch.uint8)


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    # N(m1, s1^2 I) vs N(m2, s2^2 I) in D dims: FD = D (m1 - m2)^2 + D (s1 - s2)^2 (rounding adds 1/12 to both)
    d, n = 12, 20_000
    fd = frechet_distance(PixelFeatures())
    fd.update(gaussian_images(n, 100, 10, seed=0), real=True)
    fd.update(gaussian_images(n, 110, 20, seed=1), real=False)
    s1, s2 = np.sqrt(100 + 1 / 12), np.sqrt(400 + 1 / 12)
    expected = d * 10**2 + d * (s1 - s2) ** 2
    assert float(fd.compute()) == pytest.approx(expected, rel=0.03)


def test_a_set_against_itself_scores_zero_and_a_shift_does_not():
    images = gaussian_images(4000, 120, 15, seed=2)
    fd = frechet_distance(PixelFeatures())
    kid = kernel_distance(ScaledPixelFeatures(), subset_size=500)
    for metric in (fd, kid):
        metric.update(images, real=True)
        metric.update(images, real=False)
    assert abs(float(fd.compute())) < 1e-3
    kid_mean, _ = kid.compute()
    assert abs(float(kid_mean)) < 0.05  # random subsets of the same set: zero up to sampling noise
    far = kernel_distance(ScaledPixelFeatures(), subset_size=500)
    far.update(images, real=True)
    far.update(gaussian_images(4000, 150, 15, seed=4), real=False)  # two sd away in each of 12 features
    assert float(far.compute()[0]) > 100 * max(abs(float(kid_mean)), 1e-3)
    shifted = frechet_distance(PixelFeatures())
    shifted.update(images, real=True)
    shifted.update(gaussian_images(4000, 125, 15, seed=3), real=False)
    assert float(shifted.compute()) == pytest.approx(12 * 25, rel=0.1)


@pytest.fixture(scope="module")
def encoder(tiny_clip):
    from retrieval.clip_model import ClipEncoder

    return ClipEncoder(tiny_clip, device="cpu", precision="fp32")


def test_clip_score_is_100_times_the_clamped_cosine(encoder):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8, generator=g)
    texts = ["a red circle", "a blue square", "stripes", "dots", "a star"]
    metric = ClipScore(encoder)
    metric.update(images[:3], texts[:3])
    metric.update(images[3:], texts[3:])
    features = ImageFeatures(encoder)
    cos = (features(images) * encoder.encode_texts(texts)).sum(-1)
    assert float(metric.compute()) == pytest.approx(float((100 * cos.clamp(min=0)).mean()), abs=1e-4)
    # the feature module resizes to the encoder's input and matches its own preprocessing of that size
    assert features(images).shape == (5, encoder.dim)
    assert torch.allclose(features(images).norm(dim=-1), torch.ones(5), atol=1e-5)


class FixedClassifier(nn.Module):
    """Reads attribute values written into pixel (0, 0): channel 0 = shape index, channel 1 = colour index."""

    vocabulary = {"shape": ("circle", "square", "star"), "colour": ("red", "blue")}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "shape": nn.functional.one_hot(images[:, 0, 0, 0].long(), 3).float(),
            "colour": nn.functional.one_hot(images[:, 1, 0, 0].long(), 2).float(),
        }


def test_attribute_accuracy_counts_by_attribute_and_all():
    images = torch.zeros(4, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor([0, 1, 2, 0])  # shapes the classifier reads
    images[:, 1, 0, 0] = torch.tensor([0, 1, 1, 0])  # colours
    metric = AttributeAccuracy(FixedClassifier())
    # targets: shape right for 0, 1, 3; colour right for 0, 2, and not named (-1) for 3
    metric.update(images[:2], {"shape": torch.tensor([0, 1]), "colour": torch.tensor([0, 0])})
    metric.update(images[2:], {"shape": torch.tensor([1, 0]), "colour": torch.tensor([1, -1])})
    acc = metric.compute()
    assert float(acc["shape"]) == pytest.approx(3 / 4)
    assert float(acc["colour"]) == pytest.approx(2 / 3)  # the unnamed one is not counted
    assert float(acc["all"]) == pytest.approx(2 / 4)  # 0 (both right) and 3 (shape right, colour unnamed)


def test_attribute_classifier_learns_what_it_can_see(tmp_path):
    """Colour and left/right position of a square: learnable to near 100%, and the hflip augmentation maps
    the position labels (a wrong map would cap accuracy at chance for position)."""
    from diffusion.attributes import fit_classifier, load_classifier, save_classifier

    vocab = {"colour": ("red", "green", "blue"), "side": ("left", "right")}
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        colour, side = rng.integers(3, size=n), rng.integers(2, size=n)
        images = rng.integers(0, 40, size=(n, 16, 16, 3)).astype(np.uint8)
        for i in range(n):
            x0 = 2 if side[i] == 0 else 9
            images[i, 5:10, x0 : x0 + 5, colour[i]] = 230
        return images, {"colour": colour, "side": side}

    train_x, train_y = draw(600)
    held_x, held_y = draw(200)
    fit = fit_classifier(
        vocab,
        train_x,
        train_y,
        held_x,
        held_y,
        epochs=10,
        batch_size=32,
        hflip={"side": {"left": "right", "right": "left"}},
    )
    assert fit.heldout_accuracy["colour"] > 0.95
    assert fit.heldout_accuracy["side"] > 0.95
    save_classifier(fit, str(tmp_path / "clf.pt"))
    model, meta = load_classifier(str(tmp_path / "clf.pt"))
    assert meta["heldout_accuracy"] == fit.heldout_accuracy
    np.testing.assert_array_equal(model.predict(held_x)["side"], fit.model.predict(held_x)["side"])


def test_inception_fid_reads_a_local_weights_file_and_refuses_pickles(tmp_path, monkeypatch):
    """Real Inception FID through torchmetrics, from a weights file given by path (here a seeded random-init
    state dict of torch-fidelity's network, made without the download by stubbing it once): the metric holds
    exactly the file's weights, nothing is fetched, and a file that is not plain tensors is refused. (Random
    weights give near-constant features, so how well the distance separates sets is not checked here.)"""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    from diffusion.metrics import inception_fid

    torch.manual_seed(0)
    with monkeypatch.context() as m:  # build the architecture once without weights, to save a state dict
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        state = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    path = tmp_path / "inception.pth"
    torch.save(state, path)
    monkeypatch.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    fid = inception_fid(str(path))
    loaded = fid.inception.state_dict()
    assert set(loaded) == set(state) and all(
        torch.equal(loaded[k], state[k]) for k in state
    )  # the file's weights
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g)
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert abs(float(fid.compute())) < 1e-2
    pickle = tmp_path / "evil.pth"
    torch.save({"weights": object()}, pickle)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        inception_fid(str(pickle))
    with pytest.raises(FileNotFoundError, match="inception-weights"):
        inception_fid(str(tmp_path / "missing.pth"))


def test_evaluation_neighbours_never_include_held_out_images():
    """retrieval_condition with exclude_ids: the k nearest of the rest, in order, against brute force."""
    from diffusion.config import TrainConfig, model_config
    from diffusion.sample import retrieval_condition
    from retrieval.database import DatabaseInfo, SearchResult

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = np.arange(100, 140)

    class BruteForce:
        info = DatabaseInfo(clip_model="open_clip:test/test", dim=8)

        def __len__(self) -> int:
            return len(ids)

        def search(self, q, k, band=None):
            scores = q @ emb.T
            order = np.argsort(-scores, axis=1)[:, :k]
            return SearchResult(ids=ids[order], scores=np.take_along_axis(scores, order, 1))

        def embeddings(self, wanted):
            return emb[np.asarray(wanted) - 100]

    config = TrainConfig(db="d", neighbours="n", output="o", model=model_config("tiny", cond_dim=8, k=4))
    query = emb[:5] + 0.01  # each query's nearest image is itself
    exclude = ids[:5]
    cond, found = retrieval_condition(BruteForce(), query, config, exclude_ids=exclude)
    assert not np.isin(found.ids, exclude).any()
    scores = query @ emb.T
    scores[:, :5] = -np.inf
    np.testing.assert_array_equal(found.ids, ids[np.argsort(-scores, axis=1)[:, :4]])
    np.testing.assert_allclose(cond["neighbours"].numpy(), emb[found.ids - 100])
    assert cond["valid"].all()


def test_attributes_the_reference_never_varies_are_not_scored(capsys):
    """A one-valued attribute (the demo draws every shape large, in the centre) cannot be missed by a sample, so it
    is left out of the vocabulary and of "all"; the attributes that vary stay, with their values."""
    from diffusion.evaluate import AttributeSpec, varying_attributes
    from pipelines.run import procedural_attributes

    spec = procedural_attributes()
    captions = [
        "a large red circle in the centre on a plain blue background",
        "a large blue star in the centre on a plain blue background".replace("plain blue", "striped red"),
        "not a scene caption",
    ]
    kept = varying_attributes(spec, captions)
    assert list(kept.vocabulary) == ["shape", "colour", "background", "background_colour"]
    assert kept.vocabulary["shape"] == spec.vocabulary["shape"] and kept.parse is spec.parse
    assert "size, position take one value" in capsys.readouterr().out
    assert varying_attributes(spec, captions[:1]) is None
    assert isinstance(varying_attributes(spec, captions), AttributeSpec)


def test_neighbour_agreement_counts_captions_naming_the_prompts_values():
    """Per attribute, the share of all P x k neighbour slots whose caption names the prompt's value; "all" needs
    every attribute; a missing neighbour (-1) and an unparsable caption are misses."""
    import pandas as pd

    from diffusion.evaluate import labels_of, neighbour_agreement, varying_attributes
    from pipelines.run import procedural_attributes

    captions = {
        1: "a large red circle in the centre on a plain blue background",
        2: "a large red star in the centre on a plain blue background",
        3: "a large green circle in the centre on a striped yellow background",
        4: "something else",
    }

    class Db:
        def metadata(self, ids):
            return pd.DataFrame({"caption": [captions[int(i)] for i in ids]})

    prompts = [captions[1], captions[3]]
    spec = varying_attributes(procedural_attributes(), prompts + [captions[2]])
    targets = {a: torch.from_numpy(v) for a, v in labels_of(prompts, spec).items()}
    ids = np.array([[1, 2, 3, -1], [3, 4, 1, 2]])
    agree = neighbour_agreement(Db(), ids, targets, spec)
    # prompt 1 (red circle, plain blue): 1 all right; 2 shape wrong; 3 shape right only; -1 missing
    # prompt 2 (green circle, striped yellow): 3 all right; 4 unparsable; 1 shape right only; 2 all wrong
    assert list(agree) == ["shape", "colour", "background", "background_colour", "all"]
    assert agree["shape"] == pytest.approx(4 / 8)
    assert agree["colour"] == pytest.approx(3 / 8)
    assert agree["background"] == pytest.approx(3 / 8)
    assert agree["background_colour"] == pytest.approx(3 / 8)
    assert agree["all"] == pytest.approx(2 / 8)


def test_text_image_cosine_is_the_mean_cosine_of_matched_pairs():
    """Each text row against its own image row, whatever their norms: identical directions 1, orthogonal 0,
    opposite -1; the pairs' mean."""
    from diffusion.evaluate import text_image_cosine

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8))
    assert text_image_cosine(x, 3.0 * x) == pytest.approx(1.0)
    assert text_image_cosine(x, -x) == pytest.approx(-1.0)
    e = np.eye(8)
    assert text_image_cosine(e[:2], e[2:4]) == pytest.approx(0.0)
    texts = np.array([[1.0, 0.0], [0.0, 2.0]])
    images = np.array([[1.0, 1.0], [0.0, 5.0]])  # cosines 1/sqrt(2) and 1
    assert text_image_cosine(texts, images) == pytest.approx((2**-0.5 + 1) / 2)
