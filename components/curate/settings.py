"""The curate settings, checked before any task (registry.check_settings) and by each curate step; importable in
every family (no model libraries)."""
from __future__ import annotations

import hashlib
import json

# rejection reasons of the per-row filters, in the order they are applied (the first that applies is the row's)
FILTER_REASONS = ("low_resolution", "bad_aspect_ratio", "watermarked", "unsafe", "low_clip_similarity")
DEDUP_REASONS = ("duplicate", "near_duplicate")


def caption_source(config) -> str:
    """Which caption curate judges against the image: its own setting, else the one conditioning trains on."""
    return config.curate.caption_source or config.conditioning.caption_source


def config_hash(config) -> str:
    """What decides curate's output: its settings, the CLIP model that embeds images and captions, the caption
    judged (throughput knobs excluded, as for every stage)."""
    parts = {"curate": config.section_hash("curate"), "clip_model": config.clip_embed.model,
             "caption_source": caption_source(config)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def crop_scales(config) -> list[float]:
    """The scales pHash is taken at: the whole image first, then each configured centred crop."""
    return [1.0, *config.curate.phash_crop_scales] if config.curate.phash_dedup else [1.0]


def check_settings(config) -> None:
    from pipeline_configs import CAPTION_SOURCES, ConfigError

    cfg = config.curate
    if not cfg.enabled:
        return
    if cfg.caption_source and cfg.caption_source not in CAPTION_SOURCES:
        raise ConfigError(f"curate.caption_source must be empty or one of {', '.join(CAPTION_SOURCES)}, got {cfg.caption_source!r}")
    if not 0 <= cfg.phash_max_distance <= 32:
        raise ConfigError(f"curate.phash_max_distance must be between 0 and 32 bits of 64, got {cfg.phash_max_distance}")
    for scale in cfg.phash_crop_scales:
        if not 0.5 <= scale < 1.0:
            raise ConfigError(f"curate.phash_crop_scales: each a centred crop's side as a share of the image's, "
                              f"between 0.5 and 1 (1 itself is always hashed), got {scale}")
    if len(cfg.phash_crop_scales) > 4:
        raise ConfigError(f"curate.phash_crop_scales: at most 4 crops (each one is 8 bytes per row and a search), "
                          f"got {len(cfg.phash_crop_scales)}")
    if not -1.0 <= cfg.embedding_min_cosine <= 1.0:
        raise ConfigError(f"curate.embedding_min_cosine must be a cosine between -1 and 1, got {cfg.embedding_min_cosine}")
    if not -1.0 <= cfg.min_clip_similarity <= 1.0:
        raise ConfigError(f"curate.min_clip_similarity must be a cosine between -1 and 1, got {cfg.min_clip_similarity}")
    if not cfg.embedding_index.strip():
        raise ConfigError("curate.embedding_index is empty: use auto or a faiss index factory string such as SQ8 or IVF4096,SQ8")
    if cfg.embedding_nprobe < 1:
        raise ConfigError(f"curate.embedding_nprobe must be at least 1, got {cfg.embedding_nprobe}")
    if cfg.min_side < 0:
        raise ConfigError(f"curate.min_side must be 0 (no minimum) or more, got {cfg.min_side}")
    if cfg.max_aspect_ratio < 1.0:
        raise ConfigError(f"curate.max_aspect_ratio is longer side / shorter side, so at least 1, got {cfg.max_aspect_ratio}")
    for name in ("max_pwatermark", "max_punsafe"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"curate.{name} is a probability, between 0 and 1, got {getattr(cfg, name)}")
    if cfg.batch_size < 1:
        raise ConfigError(f"curate.batch_size must be at least 1, got {cfg.batch_size}")
