"""Which rows are held out for evaluation: decided by the stable row id, so every stage agrees without sharing state."""
import hashlib


def is_heldout(row_id: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    bucket = int.from_bytes(hashlib.sha256(f"heldout:{row_id}".encode()).digest()[:8], "big") / 2**64
    return bucket < fraction
