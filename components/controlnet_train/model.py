"""The frozen base (Flax UNet, noise schedule, VAE for validation) and the ControlNet initialised from it.

Weights are read from the base's PyTorch safetensors (never pickle) and converted with diffusers'
own PyTorch->Flax key mapping; every expected key must be found and every file key used, so a
base that the Flax classes cannot represent fails loudly instead of training half-random.
The ControlNet starts as diffusers' `ControlNetModel.from_unet` does: the UNet's encoder half
(conv_in, time embedding, down and mid blocks) copied, the conditioning embedder and the zero
convolutions freshly initialised.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from components.controlnet_train.weights import WEIGHTS, WEIGHTS_INDEX, ModelError, pytorch_to_flax, read_safetensors

# PyTorch UNet config fields whose value the Flax classes hard-code (PyTorch's defaults): with any other value
# the Flax model would train something other than what its PyTorch export computes, so it is refused.
FLAX_ONLY_SUPPORTS = {
    "norm_num_groups": 32,
    "norm_eps": 1e-5,  # the Flax ResNets' and conv_norm_out's GroupNorm epsilon
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "act_fn": "silu",
    "center_input_sample": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1.0,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "mid_block_only_cross_attention": None,
    "dual_cross_attention": False,
    "cross_attention_norm": None,
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
}
# Accepted although the Flax classes ignore it: `upcast_attention` (SD 2.x) only changes PyTorch's legacy
# attention processor in fp16/bf16; the default one (AttnProcessor2_0, scaled_dot_product_attention), which the
# export and train_controlnet.py run with, ignores it, as Flax does (tests/train/test_parity_with_diffusers.py).
CONTROLNET_FROM_UNET = (
    "sample_size", "in_channels", "down_block_types", "only_cross_attention", "block_out_channels",
    "layers_per_block", "attention_head_dim", "num_attention_heads", "cross_attention_dim",
    "use_linear_projection", "flip_sin_to_cos", "freq_shift",
)
COPIED_FROM_UNET = ("conv_in", "time_embedding", "mid_block")  # plus every down_blocks_<i>


def resolve_base(path: str, revision: str = "") -> str:
    """A local diffusers folder as is; a hub id downloaded (safetensors and configs only)."""
    if os.path.isdir(path):
        return path
    if "://" in path:
        raise ModelError(f"base_model.path {path!r}: use a local folder or a hub id (copy object-store models locally first)")
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "scheduler/*.json"] + [f"{sub}/{name}" for sub in ("unet", "vae") for name in ("config.json", WEIGHTS, WEIGHTS_INDEX, "*-of-*.safetensors")]
    return snapshot_download(path, revision=revision or None, allow_patterns=patterns)


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def read_config(folder: str, sub: str) -> dict:
    path = os.path.join(folder, sub, "config.json")
    if not os.path.exists(path):
        raise ModelError(f"{folder} has no {sub}/config.json: not a diffusers Stable Diffusion folder")
    with open(path) as f:
        return json.load(f)


def check_unet_config(config: dict) -> None:
    for key, supported in FLAX_ONLY_SUPPORTS.items():
        if key in config and config[key] != supported:
            raise ModelError(
                f"base UNet has {key}={config[key]!r}; the Flax UNet/ControlNet only implement {key}={supported!r}, so the "
                f"ControlNet would be trained differently from how its PyTorch export runs: this base cannot be trained here"
            )
    layers = config.get("transformer_layers_per_block", 1)
    if any(n != 1 for n in (layers if isinstance(layers, list) else [layers])):
        raise ModelError(f"base UNet has transformer_layers_per_block={layers}; the Flax ControlNet supports only 1")


def load_flax_model(cls, folder: str, sub: str, dtype, config: dict | None = None):
    """(module, fp32 numpy params) of a diffusers Flax class from the PyTorch safetensors in folder/sub."""
    import jax

    module = cls.from_config(config or read_config(folder, sub), dtype=dtype)
    shapes = jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))
    return module, pytorch_to_flax(read_safetensors(os.path.join(folder, sub)), shapes, f"{folder}/{sub}")


@dataclass
class Base:
    """The frozen parts, loaded once; `unet_params` stay on the host as fp32 numpy."""

    folder: str
    unet: Any
    unet_params: dict
    unet_config: dict
    scheduler_config: dict
    vae_config: dict
    vae_scale_factor: int


def read_base_configs(path: str, revision: str = "") -> tuple[str, dict, dict, dict]:
    """Folder and configs only (no weights): enough for every input check before compute."""
    folder = resolve_base(path, revision)
    unet_config = read_config(folder, "unet")
    check_unet_config(unet_config)
    scheduler_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.exists(scheduler_path):
        raise ModelError(f"{folder} has no scheduler/scheduler_config.json")
    with open(scheduler_path) as f:
        scheduler_config = json.load(f)
    return folder, unet_config, scheduler_config, read_config(folder, "vae")


def load_base(folder: str, unet_config: dict, scheduler_config: dict, vae_config: dict, dtype) -> Base:
    from diffusers import FlaxUNet2DConditionModel

    check_unet_config(unet_config)
    unet, params = load_flax_model(FlaxUNet2DConditionModel, folder, "unet", dtype, unet_config)
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return Base(folder, unet, params, unet_config, scheduler_config, vae_config, scale)


def controlnet_config(unet_config: dict, conditioning_channels: list[int]) -> dict:
    """The ControlNet's architecture: the UNet's encoder settings plus the conditioning embedder's channels."""
    config = {key: unet_config[key] for key in CONTROLNET_FROM_UNET if key in unet_config}
    config["conditioning_embedding_out_channels"] = list(conditioning_channels)
    return config


