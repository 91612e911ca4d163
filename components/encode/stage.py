"""Encode: everything training needs per row, computed once so the trainer never runs a VAE or text encoder.

Per row: VAE latent of the R×R target (posterior mean × scaling_factor, bf16), text encoding of the
chosen caption (bf16), the R×R control and target as PNG, and the train/heldout split.
Rejected with a reason: an undecodable image (decode_rgb's reason) or control (`control_<reason>`),
a control whose size differs from its image. Kept and counted in notes: a row with no caption at
all is encoded with the empty prompt (`empty_caption`), the caption each row got (`caption_<origin>`),
captions cut at max_text_length (`caption_truncated`), held-out rows (`heldout`).
The empty-prompt encoding is written once beside the shards (uncond_text_encoding.bin + uncond_text_shape.json).
"""
from __future__ import annotations

import functools
import hashlib
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
from PIL import Image

from cnpipe import images, splits, storage
from cnpipe.dataset import Manifest, Reject, ShardResult, conditioning_dataset
from cnpipe.stage import run_per_shard
from cnpipe.tensors import to_bf16_bytes
from components.encode.captions import choose_caption
from components.encode.inputs import check_settings, control_type_of
from components.encode.pixels import png_bytes, square_crop

STAGE = "encode"
UNCOND_ENCODING = "uncond_text_encoding.bin"
UNCOND_SHAPE = "uncond_text_shape.json"
INPUT_COLUMNS = ["id", "image", "control", "caption", "blip_caption", "source_caption"]

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("caption", pa.string()),
        ("latent", pa.binary()),
        ("latent_shape", pa.list_(pa.int32())),
        ("text_encoding", pa.binary()),
        ("text_shape", pa.list_(pa.int32())),
        ("control", pa.binary()),
        ("control_type", pa.string()),
        ("image", pa.binary()),
    ]
)


@dataclass
class Pending:
    id: str
    caption: str
    image: Image.Image
    control: Image.Image


def config_hash(config) -> str:
    """Encode's output depends on the base model (VAE, text encoder) as much as on its own section."""
    both = config.section_hash("encode") + config.section_hash("base_model")
    return hashlib.sha256(both.encode()).hexdigest()[:16]


def prepare_row(row: dict, resolution: int, caption_source: str, notes: Counter) -> Pending:
    """Decode and crop one row; raises ImageRejected with the reason it cannot be used."""
    image = images.decode_rgb(row["image"])
    try:
        control = images.decode_rgb(row["control"])
    except images.ImageRejected as err:
        raise images.ImageRejected(f"control_{err.reason}", err.detail) from None
    if control.size != image.size:
        raise images.ImageRejected("control_size_mismatch", f"control {control.size} vs image {image.size}")
    caption, origin = choose_caption(caption_source, row["source_caption"], row["blip_caption"], row["caption"])
    notes["empty_caption" if origin == "none" else f"caption_{origin}"] += 1
    return Pending(
        id=row["id"],
        caption=caption,
        image=square_crop(image, resolution, Image.Resampling.BICUBIC),
        control=square_crop(control, resolution, Image.Resampling.BILINEAR),  # as diffusers' ControlNet example
    )


def encode_batch(batch: list[Pending], text_encoder, latent_encoder, enc, control_type: str, notes: Counter) -> list[dict]:
    latents = latent_encoder([p.image for p in batch])
    texts = text_encoder([p.caption for p in batch]).cpu().numpy()
    notes["caption_truncated"] += text_encoder.count_truncated([p.caption for p in batch])
    rows = []
    for p, latent, text in zip(batch, latents, texts):
        heldout = splits.is_heldout(p.id, enc.holdout_fraction)
        notes["heldout"] += heldout
        rows.append(
            {
                "id": p.id,
                "split": "heldout" if heldout else "train",
                "caption": p.caption,
                "latent": to_bf16_bytes(latent),
                "latent_shape": list(latent.shape),
                "text_encoding": to_bf16_bytes(text),
                "text_shape": list(text.shape),
                "control": png_bytes(p.control),
                "control_type": control_type,
                "image": png_bytes(p.image),
            }
        )
    return rows


