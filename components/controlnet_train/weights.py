"""PyTorch <-> Flax weights for diffusers models, strict in both directions.

Both directions use diffusers' own PyTorch->Flax key rule (`rename_key_and_reshape_tensor`), the
export by inverting it key by key, so the two cannot drift apart. Unlike diffusers' loaders, every
key must be matched: a missing or unused weight is an error, never a silently random layer
(diffusers' Flax->PyTorch helper, for one, does not map attention names back).
"""
from __future__ import annotations

import json
import os

import numpy as np

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


class ModelError(ValueError):
    """A base model or ControlNet setting the trainer cannot use; the message names it."""


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
    """All tensors of a (possibly sharded) safetensors checkpoint as float32 numpy arrays."""
    from safetensors import safe_open

    index = os.path.join(folder, WEIGHTS_INDEX)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, WEIGHTS)):
        files = [WEIGHTS]
    else:
        raise ModelError(f"{folder} has no {WEIGHTS}; pickle (.bin) weights are refused")
    tensors = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="flax") as f:  # "flax" reads bf16 too
            for key in f.keys():
                tensors[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
    return tensors


def _flax_key(pt_key: str, tensor: np.ndarray, flax_keys) -> tuple:
    from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor

    key, value = rename_key_and_reshape_tensor(tuple(rename_key(pt_key).split(".")), tensor, flax_keys)
    return key, value


def pytorch_to_flax(tensors: dict[str, np.ndarray], shapes, what: str) -> dict:
    """Flax params (nested dict of fp32 numpy) for a model whose param shapes are `shapes`."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    expected = flatten_dict(shapes)
    params, unused = {}, []
    for pt_key, tensor in tensors.items():
        key, value = _flax_key(pt_key, tensor, expected)
        if key not in expected:
            unused.append(pt_key)
            continue
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ModelError(f"{what}: weight {pt_key} has shape {list(value.shape)}, the Flax model expects {list(expected[key].shape)}")
        params[key] = np.ascontiguousarray(value, dtype=np.float32)
    missing = sorted("/".join(k) for k in set(expected) - set(params))
    if missing or unused:
        raise ModelError(f"{what}: weights do not match the Flax model (missing {missing[:5]}, unused {sorted(unused)[:5]})")
    return unflatten_dict(params)


def flax_to_pytorch(params: dict, pt_shapes: dict[str, tuple], what: str) -> dict[str, np.ndarray]:
    """PyTorch state dict (fp32 numpy) for a model with parameter shapes `pt_shapes`, from Flax params."""
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(params)
    state, used = {}, set()
    for pt_key, shape in pt_shapes.items():
        key, _ = _flax_key(pt_key, np.zeros(shape, np.float32), flat)
        if key not in flat:
            raise ModelError(f"{what}: PyTorch weight {pt_key} has no Flax counterpart")
        value = np.asarray(flat[key], dtype=np.float32)
        if key[-1] == "kernel":  # inverse of the import's conv (2,3,1,0) and linear (.T) layouts
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        if tuple(value.shape) != tuple(shape):
            raise ModelError(f"{what}: {pt_key} would get shape {list(value.shape)}, PyTorch expects {list(shape)}")
        state[pt_key] = np.ascontiguousarray(value)
        used.add(key)
    unused = sorted("/".join(k) for k in set(flat) - used)
    if unused:
        raise ModelError(f"{what}: Flax params {unused[:5]} have no PyTorch counterpart")
    return state
