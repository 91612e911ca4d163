"""CLIP score (100 × cosine of image and prompt embeddings, not clamped at 0 as torchmetrics does, so
differences between weak models stay visible) and the CLIP image features the Fréchet distance uses."""
from __future__ import annotations

import numpy as np


class ClipScorer:
    def __init__(self, model_id: str, device: str):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        from cnpipe.torch_models import load

        self.torch = torch
        self.device = device
        self.model, self.processor = load(CLIPModel, CLIPProcessor, model_id, device)
        self.max_length = self.model.config.text_config.max_position_embeddings

    def image_features(self, images: list) -> np.ndarray:
        """L2-normalised image embeddings [n, d]."""
        with self.torch.inference_mode():
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
            return self.torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()

    def text_features(self, texts: list[str]) -> np.ndarray:
        with self.torch.inference_mode():
            tokens = self.processor(
                text=texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            features = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
            return self.torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()

    def scores(self, image_features: np.ndarray, texts: list[str]) -> np.ndarray:
        """Per-pair CLIP score, 100 × cos(image_i, text_i)."""
        return 100.0 * (image_features * self.text_features(texts)).sum(axis=1)
