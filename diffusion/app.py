"""Generation service: a Ray Serve application with a FastAPI ingress and one self-contained HTML page.

    knn-diffusion app --checkpoint RUN --database NAME_OR_PATH [--database ...] [--port 8000]

Routes (127.0.0.1 unless --host says otherwise):

    GET  /              the page (app_page.html: no CDN, no external request; works offline)
    GET  /databases     the databases served, their aesthetic bands and sizes, the model's k and limits
    GET  /search?q=&database=&band=&k=    text search: ids, scores, captions, thumbnails (data URLs)
    POST /generate      JSON GenerateRequest -> PNG samples (data URLs), neighbour ids, captions, thumbnails

Concurrent /generate requests are batched (serve.batch): requests that share database, band, sampler, steps
and guidance run through the network as one batch, and each request's noise comes from its own seed, so a
request's images do not depend on what it was batched with. Only local databases are served: nothing is
ever fetched from a URL on a request's behalf (remote catalogue entries are refused at start-up).
"""

# No `from __future__ import annotations`: Ray Serve pickles the ingress class by value, with only the globals its
# code names, so FastAPI could not resolve a string annotation such as "GenerateRequest" in a replica.
import asyncio
import base64
import contextlib
import dataclasses
import io
import os
import time
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app_page.html")
MAX_PROMPT_CHARS = 300
MAX_STEPS = 200
MAX_IMAGES = 8
MAX_BODY_BYTES = 16_384
MAX_SEARCH_K = 50
THUMBNAIL_PX = 64


class GenerateRequest(BaseModel):
    """One generation request; anything else in the body is refused (422)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    database: str | None = None
    band: str | None = None
    k: int | None = Field(None, ge=0)
    num_images: int = Field(1, ge=1, le=MAX_IMAGES)
    steps: int = Field(20, ge=1, le=MAX_STEPS)
    guidance: float = Field(3.0, ge=0.0, le=20.0)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    sampler: Literal["ddim", "dpmpp_2m", "dpmpp_2m_sde", "ddpm"] = "dpmpp_2m_sde"


@dataclasses.dataclass
class AppConfig:
    """checkpoint: run folder or state.pt. databases: local folders or catalogue names (the first is the
    default). replicas / gpus_per_replica / cpus_per_replica: Ray Serve resources. max_batch_size and
    batch_wait_timeout_s: serve.batch's (requests wait at most that long for companions)."""

    checkpoint: str
    databases: list[str]
    catalogue: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.05

    def __post_init__(self) -> None:
        if not self.databases:
            raise ValueError("--database: name at least one database folder or catalogue name")
        if self.replicas < 1 or self.max_batch_size < 1:
            raise ValueError("--replicas and --max-batch-size must be >= 1")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")

    def check(self) -> None:
        """Fail here, in one line, on what every replica would fail on: a missing checkpoint or database."""
        from diffusion.train import latest_checkpoint
        from retrieval.catalogue import find

        latest_checkpoint(self.checkpoint)
        for name in self.databases:
            try:
                find(name, self.catalogue)
            except KeyError as err:
                raise FileNotFoundError(
                    f"--database {name}: neither a database folder (no database.json) nor a catalogue name "
                    f"({err.args[0]})"
                ) from err