def make_controlnet(config: dict, dtype):
    from diffusers import FlaxControlNetModel

    return FlaxControlNetModel(**{k: _tuples(v) for k, v in config.items()}, dtype=dtype)


def _init_weights(controlnet, rng) -> dict:
    """FlaxControlNetModel.init_weights (same rng split, so the same params), but with the control at the latent size
    times the conditioning embedder's own downsampling: diffusers hard-codes 8, which fails for a base whose VAE
    downsamples 4x (the fill base's)."""
    import jax
    import jax.numpy as jnp

    size = controlnet.sample_size
    pixels = size * 2 ** (len(controlnet.conditioning_embedding_out_channels) - 1)
    params_rng, dropout_rng = jax.random.split(rng)
    return controlnet.init(
        {"params": params_rng, "dropout": dropout_rng}, jnp.zeros((1, controlnet.in_channels, size, size), jnp.float32),
        jnp.ones((1,), jnp.int32), jnp.zeros((1, 1, controlnet.cross_attention_dim), jnp.float32),
        jnp.zeros((1, 3, pixels, pixels), jnp.float32),
    )["params"]


def init_controlnet_from_unet(controlnet, unet_params: dict, seed: int) -> dict:
    """Fresh ControlNet params with the UNet's encoder half copied in (fp32 numpy)."""
    import jax

    params = jax.tree.map(np.asarray, jax.jit(lambda rng: _init_weights(controlnet, rng))(jax.random.PRNGKey(seed)))
    copied = [*COPIED_FROM_UNET, *sorted(k for k in params if k.startswith("down_blocks_"))]
    for name in copied:
        source = unet_params.get(name)
        if source is None or jax.tree.structure(source) != jax.tree.structure(params[name]) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(source), jax.tree.leaves(params[name]))
        ):
            raise ModelError(f"ControlNet block {name} does not match the UNet's; cannot initialise from the UNet")
        params[name] = jax.tree.map(lambda x: np.array(x, dtype=np.float32), source)
    return params


def fingerprint(controlnet_cfg: dict, unet_config: dict, scheduler_config: dict) -> dict:
    """What a checkpoint must agree on to be resumed: both architectures and the training target."""
    unet = {k: v for k, v in sorted(unet_config.items()) if not k.startswith("_")}
    return {
        "controlnet": json.loads(json.dumps(controlnet_cfg)),
        "base_unet": json.loads(json.dumps(unet)),
        "prediction_type": scheduler_config.get("prediction_type", "epsilon"),
        "num_train_timesteps": scheduler_config.get("num_train_timesteps", 1000),
    }


def fingerprint_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Readable differences, e.g. "controlnet.block_out_channels: [32, 64] (checkpoint) != [64, 128] (now)"."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} (checkpoint) != {b!r} (now)")
    return out


def load_vae(folder: str, vae_config: dict, dtype):
    """The Flax VAE (decoder used for validation images), from the base's PyTorch safetensors."""
    from diffusers import FlaxAutoencoderKL

    return load_flax_model(FlaxAutoencoderKL, folder, "vae", dtype, vae_config)
