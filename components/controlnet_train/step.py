"""The train state, the optimizer and the jit-compiled train step (data-parallel through shardings).

One call = one optimizer step on one global batch: the batch is cut into `grad_accum_steps`
micro-batches scanned in sequence (gradients summed on device), the ControlNet's residuals feed
the frozen UNet, and the loss is the DDPM objective (epsilon or v, as the base's scheduler says).
Master weights, optimizer state and EMA stay fp32; the models compute in the compute dtype.
A step whose loss or gradient is not finite changes nothing and records its number, so no
checkpoint ever holds NaNs; the host notices at its next log or checkpoint and stops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from components.controlnet_train.distributed import DATA_AXIS, batch_sharded, replicated
from components.controlnet_train.remat import rematerialized_blocks


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # optimizer steps done (int32)
    params: Any  # ControlNet, fp32
    opt_state: Any
    ema_params: Any  # same tree as params; {} when EMA is off
    rng: jax.Array  # raw uint32[2] key; each step folds in its number
    first_bad_step: jax.Array  # int32: first step whose loss/grad was not finite, -1 while none


@dataclass(frozen=True)
class StepSettings:
    grad_accum_steps: int
    ema_decay: float
    caption_dropout: float
    gradient_checkpointing: bool
    prediction_type: str  # epsilon | v_prediction
    num_train_timesteps: int


def lr_schedule(learning_rate: float, warmup_steps: int, max_steps: int, kind: str) -> optax.Schedule:
    """Linear warm-up from 0, then constant, cosine or linear decay to 0 at max_steps."""
    decay_steps = max(max_steps - warmup_steps, 1)
    main = {
        "constant": lambda: optax.constant_schedule(learning_rate),
        "cosine": lambda: optax.cosine_decay_schedule(learning_rate, decay_steps),
        "linear": lambda: optax.linear_schedule(learning_rate, 0.0, decay_steps),
    }[kind]()
    if warmup_steps <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), main], [warmup_steps])


def make_optimizer(schedule: optax.Schedule, b1: float, b2: float, weight_decay: float, max_grad_norm: float):
    clip = optax.clip_by_global_norm(max_grad_norm) if max_grad_norm > 0 else optax.identity()
    return optax.chain(clip, optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))


def init_state(params, tx, seed: int, ema: bool, mesh) -> TrainState:
    """`params`: replicated global arrays. Everything derived on device with replicated outputs."""
    repl = replicated(mesh)
    opt_state = jax.jit(tx.init, out_shardings=repl)(params)
    ema_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=repl)(params) if ema else {}
    scalars = jax.jit(
        lambda: (jnp.int32(0), jax.random.PRNGKey(seed), jnp.int32(-1)), out_shardings=repl
    )()
    return TrainState(step=scalars[0], params=params, opt_state=opt_state, ema_params=ema_params, rng=scalars[1], first_bad_step=scalars[2])


def diffusion_loss_fn(unet, controlnet, scheduler, noise_state, settings: StepSettings, uncond):
    """loss(params, unet_params, batch, key): one micro-batch's mean squared error."""

    def loss_fn(params, unet_params, batch, key):
        latents, text, control = batch["latents"], batch["text"], batch["control"]
        k_noise, k_time, k_drop = jax.random.split(key, 3)
        noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
        timesteps = jax.random.randint(k_time, (latents.shape[0],), 0, settings.num_train_timesteps)
        schedule_state = jax.tree.map(jnp.asarray, noise_state)  # host numpy -> trace-time constants
        noisy = scheduler.add_noise(schedule_state, latents, noise, timesteps)
        if settings.caption_dropout > 0:
            drop = jax.random.uniform(k_drop, (latents.shape[0],)) < settings.caption_dropout
            text = jnp.where(drop[:, None, None], uncond[None].astype(text.dtype), text)
        with rematerialized_blocks(settings.gradient_checkpointing):
            down, mid = controlnet.apply({"params": params}, noisy, timesteps, text, control, return_dict=False)
            prediction = unet.apply(
                {"params": unet_params}, noisy, timesteps, text,
                down_block_additional_residuals=down, mid_block_additional_residual=mid,
            ).sample
        if settings.prediction_type == "v_prediction":
            target = scheduler.get_velocity(schedule_state, latents, noise, timesteps)
        else:
            target = noise
        return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target))

    return loss_fn


def make_train_step(loss_fn, tx, schedule, settings: StepSettings, mesh):
    """The jit-compiled step(state, unet_params, batch) -> (state, metrics); state is donated."""
    k = settings.grad_accum_steps
    grad_fn = jax.value_and_grad(loss_fn)

    def micro_batches(x):
        # Rows j*k+i form micro-batch i: every device keeps exactly the rows it already holds.
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(None, DATA_AXIS)))

    def gradients(params, unet_params, batch, key):
        if k == 1:
            return grad_fn(params, unet_params, batch, key)

        def accumulate(carry, xs):
            index, micro = xs
            loss, grads = grad_fn(params, unet_params, micro, jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zero = (jnp.float32(0), jax.tree.map(jnp.zeros_like, params))
        # XLA:CPU computes convolution weight gradients inside a while loop ~30x slower than outside one
        # (a bare conv stack: 9.9 ms vs 0.3 ms; the tests' step with k=2: 3x slower). On CPU the k
        # micro-batches are unrolled (compile time grows with k); accelerators keep the loop.
        unroll = k if jax.default_backend() == "cpu" else 1
        (loss, grads), _ = jax.lax.scan(accumulate, zero, (jnp.arange(k), jax.tree.map(micro_batches, batch)), unroll=unroll)
        return loss / k, jax.tree.map(lambda g: g / k, grads)

    def step(state: TrainState, unet_params, batch):
        key = jax.random.fold_in(state.rng, state.step)
        loss, grads = gradients(state.params, unet_params, batch, key)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        ema = state.ema_params
        if settings.ema_decay > 0:
            # diffusers' EMAModel warm-up: early averages do not drag the random start along
            count = state.step.astype(jnp.float32) + 1
            decay = jnp.minimum(settings.ema_decay, (1 + count) / (10 + count))
            ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        first_bad = jnp.where((state.first_bad_step < 0) & ~finite, state.step + 1, state.first_bad_step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, first_bad_step=first_bad)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step)}

    repl = replicated(mesh)
    return jax.jit(step, in_shardings=(repl, repl, batch_sharded(mesh)), out_shardings=(repl, repl), donate_argnums=(0,))
