"""A finished pipeline's output folder -> <output>/report.html + <output>/report/*.png (one picture per prompt
and target, cut from the sample grids), readable offline in any browser.

Sections: the generators' evaluation (attribute accuracy, Fréchet distance, KID, CLIP score; kNN against no-kNN);
stage wall times; the encoder's held-out retrieval accuracy; samples with the retrieved neighbours
beside them; the same prompts against the second database (database swap); the same prompts across the
aesthetic bands; the aesthetic head; the generator's loss curve.
"""

from __future__ import annotations

import html
import os
import shutil
from typing import Any

import numpy as np
from PIL import Image

from retrieval.storage import image_bytes, write_atomic

PAD = 2  # diffusion.sample.grid's padding between tiles


def grid_rows(path: str, num_rows: int) -> list[np.ndarray]:
    """The rows of a sample grid (a row per prompt, tiles separated by PAD white pixels)."""
    image = np.asarray(Image.open(path).convert("RGB"))
    tile = (image.shape[0] - PAD) // num_rows - PAD
    return [
        image[PAD + r * (tile + PAD) - PAD : PAD + r * (tile + PAD) + tile + PAD] for r in range(num_rows)
    ]


def _save(array: np.ndarray, path: str) -> None:
    write_atomic(path, image_bytes(array))


def _img(src: str, alt: str, height: int = 96) -> str:
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}" style="height:{height}px">'


def _sample_cells(out: str, samples: dict[str, Any], num_prompts: int) -> dict[str, dict[str, list[str]]]:
    """Cut each target's grid.png and neighbours.png into one picture per prompt under report/:
    target -> {"grid": [src per prompt], "neighbours": [...]}."""
    cells: dict[str, dict[str, list[str]]] = {}
    for name, target in samples["targets"].items():
        cells[name] = {}
        for kind in ("grid", "neighbours"):
            path = os.path.join(target["folder"], f"{kind}.png")
            if not os.path.exists(path):
                continue
            srcs = []
            for i, row in enumerate(grid_rows(path, num_prompts)):
                src = f"report/{name}_{kind}_{i}.png"
                _save(row, os.path.join(out, src))
                srcs.append(src)
            cells[name][kind] = srcs
    return cells


def _stages_section(add: Any, timings: dict[str, dict[str, Any]]) -> None:
    add("<h2>Stages</h2><table><tr><th>stage</th><th>wall time</th><th></th></tr>")
    for stage, t in timings.items():
        note = "skipped now (finished in an earlier run)" if t["skipped"] else ""
        add(f"<tr><td>{stage}</td><td>{t['seconds']:.1f} s</td><td>{note}</td></tr>")
    total = sum(t["seconds"] for t in timings.values())
    add(f"<tr><th>total</th><th>{total:.1f} s</th><th></th></tr></table>")


def _encoder_section(add: Any, clip: dict[str, Any], accuracy: dict[str, Any], fitted: bool) -> None:
    add("<h2>Encoder: text &rarr; image retrieval on held-out captions</h2>")
    add(
        f"<p>CLIP <code>{html.escape(clip['clip_model'])}</code>, on the {accuracy['num_pairs']} (caption, image) "
        "pairs of the held-out shards"
        + (", which the CLIP fitted here never saw in training" if fitted else "")
        + ". Recall@k: the caption's own image is among the k nearest of all held-out images.</p>"
        "<table><tr><th></th>"
    )
    ks = list(accuracy["text_to_image"])
    add("".join(f"<th>R@{k}</th>" for k in ks) + "</tr>")
    for key, label in (
        ("text_to_image", "text &rarr; image"),
        ("image_to_text", "image &rarr; text"),
        ("chance", "chance"),
    ):
        if key in accuracy:
            add(f"<tr><td>{label}</td>" + "".join(f"<td>{accuracy[key][k]:.3f}</td>" for k in ks) + "</tr>")
    add("</table>")


