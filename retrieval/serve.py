"""Serve a database over clip-retrieval's `back` HTTP API (/knn-service, /metadata, /indices-list), locked down.

clip_back() would do this in one call, but it binds 0.0.0.0, answers any Origin (CORS) and any Host header,
reads bodies of any size, fetches any `image_url` (file:// and internal addresses included), and loads the
CLIP through all_clip, which cannot load an open_clip config JSON (the demo's fitted CLIP). So the app is
assembled here from clip_back's own resources (KnnService, MetadataService, IndicesList) with:

- the database's CLIP loaded by retrieval.clip_model (any name `embed` accepts);
- `image_url` queries refused unless allow_image_urls, and then fetched only through the download stage's
  guard (http(s) only, public addresses only, capped size, a deadline), never with urllib's default opener;
- CORS headers only for the origins named in cors_origins (none by default);
- the Host header checked before anything else runs: a web page cannot reach the service by DNS rebinding;
- request bodies capped (413) and images whose header declares more than PIL's MAX_IMAGE_PIXELS refused;
- bound to 127.0.0.1 unless told otherwise; malformed requests answered 400 with the reason.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import os
import warnings
from typing import Any

DEFAULT_COLUMNS = ("image_id", "url", "caption", "key")
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
# What a malformed query raises inside clip_back (faiss raises AssertionError/RuntimeError on a wrong dimension).
BAD_INPUT: tuple[type[BaseException], ...] = (
    KeyError,
    IndexError,
    TypeError,
    ValueError,
    OSError,
    AssertionError,
    RuntimeError,
)


@dataclasses.dataclass
class ServeConfig:
    """What `knn-diffusion serve` serves and to whom.

    allowed_hosts: Host header names accepted besides 127.0.0.1, localhost and the bound address (a wildcard
      bind, 0.0.0.0 or ::, accepts any Host unless names are given here).
    cors_origins: origins (e.g. http://127.0.0.1:3000) whose pages may call the service; none by default.
    allow_image_urls: fetch `image_url` queries (through the guarded opener: public http(s) addresses only).
    """

    db: str
    port: int = 1234
    host: str = "127.0.0.1"
    name: str = "db"
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    allow_image_urls: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    fetch_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not os.path.exists(os.path.join(self.db, "image.index")):
            raise FileNotFoundError(
                f"{self.db}/image.index does not exist; run `knn-diffusion index --db {self.db}` first"
            )
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        for name in ("max_body_bytes", "max_image_bytes", "fetch_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for origin in self.cors_origins:
            if not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
                raise ValueError(f"--cors-origin {origin!r} must be an origin such as http://127.0.0.1:3000")

    def trusted_hosts(self) -> list[str] | None:
        """Host header names accepted (without the port): None (any) for a wildcard bind without --allowed-host."""
        wildcard = self.host in ("0.0.0.0", "::", "")
        if wildcard and not self.allowed_hosts:
            return None
        names = [*LOOPBACK_NAMES, *self.allowed_hosts]
        if not wildcard:
            try:
                names.append(f"[{self.host}]" if ipaddress.ip_address(self.host).version == 6 else self.host)
            except ValueError:
                names.append(self.host)  # a host name
        return names


def _clip_resource(db: str, columns: tuple[str, ...]) -> Any:
    """clip_back's ClipResource for one database folder, with the CLIP loaded the way `embed` loads it."""
    from clip_retrieval.clip_back import ClipResource

    from retrieval.clip_model import ClipEncoder
    from retrieval.database import Database

    database = Database.open(db)  # the index memory-mapped, as clip_back's load_index would
    encoder = ClipEncoder(database.info.clip_model, precision="fp32")  # clip_back feeds it float32 pixels
    index, metadata = database.index, DatabaseMetadata(database)
    return ClipResource(
        device=str(encoder.device),
        model=encoder.model,
        preprocess=encoder.preprocess,
        tokenizer=encoder.tokenizer,
        model_txt_mclip=None,
        safety_model=None,
        violence_detector=None,
        metadata_provider=metadata,
        image_index=index,
        text_index=None,
        ivf_old_to_new_mapping=None,
        columns_to_return=list(columns),
        metadata_is_ordered_by_ivf=False,
        aesthetic_embeddings=None,
    )


class DatabaseMetadata:
    """clip_back's metadata provider (get(faiss rows, columns) -> one dict per row), answered by
    Database.metadata from the parts that hold the rows. clip_back's own parquet provider loads every part
    into memory and orders them as strings, which past 99999 shards is not the index's row order."""

    def __init__(self, database: Any) -> None:
        self.database = database

    def get(self, ids: Any, cols: list[str] | None = None) -> list[dict[str, Any]]:
        import numpy as np

        frame = self.database.metadata_at_rows(np.asarray(ids, dtype=np.int64))
        if cols is not None:
            frame = frame[[c for c in frame.columns if c in cols]]
        return frame.to_dict(orient="records")


def _host_check(wsgi_app: Any, trusted: list[str]) -> Any:
    """WSGI middleware answering 400 to a request whose Host header (port removed) is not trusted."""
    names = {name.lower() for name in trusted}

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        host = environ.get("HTTP_HOST", "").lower()
        name = host[: host.find("]") + 1] if host.startswith("[") else host.split(":", 1)[0]  # no port
        if name not in names:
            body = f"Host {host!r} is not served here (see serve --allowed-host)".encode()
            start_response(
                "400 Bad Request", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
            )
            return [body]
        return wsgi_app(environ, start_response)

    return app


def _fetch_image_url(body: dict[str, Any], config: ServeConfig, opener: Any) -> tuple[dict, int] | None:
    """Replace body["image_url"] by the fetched image (base64 in body["image"]); an error answer when refused."""
    if body.get("image_url") is None:
        return None
    if not config.allow_image_urls:
        return {
            "error": "image_url queries are off on this service (start serve with --allow-image-urls "
            "to fetch public http(s) images); send the image itself as base64 in 'image'"
        }, 400
    try:
        with opener.open(str(body["image_url"]), timeout=config.fetch_timeout) as r:
            body["image"] = base64.b64encode(r.read()).decode()
    except (OSError, ValueError) as err:
        return {"error": f"image_url not fetched: {err}"}, 400
    return None


def _check_query(
    body: dict[str, Any], config: ServeConfig, resources: dict[str, Any]
) -> tuple[dict, int] | None:
    indice = body.get("indice_name") or config.name
    if indice not in resources:
        return {"error": f"unknown indice_name {indice!r}; this service has {sorted(resources)}"}, 404
    if body.get("modality", "image") != "image":
        return {"error": "modality must be image (this service indexes image embeddings)"}, 400
    return None


def _query(service: Any, body: dict[str, Any], default_name: str) -> Any:
    """clip_back's query() on a checked body; malformed values and decompression bombs answer 400."""
    from PIL import Image

    try:
        num_images = int(body.get("num_images", 10))
        if not 0 < num_images <= 10_000:
            raise ValueError(f"num_images must be in 1..10000, got {num_images}")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return service.query(
                text_input=body.get("text"),
                image_input=body.get("image"),
                embedding_input=body.get("embedding_input"),
                modality="image",
                num_images=num_images,
                num_result_ids=int(body.get("num_result_ids", num_images)),
                indice_name=body.get("indice_name") or default_name,
                deduplicate=bool(body.get("deduplicate", False)),
            )
    except BAD_INPUT + (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return {"error": f"bad query: {type(err).__name__}: {err}"}, 400


def make_app(config: ServeConfig, resources: dict[str, Any] | None = None) -> Any:
    """The Flask app serving config.db under config.name (resources: prebuilt ClipResources, for tests)."""
    from clip_retrieval.clip_back import Health, IndicesList, KnnService, MetadataService
    from flask import Flask, request
    from flask_restful import Api

    from retrieval.safe_fetch import FetchPolicy, guarded_opener

    resources = resources or {config.name: _clip_resource(config.db, DEFAULT_COLUMNS)}
    opener = guarded_opener(
        FetchPolicy(max_bytes=config.max_image_bytes, deadline_seconds=config.fetch_timeout)
    )

    class GuardedKnnService(KnnService):
        """clip_back's KnnService with its request parsing made strict and image_url fetching guarded."""

        def post(self) -> Any:
            body = request.get_json(force=True, silent=True)
            if not isinstance(body, dict):
                return {"error": "the body must be a JSON object"}, 400
            refused = _fetch_image_url(body, config, opener) or _check_query(body, config, resources)
            return refused or _query(self, body, config.name)

    class StrictMetadataService(MetadataService):
        def post(self) -> Any:
            body = request.get_json(force=True, silent=True)
            if not isinstance(body, dict) or not isinstance(body.get("ids"), list):
                return {"error": "the body must be a JSON object with an ids list"}, 400
            if body.get("indice_name", config.name) not in resources:
                return {"error": f"unknown indice_name; this service has {sorted(resources)}"}, 404
            try:
                return super().post()
            except BAD_INPUT as err:
                return {"error": f"bad query: {type(err).__name__}: {err}"}, 400

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    trusted = config.trusted_hosts()
    if trusted is not None:
        app.wsgi_app = _host_check(app.wsgi_app, trusted)  # type: ignore[method-assign]
    api = Api(app)
    api.add_resource(Health, "/")
    api.add_resource(IndicesList, "/indices-list", resource_class_kwargs={"indices": list(resources)})
    api.add_resource(StrictMetadataService, "/metadata", resource_class_kwargs={"clip_resources": resources})
    api.add_resource(GuardedKnnService, "/knn-service", resource_class_kwargs={"clip_resources": resources})
    if config.cors_origins:
        from flask_cors import CORS

        CORS(app, origins=list(config.cors_origins))
    return app


def serve(config: ServeConfig) -> None:
    """Block serving config.db at http://host:port (endpoints: /knn-service, /metadata, /indices-list)."""
    app = make_app(config)
    print(
        f"serving {config.db} as {config.name!r} on http://{config.host}:{config.port}"
        + ("" if config.allow_image_urls else " (image_url queries off)"),
        flush=True,
    )
    app.run(host=config.host, port=config.port, debug=False, threaded=True)