def encode_shard(table: pa.Table, text_encoder, latent_encoder, enc, control_type: str) -> ShardResult:
    """Rows in input order; batches of encode.batch_size through the VAE and the text encoder."""
    rows, rejects, notes, batch = [], [], Counter(), []
    for row in table.to_pylist():
        try:
            batch.append(prepare_row(row, enc.resolution, enc.caption_source, notes))
        except images.ImageRejected as err:
            rejects.append(Reject(row["id"], err.reason, err.detail))
            continue
        if len(batch) >= enc.batch_size:
            rows += encode_batch(batch, text_encoder, latent_encoder, enc, control_type, notes)
            batch = []
    if batch:
        rows += encode_batch(batch, text_encoder, latent_encoder, enc, control_type, notes)
    notes = Counter({k: v for k, v in notes.items() if v})
    return ShardResult(pa.Table.from_pylist(rows, schema=SCHEMA), rejects, notes)


def write_uncond(output_uri: str, text_encoder) -> None:
    """The empty prompt's encoding, for caption dropout in training and the negative branch of CFG."""
    uncond = text_encoder([""]).cpu().numpy()[0]
    storage.write_bytes_atomic(storage.join(output_uri, UNCOND_ENCODING), to_bf16_bytes(uncond))
    storage.write_json_atomic(storage.join(output_uri, UNCOND_SHAPE), list(uncond.shape))


def check_cross_attention(base_model, hidden_size: int) -> None:
    """A text encoder the UNet cannot attend to would only fail in training, after the whole encode."""
    from diffusers import UNet2DConditionModel

    from pipeline_configs import ConfigError

    unet = UNet2DConditionModel.load_config(base_model.path, subfolder="unet", revision=base_model.revision or None)
    wanted = unet.get("cross_attention_dim")
    if isinstance(wanted, int) and wanted != hidden_size:
        raise ConfigError(
            f"base_model.text_encoder={base_model.text_encoder!r} gives hidden size {hidden_size}, "
            f"but the UNet of {base_model.path} cross-attends to {wanted}"
        )


def run(config, inputs: dict[str, Manifest], output_uri: str) -> Manifest:
    from cnpipe.torch_models import pick_device
    from components.encode.latents import LatentEncoder
    from components.encode.text import TextEncoder

    check_settings(config)
    if "conditioning" not in inputs:
        raise ValueError(f"encode needs input 'conditioning', got {sorted(inputs)}")
    conditioning = conditioning_dataset(inputs["conditioning"], config.encode.conditioning_type)
    control_type = control_type_of(conditioning, config)
    enc = config.encode

    @functools.cache
    def encoders() -> tuple:
        """The models, loaded and checked when the first shard is left to do (a rerun that finds every shard
        done loads nothing); the empty-prompt encoding is written before any shard is committed."""
        device = pick_device(enc.device)
        latent_encoder = LatentEncoder(config.base_model, device)
        if enc.resolution % latent_encoder.downsampling:
            from pipeline_configs import ConfigError

            raise ConfigError(
                f"encode.resolution {enc.resolution} is not divisible by the VAE's downsampling {latent_encoder.downsampling}"
            )
        text_encoder = TextEncoder(config.base_model, enc.max_text_length, device)
        check_cross_attention(config.base_model, text_encoder.hidden_size)
        write_uncond(output_uri, text_encoder)
        return text_encoder, latent_encoder

    return run_per_shard(
        STAGE, [conditioning], output_uri, config_hash(config), SCHEMA,
        lambda table, _: encode_shard(table, *encoders(), enc, control_type),
        columns=INPUT_COLUMNS,
    )
