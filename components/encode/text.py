"""Prompt → the hidden states the UNet cross-attends to: the base model's CLIP text encoder, or a T5 encoder.

Used by encode (stored per row) and by evaluate (fed to the pipeline as prompt_embeds), so
generation sees exactly the conditioning that training saw.
"""
from __future__ import annotations

TEXT_ENCODERS = ("clip", "t5")


class TextEncoder:
    """`base_model.text_encoder`: clip → <base>/text_encoder + <base>/tokenizer (SD 1.x/2.x);
    t5 → T5EncoderModel and its tokenizer from `base_model.t5_model` (padding masked)."""

    def __init__(self, base_model, max_text_length: int, device: str):
        import torch
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        from cnpipe.torch_models import load_pretrained

        self.torch = torch
        self.device = device
        if base_model.text_encoder == "clip":
            revision = base_model.revision or None
            self.tokenizer = AutoTokenizer.from_pretrained(base_model.path, subfolder="tokenizer", revision=revision)
            model = load_pretrained(CLIPTextModel, base_model.path, subfolder="text_encoder", revision=revision)
            self.use_attention_mask = False  # SD's CLIP encoder attends to the padding, as in its training
        elif base_model.text_encoder == "t5":
            self.tokenizer = AutoTokenizer.from_pretrained(base_model.t5_model)
            model = load_pretrained(T5EncoderModel, base_model.t5_model)
            self.use_attention_mask = True
        else:
            raise ValueError(
                f"base_model.text_encoder must be one of {', '.join(TEXT_ENCODERS)}, got {base_model.text_encoder!r}"
            )
        self.model = model.to(device=device, dtype=torch.float32).eval()
        self.max_length = min(max_text_length, self.tokenizer.model_max_length)
        self.hidden_size = self.model.config.hidden_size  # T5's config maps hidden_size to d_model

    def count_truncated(self, prompts: list[str]) -> int:
        """Prompts longer than max_length tokens lose their tail: counted so the loss is visible."""
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        return sum(n > self.max_length for n in lengths)

    def __call__(self, prompts: list[str]):
        """float32 tensor [batch, max_length, hidden] on the encoder's device."""
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        mask = tokens["attention_mask"].to(self.device) if self.use_attention_mask else None
        with self.torch.inference_mode():
            return self.model(tokens["input_ids"].to(self.device), attention_mask=mask)[0].float()