def _sample_table(
    add: Any, cells: dict[str, dict[str, list[str]]], prompts: list[str], names: list[str], title: str,
    headers: list[str],
) -> None:  # fmt: skip
    """A row per prompt; for each target a column of samples and one of the neighbours that conditioned them."""
    add(f"<h2>{title}</h2><table><tr><th>prompt</th>")
    for head in headers:
        add(f"<th>{html.escape(head)}</th><th>{html.escape(head)}: retrieved neighbours</th>")
    add("</tr>")
    for i, prompt in enumerate(prompts):
        add(f"<tr><td class='p'>{html.escape(prompt)}</td>")
        for name in names:
            c = cells.get(name, {})
            add(f"<td>{_img(c['grid'][i], prompt) if 'grid' in c else ''}</td>")
            add(f"<td>{_img(c['neighbours'][i], 'neighbours', 48) if 'neighbours' in c else ''}</td>")
        add("</tr>")
    add("</table>")


def _band_label(b: dict[str, Any]) -> str:
    lo = "-inf" if b["lower"] is None else f"{b['lower']:.2f}"
    hi = "inf" if b["upper"] is None else f"{b['upper']:.2f}"
    return f"{b['name']}: [{lo}, {hi}), {b['count']} images"


def _samples_sections(add: Any, config: Any, cells: dict[str, Any], bands: list[dict[str, Any]]) -> None:
    prompts = list(config.sample.prompts)
    gen = config.generator
    add(
        f"<p>Generator: preset {gen.preset}, {gen.steps} steps; samples with guidance {config.sample.guidance}, "
        f"{config.sample.steps} {config.sample.sampler} steps, seed {config.sample.seed}. Each row's condition is "
        "the prompt's CLIP text embedding plus the image embeddings of its k nearest images in the database named.</p>"
    )
    _sample_table(add, cells, prompts, ["main"], "Samples (main database)", ["samples"])
    if "ood" in cells:
        _sample_table(
            add, cells, prompts, ["main", "ood"],
            "Database swap: the same model and prompts, neighbours from the second database",
            [f"main database ({config.data.style})", f"second database ({config.data.ood_style})"],
        )  # fmt: skip
    bands = [b for b in bands if f"band_{b['name']}" in cells]
    if bands:
        _sample_table(
            add, cells, prompts, [f"band_{b['name']}" for b in bands],
            "Aesthetic bands: neighbours retrieved only from one band (lowest to highest)",
            [_band_label(b) for b in bands],
        )  # fmt: skip


def _training_sections(add: Any, out: str, aesthetic: dict[str, Any], trained: dict[str, Any]) -> None:
    fit = aesthetic.get("fit") or {}
    add(f"<h2>Aesthetic head</h2><p>Head <code>{html.escape(str(aesthetic['head']))}</code>.")
    if fit:
        add(
            f" Fitted to the data's ratings: held-out MSE {fit['holdout_mse']:.3f} against "
            f"{fit['holdout_mse_of_mean']:.3f} for predicting the mean ({fit['num_holdout']} held-out images)."
        )
    add("</p>")
    add(
        f"<h2>Generator training</h2><p>Final loss {trained['loss']:.4f}, {trained['samples_per_s']:.0f} samples/s, "
        f"data wait {trained['data_wait_fraction']:.1%}.</p>"
    )
    loss_src = "report/loss.png"
    if os.path.exists(os.path.join(out, "run", "loss.png")):
        shutil.copyfile(os.path.join(out, "run", "loss.png"), os.path.join(out, loss_src))
        add(_img(loss_src, "training loss", 360))


def _tokenizer_section(add: Any, out: str, tokenizer: dict[str, Any]) -> None:
    f = tokenizer["figures"]
    shape = " x ".join(str(v) for v in f["latent_shape"][1:] + f["latent_shape"][:1])
    add(
        f"<h2>Tokenizer</h2><p>The generators denoise {shape} latents of an autoencoder trained on the main "
        f"database's images ({tokenizer['samples_per_s']:.0f} samples/s). Held-out reconstruction error: MSE "
        f"{f['reconstruction_mse']:.4f} on [-1, 1] images, PSNR {f['reconstruction_psnr']:.1f} dB, over "
        f"{f['num_heldout']} images of parts {', '.join(f['heldout_parts'])}. Top row: held-out images; bottom "
        "row: their reconstructions.</p>"
    )
    src = "report/reconstructions.png"
    if os.path.exists(tokenizer["reconstructions"]):
        shutil.copyfile(tokenizer["reconstructions"], os.path.join(out, src))
        add(_img(src, "held-out images and their reconstructions", 140))
    if "fsq" in tokenizer:  # generator.compare_backbones: the discrete backbone's quantising tokenizer
        q, f = tokenizer["fsq"], tokenizer["fsq"]["figures"]
        add(
            f"<p>The discrete generator's tokenizer (tokenizer_fsq/, {f['codebook_size']} FSQ codes): "
            f"{f['codebook_usage']:.0%} of the codes used, perplexity {f['perplexity']:.0f}, held-out PSNR "
            f"{f['reconstruction_psnr']:.1f} dB.</p>"
        )
        if os.path.exists(q["reconstructions"]):
            shutil.copyfile(q["reconstructions"], os.path.join(out, "report/reconstructions_fsq.png"))
            add(_img("report/reconstructions_fsq.png", "held-out images and their FSQ reconstructions", 140))


