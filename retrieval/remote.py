"""A remote `clip-retrieval back` service as a database: query embeddings [Q, D] -> SearchResult of image ids.

This is the paper's "image search engine" source: the service returns ids, similarities and metadata
(url, caption); neighbour embeddings are computed here by fetching the images (through the download
stage's guarded opener, so private addresses are refused unless allowed) and embedding them with the
service's own CLIP. Responses are read with a size cap.
"""

from __future__ import annotations

import io
import json
import logging
import urllib.request
from typing import Any

import numpy as np
import pandas as pd

from retrieval.database import DatabaseInfo, SearchResult, normalize

MAX_RESPONSE_BYTES = 16 * 1024 * 1024
log = logging.getLogger(__name__)


def _read_capped(response: Any, limit: int, what: str) -> bytes:
    data = response.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} answered more than {limit} bytes; refusing to read further")
    return data


class RemoteDatabase:
    """search(queries, k) against http://host:port/knn-service; metadata(ids) and embeddings(ids) of results seen."""

    def __init__(
        self,
        url: str,
        indice_name: str,
        clip_model: str,
        timeout: float = 30.0,
        allow_network: tuple[str, ...] = (),
        allow_private_network: bool = False,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote database url {url!r} must start with http:// or https://")
        self.path = self.url = url.rstrip("/")
        self.indice_name = indice_name
        self.info = DatabaseInfo(clip_model=clip_model)
        self.timeout = timeout
        self.allow_network = tuple(allow_network)
        self.allow_private_network = allow_private_network
        self._seen: dict[int, dict[str, Any]] = {}

    def _post(self, endpoint: str, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(
            f"{self.url}/{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(_read_capped(r, MAX_RESPONSE_BYTES, f"{self.url}/{endpoint}"))
        except OSError as err:
            raise ValueError(f"the remote database {self.url} did not answer /{endpoint}: {err}") from err

    def indices(self) -> list[str]:
        try:
            with urllib.request.urlopen(f"{self.url}/indices-list", timeout=self.timeout) as r:
                found = json.loads(_read_capped(r, MAX_RESPONSE_BYTES, f"{self.url}/indices-list"))
        except OSError as err:
            raise ValueError(f"the remote database {self.url} did not answer /indices-list: {err}") from err
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{self.url}/indices-list did not answer JSON ({err}); is it a clip-retrieval back?"
            ) from err
        if not isinstance(found, list) or not found:
            raise ValueError(
                f"{self.url}/indices-list answered {str(found)[:100]!r}, not a list of index names"
            )
        return [str(name) for name in found]

    def search(self, queries: np.ndarray, k: int, band: str | int | None = None) -> SearchResult:
        """k nearest images per query; ids are the service's image_id column (else its row id)."""
        if band is not None:
            raise ValueError(f"the remote database {self.url} ({self.indice_name}) has no aesthetic bands")
        q = normalize(queries)
        ids = np.full((len(q), k), -1, np.int64)
        scores = np.full((len(q), k), -np.inf, np.float32)
        for i, vec in enumerate(q):
            results = self._post(
                "knn-service",
                {
                    "embedding_input": vec.tolist(),
                    "modality": "image",
                    "num_images": k,
                    "num_result_ids": k,
                    "indice_name": self.indice_name,
                    "deduplicate": False,
                    "use_safety_model": False,
                    "use_violence_detector": False,
                },
            )
            if not isinstance(results, list):
                raise ValueError(
                    f"{self.url}/knn-service answered {str(results)[:200]!r} instead of a list of results"
                )
            for j, hit in enumerate(results[:k]):
                image_id = int(hit.get("image_id", hit["id"]))
                ids[i, j], scores[i, j] = image_id, hit["similarity"]
                self._seen[image_id] = {c: v for c, v in hit.items() if c not in ("id", "similarity")}
        return SearchResult(ids=ids, scores=scores)

    def search_text(self, texts: list[str], k: int) -> SearchResult:
        from retrieval.clip_model import cached_encoder

        return self.search(cached_encoder(self.info.clip_model).encode_texts(texts).numpy(), k)

    def metadata(self, image_ids: np.ndarray) -> pd.DataFrame:
        """Metadata of ids returned by earlier searches (the service is asked by row, which we never see)."""
        missing = [int(i) for i in image_ids if int(i) not in self._seen]
        if missing:
            raise KeyError(f"image ids {missing[:5]} were not returned by a search of {self.url}")
        return pd.DataFrame([{"image_id": int(i), **self._seen[int(i)]} for i in image_ids])

    def embeddings(self, image_ids: np.ndarray) -> np.ndarray:
        """[n, D] float32: the images behind the ids, fetched by url (guarded) and embedded with the CLIP.

        An image that cannot be fetched or decoded (dead links are common in web indexes), or whose header
        declares more than PIL's MAX_IMAGE_PIXELS (a decompression bomb: refused before decoding), gives a zero
        row, which callers treat as a missing neighbour; a warning names it.
        """
        import warnings

        from PIL import Image

        from retrieval.clip_model import cached_encoder
        from retrieval.safe_fetch import FetchPolicy, guarded_opener

        encoder = cached_encoder(self.info.clip_model)
        opener = guarded_opener(
            FetchPolicy(allow_private_network=self.allow_private_network, allowed_networks=self.allow_network)
        )
        import torch

        urls = list(self.metadata(image_ids)["url"])
        pixels, fetched = [], []
        for i, url in enumerate(urls):
            try:
                with opener.open(url, timeout=self.timeout) as r, warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    image = Image.open(io.BytesIO(r.read())).convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                # refused, unreachable, too big, not an image, or a decompression bomb
                log.warning("neighbour image %s skipped: %s", url, err)
                continue
            pixels.append(encoder.preprocess(image))
            fetched.append(i)
        out = np.zeros((len(urls), encoder.dim), np.float32)
        if pixels:
            out[fetched] = encoder.encode_images(torch.stack(pixels)).numpy()
        return out
