"""CLIP embed: batched image embeddings, L2-normalised so that inner product is cosine similarity."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from cnpipe import images
from cnpipe.dataset import Manifest, Reject, ShardResult
from cnpipe.stage import run_per_shard

STAGE = "clip_embed"


class ClipImageEmbedder:
    def __init__(self, model_id: str, device: str = "auto"):
        import torch
        from transformers import CLIPImageProcessor, CLIPModel

        from cnpipe.torch_models import load, pick_device

        self.torch = torch
        self.device = pick_device(device)
        self.model, self.processor = load(CLIPModel, CLIPImageProcessor, model_id, self.device)
        self.dim = self.model.config.projection_dim

    def __call__(self, pil_images: list) -> np.ndarray:
        with self.torch.inference_mode():
            pixels = self.processor(images=pil_images, return_tensors="pt")["pixel_values"]
            features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
            features = self.torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32)


def embed_shard(table: pa.Table, embedder: ClipImageEmbedder, batch_size: int) -> ShardResult:
    """Rows without an image yet (URL rows) pass through with a null embedding, counted in notes."""
    embeddings: list = [None] * table.num_rows
    rejects, notes, keep = [], Counter(), [True] * table.num_rows
    ids, blobs = table.column("id").to_pylist(), table.column("image").to_pylist()
    pending: list[tuple[int, object]] = []

    def flush() -> None:
        if pending:
            vectors = embedder([image for _, image in pending])
            for (row, _), vector in zip(pending, vectors):
                embeddings[row] = vector.tolist()
            pending.clear()

    for row, (row_id, blob) in enumerate(zip(ids, blobs)):
        if blob is None:
            notes["no_image_to_embed"] += 1
            continue
        try:
            pending.append((row, images.decode_rgb(blob)))
        except images.ImageRejected as err:
            rejects.append(Reject(row_id, err.reason, err.detail))
            keep[row] = False
            continue
        if len(pending) >= batch_size:
            flush()
    flush()
    kept = table.filter(pa.array(keep, type=pa.bool_()))
    column = pa.array([e for e, k in zip(embeddings, keep) if k], type=pa.list_(pa.float32()))
    return ShardResult(kept.append_column("clip_embedding", column), rejects, notes)


def run(config, inputs: dict[str, Manifest], output_uri: str) -> Manifest:
    cfg = config.clip_embed
    (seeds,) = inputs.values()
    embedder = ClipImageEmbedder(cfg.model, cfg.device)
    schema = seeds.arrow_schema().append(pa.field("clip_embedding", pa.list_(pa.float32())))
    return run_per_shard(
        STAGE, [seeds], output_uri, config.section_hash("clip_embed"), schema,
        lambda table, _: embed_shard(table, embedder, cfg.batch_size),
    )

