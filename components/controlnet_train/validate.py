"""Validation images: the first held-out rows rendered with the current ControlNet.

DDIM sampling (the base's noise schedule, a few steps, classifier-free guidance with the stored
empty-prompt encoding) with the Flax UNet + ControlNet, decoded by the Flax VAE, written as one
PNG strip per row: control | generated | reference. Every host computes (the arrays live on the
global mesh); the primary host writes.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from cnpipe import storage
from components.controlnet_train import distributed
from components.controlnet_train.numerics import pytorch_numerics


class Validator:
    def __init__(self, rows: list[dict], base, controlnet, vae, vae_params, uncond, steps: int, guidance: float, mesh, seed: int):
        import jax
        import jax.numpy as jnp
        from diffusers import FlaxDDIMScheduler

        self.rows, self.mesh = rows, mesh
        scheduler = FlaxDDIMScheduler.from_config(base.scheduler_config)
        scaling = base.vae_config.get("scaling_factor", 0.18215)
        control = np.stack([r["control"] for r in rows])
        latent_shape = (base.unet.in_channels, control.shape[2] // base.vae_scale_factor, control.shape[3] // base.vae_scale_factor)
        use_cfg = guidance > 1.0 and uncond is not None
        self.inputs = distributed.replicate(mesh, {
            "text": np.stack([r["text"] for r in rows]),
            "uncond": uncond if uncond is not None else np.zeros_like(rows[0]["text"]),
            "control": control,
            "key": np.asarray(jax.random.PRNGKey(seed)),
            "vae": vae_params,
        })
        unet, count = base.unet, len(rows)

        def sample(controlnet_params, unet_params, inputs):
            # A sharded train state is gathered once, not left for the partitioner to spread the convolutions over.
            controlnet_params = jax.lax.with_sharding_constraint(controlnet_params, distributed.replicated(mesh))
            state = scheduler.set_timesteps(scheduler.create_state(), steps, (count, *latent_shape))
            timesteps = jnp.asarray(state.timesteps, dtype=jnp.int32)
            latents = jax.random.normal(inputs["key"], (count, *latent_shape), jnp.float32) * state.init_noise_sigma
            text, ctl = inputs["text"], inputs["control"]
            if use_cfg:
                text = jnp.concatenate([jnp.broadcast_to(inputs["uncond"], text.shape), text])
                ctl = jnp.concatenate([ctl, ctl])

            def denoise(i, carry):
                latents, state = carry
                x = jnp.concatenate([latents, latents]) if use_cfg else latents
                t = jnp.full((x.shape[0],), timesteps[i], jnp.int32)
                with pytorch_numerics():
                    down, mid = controlnet.apply({"params": controlnet_params}, x, t, text, ctl, return_dict=False)
                    eps = unet.apply({"params": unet_params}, x, t, text, down_block_additional_residuals=down,
                                     mid_block_additional_residual=mid).sample.astype(jnp.float32)
                if use_cfg:
                    uncond_eps, cond_eps = jnp.split(eps, 2)
                    eps = uncond_eps + guidance * (cond_eps - uncond_eps)
                latents, state = scheduler.step(state, eps, timesteps[i], latents).to_tuple()
                return latents, state

            latents, _ = jax.lax.fori_loop(0, steps, denoise, (latents, state))
            image = vae.apply({"params": inputs["vae"]}, latents / scaling, method=vae.decode).sample
            return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0, 1)

        self._sample = jax.jit(sample, out_shardings=distributed.replicated(mesh))

    def render(self, controlnet_params, unet_params) -> np.ndarray:
        """[rows, 3, H, W] float images in [0, 1]."""
        return distributed.to_host(self._sample(controlnet_params, unet_params, self.inputs))

    def write(self, images: np.ndarray, folder_uri: str) -> list[str]:
        names = []
        for row, image in zip(self.rows, images):
            generated = (image.transpose(1, 2, 0) * 255).round().astype(np.uint8)
            control = (row["control"].transpose(1, 2, 0) * 255).round().astype(np.uint8)
            panels = [control, generated]
            if row.get("image"):
                reference = Image.open(io.BytesIO(row["image"])).convert("RGB").resize(generated.shape[1::-1])
                panels.append(np.asarray(reference))
            buffer = io.BytesIO()
            Image.fromarray(np.concatenate(panels, axis=1)).save(buffer, format="PNG")
            name = f"{_safe(row['id'])}.png"
            storage.write_bytes_atomic(storage.join(folder_uri, name), buffer.getvalue())
            names.append(name)
        return names


def _safe(row_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in row_id)[:120]
