"""Stable row ids: the same source row gets the same id on every run and every machine."""
import hashlib


def stable_id(*parts: object) -> str:
    digest = hashlib.sha1("\x1f".join(str(p) for p in parts).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:20]