def png_data_url(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class GenerationService:
    """The model, the databases and the query encoder of one replica; no Ray Serve in it (tested directly)."""

    def __init__(self, checkpoint: str, databases: list[str], catalogue: str | None = None) -> None:
        from diffusion.sample import load_model
        from retrieval.catalogue import open_database
        from retrieval.clip_model import ClipEncoder
        from retrieval.database import Database

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, self.config, self.step = load_model(checkpoint)
        self.model = model.to(device)
        self.databases: dict[str, Any] = {}
        for name in databases:
            db = open_database(name, catalogue=catalogue)
            if not isinstance(db, Database):
                raise ValueError(
                    f"--database {name}: a remote database; the app serves local databases only (searching a "
                    "remote one fetches images from URLs on a request's behalf)"
                )
            self.databases[name] = db
        clip = {db.info.clip_model for db in self.databases.values()}
        if len(clip) != 1:
            raise ValueError(f"--database: the databases are embedded by different CLIPs {sorted(clip)}")
        self.encoder = ClipEncoder(clip.pop(), device="cpu", precision="fp32")
        self.default = databases[0]

    def info(self) -> dict[str, Any]:
        return {
            "databases": [
                {"name": name, "size": len(db), "bands": [b.name for b in db.bands]}
                for name, db in self.databases.items()
            ],
            "default_database": self.default,
            "k": self.config.model.k if self.config.model.use_knn else 0,
            "image_size": self.config.model.image_size,
            "checkpoint_step": self.step,
            "limits": {
                "prompt_chars": MAX_PROMPT_CHARS,
                "steps": MAX_STEPS,
                "num_images": MAX_IMAGES,
                "body_bytes": MAX_BODY_BYTES,
                "search_k": MAX_SEARCH_K,
            },
        }

    def database(self, name: str | None) -> Any:
        if name is None:
            return self.databases[self.default]
        if name not in self.databases:
            raise LookupError(f"database {name!r} is not served; choose one of {sorted(self.databases)}")
        return self.databases[name]

    def _check_band(self, db: Any, band: str | None) -> None:
        if band is not None and band not in [b.name for b in db.bands]:
            raise LookupError(f"band {band!r} is not a band of this database ({[b.name for b in db.bands]})")

    def _thumbnails(self, db: Any, ids: list[int]) -> list[str]:
        from diffusion.sample import thumbnails

        return [png_data_url(t) for t in thumbnails(db, np.array(ids, np.int64), THUMBNAIL_PX)]

    def _captions(self, db: Any, ids: list[int]) -> list[str]:
        if not ids:
            return []
        meta = db.metadata(np.array(ids, np.int64)).set_index("image_id")
        return [str(meta.loc[i, "caption"]) if "caption" in meta.columns else "" for i in ids]

    def search(self, q: str, database: str | None, band: str | None, k: int) -> dict[str, Any]:
        if not q or len(q) > MAX_PROMPT_CHARS:
            raise ValueError(f"q must be 1..{MAX_PROMPT_CHARS} characters")
        if not 1 <= k <= MAX_SEARCH_K:
            raise ValueError(f"k must be in 1..{MAX_SEARCH_K}")
        db = self.database(database)
        self._check_band(db, band)
        found = db.search(self.encoder.encode_texts([q]).numpy(), k, band=band)
        keep = found.ids[0] >= 0
        ids = [int(i) for i in found.ids[0][keep]]
        return {
            "ids": ids,
            "scores": [float(s) for s in found.scores[0][keep]],
            "captions": self._captions(db, ids),
            "thumbnails": self._thumbnails(db, ids),
        }

    def validate(self, request: GenerateRequest) -> None:
        """Errors a request would meet in generate_many, raised before it joins a batch."""
        db = self.database(request.database)
        self._check_band(db, request.band)
        k = self.config.model.k if self.config.model.use_knn else 0
        if request.k is not None and request.k > k:
            raise ValueError(f"k={request.k}: the model conditions on at most {k} neighbours")

    def generate_many(self, requests: list[GenerateRequest]) -> list[dict[str, Any]]:
        """Each request's result, running requests with the same settings as one batch (requests are checked by
        validate() before they join a batch)."""
        from diffusion.sample import generate, retrieval_condition

        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            key = (r.database or self.default, r.band, r.sampler, r.steps, r.guidance)
            groups.setdefault(key, []).append(i)
        results: list[dict[str, Any]] = [{} for _ in requests]
        mc = self.config.model
        for (name, band, sampler, steps, guidance), members in groups.items():
            start = time.time()
            db = self.databases[name]
            batch = [requests[i] for i in members]
            query = self.encoder.encode_texts([r.prompt for r in batch]).numpy()
            cond, found = retrieval_condition(db, query, self.config, band=band)
            if "valid" in cond:  # fewer neighbours than the model's k when asked: the rest are masked out
                for row, r in enumerate(batch):
                    if r.k is not None:
                        cond["valid"][row, r.k :] = False
            counts = [r.num_images for r in batch]
            cond = {part: v.repeat_interleave(torch.tensor(counts), dim=0) for part, v in cond.items()}
            seeds = [(r.seed, r.num_images) for r in batch]
            images = generate(self.model, self.config, cond, sampler, steps, guidance, request_seeds=seeds)
            seconds = time.time() - start
            offsets = np.cumsum([0, *counts])
            for row, (i, r) in enumerate(zip(members, batch, strict=True)):
                ids: list[int] = []
                if found is not None:
                    used = found.ids[row][: r.k if r.k is not None else mc.k]
                    ids = [int(v) for v in used if v >= 0]
                results[i] = {
                    "images": [png_data_url(im) for im in images[offsets[row] : offsets[row + 1]]],
                    "neighbour_ids": ids,
                    "neighbour_captions": self._captions(db, ids),
                    "neighbour_thumbnails": self._thumbnails(db, ids),
                    "database": name,
                    "band": band,
                    "batch_requests": len(batch),
                    "seconds": seconds,
                }
        return results


async def cap_body(request: Any, call_next: Any) -> Any:
    """HTTP middleware: a POST needs a Content-Length (411) of at most MAX_BODY_BYTES (413)."""
    from fastapi.responses import JSONResponse

    if request.method == "POST":
        length = request.headers.get("content-length")
        if length is None:
            return JSONResponse({"detail": "send a Content-Length header"}, status_code=411)
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
    return await call_next(request)


@contextlib.contextmanager
def http_errors() -> Any:
    """The service's LookupError (unknown database or band) as 404, its ValueError (bad request) as 400."""
    from fastapi import HTTPException

    try:
        yield
    except LookupError as err:
        raise HTTPException(404, str(err)) from err
    except ValueError as err:
        raise HTTPException(400, str(err)) from err


def build_app(config: AppConfig) -> Any:
    """The Ray Serve application (bound deployment) for config."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse
    from ray import serve

    api = FastAPI(title="knn-diffusion", docs_url=None, redoc_url=None, openapi_url=None)

    api.middleware("http")(cap_body)

    @serve.deployment(
        num_replicas=config.replicas,
        # Serve's default (5 requests in flight per replica) would cap every batch at 5.
        max_ongoing_requests=max(2 * config.max_batch_size, 8),
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
    )
    @serve.ingress(api)
    class KnnDiffusionApp:
        def __init__(self, checkpoint: str, databases: list[str], catalogue: str | None) -> None:
            self.service = GenerationService(checkpoint, databases, catalogue)
            self.batched.set_max_batch_size(config.max_batch_size)
            self.batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
            with open(PAGE, encoding="utf-8") as f:
                self.page = f.read()

        @api.get("/", response_class=HTMLResponse)
        def page(self) -> str:
            return self.page

        @api.get("/databases")
        def databases(self) -> dict[str, Any]:
            return self.service.info()

        @api.get("/search")
        async def search(
            self, q: str, database: str | None = None, band: str | None = None, k: int = 12
        ) -> Any:
            with http_errors():
                return await asyncio.to_thread(self.service.search, q, database, band, k)

        @api.post("/generate")
        async def generate(self, request: GenerateRequest) -> Any:
            with http_errors():
                self.service.validate(request)
            return await self.batched(request)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
        async def batched(self, requests: list[GenerateRequest]) -> list[dict[str, Any]]:
            # In a thread, so the replica keeps accepting (and queueing) requests while a batch runs.
            return await asyncio.to_thread(self.service.generate_many, requests)

    return KnnDiffusionApp.bind(config.checkpoint, config.databases, config.catalogue)


def run_app(config: AppConfig, blocking: bool = True) -> str:
    """Start Ray Serve on config.host:config.port with the app at /; returns the base URL. blocking: serve
    until interrupted (the CLI); otherwise return once the app is ready (tests, notebooks)."""
    from ray import serve

    from retrieval.ray_env import init_ray

    config.check()
    init_ray(None)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name="knn-diffusion", route_prefix="/")
    url = f"http://{config.host}:{config.port}/"
    print(
        f"app: {url} serves {config.checkpoint} with {', '.join(config.databases)} (Ctrl-C stops)", flush=True
    )
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url
