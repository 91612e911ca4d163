"""The Hub token reaches the curate step that loads CLIP (curate_keys embeds downloaded images and captions with
clip_embed.model) and no other curate step: a pod gets only the secrets it reads."""
from __future__ import annotations

import pipeline_configs
from components.registry import secrets_for


def test_curate_keys_gets_the_hub_token_and_the_other_curate_steps_do_not():
    config = pipeline_configs.preset("production")
    assert config.curate.enabled and not config.clip_embed.model.startswith("/")  # a Hub model id
    envs = {stage: {s.env for s in secrets_for(stage, config)} for stage in ("curate_keys", "curate_dedup", "curate")}
    assert envs == {"curate_keys": {"HF_TOKEN"}, "curate_dedup": set(), "curate": set()}
    hub_token = next(s for s in secrets_for("curate_keys", config) if s.env == "HF_TOKEN")
    assert hub_token.optional  # public models load without it
