"""The catalogue: one JSON file naming databases (local folders or remote `clip-retrieval back` services)
with their models, counts and aesthetic bands, so any stage can open a database by name.

Format (version 1)::

    {"version": 1, "databases": {
        "db":  {"kind": "local", "path": "/abs/data/db", "clip_model": "...", "dim": 512, "num_images": 1000,
                "aesthetic_head": "laion-v1:ViT-B-32",
                "bands": [{"name": "q0", "lower": null, "upper": 4.1, "count": 200}, ...]},
        "web": {"kind": "remote", "url": "http://127.0.0.1:1234", "indice_name": "db", "clip_model": "..."}}}

Its default place is $KNN_DIFFUSION_CATALOGUE, else ~/.config/knn_diffusion/catalogue.json: one catalogue
per user, so a name means the same database from any directory.
"""

from __future__ import annotations

import json
import os
from typing import Any

CATALOGUE_ENV = "KNN_DIFFUSION_CATALOGUE"


def default_path() -> str:
    if os.environ.get(CATALOGUE_ENV):
        return os.environ[CATALOGUE_ENV]
    return os.path.join(os.path.expanduser("~"), ".config", "knn_diffusion", "catalogue.json")


def load(path: str) -> dict[str, Any]:
    """The catalogue at `path` ({"version": 1, "databases": {}} when the file does not exist yet)."""
    if not os.path.exists(path):
        return {"version": 1, "databases": {}}
    if os.path.isdir(path):
        raise ValueError(
            f"catalogue {path} is a folder; pass the catalogue JSON file (e.g. {path}/catalogue.json)"
        )
    with open(path) as f:
        try:
            cat = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"catalogue {path} is not valid JSON ({err}); fix or delete it") from err
    if cat.get("version") != 1 or not isinstance(cat.get("databases"), dict):
        raise ValueError(f"catalogue {path} is not a version-1 catalogue (no 'databases' object)")
    return cat


def register(path: str, name: str, entry: dict[str, Any]) -> None:
    """Add or replace the database `name` (written to a temporary file, then renamed into place)."""
    if entry.get("kind") not in ("local", "remote"):
        raise ValueError(
            f"catalogue entry {name!r} must have kind 'local' or 'remote', got {entry.get('kind')!r}"
        )
    cat = load(path)
    old = cat["databases"].get(name)
    if old is not None and (old.get("path"), old.get("url")) != (entry.get("path"), entry.get("url")):
        raise ValueError(
            f"catalogue {path} already names {name!r} for {old.get('path') or old.get('url')}; choose another --name "
            "(or remove that entry from the file)"
        )
    cat["databases"][name] = entry
    from retrieval.storage import json_bytes, write_atomic

    write_atomic(path, json_bytes(cat))


def local_entry(db: str) -> dict[str, Any]:
    """The catalogue entry of a local database folder, from its database.json and bands/bands.json."""
    from retrieval.database import DatabaseInfo

    info = DatabaseInfo.read(db)
    entry: dict[str, Any] = {
        "kind": "local",
        "path": os.path.abspath(db),
        "clip_model": info.clip_model,
        "dim": info.dim,
        "num_images": info.num_images,
    }
    bands_path = os.path.join(db, "bands", "bands.json")
    if os.path.exists(bands_path):
        with open(bands_path) as f:
            bands = json.load(f)
        entry["aesthetic_head"] = bands["head"]
        entry["bands"] = bands["bands"]
    return entry


def find(name_or_path: str, catalogue: str | None = None) -> dict[str, Any]:
    """What a database folder path or catalogue name stands for, without opening it: {"kind": "local",
    "path": ...} for a folder holding database.json, else its catalogue entry. KeyError when it is neither."""
    if os.path.exists(os.path.join(name_or_path, "database.json")):
        return {"kind": "local", "path": name_or_path}
    path = catalogue or default_path()
    databases = load(path)["databases"]
    if name_or_path not in databases:
        raise KeyError(
            f"{name_or_path!r} is neither a database folder nor a name in the catalogue {path} "
            f"(it names {sorted(databases)}); add it with `knn-diffusion catalogue add`"
        )
    return databases[name_or_path]


def open_database(name_or_path: str, catalogue: str | None = None, **remote_options: Any) -> Any:
    """A Database (local folder) or RemoteDatabase (clip-retrieval back), by folder path or catalogue name.

    Both answer search(query_embeddings [Q, D], k, band=None) -> SearchResult of global image ids.
    """
    from retrieval.database import Database
    from retrieval.remote import RemoteDatabase

    entry = find(name_or_path, catalogue)
    if entry["kind"] == "local":
        return Database.open(entry["path"])
    return RemoteDatabase(entry["url"], entry["indice_name"], entry["clip_model"], **remote_options)
