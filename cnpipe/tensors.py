"""bfloat16 tensors as raw bytes, with numpy only, so every family (torch, JAX, none) reads them alike.

bfloat16 is the upper half of a float32: same sign and exponent, 7 mantissa bits. Encoding rounds
to nearest, ties to even (what torch's and ml_dtypes' casts do), so bytes written here equal
`tensor.to(torch.bfloat16)`'s. Bytes are little-endian uint16 in C order, whatever the machine.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

_WIRE = np.dtype("<u2")


def to_bf16_bytes(array) -> bytes:
    """Raw bfloat16 bytes of `array` (cast to float32 first), C order."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    # Ties to even: add 0x7FFF plus the lowest kept bit, then drop the low half. Cannot overflow
    # for non-NaN input (largest is -inf, 0xFF800000); a finite value past bf16's range becomes inf.
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    # NaN must stay NaN (rounding could carry its mantissa into the exponent): keep it quiet.
    nan = np.isnan(bits.view(np.float32))
    rounded = np.where(nan, (bits >> 16) | np.uint32(0x0040), rounded)
    return rounded.astype(_WIRE).tobytes()


def from_bf16_bytes(data: bytes, shape: Sequence[int]) -> np.ndarray:
    """A float32 array of `shape` from raw bfloat16 bytes (exact: every bfloat16 is a float32)."""
    shape = tuple(int(s) for s in shape)
    expected = 2 * int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise ValueError(f"{len(data)} bytes cannot hold a bfloat16 tensor of shape {list(shape)} ({expected} bytes)")
    halves = np.frombuffer(data, dtype=_WIRE).astype(np.uint32) << 16
    return halves.view(np.float32).reshape(shape)
