"""A client of clip-retrieval's `/knn-service` HTTP API, sending the request body that
`clip_retrieval.clip_client.ClipClient` sends, so it works against LAION's service, any
`clip-retrieval back` deployment, and the stand-in in `knn_service.py`.

We speak the protocol rather than import ClipClient: clip-retrieval pins numpy<2 and pyarrow<16,
which would force its pins on every stage of this family.

The service is not trusted: its answer is read with a byte cap and a deadline for the whole try (a
per-read timeout alone lets a server that sends a byte a second hold the stage for ever), and an answer
that cannot be read is retried like a network error. The rows in it are checked by the stage.
We use http.client rather than requests for that: a deadline needs the socket from the first byte
(requests exposes it only after the headers), and each try opens its own connection.
"""
from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import socket
import ssl
import threading
import time
import urllib.parse

from cnpipe.redact import CREDENTIALS_ENV, scrub, split_credentials


class KnnServiceError(RuntimeError):
    """The service failed or refused a query; the message names it by its URL without credentials."""


class _Retry(Exception):
    """A failure another try may not meet: network, server error, an answer too large, too slow or unreadable."""


class KnnClient:
    def __init__(self, url: str, cfg):
        if not url:
            raise KnnServiceError("retrieval.service_url is empty: give the URL of a /knn-service endpoint")
        # self.url never holds credentials: it is what messages, logs and the manifest name
        self.url, credentials = split_credentials(url)
        credentials = credentials or os.environ.get(CREDENTIALS_ENV, "")
        self.cfg = cfg
        try:
            parts = urllib.parse.urlsplit(self.url)
            self.port = parts.port
        except ValueError as err:
            raise KnnServiceError(f"retrieval.service_url is not a URL: {scrub(str(err), [credentials])}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise KnnServiceError(f"retrieval.service_url must be an http(s) URL with a host, not {parts.scheme or 'no'} scheme")
        self.https, self.host = parts.scheme == "https", parts.hostname
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self.secrets = [credentials, credentials.partition(":")[2]]
        if credentials:
            token = base64.b64encode(credentials.encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
            self.secrets.append(token)

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

    def query(self, text: str | None = None, embedding: list[float] | None = None) -> list:
        """The answer's results, as the service sent them (the stage checks each row); every failure to get a
        readable answer is retried with exponential backoff, then raised as one KnnServiceError."""
        payload = json.dumps(self.body(text, embedding)).encode()
        tries = self.cfg.retries + 1
        last: Exception | None = None
        for attempt in range(tries):
            if attempt:
                time.sleep(min(2 ** (attempt - 1) * 0.5, 30))
            try:
                return self._try(payload)
            except (_Retry, OSError, http.client.HTTPException) as err:
                last = err
        raise KnnServiceError(f"kNN service {self.url} failed after {tries} tries: {self._clean(str(last))}")

    def _clean(self, text: str) -> str:
        """Text that came from the server (or an error quoting it): a server may echo the credentials it got."""
        return scrub(text, self.secrets)

    def _connection(self) -> http.client.HTTPConnection:
        if not self.https:
            return http.client.HTTPConnection(self.host, self.port, timeout=self.cfg.timeout_s)
        cafile = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
        if not cafile:
            import certifi  # the CA bundle requests used before

            cafile = certifi.where()
        context = ssl.create_default_context(cafile=cafile)
        return http.client.HTTPSConnection(self.host, self.port, timeout=self.cfg.timeout_s, context=context)

    def _try(self, payload: bytes) -> list:
        cfg = self.cfg
        late = f"no whole answer within retrieval.query_deadline_s={cfg.query_deadline_s:g} s"
        deadline = time.monotonic() + cfg.query_deadline_s
        conn = self._connection()
        expired = threading.Event()

        def cut() -> None:  # a read blocked on a slow drip ends when its socket is shut down
            expired.set()
            sock = conn.sock  # read once: the query's thread may close it meanwhile
            if sock is not None:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

        watchdog = threading.Timer(cfg.query_deadline_s, cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()
            if expired.is_set():
                raise _Retry(late)
            conn.request("POST", self.target, body=payload, headers=self.headers)
            response = conn.getresponse()
            body = self._read(response, deadline, late)
            if expired.is_set():  # a cut socket can read as a clean end (of the headers, of the body)
                raise _Retry(late)
        except (OSError, http.client.HTTPException) as err:
            raise _Retry(late if expired.is_set() else f"{type(err).__name__}: {err}") from None
        finally:
            watchdog.cancel()
            conn.close()
        return self._parse(response.status, body)

    def _read(self, response: http.client.HTTPResponse, deadline: float, late: str) -> bytes:
        """The body, refused once it passes max_response_bytes (at once when Content-Length says it will)."""
        cap = self.cfg.max_response_bytes
        declared = (response.getheader("Content-Length") or "").strip()
        if declared.isdigit() and int(declared) > cap:
            raise _Retry(f"answer of {declared} bytes is over retrieval.max_response_bytes={cap}")
        chunks, size = [], 0
        while chunk := response.read1(65536):
            size += len(chunk)
            if size > cap:
                raise _Retry(f"answer is over retrieval.max_response_bytes={cap} bytes")
            if time.monotonic() > deadline:
                raise _Retry(late)
            chunks.append(chunk)
        return b"".join(chunks)

    def _parse(self, status: int, body: bytes) -> list:
        excerpt = self._clean(body[:4096].decode(errors="replace"))[:500]  # cleaned before cut: no half secret left
        if status in (408, 429) or status >= 500:
            raise _Retry(f"HTTP {status}: {excerpt}")
        if status >= 300:
            # the request itself is wrong (unknown indice, bad embedding, credentials) or the URL moved: retrying repeats it
            hint = f" (credentials: user:password in retrieval.service_url or ${CREDENTIALS_ENV})" if status in (401, 403) else ""
            raise KnnServiceError(f"{self.url} refused the query (HTTP {status}){hint}: {excerpt}")
        try:
            results = json.loads(body)
        except RecursionError:
            raise _Retry("the answer's JSON is nested too deeply") from None
        except ValueError as err:
            raise _Retry(f"the answer is not JSON: {err}") from None
        if isinstance(results, dict) and "error" in results:
            raise KnnServiceError(f"{self.url} answered: {self._clean(str(results['error']))[:500]}")
        if not isinstance(results, list):
            raise _Retry(f"answered a JSON {type(results).__name__}, expected a list of results")
        return results
