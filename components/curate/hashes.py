"""Compact keys of an image for duplicate search: a hash of its decoded pixels (exact duplicates) and a 64-bit
perceptual hash (near duplicates), NumPy only.

`phash` is the DCT hash of Zauner's thesis as the `imagehash` package computes it (gray, 32x32 Lanczos, 2-D DCT-II,
the 8x8 lowest frequencies against their median, bits row-major), without its SciPy dependency: the DCT is a 32x32
cosine matrix. Equal inputs give equal bits to imagehash's (tests/core compare the DCT with SciPy's).
"""
from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

HASH_SIZE = 8  # 8x8 low frequencies: 64 bits
HIGHFREQ_FACTOR = 4  # the image is reduced to 32x32 before the DCT
_N = HASH_SIZE * HIGHFREQ_FACTOR
# DCT-II basis, unnormalised like scipy.fftpack.dct(type=2): X[k] = 2 * sum_n x[n] cos(pi k (2n + 1) / 2N)
_DCT = 2.0 * np.cos(np.pi * np.arange(_N)[:, None] * (2 * np.arange(_N)[None, :] + 1) / (2 * _N))
_BIT_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def dct2(block: np.ndarray) -> np.ndarray:
    """2-D DCT-II of a square block of side 32 (scipy.fftpack.dct along axis 0, then axis 1)."""
    return _DCT @ block @ _DCT.T


# A 32x32 thumbnail whose gray levels vary less than this (standard deviation, of 255) has no structure for the hash
# to describe: its bits are set by noise (JPEG artefacts, rounding), mean nothing, and can match another's by chance.
MIN_STRUCTURE = 2.0


def _thumbnail(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L").resize((_N, _N), Image.Resampling.LANCZOS), dtype=np.float64)


def phash_bits(image: Image.Image) -> np.ndarray:
    """The 64 booleans of the DCT hash, row-major over the 8x8 lowest frequencies."""
    low = dct2(_thumbnail(image))[:HASH_SIZE, :HASH_SIZE]
    return (low > np.median(low)).ravel()


def phash(image: Image.Image) -> int | None:
    """The DCT hash as an unsigned 64-bit integer, the first bit the most significant (imagehash's hex string order);
    None for an image with no structure to hash (MIN_STRUCTURE): such images are compared by pixels and embeddings only."""
    thumbnail = _thumbnail(image)
    if thumbnail.std() < MIN_STRUCTURE:
        return None
    low = dct2(thumbnail)[:HASH_SIZE, :HASH_SIZE]
    return int(np.bitwise_or.reduce(_BIT_WEIGHTS[(low > np.median(low)).ravel()], initial=np.uint64(0)))


def pixel_hash(rgb: np.ndarray) -> int:
    """64-bit BLAKE2b of the decoded pixels and their shape: equal for two files that decode to the same picture
    (another container, another PNG compression level, stripped metadata), unlike a hash of the file bytes."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.asarray(rgb.shape, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(rgb, dtype=np.uint8).data)
    return int.from_bytes(digest.digest(), "big")


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise distances between uint64 hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))
