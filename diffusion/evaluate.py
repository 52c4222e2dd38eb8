"""The evaluation stage: trained generators + a database with held-out parts -> evaluation.json, a table of
sample quality per generator, and a grid of their samples.

The prompts are the captions of the held-out parts' images (images no generator trained on; training takes
exclude_parts), and those images are the real reference. For each generator, one sample per prompt with fixed
seeds, its neighbours retrieved from the database with the held-out images excluded (a kNN model must not
see the very image whose caption it draws). Then, streamed batch by batch through torchmetrics objects
(diffusion.metrics):

- attribute accuracy, when the captions follow a known vocabulary (AttributeSpec): a classifier fitted on the
  database's other images (diffusion.attributes), its held-out accuracy on real images reported beside it;
- Fréchet distance and KID against the held-out real images, in the feature space of an evaluation CLIP's
  image tower (and real Inception FID when a weights file is given);
- CLIP score of prompt and sample under the evaluation CLIP (ideally not the one that conditions the
  generator, so it is not graded by its own encoder);
- seconds per image of the sampler.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from retrieval.storage import json_bytes, write_atomic

# what conditions the generators in evaluate: the captions' text embeddings or their images' own embeddings
QUERIES = ("text", "image")

Parse = Callable[[str], dict[str, str] | None]


@dataclasses.dataclass
class AttributeSpec:
    """A caption vocabulary: attribute -> values, a parser from a caption to {attribute: value} (None when the
    caption is not of that form), and how a horizontal mirror changes values (classifier augmentation)."""

    vocabulary: dict[str, tuple[str, ...]]
    parse: Parse
    hflip: dict[str, dict[str, str]] | None = None


@dataclasses.dataclass
class EvaluateConfig:
    """checkpoints: {name: run folder or state.pt}, e.g. {"knn": "runs/a", "no-knn": "runs/b"}.
    database: the database folder the generators were trained on (its CLIP conditions them).
    heldout_parts: its parts (e.g. ["00011"]) that no generator trained on: prompts and real reference.
    output: folder for evaluation.json, samples_<name>.png and the classifier.
    classifier: an attribute classifier (.pt from diffusion.attributes); fitted here (and saved there) when
    missing and an AttributeSpec is given. eval_clip_model: the CLIP for features and CLIP score (clip-retrieval
    name; default: the database's own). inception_weights: a local Inception-v3 weights file for real FID.
    num_prompts: at most this many held-out captions. sampler, steps, guidance, seed: as `sample`; truncation:
    the discrete backbone's r (diffusion.discrete.truncate; None: discrete.TRUNCATION; 1: none). query: what
    conditions the generators and retrieves the neighbours, "text" (the captions' text embeddings, as at
    inference) or "image" (the held-out images' own image embeddings, as in training): the two rows' difference
    is what the text-image gap costs a generator.
    """

    checkpoints: dict[str, str]
    database: str
    heldout_parts: list[str]
    output: str
    classifier: str | None = None
    eval_clip_model: str | None = None
    inception_weights: str | None = None
    num_prompts: int = 250
    sampler: str = "dpmpp_2m_sde"
    steps: int = 20
    guidance: float = 3.0
    seed: int = 0
    batch_size: int = 64
    truncation: float | None = None
    classifier_epochs: int = 16
    query: str = "text"

    def __post_init__(self) -> None:
        from diffusion.discrete import truncation_or_default
        from diffusion.samplers import SAMPLERS

        if not self.checkpoints:
            raise ValueError("evaluate needs at least one checkpoint (--checkpoint NAME=RUN)")
        if not self.heldout_parts:
            raise ValueError(
                "evaluate needs held-out parts (--heldout-parts), images no generator trained on"
            )
        if self.query not in QUERIES:
            raise ValueError(f"--query must be one of {QUERIES}, got {self.query!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        truncation_or_default(self.truncation)  # refused here, before anything loads
        if self.num_prompts < 2:
            raise ValueError(
                f"--num-prompts must be >= 2 (Fréchet distance needs two samples), got {self.num_prompts}"
            )


def part_images(db: Any, parts: list[str], image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(image ids [N], images [N, S, S, 3] uint8 as training decodes them, captions) of a database's parts."""
    from diffusion.data import decode_image

    unknown = sorted(set(parts) - set(db.part_names))
    if unknown:
        raise ValueError(f"parts {unknown} are not in the database {db.path} (its parts: {db.part_names})")
    ids = np.concatenate([db.ids[db.part_rows(i)] for i, p in enumerate(db.part_names) if p in parts])
    found = db.images(ids)
    missing = [int(i) for i in ids if int(i) not in found]
    if missing:
        raise FileNotFoundError(f"the shards of {db.path} lack images {missing[:5]}; re-run download/embed")
    images = np.stack([decode_image(found[int(i)], image_size) for i in ids])
    captions = [str(c) for c in db.metadata(ids)["caption"]]
    return ids, images, captions


def labels_of(captions: list[str], spec: AttributeSpec) -> dict[str, np.ndarray]:
    """{attribute: value index [N]} of parsed captions; -1 where a caption does not name the attribute."""
    out = {a: np.full(len(captions), -1, np.int64) for a in spec.vocabulary}
    for i, text in enumerate(captions):
        parsed = spec.parse(text) or {}
        for a, values in spec.vocabulary.items():
            if parsed.get(a) in values:
                out[a][i] = values.index(parsed[a])
    return out


def varying_attributes(spec: AttributeSpec, captions: list[str]) -> AttributeSpec | None:
    """spec without the attributes that take one value in these (the reference's) captions: a classifier cannot
    learn them and a sample cannot miss them, so they would only pad "all". None when no attribute varies."""
    labels = labels_of(captions, spec)
    keep = {a: v for a, v in spec.vocabulary.items() if len(np.unique(labels[a][labels[a] >= 0])) > 1}
    dropped = [a for a in spec.vocabulary if a not in keep]
    if dropped:
        print(
            f"evaluate: {', '.join(dropped)} take one value in the held-out images and are not scored",
            flush=True,
        )
    return dataclasses.replace(spec, vocabulary=keep) if keep else None


def ensure_classifier(
    config: EvaluateConfig,
    db: Any,
    spec: AttributeSpec,
    image_size: int,
    heldout: tuple[np.ndarray, list[str]],
) -> tuple[Any, dict[str, Any]]:
    """The attribute classifier at config.classifier (or <output>/classifier.pt), fitted on the database's
    non-held-out images when it is not there yet."""
    from diffusion.attributes import fit_classifier, load_classifier, save_classifier

    path = config.classifier or os.path.join(config.output, "classifier.pt")
    if not os.path.exists(path + ".json"):
        train_parts = [p for p in db.part_names if p not in config.heldout_parts]
        _, images, captions = part_images(db, train_parts, image_size)
        labels = labels_of(captions, spec)
        keep = np.all([v >= 0 for v in labels.values()], axis=0)
        if keep.sum() < 10:
            raise ValueError(
                f"only {int(keep.sum())} captions of {db.path} follow the attribute vocabulary; the classifier "
                "cannot be fitted (leave the attribute vocabulary out for data without one)"
            )
        held_images, held_captions = heldout
        held_labels = labels_of(held_captions, spec)
        held_keep = np.all([v >= 0 for v in held_labels.values()], axis=0)
        fit = fit_classifier(
            spec.vocabulary,
            images[keep],
            {a: v[keep] for a, v in labels.items()},
            held_images[held_keep],
            {a: v[held_keep] for a, v in held_labels.items()},
            epochs=config.classifier_epochs,
            hflip=spec.hflip,
        )
        save_classifier(fit, path)
        print(
            f"evaluate: attribute classifier fitted on {fit.num_train} images in {fit.seconds:.0f}s, held-out "
            "accuracy " + ", ".join(f"{a} {v:.3f}" for a, v in fit.heldout_accuracy.items()),
            flush=True,
        )
    return load_classifier(path)


def _load_checkpoints(config: EvaluateConfig) -> tuple[dict[str, Any], int]:
    """{name: (model, config, step)} and their common image size; refuses one trained on the held-out parts."""
    from diffusion.sample import default_device, load_model

    models = {}
    for name, path in config.checkpoints.items():
        model, cfg, step = load_model(path)
        models[name] = (model.to(default_device()), cfg, step)
    sizes = {cfg.model.image_size for _, cfg, _ in models.values()}
    if len(sizes) != 1:
        raise ValueError(
            f"the checkpoints generate different image sizes {sorted(sizes)}; evaluate them apart"
        )
    for name, (_, cfg, _) in models.items():
        overlap = sorted(set(config.heldout_parts) - set(cfg.exclude_parts))
        if overlap:
            raise ValueError(
                f"checkpoint {name} trained on the held-out parts {overlap}; train with exclude_parts {overlap}"
            )
    return models, sizes.pop()


def _score_generator(
    config: EvaluateConfig, name: str, loaded: tuple[Any, Any, int], ctx: dict[str, Any]
) -> tuple[dict[str, Any], np.ndarray]:
    """One generator's row of the table (and its images): it samples the prompts, then every metric reads them."""
    from tqdm import tqdm

    from diffusion.metrics import AttributeAccuracy, ClipScore
    from diffusion.sample import generate, retrieval_condition

    model, cfg, step = loaded
    for metric in ctx["distances"]:
        metric.reset()  # the real images' features stay (reset_real_features=False); the samples' go
    clip_score = ClipScore(ctx["encoder"])
    accuracy = AttributeAccuracy(ctx["classifier"]) if ctx["classifier"] is not None else None
    cond, found = retrieval_condition(ctx["db"], ctx["query"], cfg, exclude_ids=ctx["heldout_ids"])
    tic = time.time()
    images = generate(
        model,
        cfg,
        cond,
        config.sampler,
        config.steps,
        config.guidance,
        config.seed,
        truncation=config.truncation,
    )
    seconds = time.time() - tic
    prompts, targets, n = ctx["prompts"], ctx["targets"], config.batch_size
    for lo in tqdm(range(0, len(images), n), desc=f"evaluate {name}", unit="batch", leave=False):
        batch = torch.from_numpy(images[lo : lo + n]).permute(0, 3, 1, 2)
        for metric in ctx["distances"]:
            metric.update(batch, real=False)
        clip_score.update(batch, prompts[lo : lo + n])
        if accuracy is not None:
            accuracy.update(batch, {a: v[lo : lo + n] for a, v in targets.items()})
    kid_mean, kid_std = ctx["kid"].compute()
    row: dict[str, Any] = {
        "checkpoint": config.checkpoints[name],
        "step": step,
        "use_knn": cfg.model.use_knn,
        "k": cfg.model.k if cfg.model.use_knn else 0,
        "frechet_distance": float(ctx["fd"].compute()),
        "kid": float(kid_mean),
        "kid_std": float(kid_std),
        "clip_score": float(clip_score.compute()),
        "seconds_per_image": seconds / len(images),
    }
    if ctx["inception"] is not None:
        row["inception_fid"] = float(ctx["inception"].compute())
    if accuracy is not None:
        row["attribute_accuracy"] = {a: float(v) for a, v in accuracy.compute().items()}
        if found is not None:
            row["neighbour_agreement"] = neighbour_agreement(ctx["db"], found.ids, targets, ctx["attributes"])
    return row, images


def neighbour_agreement(
    db: Any, ids: np.ndarray, targets: dict[str, torch.Tensor], spec: AttributeSpec
) -> dict[str, float]:
    """{attribute: share of the retrieved neighbours [P, k] whose caption names the prompt's value}, and "all"
    for those naming every one: how much the neighbours can tell a kNN model about the prompt. A missing
    neighbour (id -1) or a caption that does not name the attribute counts as a miss."""
    valid = ids >= 0
    labels = labels_of(db.metadata(ids[valid])["caption"].tolist(), spec)
    every = np.ones(int(valid.sum()), bool)
    out = {}
    for a, target in targets.items():
        hit = labels[a] == np.broadcast_to(target.numpy()[:, None], ids.shape)[valid]
        out[a] = float(hit.sum() / ids.size)
        every &= hit
    out["all"] = float(every.sum() / ids.size)
    return out


def evaluate(config: EvaluateConfig, attributes: AttributeSpec | None = None) -> dict[str, Any]:
    """Score every checkpoint (see the module docstring); writes <output>/evaluation.json and returns it."""
    from diffusion.metrics import ClipScore, ImageFeatures, frechet_distance, inception_fid, kernel_distance
    from diffusion.sample import grid, save_png
    from retrieval.clip_model import cached_encoder
    from retrieval.database import Database

    start = time.time()
    os.makedirs(config.output, exist_ok=True)
    models, image_size = _load_checkpoints(config)
    db = Database.open(config.database)
    heldout_ids, real, captions = part_images(db, config.heldout_parts, image_size)
    rng = np.random.default_rng(config.seed)
    chosen = np.sort(rng.permutation(len(captions))[: config.num_prompts])
    prompts = [captions[i] for i in chosen]
    eval_clip = config.eval_clip_model or db.info.clip_model
    encoder = cached_encoder(eval_clip)
    features = ImageFeatures(encoder)
    classifier, classifier_meta, targets = None, None, None
    if attributes is not None:
        attributes = varying_attributes(attributes, captions)
    if attributes is not None:
        classifier, classifier_meta = ensure_classifier(config, db, attributes, image_size, (real, captions))
        targets = {a: torch.from_numpy(v) for a, v in labels_of(prompts, attributes).items()}
    real_t = torch.from_numpy(real).permute(0, 3, 1, 2)
    fd = frechet_distance(features)
    kid = kernel_distance(features, subset_size=min(100, len(prompts), len(real)))
    inception = inception_fid(config.inception_weights) if config.inception_weights else None
    distances = [m for m in (fd, kid, inception) if m is not None]
    for lo in range(0, len(real_t), config.batch_size):  # the real images' features, once for all generators
        for metric in distances:
            metric.update(real_t[lo : lo + config.batch_size], real=True)
    text_emb, image_emb = db_encoder_texts(db, prompts), db.embeddings(heldout_ids[chosen])
    query = image_emb if config.query == "image" else text_emb
    ctx = {
        "db": db,
        "query": query,
        "heldout_ids": heldout_ids,
        "prompts": prompts,
        "encoder": encoder,
        "classifier": classifier,
        "targets": targets,
        "attributes": attributes,
        "fd": fd,
        "kid": kid,
        "inception": inception,
        "distances": distances,
    }
    results: dict[str, Any] = {}
    for name, loaded in models.items():
        results[name], images = _score_generator(config, name, loaded, ctx)
        save_png(grid(list(images[:48]), cols=12), os.path.join(config.output, f"samples_{name}.png"))
    real_clip = ClipScore(encoder)
    for lo in range(0, len(real_t), config.batch_size):
        real_clip.update(real_t[lo : lo + config.batch_size], captions[lo : lo + config.batch_size])
    record = {
        "database": config.database,
        "heldout_parts": config.heldout_parts,
        "num_prompts": len(prompts),
        "num_real": len(real),
        "eval_clip_model": eval_clip,
        "conditioning_clip_model": db.info.clip_model,
        "sampler": config.sampler,
        "steps": config.steps,
        "guidance": config.guidance,
        "seed": config.seed,
        "query": config.query,
        "truncation": config.truncation,  # the discrete backbone's (None: diffusion.discrete.TRUNCATION)
        "real_clip_score": float(real_clip.compute()),
        "text_image_cosine": text_image_cosine(text_emb, image_emb),
        "classifier": classifier_meta,
        "models": results,
        "seconds": time.time() - start,
    }
    write_atomic(os.path.join(config.output, "evaluation.json"), json_bytes(record))
    for line in format_table(record).splitlines():
        print(f"evaluate: {line}", flush=True)
    return record


def text_image_cosine(texts: np.ndarray, images: np.ndarray) -> float:
    """Mean cosine of each prompt's text embedding [N, D] to its own image's embedding [N, D] (the conditioning
    CLIP's): how close inference-time queries are to the image embeddings a generator trained on. Near 1, a
    no-kNN model reads a text query as it read images in training, which is the gap KNN-Diffusion's neighbours
    bridge (Sheynin et al. 2023; matched pairs in OpenAI's CLIP score about 0.3, Hessel et al. 2021)."""
    from retrieval.database import normalize

    return float((normalize(texts) * normalize(images)).sum(axis=1).mean())


def db_encoder_texts(db: Any, texts: list[str]) -> np.ndarray:
    """[N, D] text embeddings of the database's own CLIP (what conditions the generators)."""
    from retrieval.clip_model import cached_encoder

    return cached_encoder(db.info.clip_model).encode_texts(texts).numpy()


def format_table(record: dict[str, Any]) -> str:
    """The evaluation as a plain-text table, one row per model."""
    attrs: list[str] = []
    for row in record["models"].values():
        for a in row.get("attribute_accuracy", {}):
            if a not in attrs:
                attrs.append(a)
    head = ["model", "k", *attrs, "FD", "KID", "CLIPscore", "s/img"]
    lines = [" | ".join(head)]
    for name, row in record["models"].items():
        acc = row.get("attribute_accuracy", {})
        cells = [name, str(row["k"]), *(f"{acc[a]:.2f}" if a in acc else "-" for a in attrs)]
        cells += [f"{row['frechet_distance']:.4f}", f"{row['kid']:.4f}", f"{row['clip_score']:.1f}"]
        cells.append(f"{row['seconds_per_image']:.3f}")
        lines.append(" | ".join(cells))
    for name, row in record["models"].items():
        agree = row.get("neighbour_agreement")
        if agree:
            lines.append(
                f"{name}'s {row['k']} neighbours name the prompt's "
                + ", ".join(f"{a} {v:.2f}" for a, v in agree.items())
            )
    classifier = record.get("classifier")
    if classifier:
        acc = classifier["heldout_accuracy"]
        lines.append(
            "classifier on real held-out images: " + ", ".join(f"{a} {v:.3f}" for a, v in acc.items())
        )
    lines.append(f"real images' CLIP score: {record['real_clip_score']:.1f} ({record['eval_clip_model']})")
    if record.get("query") == "image":
        lines.append(
            "conditioned on the held-out images' own image embeddings (query image), not their captions'"
        )
    if "text_image_cosine" in record:
        lines.append(
            f"a prompt's text embedding has cosine {record['text_image_cosine']:.3f} to its image's (mean; the "
            "closer to 1, the less a no-kNN model trained on image embeddings loses to the text-image gap)"
        )
    return "\n".join(lines)
