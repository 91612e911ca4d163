"""Makes diffusers' Flax UNet/ControlNet compute what their PyTorch classes compute, which the export runs.

Two places where diffusers' Flax port differs from its PyTorch original, on every base:
- `FlaxGEGLU` (the transformer blocks' feed-forward gate) uses `nn.gelu`, whose default is the tanh
  approximation; PyTorch's `GEGLU` uses the exact (erf) GELU. The two differ by up to ~5e-4.
- `FlaxTransformer2DModel` normalises its input with GroupNorm eps 1e-5; PyTorch's `Transformer2DModel`
  hard-codes 1e-6.
On the test base the two move the UNet's prediction by ~1e-4 together, ~150x what fp32 rounding does (and fail
tests/train/test_parity_with_diffusers.py). Inside `pytorch_numerics()` both compute as PyTorch does.
It also runs `FlaxAttention` with the query scaled before Q·Kᵀ (as PyTorch's scaled_dot_product_attention may,
the same math up to rounding): scaling the scores instead made XLA:CPU materialise the scale broadcast to every
[batch·heads, queries, keys] score tensor and spend one more pass over it (the fill base's 256-token attentions: 16 MB
each; one attention's forward and backward at batch 16 went from 56 to 40 ms).
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
    if isinstance(module, attention_flax.FlaxAttention) and not module.use_memory_efficient_attention:
        return _prescaled_attention(module, *args, **kwargs)
    return next_fun(*args, **kwargs)


def _prescaled_attention(module, hidden_states, context=None, deterministic=True):
    """FlaxAttention.__call__ (not memory-efficient) with the query scaled first, heads kept as an axis (no
    head-to-batch transposes)."""
    import jax
    import jax.numpy as jnp

    context = hidden_states if context is None else context
    heads = lambda x: x.reshape(x.shape[0], x.shape[1], module.heads, module.dim_head)  # noqa: E731
    query = heads(module.query(hidden_states)) * module.scale
    key, value = heads(module.key(context)), heads(module.value(context))
    probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", query, key), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, value).reshape(hidden_states.shape[0], -1, module.heads * module.dim_head)
    return module.dropout_layer(module.proj_attn(out), deterministic=deterministic)


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
