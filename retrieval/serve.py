"""Serve a database with clip-retrieval's `back` (kNN HTTP API + metadata), bound to 127.0.0.1 by default.

clip_back() binds 0.0.0.0 unconditionally; here Flask's run() is given the host we choose instead. The
options that download models at start-up (M-CLIP, aesthetic embeddings, safety/violence models) are off.
"""

from __future__ import annotations

import json
import os
import tempfile

DEFAULT_COLUMNS = ("image_id", "url", "caption", "key")


def indices_config(db: str, name: str = "db", columns: tuple[str, ...] = DEFAULT_COLUMNS) -> dict:
    """clip-retrieval back's indices JSON for one database folder."""
    with open(os.path.join(db, "database.json")) as f:
        info = json.load(f)
    return {
        name: {
            "indice_folder": os.path.abspath(db),
            "clip_model": info["clip_model"],
            "columns_to_return": list(columns),
            "enable_faiss_memory_mapping": True,
            "use_arrow": False,
            "enable_hdf5": False,
            "enable_mclip_option": False,
            "provide_safety_model": False,
            "provide_violence_detector": False,
            "provide_aesthetic_embeddings": False,
            "use_jit": False,
        }
    }


def serve(db: str, port: int = 1234, host: str = "127.0.0.1", name: str = "db") -> None:
    """Block serving `db` at http://host:port (endpoints: /knn-service, /metadata, /indices-list)."""
    import flask
    from clip_retrieval.clip_back import clip_back

    if not os.path.exists(os.path.join(db, "image.index")):
        raise FileNotFoundError(f"{db}/image.index does not exist; run `knn-diffusion index --db {db}` first")
    config = indices_config(db, name)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    flask_run = flask.Flask.run

    def run_on_host(self: flask.Flask, *args: object, **kwargs: object) -> None:
        kwargs["host"] = host  # clip_back passes host= and port= as keywords
        flask_run(self, *args, **kwargs)  # type: ignore[arg-type]

    flask.Flask.run = run_on_host  # type: ignore[method-assign]
    print(f"serving {db} as {name!r} on http://{host}:{port}", flush=True)
    clip_back(
        indices_paths=f.name,
        port=port,
        clip_model=config[name]["clip_model"],
        enable_mclip_option=False,
        provide_aesthetic_embeddings=False,
        use_jit=False,
        columns_to_return=list(DEFAULT_COLUMNS),
    )
