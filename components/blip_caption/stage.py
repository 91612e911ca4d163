"""BLIP caption: a generated caption for every image, batched; a caption that came with the data stays
in `source_caption`, so training can choose either (encode.caption_source)."""
from __future__ import annotations

import functools
import pyarrow as pa

from cnpipe.dataset import Manifest, ShardResult
from cnpipe.image_batches import map_images
from cnpipe.stage import run_per_shard

STAGE = "blip_caption"


class BlipCaptioner:
    """BLIP (BlipForConditionalGeneration) or BLIP-2 (Blip2ForConditionalGeneration), picked from the checkpoint's config."""

    def __init__(self, model_id: str, device: str = "auto", max_new_tokens: int = 30, num_beams: int = 1, prompt: str = ""):
        import torch
        from transformers import AutoConfig, AutoProcessor, Blip2ForConditionalGeneration, BlipForConditionalGeneration

        from cnpipe.torch_models import load, pick_device

        self.torch = torch
        self.device = pick_device(device)
        model_cls = Blip2ForConditionalGeneration if AutoConfig.from_pretrained(model_id).model_type == "blip-2" else BlipForConditionalGeneration
        self.model, self.processor = load(model_cls, AutoProcessor, model_id, self.device)
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": False}
        self.prompt = prompt
        # The prompt as the decoder spells it back (BLIP's uncased tokenizer lower-cases it), to strip it from captions.
        tokenizer = self.processor.tokenizer
        self.decoded_prompt = tokenizer.decode(tokenizer(prompt, add_special_tokens=False).input_ids).strip() if prompt else ""

    def prepare(self, pil_images: list):
        """The processor's CPU work, separate so that it can run ahead of generation."""
        kwargs = {"images": pil_images, "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(pil_images)
        return self.processor(**kwargs)

    def run(self, inputs) -> list[str]:
        with self.torch.inference_mode():
            batch = inputs.to(self.device)
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
            tokens = self.model.generate(**batch, **self.generate_kwargs)
        return [self.without_prompt(t) for t in self.processor.batch_decode(tokens, skip_special_tokens=True)]

    def without_prompt(self, text: str) -> str:
        """The generated text less the conditional prompt it continues, as the original BLIP returns captions
        (caption[len(prompt):]): "a photography of a cat" is the caption "a cat" of that prompt."""
        text = text.strip()
        if self.decoded_prompt and text.startswith(self.decoded_prompt):
            return text[len(self.decoded_prompt):].strip()
        return text

    def __call__(self, pil_images: list) -> list[str]:
        return self.run(self.prepare(pil_images))


def caption_shard(table: pa.Table, captioner, batch_size: int) -> ShardResult:
    result = map_images(table, captioner.prepare, captioner.run, batch_size, pa.field("blip_caption", pa.string()))
    empty = sum(1 for text in result.table.column("blip_caption").to_pylist() if not text)
    if empty:
        result.notes["blip_caption_empty"] += empty
    return result


def run(config, inputs: dict[str, Manifest], output_uri: str) -> Manifest:
    cfg = config.caption
    (source,) = inputs.values()
    # loaded only if a shard is left to do: a rerun that finds every shard done costs its manifest check
    captioner = functools.cache(lambda: BlipCaptioner(cfg.model, cfg.device, cfg.max_new_tokens, cfg.num_beams, cfg.prompt))
    schema = source.arrow_schema().append(pa.field("blip_caption", pa.string()))
    return run_per_shard(
        STAGE, [source], output_uri, config.section_hash("caption"), schema,
        lambda table, _: caption_shard(table, captioner(), cfg.batch_size),
    )
