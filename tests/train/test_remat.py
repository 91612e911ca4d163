"""Gradient checkpointing of the Flax UNet/ControlNet blocks: every block becomes a remat region, gradients unchanged.

(The memory saving itself is not asserted: XLA:CPU's memory_analysis reports the same temp size with and
without jax.checkpoint even for a textbook example, so only an accelerator could show it.)
"""
from __future__ import annotations

import re

import numpy as np

from base_model import CONDITIONING_CHANNELS, RESOLUTION, TEXT_SHAPE


def test_rematerialized_blocks_keep_gradients(base):
    import jax
    import jax.numpy as jnp

    from components.controlnet_train import model
    from components.controlnet_train.remat import rematerialized_blocks

    folder, unet_config, scheduler_config, vae_config = model.read_base_configs(base)
    frozen = model.load_base(folder, unet_config, scheduler_config, vae_config, jnp.float32)
    controlnet = model.make_controlnet(model.controlnet_config(unet_config, CONDITIONING_CHANNELS), jnp.float32)
    params = model.init_controlnet_from_unet(controlnet, frozen.unet_params, seed=0)
    params["controlnet_mid_block"]["kernel"] = np.full_like(params["controlnet_mid_block"]["kernel"], 0.01)
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.standard_normal((2, 4, RESOLUTION // 8, RESOLUTION // 8)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((2, *TEXT_SHAPE)), jnp.float32)
    control = jnp.asarray(rng.random((2, 3, RESOLUTION, RESOLUTION)), jnp.float32)
    timesteps = jnp.array([100, 700])

    def loss(p, remat):
        with rematerialized_blocks(remat):
            down, mid = controlnet.apply({"params": p}, sample, timesteps, text, control, return_dict=False)
            out = frozen.unet.apply({"params": frozen.unet_params}, sample, timesteps, text,
                                  down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        return jnp.mean(out**2)

    plain_grad, remat_grad = jax.grad(lambda p: loss(p, False)), jax.grad(lambda p: loss(p, True))
    # one checkpoint region per block: 2 down + mid in the ControlNet, 2 down + mid + 2 up in the UNet
    count = lambda remat: len(re.findall(r"\b(?:remat2|checkpoint)\[", str(jax.make_jaxpr(lambda p: loss(p, remat))(params))))  # noqa: E731
    assert (count(False), count(True)) == (0, 8)
    for a, b in zip(jax.tree.leaves(jax.jit(plain_grad)(params)), jax.tree.leaves(jax.jit(remat_grad)(params))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
