"""The `knn-diffusion` command: a thin layer mapping flags onto the stage configs and functions.

Flags are generated from each stage's config dataclass (one flag per field, --snake-case), and every flag
must have help text in HELP: a test checks it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from typing import Any

HELP: dict[str, str] = {
    # download
    "url_list": "URL list file (parquet, csv, tsv, txt, jsonl; .gz allowed) or URI",
    "output_folder": "folder (or URI) receiving the webdataset shards and status parquet files",
    "input_format": "format of --url-list; default: from its extension",
    "url_col": "column holding the image URLs",
    "caption_col": "column holding captions; default: the first of caption/text/TEXT/alt present",
    "extra_cols": "input columns to keep in the output (comma-separated); default: all other columns",
    "image_size": "side of the resized images, in pixels",
    "resize_mode": "img2dataset resize mode: no, keep_ratio, keep_ratio_largest, center_crop, border",
    "resize_only_if_bigger": "only downscale, never upscale",
    "encode_format": "image format inside the shards (jpg, png, webp)",
    "encode_quality": "encoder quality for jpg/webp",
    "min_image_size": "drop images whose smaller side is below this many pixels",
    "max_aspect_ratio": "drop images with a larger aspect ratio",
    "number_sample_per_shard": "URLs per shard (the unit of work and of resume)",
    "thread_count": "concurrent fetches per shard task",
    "timeout": "seconds a fetch may wait for a connection or for the next data",
    "url_deadline": "seconds a response body may take in all, however slowly it drips",
    "retries": "extra attempts per failed URL",
    "max_shard_retry": "extra attempts per failed shard",
    "allow_private_network": "allow loopback/private/link-local addresses (unsafe on shared networks)",
    "allow_network": "CIDRs allowed although non-public, comma-separated (e.g. 127.0.0.1/32 for a local mirror)",
    "max_image_bytes": "largest accepted response body, in bytes",
    "max_image_pixels": "largest accepted image (width x height, read from its header before decoding)",
    "user_agent_token": "token added to the User-Agent (and matched against X-Robots-Tag directives)",
    # embed
    "shards": "folder of webdataset shards written by `knn-diffusion download`",
    "output": "database folder to write (img_emb/, text_emb/, metadata/, database.json)",
    "clip_model": "open_clip:<config>/<pretrained tag or checkpoint path>, e.g. open_clip:ViT-B-32/openai",
    "batch_size": "images per model call",
    "num_actors": "model replicas; default: one per GPU, else one",
    "precision": "auto (bf16 on CUDA/AMX, fp16 with AVX512-FP16, else fp32), fp32, bf16, fp16, or int8 (CPU: "
    "the image tower's matrix products in int8 through onnxruntime, ~2.5x fp32 with VNNI)",
    "torch_threads": "intra-op threads per CPU model replica; default: all cores",
    "enable_text": "also embed captions",
    # index
    "db": "database folder written by `knn-diffusion embed`",
    "max_index_memory": "size budget of the index, e.g. 4G",
    "current_memory_available": "memory the index build may use, e.g. 16G",
    "max_query_time_ms": "per-query latency target that autofaiss tunes search parameters for",
    "index_key": "faiss factory string to force (e.g. HNSW32); default: autofaiss chooses",
    "nb_cores": "cores for the index build; default: all cores Ray offers",
    "modality": "which embeddings to index: image or text",
    # aesthetic score / fit / subindex
    "head": "laion-v1 or laion-v2 (the published head for the database's CLIP), a name such as "
    "laion-v1:ViT-B-32, or the .pt written by `aesthetic fit`",
    "head_dir": "folder holding the published head files (offline use); default: $KNN_DIFFUSION_AESTHETIC_DIR, "
    "else download once into ~/.cache/knn_diffusion/aesthetic",
    "allow_other_weights": "accept a head trained on another checkpoint of the same architecture",
    "overwrite": "replace scores made by another head",
    "ratings": "parquet of ratings: a rating column plus image_id (with --db) or an embedding column",
    "output_head": "path of the fitted head (.pt; a .json with its model and held-out error goes beside it)",
    "head_kind": "linear (LAION v1 shape) or mlp (LAION v2 shape)",
    "rating_col": "column holding the ratings",
    "epochs": "passes over the training ratings",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "holdout": "fraction of the ratings held out to report the error on",
    "seed": "random seed (held-out split, initialisation, batch order)",
    "quantile_bins": "N bands holding equal numbers of images (the paper uses 5)",
    "bands": "explicit bands LOWER-UPPER, comma-separated, each [LOWER, UPPER), e.g. 0-4.5,4.5-5.5,5.5-10",
    "catalogue": "catalogue JSON naming the databases; default: $KNN_DIFFUSION_CATALOGUE, "
    "else ~/.config/knn_diffusion/catalogue.json",
    "name": "the database's name in the catalogue; default: its folder name",
    # neighbours
    "k": "neighbours per image",
    "index": "aesthetic band (name or position, 0 = lowest) to draw neighbours from; default: the whole database",
    "duplicate_threshold": "skip neighbours at cosine >= this as near-duplicates of the image",
    "store_embeddings": "also store the neighbours' embeddings (float16) inline, so training needs no lookups",
    "search_params": "faiss search parameters, e.g. nprobe=64 or efSearch=128; default: autofaiss's tuned ones",
    # sample / evaluate
    "truncation": "the discrete backbone's truncation r: keep the likeliest codes up to this cumulative "
    "probability (1: none; default: 0.9)",
}

# Where a field means something else in one stage.
HELP_OVERRIDES: dict[tuple[str, str], str] = {
    (
        "NeighboursConfig",
        "output",
    ): "folder for the neighbour tables; default: <db>/neighbours (<db>/neighbours_<band>)",
    ("NeighboursConfig", "batch_size"): "queries per faiss search call",
    ("NeighboursConfig", "num_actors"): "actors holding the index; default: one per node",
    ("FitConfig", "db"): "database whose embeddings the ratings' image_id column refers to",
    ("FitConfig", "clip_model"): "the model of the ratings' embedding column (when there is no --db)",
    ("SubindexConfig", "max_index_memory"): "size budget of each band's index, e.g. 4G",
    (
        "SubindexConfig",
        "index_key",
    ): "faiss factory string to force for every band; default: autofaiss chooses",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_list) of an annotation such as `int`, `str | None`, `list[str] | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def add_config_args(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per dataclass field; fields without a default are required."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        text = HELP_OVERRIDES.get((config_cls.__name__, field.name), HELP.get(field.name))
        if text is None:
            raise KeyError(f"no help text for {config_cls.__name__}.{field.name}")
        tp, is_list = _base_type(hints[field.name])
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = None if required else field.default
        help_text = text + ("" if required else f" (default: {default})")
        if tp is bool:
            parser.add_argument(
                _flag(field.name), action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif is_list:
            parser.add_argument(
                _flag(field.name),
                type=lambda s: [x for x in s.split(",") if x],
                default=default,
                help=help_text,
            )
        else:
            parser.add_argument(
                _flag(field.name), type=tp, default=default, required=required, help=help_text
            )


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def build_parser() -> argparse.ArgumentParser:
    from diffusion.config import EDIT_KEEP, EDIT_STRENGTH
    from pipelines.download import DownloadConfig
    from pipelines.embed import EmbedConfig
    from pipelines.index import IndexConfig

    parser = argparse.ArgumentParser(prog="knn-diffusion", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument(
        "--debug", action="store_true", help="on an error, print the whole traceback instead of one line"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ray_help = "Ray cluster to run on (auto, host:6379, ray://host:10001); default: start a local Ray"
    for name, cls, desc in (
        ("download", DownloadConfig, "URL list -> webdataset shards + status parquet (img2dataset on Ray)"),
        ("embed", EmbedConfig, "shards -> CLIP embeddings + metadata (Ray Data actor pool)"),
        ("index", IndexConfig, "embeddings -> faiss index (autofaiss)"),
    ):
        p = sub.add_parser(name, help=desc, description=desc)
        add_config_args(p, cls)
        p.add_argument("--ray-address", default=None, help=ray_help)
        p.set_defaults(config_cls=cls)
    from pipelines.aesthetic import FitConfig, ScoreConfig, SubindexConfig
    from pipelines.neighbours import NeighboursConfig

    p = sub.add_parser("aesthetic", help="aesthetic scores, fitted heads and aesthetic-band sub-indexes")
    aesthetic = p.add_subparsers(dest="aesthetic_command", required=True, metavar="ACTION")
    for name, cls, desc in (
        ("score", ScoreConfig, "score every image with a LAION (or fitted) aesthetic head -> db/aesthetic/"),
        ("fit", FitConfig, "fit an aesthetic head (linear or LAION v2 MLP) to rated embeddings"),
        ("subindex", SubindexConfig, "one faiss index per aesthetic band -> db/bands/ + the catalogue"),
    ):
        p = aesthetic.add_parser(name, help=desc, description=desc)
        add_config_args(p, cls)
        p.add_argument("--ray-address", default=None, help=ray_help)
        p.set_defaults(config_cls=cls)
    desc = "the k nearest neighbours of every image (self and near-duplicates excluded) -> parquet tables"
    p = sub.add_parser("neighbours", help=desc, description=desc)
    add_config_args(p, NeighboursConfig)
    p.add_argument("--ray-address", default=None, help=ray_help)
    p.set_defaults(config_cls=NeighboursConfig)
    p = sub.add_parser(
        "catalogue", help="list the catalogue or add a database (local folder or remote service)"
    )
    p.add_argument("action", choices=("list", "add"), help="list the databases, or add one")
    p.add_argument("--catalogue", default=None, help=HELP["catalogue"])
    p.add_argument("--name", default=None, help="name of the database to add")
    p.add_argument("--db", default=None, help="a local database folder to add")
    p.add_argument(
        "--url", default=None, help="a clip-retrieval back service to add, e.g. http://127.0.0.1:1234"
    )
    p.add_argument("--indice-name", default=None, help="the service's index name (default: its first)")
    p.add_argument("--clip-model", default=None, help="the service's CLIP, as in `embed` (needed with --url)")
    desc = "train the kNN-Diffusion generator on Ray Train (resumes when --output holds a run)"
    p = sub.add_parser("train", help=desc, description=desc)
    p.add_argument(
        "--config",
        required=True,
        help="YAML run config (model preset + training fields), e.g. configs/small.yaml",
    )
    p.add_argument("--db", default=None, help="database folder (its embeddings condition the model)")
    p.add_argument(
        "--neighbours", default=None, help="neighbour tables of the database (`knn-diffusion neighbours`)"
    )
    p.add_argument("--output", default=None, help="run folder: checkpoints, metrics.csv, loss.png")
    p.add_argument("--shards", default=None, help="image shards; default: the ones database.json records")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps in total (overrides the config)")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (DDP ranks)")
    p.add_argument(
        "--use-gpu", action=argparse.BooleanOptionalAction, default=None, help="one GPU per worker"
    )
    p.add_argument("--batch-size-per-worker", type=int, default=None, help="images per worker per step")
    p.add_argument("--ray-address", default=None, help=ray_help)
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a tokenizer.pt (`knn-diffusion tokenizer`): learn in its latent space",
    )
    p.add_argument(
        "--backbone",
        choices=("continuous", "discrete"),
        default=None,
        help="continuous (Gaussian diffusion) or discrete (VQ-Diffusion over a quantising --tokenizer's codes)",
    )
    desc = "train the tokenizer (an autoencoder) on a database's images, for latent generators"
    p = sub.add_parser("tokenizer", help=desc, description=desc)
    p.add_argument(
        "--config",
        default=None,
        help="YAML: model + training fields (default: the tokenizer preset, as in configs/tokenizer.yaml)",
    )
    p.add_argument(
        "--preset",
        default="tokenizer",
        help="without --config: tokenizer (continuous latents) or tokenizer-fsq (codes, for the discrete backbone)",
    )
    p.add_argument("--db", required=True, help="database folder whose shards hold the images")
    p.add_argument(
        "--output", required=True, help="folder: the training run, tokenizer.pt, reconstructions.png"
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps in total (overrides the config)")
    p.add_argument(
        "--exclude-parts",
        nargs="*",
        default=None,
        help="database parts left out of training; the reconstruction error is measured on them",
    )
    p.add_argument("--ray-address", default=None, help=ray_help)
    desc = (
        "edit an image by a text, with no mask: an editing model (train --config configs/edit.yaml) redraws the "
        "part the text talks about -> before.png, after.png, heatmap.png, mask.png, edit.png, edit.json"
    )
    p = sub.add_parser("edit", help=desc, description=desc)
    p.add_argument("--checkpoint", required=True, help="an editing model's run folder or state.pt")
    p.add_argument(
        "--image", required=True, help="the image to edit (centre-cropped and resized to the model's)"
    )
    p.add_argument("--text", required=True, help='what the edited part should show, e.g. "a blue square"')
    p.add_argument("--output", required=True, help="folder for the results")
    p.add_argument(
        "--guidance", type=float, default=3.0, help="classifier-free guidance on the text (default: 3)"
    )
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    p.add_argument(
        "--strength",
        type=float,
        default=EDIT_STRENGTH,
        help="where sampling starts: 1 from pure noise, below 1 from the image noised that far (SDEdit): keeps "
        f"more of it, changes less (default: {EDIT_STRENGTH})",
    )
    p.add_argument(
        "--keep",
        type=float,
        default=EDIT_KEEP,
        help="keep the original outside the area the edit changed: the pixels whose change exceeds this fraction "
        f"of the largest; 0 takes the model's whole image (default: {EDIT_KEEP})",
    )
    p.add_argument(
        "--sampler", default="dpmpp_2m", help="ddim, ddpm, dpmpp_2m or dpmpp_2m_sde (default: dpmpp_2m)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is a GPU)")
    desc = "generate images for prompts, conditioned on their neighbours in any database or band"
    p = sub.add_parser("sample", help=desc, description=desc)
    p.add_argument("--checkpoint", required=True, help="run folder (its latest checkpoint) or a state.pt")
    p.add_argument("--database", required=True, help="database folder or catalogue name to retrieve from")
    p.add_argument("--output", required=True, help="folder for grid.png, neighbours.png and samples.json")
    p.add_argument("--prompt", action="append", dest="prompts", help="a prompt (repeat for more)")
    p.add_argument("--prompt-file", default=None, help="file with one prompt per line")
    p.add_argument("--band", default=None, help="aesthetic band (name or position) to retrieve from")
    p.add_argument("--catalogue", default=None, help="catalogue JSON for database names")
    p.add_argument(
        "--k", type=int, default=None, help="neighbours to retrieve; must equal the model's k (default: it)"
    )
    p.add_argument(
        "--guidance", type=float, default=3.0, help="classifier-free guidance scale (1: conditional only)"
    )
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    p.add_argument(
        "--sampler",
        default="dpmpp_2m_sde",
        help="ddim, ddpm, dpmpp_2m or dpmpp_2m_sde (default: dpmpp_2m_sde)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--num-per-prompt", type=int, default=4, help="images per prompt (default: 4)")
    p.add_argument("--truncation", type=float, default=None, help=HELP["truncation"])
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is a GPU)")
    p.add_argument(
        "--batch-size", type=int, default=64, help="images generated per network batch (default: 64)"
    )
    desc = (
        "score generators on held-out images: attribute accuracy (captions of a known vocabulary), Fréchet "
        "distance, KID and CLIP score -> evaluation.json"
    )
    p = sub.add_parser("evaluate", help=desc, description=desc)
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="NAME=RUN (a run folder or state.pt); repeat to compare, e.g. --checkpoint knn=runs/a "
        "--checkpoint no-knn=runs/b",
    )
    p.add_argument("--database", required=True, help="the database folder the generators were trained on")
    p.add_argument(
        "--heldout-parts",
        required=True,
        type=lambda s: [x for x in s.split(",") if x],
        help="comma-separated database parts no generator trained on (train with exclude_parts), e.g. 00011",
    )
    p.add_argument("--output", required=True, help="folder for evaluation.json, sample grids, the classifier")
    p.add_argument(
        "--attributes",
        choices=("none", "procedural"),
        default="none",
        help="caption vocabulary for attribute accuracy: procedural = the demo's scenes (default: none)",
    )
    p.add_argument("--classifier", default=None, help="attribute classifier .pt (fitted there when missing)")
    p.add_argument(
        "--eval-clip-model", default=None, help="CLIP for features and CLIP score (default: the database's)"
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        help="local Inception-v3 weights (torch-fidelity's pt_inception-2015-12-05) for real FID; nothing "
        "is downloaded",
    )
    p.add_argument("--num-prompts", type=int, default=250, help="held-out captions to sample (default: 250)")
    p.add_argument(
        "--sampler",
        default="dpmpp_2m_sde",
        help="ddim, ddpm, dpmpp_2m or dpmpp_2m_sde (default: dpmpp_2m_sde)",
    )
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--truncation", type=float, default=None, help=HELP["truncation"])
    p.add_argument(
        "--query",
        choices=("text", "image"),
        default="text",
        help="what conditions the generators: the captions' text embeddings (as at inference) or the held-out "
        "images' own image embeddings (as in training); the difference is what the text-image gap costs "
        "(default: text)",
    )
    p = sub.add_parser(
        "serve", help="serve a database with clip-retrieval back", description="serve a database over HTTP"
    )
    p.add_argument("--db", required=True, help=HELP["db"])
    p.add_argument("--port", type=int, default=1234, help="port (default: 1234)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    p.add_argument("--name", default="db", help="the index name clients pass as indice_name (default: db)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="a Host header name to accept besides 127.0.0.1, localhost and --host (repeat for more)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="an origin whose web pages may call the service, e.g. http://127.0.0.1:3000 (default: none)",
    )
    p.add_argument(
        "--allow-image-urls",
        action="store_true",
        help="fetch image_url queries, public http(s) addresses only, through the download guard (default: off)",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=2 * 1024 * 1024, help="largest request body (default: 2 MiB)"
    )
    desc = "a browser page and JSON API (Ray Serve) to search databases and generate with a trained model"
    p = sub.add_parser("app", help=desc, description=desc)
    p.add_argument("--checkpoint", required=True, help="run folder (its latest checkpoint) or a state.pt")
    p.add_argument(
        "--database",
        action="append",
        required=True,
        dest="databases",
        help="local database folder or catalogue name (repeat for more; the first is the default)",
    )
    p.add_argument("--catalogue", default=None, help="catalogue JSON for database names")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    p.add_argument("--replicas", type=int, default=1, help="model replicas (default: 1)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per replica (default: 0)")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests batched together (default: 16)")
    desc = (
        "the embedded default, offline: procedural images served on 127.0.0.1 -> download -> fit a CLIP -> embed "
        "-> index -> aesthetic bands -> neighbours -> train the generator -> samples -> report.html"
    )
    p = sub.add_parser("demo", help=desc, description=desc)
    p.add_argument(
        "--output", default="demo_out", help="folder for everything the demo writes (default: demo_out)"
    )
    p.add_argument(
        "--quick", action="store_true", help="the 2-3 minute smoke version (fewer, smaller everything)"
    )
    p.add_argument("--ray-address", default=None, help=ray_help)
    desc = "run a whole pipeline described by one YAML config (see configs/demo.yaml); reruns skip finished stages"
    p = sub.add_parser("run", help=desc, description=desc)
    p.add_argument("config", help="pipeline YAML: data, clip, aesthetic, generator, sample sections, output")
    p.add_argument("--output", default=None, help="output folder (overrides the config's output)")
    p.add_argument(
        "--quick", action="store_true", help="apply the demo's smoke-test sizes on top of the config"
    )
    p.add_argument("--ray-address", default=None, help=ray_help)
    return parser


def catalogue_command(args: argparse.Namespace) -> None:
    from retrieval import catalogue
    from retrieval.remote import RemoteDatabase

    path = args.catalogue or catalogue.default_path()
    if args.action == "list":
        for name, entry in sorted(catalogue.load(path)["databases"].items()):
            where = entry.get("path") or f"{entry['url']} ({entry['indice_name']})"
            bands = ", ".join(f"{b['name']}: {b['count']}" for b in entry.get("bands", []))
            print(f"{name}\t{entry['kind']}\t{where}\t{entry.get('num_images', '?')} images\t{bands}")
        return
    if not args.name or (args.db is None) == (args.url is None):
        raise ValueError("catalogue add needs --name and exactly one of --db or --url")
    if args.db:
        entry = catalogue.local_entry(args.db)
    else:
        if not args.clip_model:
            raise ValueError("catalogue add --url needs --clip-model (the model the service embeds with)")
        indices = RemoteDatabase(args.url, "", args.clip_model).indices()
        indice = args.indice_name or indices[0]
        if indice not in indices:
            raise ValueError(f"--indice-name {indice!r} is not served by {args.url} (it serves {indices})")
        entry = {"kind": "remote", "url": args.url, "indice_name": indice, "clip_model": args.clip_model}
    catalogue.register(path, args.name, entry)
    print(f"catalogue {path}: added {args.name!r} ({entry['kind']})")


def evaluate_command(args: argparse.Namespace) -> None:
    from diffusion.evaluate import EvaluateConfig, evaluate

    checkpoints = {}
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--checkpoint {item!r}: expected NAME=RUN, e.g. knn=runs/small")
        checkpoints[name] = path
    attributes = None
    if args.attributes == "procedural":
        from pipelines.run import procedural_attributes

        attributes = procedural_attributes()
    config = EvaluateConfig(
        checkpoints=checkpoints,
        database=args.database,
        heldout_parts=args.heldout_parts,
        output=args.output,
        classifier=args.classifier,
        eval_clip_model=args.eval_clip_model,
        inception_weights=args.inception_weights,
        num_prompts=args.num_prompts,
        sampler=args.sampler,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        truncation=args.truncation,
        query=args.query,
    )
    evaluate(config, attributes=attributes)


def stage_command(args: argparse.Namespace) -> None:
    """download, embed, index, aesthetic score/fit/subindex, neighbours: a config dataclass from the flags."""
    config = config_from_args(args.config_cls, args)
    if args.command == "download":
        from pipelines.download import download

        download(config, ray_address=args.ray_address)
    elif args.command == "embed":
        from pipelines.embed import embed

        embed(config, ray_address=args.ray_address)
    elif args.command == "index":
        from pipelines.index import build

        build(config, ray_address=args.ray_address)
    elif args.command == "neighbours":
        from pipelines.neighbours import compute

        compute(config, ray_address=args.ray_address)
    else:
        from pipelines import aesthetic

        if args.aesthetic_command == "score":
            aesthetic.score(config)
        elif args.aesthetic_command == "fit":
            aesthetic.fit(config)
        else:
            aesthetic.subindex(config, ray_address=args.ray_address)


def train_command(args: argparse.Namespace) -> None:
    from diffusion.config import load_yaml
    from diffusion.train import train

    names = (
        "db",
        "neighbours",
        "output",
        "shards",
        "steps",
        "num_workers",
        "use_gpu",
        "batch_size_per_worker",
        "tokenizer",
    )
    config = load_yaml(args.config, **{k: getattr(args, k) for k in names})
    if args.backbone:
        import dataclasses

        config.model = dataclasses.replace(config.model, backbone=args.backbone)
    train(config, ray_address=args.ray_address)


def tokenizer_command(args: argparse.Namespace) -> None:
    import os

    from diffusion.config import load_yaml
    from diffusion.tokenizer import tokenizer_config, train_tokenizer

    paths = {
        "db": args.db,
        "neighbours": os.path.join(args.db, "neighbours"),  # not read: the autoencoder reads images only
        "output": args.output,
        "steps": args.steps,
        "exclude_parts": args.exclude_parts,
    }
    if args.config:
        config = load_yaml(args.config, **paths)
    else:
        config = tokenizer_config(args.preset, **{k: v for k, v in paths.items() if v is not None})
    train_tokenizer(config, ray_address=args.ray_address)


def sample_command(args: argparse.Namespace) -> None:
    from diffusion.sample import SampleConfig, sample

    names = (
        "checkpoint",
        "database",
        "output",
        "prompts",
        "prompt_file",
        "band",
        "catalogue",
        "k",
        "guidance",
    )
    names += ("steps", "sampler", "seed", "num_per_prompt", "device", "batch_size", "truncation")
    sample(SampleConfig(**{k: getattr(args, k) for k in names}, use_ema=args.ema))


def edit_command(args: argparse.Namespace) -> None:
    from diffusion.edit import EditConfig, edit

    names = (
        "checkpoint",
        "image",
        "text",
        "output",
        "guidance",
        "steps",
        "strength",
        "keep",
        "sampler",
        "seed",
        "device",
    )
    edit(EditConfig(**{k: getattr(args, k) for k in names}))


def serve_command(args: argparse.Namespace) -> None:
    from retrieval.serve import ServeConfig, serve

    serve(
        ServeConfig(
            db=args.db,
            port=args.port,
            host=args.host,
            name=args.name,
            allowed_hosts=tuple(args.allowed_host),
            cors_origins=tuple(args.cors_origin),
            allow_image_urls=args.allow_image_urls,
            max_body_bytes=args.max_body_bytes,
        )
    )


def app_command(args: argparse.Namespace) -> None:
    from diffusion.app import AppConfig, run_app

    names = (
        "checkpoint",
        "databases",
        "catalogue",
        "host",
        "port",
        "replicas",
        "gpus_per_replica",
        "max_batch_size",
    )
    run_app(AppConfig(**{k: getattr(args, k) for k in names}))


def demo_command(args: argparse.Namespace) -> None:
    from pipelines.demo import run_demo

    run_demo(args.output, quick=args.quick, ray_address=args.ray_address)


def run_command(args: argparse.Namespace) -> None:
    from pipelines.run import load_config, run_pipeline

    config = load_config(args.config, output=args.output, quick=args.quick)
    config.ray_address = args.ray_address or config.ray_address
    run_pipeline(config)


COMMANDS = {
    "download": stage_command,
    "embed": stage_command,
    "index": stage_command,
    "aesthetic": stage_command,
    "neighbours": stage_command,
    "train": train_command,
    "tokenizer": tokenizer_command,
    "sample": sample_command,
    "edit": edit_command,
    "evaluate": evaluate_command,
    "catalogue": catalogue_command,
    "serve": serve_command,
    "app": app_command,
    "demo": demo_command,
    "run": run_command,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        COMMANDS[args.command](args)
    except (
        ValueError,
        OSError,
        KeyError,
    ) as err:  # user errors: bad input, missing files, unreachable services
        if args.debug:
            raise
        print(
            f"knn-diffusion {args.command}: error: {one_line(err)} (run `knn-diffusion --debug ...` for the traceback)",
            file=sys.stderr,
        )
        return 2
    return 0


def one_line(err: BaseException) -> str:
    """The message of an error raised here or inside a Ray task (whose text carries the remote traceback)."""
    cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError keeps the original exception
    if isinstance(cause, BaseException):
        err = cause
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
