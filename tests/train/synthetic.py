"""A small encode-stage dataset made up on the spot, following the data contract exactly.

Random latents and text encodings (bf16 bytes via cnpipe.tensors), PNG controls and targets,
split by cnpipe.splits like the encode stage, and the empty-prompt encoding beside the shards.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from cnpipe import splits, storage
from cnpipe.dataset import ShardedOutput, ShardResult
from cnpipe.tensors import to_bf16_bytes

from base_model import RESOLUTION, TEXT_SHAPE

SCHEMA = pa.schema([
    ("id", pa.string()), ("split", pa.string()), ("caption", pa.string()),
    ("latent", pa.binary()), ("latent_shape", pa.list_(pa.int32())),
    ("text_encoding", pa.binary()), ("text_shape", pa.list_(pa.int32())),
    ("control", pa.binary()), ("control_type", pa.string()), ("image", pa.binary()),
])


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _control(rng: np.random.Generator, size: int) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    x0, y0 = rng.integers(0, size // 2, 2)
    image[y0 : y0 + size // 3, x0 : x0 + size // 3] = 255
    return image


def write_encoded(uri: str, rows: int = 24, resolution: int = RESOLUTION, latent_shape=None, text_shape=TEXT_SHAPE,
                  rows_per_shard: int = 8, holdout_fraction: float = 0.25, seed: int = 0, nan_latents: bool = False,
                  control_size: int | None = None, with_uncond: bool = True, heldout_rows: int | None = None):
    """Writes the dataset at `uri` and returns its Manifest.

    Rows are split by cnpipe.splits like the encode stage, or, with `heldout_rows`, the first that many are held out.
    """
    rng = np.random.default_rng(seed)
    latent_shape = tuple(latent_shape or (4, resolution // 8, resolution // 8))
    control_size = control_size or resolution
    output = ShardedOutput(uri, "encode", "synthetic", SCHEMA)
    names = []
    for shard_index, start in enumerate(range(0, rows, rows_per_shard)):
        records = []
        for i in range(start, min(start + rows_per_shard, rows)):
            row_id = f"row-{i:04d}"
            latent = rng.standard_normal(latent_shape).astype(np.float32)
            if nan_latents:
                latent[:] = np.nan
            records.append({
                "id": row_id,
                "split": "heldout" if (i < heldout_rows if heldout_rows is not None else splits.is_heldout(row_id, holdout_fraction)) else "train",
                "caption": f"caption {i}",
                "latent": to_bf16_bytes(latent),
                "latent_shape": list(latent_shape),
                "text_encoding": to_bf16_bytes(rng.standard_normal(text_shape).astype(np.float32)),
                "text_shape": list(text_shape),
                "control": _png(_control(rng, control_size)),
                "control_type": "canny",
                "image": _png(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)),
            })
        name = f"{shard_index:05d}"
        output.commit(name, ShardResult(pa.Table.from_pylist(records, schema=SCHEMA)), rows_in=len(records))
        names.append(name)
    if with_uncond:
        storage.write_bytes_atomic(storage.join(uri, "uncond_text_encoding.bin"), to_bf16_bytes(rng.standard_normal(text_shape)))
        storage.write_json_atomic(storage.join(uri, "uncond_text_shape.json"), list(text_shape))
    return output.finalize(names, inputs=["synthetic"])
