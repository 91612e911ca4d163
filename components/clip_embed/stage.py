"""CLIP embed: batched image embeddings, L2-normalised so that inner product is cosine similarity."""
from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from cnpipe.dataset import Manifest, ShardResult
from cnpipe.image_batches import map_images
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

    def prepare(self, pil_images: list):
        """The processor's CPU work (resize, crop, normalise), separate so that it can run ahead of the model."""
        return self.processor(images=pil_images, return_tensors="pt")["pixel_values"]

    def run(self, pixels) -> np.ndarray:
        with self.torch.inference_mode():
            features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
            features = self.torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32)

    def __call__(self, pil_images: list) -> np.ndarray:
        return self.run(self.prepare(pil_images))


class ClipEmbedder(ClipImageEmbedder):
    """The same model's text tower too: L2-normalised caption embeddings in the image embeddings' space, so that their
    inner product is CLIP's image-text cosine similarity (curate's caption agreement)."""

    def __init__(self, model_id: str, device: str = "auto"):
        super().__init__(model_id, device)
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(model_id)
        self.max_length = self.model.config.text_config.max_position_embeddings

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Captions longer than CLIP's context (77 tokens) are truncated, as CLIP scores them."""
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with self.torch.inference_mode():
            features = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
            features = self.torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32)


def embed_shard(table: pa.Table, embedder: ClipImageEmbedder, batch_size: int) -> ShardResult:
    """Rows without an image yet (URL rows) pass through with a null embedding, counted in notes."""
    return map_images(table, embedder.prepare, lambda pixels: [v.tolist() for v in embedder.run(pixels)], batch_size,
                      pa.field("clip_embedding", pa.list_(pa.float32())), keep_missing_as="no_image_to_embed")


def run(config, inputs: dict[str, Manifest], output_uri: str) -> Manifest:
    cfg = config.clip_embed
    (seeds,) = inputs.values()
    embedder = functools.cache(lambda: ClipImageEmbedder(cfg.model, cfg.device))  # loaded only if a shard is left to do
    schema = seeds.arrow_schema().append(pa.field("clip_embedding", pa.list_(pa.float32())))
    return run_per_shard(
        STAGE, [seeds], output_uri, config.section_hash("clip_embed"), schema,
        lambda table, _: embed_shard(table, embedder(), cfg.batch_size),
    )

