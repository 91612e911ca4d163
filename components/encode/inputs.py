"""Checks on the conditioning dataset and the encode settings, made before any model is loaded."""
from __future__ import annotations

from cnpipe.dataset import ContractError, Manifest
from components.encode.captions import CAPTION_SOURCES
from components.encode.text import TEXT_ENCODERS

REQUIRED_COLUMNS = ("id", "image", "control", "caption", "blip_caption", "source_caption")


def check_settings(config) -> None:
    """Fail fast, naming the field, on settings that would only break after loading models."""
    from pipeline_configs import ConfigError

    enc, base = config.encode, config.base_model
    if enc.resolution <= 0 or enc.resolution % 8:
        raise ConfigError(f"encode.resolution must be a positive multiple of 8 (the VAE downsamples 8x), got {enc.resolution}")
    if enc.caption_source not in CAPTION_SOURCES:
        raise ConfigError(f"encode.caption_source must be one of {', '.join(CAPTION_SOURCES)}, got {enc.caption_source!r}")
    if base.text_encoder not in TEXT_ENCODERS:
        raise ConfigError(f"base_model.text_encoder must be one of {', '.join(TEXT_ENCODERS)}, got {base.text_encoder!r}")
    if base.text_encoder == "t5" and not base.t5_model:
        raise ConfigError("base_model.t5_model must name the T5 encoder when base_model.text_encoder is 't5'")
    if not 0.0 <= enc.holdout_fraction < 1.0:
        raise ConfigError(f"encode.holdout_fraction must be in [0, 1), got {enc.holdout_fraction}")
    if enc.batch_size < 1 or enc.max_text_length < 1:
        raise ConfigError("encode.batch_size and encode.max_text_length must be at least 1")


def control_type_of(conditioning: Manifest, config) -> str:
    """The configured control type, checked against the dataset's `<conditioning_uri>/<type>` location."""
    wanted = config.encode.conditioning_type
    folder = conditioning.uri.rstrip("/").rsplit("/", 1)[-1]
    if folder in config.conditioning.types and folder != wanted:
        raise ContractError(
            f"encode.conditioning_type is {wanted!r} but the conditioning input {conditioning.uri} holds {folder!r} controls"
        )
    columns = {field["name"] for field in conditioning.schema}
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ContractError(f"conditioning dataset {conditioning.uri} lacks column(s) {', '.join(missing)}")
    return wanted