def _edit_section(add: Any, out: str, edits: dict[str, Any]) -> None:
    add(
        "<h2>Editing</h2><p>Mask-free text-driven editing: a model trained on pairs made from each image and its "
        f"ECC-aligned nearest neighbour (ECC aligned {edits['aligned_fraction']:.0%} of the pairs; the others "
        "took the neighbour unaligned), asked to redraw held-out images by a text.</p>"
    )
    record = edits.get("edits")
    if not record:
        return
    asked = ", ".join(record["asked_attributes"])
    add(
        f"<table><caption>{record['num_trials']} edits of held-out images, {record['steps']} "
        f"{html.escape(record['sampler'])} steps, guidance {record['guidance']}, "
        f"strength {record.get('strength', 1.0)}, keep {record.get('keep', 0.0)}: "
        "the edit text is the image's caption with another shape colour; "
        "the attribute classifier reads the result.</caption>"
        f"<tr><th>asked ({html.escape(asked)}) right</th>"
        + "".join(f"<th>{html.escape(a.replace('_', ' '))} kept</th>" for a in record["kept"])
        + "<th>PSNR outside the shape [dB]</th><th>s / edit</th></tr><tr>"
        f"<td>{record['edit_accuracy']:.2f}</td>"
        + "".join(f"<td>{v:.2f}</td>" for v in record["kept"].values())
        + f"<td>{record['psnr_outside_db']:.1f}</td><td>{record['seconds_per_edit']:.3f}</td></tr></table>"
    )
    src = os.path.join(out, "edit", "edits.png")
    if os.path.exists(src):
        shutil.copyfile(src, os.path.join(out, "report", "edits.png"))
        add("<p>Each row: the held-out image, the edit, and where it changed (|after - before|).</p>")
        add(
            "<p>"
            + "<br>".join(html.escape(f"{x['caption']} -> {x['text']}") for x in record["examples"])
            + "</p>"
        )
        add(_img("report/edits.png", "edits: before, after, heat map", 480))


def write_report(
    out: str,
    config: Any,
    timings: dict[str, dict[str, Any]],
    clip: dict[str, Any],
    aesthetic: dict[str, Any],
    trained: dict[str, Any],
    samples: dict[str, Any],
    evaluation: dict[str, Any],
    tokenizer: dict[str, Any] | None = None,
    edits: dict[str, Any] | None = None,
) -> str:
    """Write report.html (atomically) and its pictures; returns the report's path. tokenizer: the tokenizer
    stage's result, when the generator works in its latent space; edits: the edit stage's, when it ran."""
    os.makedirs(os.path.join(out, "report"), exist_ok=True)
    cells = _sample_cells(out, samples, len(config.sample.prompts))
    h: list[str] = []
    add = h.append
    add("<!doctype html><html><head><meta charset='utf-8'><title>kNN-Diffusion report</title><style>")
    add(
        "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "vertical-align:middle;text-align:left}img{image-rendering:pixelated}.p{max-width:260px}"
        "caption{text-align:left;color:#555;padding:4px 0}"
    )
    add("</style></head><body><h1>kNN-Diffusion: pipeline report</h1>")
    add(
        f"<p>Output folder <code>{html.escape(out)}</code>; config <code>config.yaml</code> beside this file.</p>"
    )
    _evaluation_section(add, out, evaluation["generators"])
    _stages_section(add, timings)
    _encoder_section(add, clip, evaluation["retrieval"], config.clip.model == "fit")
    _samples_sections(add, config, cells, aesthetic["bands"])
    _training_sections(add, out, aesthetic, trained)
    if edits:
        _edit_section(add, out, edits)
    if tokenizer:
        _tokenizer_section(add, out, tokenizer)
    add("</body></html>")
    path = os.path.join(out, "report.html")
    write_atomic(path, "\n".join(h).encode())
    return path


