"""Makes diffusers' Flax UNet/ControlNet compute what their PyTorch classes compute, which the export runs.

Two places where diffusers' Flax port differs from its PyTorch original, on every base:
- `FlaxGEGLU` (the transformer blocks' feed-forward gate) uses `nn.gelu`, whose default is the tanh
  approximation; PyTorch's `GEGLU` uses the exact (erf) GELU. The two differ by up to ~5e-4.
- `FlaxTransformer2DModel` normalises its input with GroupNorm eps 1e-5; PyTorch's `Transformer2DModel`
  hard-codes 1e-6.
On the test base the two move the UNet's prediction by ~1e-4 together, ~150x what fp32 rounding does (and fail
tests/train/test_parity_with_diffusers.py). Inside `pytorch_numerics()` both compute as PyTorch does.
Like remat.py it works from the outside (a method interceptor): the parameters and the diffusers code
stay as they are.
"""
from __future__ import annotations

import contextlib

PYTORCH_TRANSFORMER_GROUPNORM_EPS = 1e-6  # diffusers.models.transformers.transformer_2d: GroupNorm(eps=1e-6)


def _intercept(next_fun, args, kwargs, context):
    import flax.linen as nn
    from diffusers.models import attention_flax

    module = context.module
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    if isinstance(module, attention_flax.FlaxGEGLU):
        return _exact_geglu(module, *args, **kwargs)
    if isinstance(module, nn.GroupNorm) and isinstance(module.parent, attention_flax.FlaxTransformer2DModel):
        exact = module.clone(parent=None, epsilon=PYTORCH_TRANSFORMER_GROUPNORM_EPS)
        return exact.apply({"params": module.variables["params"]}, *args, **kwargs)
    return next_fun(*args, **kwargs)


def _exact_geglu(module, hidden_states, deterministic=True):
    """FlaxGEGLU.__call__ with the erf GELU (as PyTorch's GEGLU)."""
    import jax.numpy as jnp
    from jax.nn import gelu

    hidden_linear, hidden_gelu = jnp.split(module.proj(hidden_states), 2, axis=2)
    return module.dropout_layer(hidden_linear * gelu(hidden_gelu, approximate=False), deterministic=deterministic)


@contextlib.contextmanager
def pytorch_numerics():
    """Use around every apply of the Flax UNet/ControlNet that is traced (training and sampling)."""
    import flax.linen as nn

    with nn.intercept_methods(_intercept):
        yield
