"""diffusers' examples/controlnet/train_controlnet.py's training step: the reference of tests/train's parity test
and the PyTorch side of bench/convergence.py (one copy, both import it).

Its loss and update, line for line (no accelerate, one process, CPU): add_noise, the ControlNet's residuals into
the frozen UNet, MSE against epsilon or get_velocity, backward, clip_grad_norm_, torch.optim.AdamW, the
get_scheduler LR schedule, zero_grad; plus diffusers' EMAModel as train_text_to_image.py steps it (the ControlNet
example has none). Noise, timesteps and the rows trained with the empty prompt (proportion_empty_prompts) are
handed in, so that both sides see the same draws. In float64 the noise schedule is recomputed in float64 too
and so is the time embedding (diffusers computes both in float32 whatever the model's dtype): that run is the
nearly exact one that measures the rounding spread.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

# TrainConfig.lr_schedule -> diffusers' get_scheduler name: diffusers' "constant" ignores the warm-up, ours does not.
SCHEDULER_NAMES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def float64_alphas_cumprod(config: dict):
    """DDPMScheduler's alphas_cumprod, computed in float64 (only the schedules of the test bases)."""
    import torch

    start, end, count = config["beta_start"], config["beta_end"], config["num_train_timesteps"]
    kind = config["beta_schedule"]
    if kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, count, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(start, end, count, dtype=torch.float64)
    else:
        raise ValueError(f"no float64 reference for beta_schedule={kind!r}: the parity tests' bases use linear and scaled_linear")
    return torch.cumprod(1.0 - betas, dim=0)


def float64_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1, max_period=10000):
    """diffusers.models.embeddings.get_timestep_embedding in float64 (diffusers computes it in float32 always)."""
    import torch

    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift)
    emb = scale * timesteps[:, None].double() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return torch.nn.functional.pad(emb, (0, 1, 0, 0)) if embedding_dim % 2 else emb


@contextlib.contextmanager
def float64_time_embedding(enabled: bool):
    from diffusers.models import embeddings

    original = embeddings.get_timestep_embedding
    embeddings.get_timestep_embedding = float64_timestep_embedding if enabled else original
    try:
        yield
    finally:
        embeddings.get_timestep_embedding = original


class ReferenceTrainer:
    """diffusers' PyTorch ControlNet training step from the given ControlNet weights (PyTorch names, numpy)."""

    def __init__(self, base_folder: str, conditioning_channels, controlnet_weights: dict, train, dtype):
        import torch
        from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.torch, self.dtype = torch, dtype
        self.unet = UNet2DConditionModel.from_pretrained(base_folder, subfolder="unet", use_safetensors=True)
        self.controlnet = ControlNetModel.from_unet(self.unet, conditioning_embedding_out_channels=tuple(conditioning_channels))
        self.controlnet.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in controlnet_weights.items()}, strict=True)
        self.unet.to(dtype).requires_grad_(False)
        self.controlnet.to(dtype).train()
        self.noise_scheduler = DDPMScheduler.from_pretrained(base_folder, subfolder="scheduler")
        if dtype == torch.float64:
            self.noise_scheduler.alphas_cumprod = float64_alphas_cumprod(self.noise_scheduler.config)
        self.optimizer = torch.optim.AdamW(self.controlnet.parameters(), lr=train.learning_rate, betas=(train.adam_b1, train.adam_b2),
                                           weight_decay=train.weight_decay, eps=1e-8)
        self.lr_scheduler = get_scheduler(SCHEDULER_NAMES[train.lr_schedule], optimizer=self.optimizer,
                                          num_warmup_steps=train.warmup_steps, num_training_steps=train.max_steps)
        self.max_grad_norm = train.max_grad_norm
        self.ema = EMAModel(self.controlnet.parameters(), decay=train.ema_decay) if train.ema_decay > 0 else None

    def tensor(self, value):
        return self.torch.from_numpy(np.asarray(value)).to(self.dtype)

    def step(self, batch: dict, noise, timesteps, drop, uncond) -> float:
        """One optimizer step; `drop`: rows whose caption train_controlnet.py replaced by "" (or None)."""
        torch = self.torch
        latents, text, control = (self.tensor(batch[k]) for k in ("latents", "text", "control"))
        if drop is not None:  # the empty caption's encoding (encode stores it: text_encoder(""))
            text = torch.where(torch.from_numpy(np.asarray(drop))[:, None, None], self.tensor(uncond)[None], text)
        noise = self.tensor(noise)
        timesteps = torch.from_numpy(np.asarray(timesteps)).long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with float64_time_embedding(self.dtype == torch.float64):
            down_block_res_samples, mid_block_res_sample = self.controlnet(
                noisy_latents, timesteps, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
            model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states=text,
                                   down_block_additional_residuals=list(down_block_res_samples),
                                   mid_block_additional_residual=mid_block_res_sample, return_dict=False)[0]
        if self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        elif self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(self.noise_scheduler.config.prediction_type)
        loss = torch.nn.functional.mse_loss(model_pred, target, reduction="mean")  # the example's .float() is a no-op in fp32
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.controlnet.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.controlnet.parameters())
        return float(loss.detach())

    def draws(self, rows: int, latent_shape, caption_dropout: float, generator):
        """(noise, timesteps, dropped rows or None) of one step drawn as train_controlnet.py draws them: randn_like the
        latents, timesteps uniform in [0, num_train_timesteps), each caption emptied with proportion_empty_prompts."""
        torch = self.torch
        noise = torch.randn((rows, *latent_shape), generator=generator, dtype=torch.float32)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (rows,), generator=generator)
        drop = torch.rand(rows, generator=generator) < caption_dropout if caption_dropout > 0 else None
        return noise, timesteps, drop

    def weights(self) -> dict:
        return {k: v.detach().double().numpy().copy() for k, v in self.controlnet.state_dict().items()}

    def ema_weights(self) -> dict:
        names = [name for name, _ in self.controlnet.named_parameters()]
        return {name: p.detach().double().numpy().copy() for name, p in zip(names, self.ema.shadow_params)}