def _evaluation_section(add: Any, out: str, record: dict[str, Any]) -> None:
    """The evaluate stage's table (one row per generator) and each generator's samples for held-out captions."""
    models = record["models"]
    attrs: list[str] = []
    for row in models.values():
        attrs += [a for a in row.get("attribute_accuracy", {}) if a not in attrs]
    add("<h2>Generator evaluation</h2>")
    add(
        f"<p>{record['num_prompts']} captions of held-out images (parts {', '.join(record['heldout_parts'])}, which no "
        f"generator trained on), one sample each, {record['steps']} {html.escape(record['sampler'])} steps, guidance "
        f"{record['guidance']}, seed {record['seed']}. "
        "A kNN model's neighbours never include a held-out image. Fréchet "
        f"distance (FD) and KID against the {record['num_real']} held-out images and CLIP score use the image "
        f"features of <code>{html.escape(record['eval_clip_model'])}</code>"
        + (
            ", the same CLIP that conditions the generators."
            if record["eval_clip_model"] == record["conditioning_clip_model"]
            else ", a CLIP other than the one that conditions the generators."
        )
        + f" Real images score a CLIP score of {record['real_clip_score']:.1f} against their own captions.</p>"
    )
    add("<table><tr><th>generator</th><th>k</th>")
    add("".join(f"<th>{html.escape(a.replace('_', ' '))}</th>" for a in attrs))
    add("<th>FD &darr;</th><th>KID &darr;</th><th>CLIP score &uarr;</th><th>s / image</th></tr>")
    for name, row in models.items():
        acc = row.get("attribute_accuracy", {})
        add(f"<tr><td>{html.escape(name)}</td><td>{row['k']}</td>")
        add("".join(f"<td>{acc[a]:.2f}</td>" if a in acc else "<td></td>" for a in attrs))
        add(
            f"<td>{row['frechet_distance']:.4f}</td><td>{row['kid']:.4f}</td><td>{row['clip_score']:.1f}</td>"
            f"<td>{row['seconds_per_image']:.3f}</td></tr>"
        )
    add("</table>")
    agreeing = {
        name: row["neighbour_agreement"] for name, row in models.items() if row.get("neighbour_agreement")
    }
    if agreeing:
        add(
            "<p>What the retrieved neighbours tell a kNN model: the share of them whose caption names the prompt's "
            "value, per attribute (the same captions and database as above): "
            + "; ".join(
                f"{html.escape(name)} ({models[name]['k']} neighbours) "
                + ", ".join(f"{html.escape(a.replace('_', ' '))} {v:.2f}" for a, v in agree.items())
                for name, agree in agreeing.items()
            )
            + ".</p>"
        )
    if "text_image_cosine" in record:
        add(
            f"<p>The text-image gap: a prompt's text embedding has cosine {record['text_image_cosine']:.3f} to its "
            "own image's embedding (mean over the prompts, the conditioning CLIP). The generators trained on image "
            "embeddings and are queried with text ones; the closer this is to 1, the less a no-kNN model loses to "
            "that change and the less the neighbours (image embeddings themselves) have to bridge. Matched pairs in "
            "OpenAI's CLIP score about 0.3 (Hessel et al. 2021).</p>"
        )
    classifier = record.get("classifier")
    if classifier:
        acc = classifier["heldout_accuracy"]
        add(
            "<p>Attribute accuracy: the share of samples whose attribute, as a classifier fitted on the database's "
            f'other {classifier["num_train"]} images reads it, is the one the caption names; "all" needs every '
            f"attribute right. The classifier's accuracy on the {classifier['num_heldout']} real held-out images: "
            + ", ".join(f"{html.escape(a.replace('_', ' '))} {v:.3f}" for a, v in acc.items())
            + ".</p>"
        )
    pics = os.path.join(out, "report")
    for name in models:
        src = os.path.join(out, "evaluation", f"samples_{name}.png")
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(pics, f"evaluation_{name}.png"))
            add(f"<h3>{html.escape(name)}: samples for the first held-out captions</h3>")
            add(_img(f"report/evaluation_{name}.png", f"samples of {name}", 240))
