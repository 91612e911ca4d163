"""Gradient checkpointing for diffusers' Flax UNet and ControlNet, which expose no remat switch.

Inside `rematerialized_blocks()`, every call of a UNet/ControlNet block (down, mid, up) is wrapped
in Flax's lifted `nn.remat`: the backward pass recomputes the block's activations instead of
keeping them, so activation memory shrinks to the block boundaries at the price of one more
forward. It works from the outside (a method interceptor), so the diffusers code stays untouched.
"""
from __future__ import annotations

import contextlib
import threading

import jax
import numpy as np

_inside = threading.local()


def _block_types() -> tuple[type, ...]:
    from diffusers.models.unets import unet_2d_blocks_flax as blocks

    return (
        blocks.FlaxCrossAttnDownBlock2D,
        blocks.FlaxDownBlock2D,
        blocks.FlaxUNetMidBlock2DCrossAttn,
        blocks.FlaxCrossAttnUpBlock2D,
        blocks.FlaxUpBlock2D,
    )


def _is_array_tree(value) -> bool:
    leaves = jax.tree.leaves(value)
    return bool(leaves) and all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves)


def _interceptor(block_types):
    import flax.linen as nn

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, block_types) or getattr(_inside, "on", False):
            return next_fun(*args, **kwargs)
        # Arrays go through remat as traced inputs; Python values (deterministic=...) stay static.
        traced = {k: v for k, v in kwargs.items() if _is_array_tree(v)}
        static = {k: v for k, v in kwargs.items() if k not in traced}

        def block(module, args, traced):
            _inside.on = True
            try:
                return module(*args, **traced, **static)
            finally:
                _inside.on = False

        return nn.remat(block)(context.module, args, traced)

    return intercept


@contextlib.contextmanager
def rematerialized_blocks(enabled: bool = True):
    """Use around the model apply calls that are traced for the gradient (no effect when disabled)."""
    if not enabled:
        yield
        return
    import flax.linen as nn

    with nn.intercept_methods(_interceptor(_block_types())):
        yield
