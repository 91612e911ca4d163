"""A client of clip-retrieval's `/knn-service` HTTP API, sending the request body that
`clip_retrieval.clip_client.ClipClient` sends, so it works against LAION's service, any
`clip-retrieval back` deployment, and the stand-in in `knn_service.py`.

We speak the protocol rather than import ClipClient: clip-retrieval pins numpy<2 and pyarrow<16,
which would force its pins on every stage of this family.
"""
from __future__ import annotations

import time

import requests


class KnnServiceError(RuntimeError):
    pass


class KnnClient:
    def __init__(self, url: str, cfg):
        if not url:
            raise KnnServiceError("retrieval.service_url is empty: give the URL of a /knn-service endpoint")
        self.url = url
        self.cfg = cfg
        self.session = requests.Session()

    def body(self, text: str | None = None, embedding: list[float] | None = None) -> dict:
        cfg = self.cfg
        return {
            "text": text,
            "image": None,
            "image_url": None,
            "embedding_input": embedding,
            "deduplicate": cfg.deduplicate,
            "use_safety_model": cfg.use_safety_model,
            "use_violence_detector": cfg.use_violence_detector,
            "indice_name": cfg.indice_name,
            "use_mclip": False,
            "aesthetic_score": cfg.aesthetic_score,
            "aesthetic_weight": cfg.aesthetic_weight,
            "modality": "image",
            "num_images": cfg.num_images,
            "num_result_ids": cfg.num_images,
        }

    def query(self, text: str | None = None, embedding: list[float] | None = None) -> list[dict]:
        """Results as [{"url", "caption", "similarity", "id"}, ...]; retries with exponential backoff."""
        last: Exception | None = None
        for attempt in range(self.cfg.retries + 1):
            try:
                response = self.session.post(self.url, json=self.body(text, embedding), timeout=self.cfg.timeout_s)
                if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                    # the request itself is wrong (unknown indice, bad embedding): retrying repeats it; say why
                    raise KnnServiceError(f"{self.url} refused the query (HTTP {response.status_code}): {response.text[:500]}")
                response.raise_for_status()
                results = response.json()
                if isinstance(results, dict) and "error" in results:
                    raise KnnServiceError(f"{self.url} answered: {results['error']}")
                if not isinstance(results, list):
                    raise KnnServiceError(f"{self.url} answered {type(results).__name__}, expected a list of results")
                return results
            except (requests.RequestException, ValueError) as err:
                last = err
                time.sleep(min(2**attempt * 0.5, 30))
        raise KnnServiceError(f"kNN service {self.url} failed after {self.cfg.retries + 1} tries: {last}")
