"""The train state, the optimizer and the jit-compiled train step (data-parallel through shardings).

One call = one optimizer step on one global batch: the batch is cut into `grad_accum_steps`
micro-batches scanned in sequence (gradients summed on device), the ControlNet's residuals feed
the frozen UNet, and the loss is the DDPM objective (epsilon or v, as the base's scheduler says).
Master weights, optimizer state and EMA stay fp32, replicated or sharded over the devices (the
layout is the state's shardings: `init_state`); every step the models compute with a copy of the
weights cast to the compute dtype and gathered on every device, and the gradients are brought back
to the state's layout (a reduce-scatter when sharded) before the optimizer and EMA update their shard.
A step whose loss or gradient is not finite changes nothing and records its number, so no
checkpoint ever holds NaNs; the host notices at its next log or checkpoint and stops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from components.controlnet_train import distributed
from components.controlnet_train.distributed import DATA_AXIS, batch_sharded, replicated
from components.controlnet_train.numerics import pytorch_numerics
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
    compute_dtype: str = "float32"  # the weights' copy the models run with (the master stays fp32)


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


def layout_for(params, tx, ema: bool, mesh, shard: bool) -> TrainState:
    """The state's shardings from the ControlNet's param shapes alone: weights, both AdamW moments and EMA
    sharded (`distributed.state_shardings`) or replicated; step, RNG key and the non-finite marker replicated."""
    repl = replicated(mesh)
    param_shardings = distributed.state_shardings(mesh, params, shard)
    opt_shardings = distributed.state_shardings(mesh, jax.eval_shape(tx.init, params), shard)
    return TrainState(step=repl, params=param_shardings, opt_state=opt_shardings, ema_params=param_shardings if ema else {},
                      rng=repl, first_bad_step=repl)


def state_layout(state: TrainState) -> TrainState:
    """The shardings of a state's arrays: what the step keeps it in and a checkpoint restore places it in."""
    return jax.tree.map(lambda x: x.sharding, state)


def init_state(params, tx, seed: int, ema: bool, mesh, shard: bool) -> TrainState:
    """`params`: host numpy (the same on every host), placed slice by slice in `layout_for`'s layout."""
    layout = layout_for(params, tx, ema, mesh, shard)
    params = distributed.place(params, layout.params)
    opt_state = jax.jit(tx.init, out_shardings=layout.opt_state)(params)
    ema_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=layout.ema_params)(params) if ema else {}
    scalars = jax.jit(
        lambda: (jnp.int32(0), jax.random.PRNGKey(seed), jnp.int32(-1)), out_shardings=replicated(mesh)
    )()
    return TrainState(step=scalars[0], params=params, opt_state=opt_state, ema_params=ema_params, rng=scalars[1], first_bad_step=scalars[2])


def step_key(rng, step):
    """The key of optimizer step `step` (a micro-batch i of it folds in i once more)."""
    return jax.random.fold_in(rng, step)


def random_draws(key, latent_shape, num_train_timesteps: int, caption_dropout: float):
    """(noise, timesteps, rows trained with the empty prompt or None) of one micro-batch, as train_controlnet.py
    draws them (standard normal noise, timesteps uniform in [0, T), each caption dropped with that probability);
    callable from outside so that a reference implementation can be fed the very same draws."""
    k_noise, k_time, k_drop = jax.random.split(key, 3)
    noise = jax.random.normal(k_noise, latent_shape, jnp.float32)
    timesteps = jax.random.randint(k_time, (latent_shape[0],), 0, num_train_timesteps)
    drop = jax.random.uniform(k_drop, (latent_shape[0],)) < caption_dropout if caption_dropout > 0 else None
    return noise, timesteps, drop


def ema_decay_at(step, ema_decay: float):
    """The decay of the EMA update after optimizer step `step` + 1, as diffusers' EMAModel.get_decay (default
    settings) gives it: 0 on the first update (the EMA starts as the trained weights), then
    min(ema_decay, (1 + step) / (10 + step)), so early averages do not drag the random start along."""
    count = jnp.asarray(step).astype(jnp.float32)
    return jnp.where(count <= 0, 0.0, jnp.minimum(ema_decay, (1 + count) / (10 + count)))


def diffusion_loss_fn(unet, controlnet, scheduler, noise_state, settings: StepSettings, uncond):
    """loss(params, unet_params, batch, key): one micro-batch's mean squared error."""

    def loss_fn(params, unet_params, batch, key):
        latents, text, control = batch["latents"], batch["text"], batch["control"]
        noise, timesteps, drop = random_draws(key, latents.shape, settings.num_train_timesteps, settings.caption_dropout)
        schedule_state = jax.tree.map(jnp.asarray, noise_state)  # host numpy -> trace-time constants
        noisy = scheduler.add_noise(schedule_state, latents, noise, timesteps)
        if drop is not None:
            text = jnp.where(drop[:, None, None], uncond[None].astype(text.dtype), text)
        with pytorch_numerics(), rematerialized_blocks(settings.gradient_checkpointing):
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


def make_train_step(loss_fn, tx, schedule, settings: StepSettings, mesh, layout: TrainState):
    """The jit-compiled step(state, unet_params, batch) -> (state, metrics); state is donated and keeps `layout`."""
    k = settings.grad_accum_steps
    grad_fn = jax.value_and_grad(loss_fn)
    repl = replicated(mesh)
    compute_dtype = jnp.dtype(settings.compute_dtype)

    def compute_copy(params):
        # Cast on each shard first, so the all-gather moves compute-dtype bytes (a no-op when replicated).
        return jax.lax.with_sharding_constraint(jax.tree.map(lambda p: p.astype(compute_dtype), params), repl)

    def to_state_layout(grads):
        # fp32 in the master's layout: sharded, XLA turns the cross-device sum into a reduce-scatter.
        return jax.lax.with_sharding_constraint(jax.tree.map(lambda g: g.astype(jnp.float32), grads), layout.params)

    def micro_batches(x):
        # Rows j*k+i form micro-batch i: every device keeps exactly the rows it already holds.
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(None, DATA_AXIS)))

    def gradients(params, unet_params, batch, key):
        """Mean loss and fp32 gradients, in the state's layout, w.r.t. the compute copy `params`."""
        if k == 1:
            loss, grads = grad_fn(params, unet_params, batch, key)
            return loss, to_state_layout(grads)

        def accumulate(carry, xs):
            index, micro = xs
            loss, grads = grad_fn(params, unet_params, micro, jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, carry, (loss, to_state_layout(grads))), None

        zero = (jnp.float32(0), to_state_layout(jax.tree.map(jnp.zeros_like, params)))
        # XLA:CPU computes convolution weight gradients inside a while loop ~30x slower than outside one
        # (a bare conv stack: 9.9 ms vs 0.3 ms; the tests' step with k=2: 3x slower). On CPU the k
        # micro-batches are unrolled (compile time grows with k); accelerators keep the loop.
        unroll = k if jax.default_backend() == "cpu" else 1
        (loss, grads), _ = jax.lax.scan(accumulate, zero, (jnp.arange(k), jax.tree.map(micro_batches, batch)), unroll=unroll)
        return loss / k, jax.tree.map(lambda g: g / k, grads)

    def step(state: TrainState, unet_params, batch):
        key = step_key(state.rng, state.step)
        loss, grads = gradients(compute_copy(state.params), unet_params, batch, key)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        ema = state.ema_params
        if settings.ema_decay > 0:
            decay = ema_decay_at(state.step, settings.ema_decay)
            ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        first_bad = jnp.where((state.first_bad_step < 0) & ~finite, state.step + 1, state.first_bad_step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, first_bad_step=first_bad)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step)}

    return jax.jit(step, in_shardings=(layout, repl, batch_sharded(mesh)), out_shardings=(layout, repl), donate_argnums=(0,))


class HostSyncedStep:
    """The jitted step of a run over several hosts: the first call compiles, waits until every host has compiled,
    then runs. XLA:CPU's cross-process collectives (gloo) give a host 30 s to join the first one, less than one
    host's compile can lag another's on a busy machine; the same wait costs nothing where collectives wait longer."""

    def __init__(self, jitted, name: str):
        self.jitted, self.name, self.compiled = jitted, name, None

    def lower(self, *args):
        return self.jitted.lower(*args)

    def __call__(self, *args):
        if self.compiled is None:
            self.compiled = self.jitted.lower(*args).compile()
            distributed.wait_for_hosts(self.name)
        return self.compiled(*args)


def train_step_for(t, unet, controlnet, scheduler_config: dict, uncond, mesh, dtype):
    """(optimizer, layout -> jit-compiled step) from the train config: the pieces stage.build_training puts
    together, and bench/train_memory.py compiles for real-size models from shapes alone."""
    from diffusers import FlaxDDPMScheduler

    schedule = lr_schedule(t.learning_rate, t.warmup_steps, t.max_steps, t.lr_schedule)
    tx = make_optimizer(schedule, t.adam_b1, t.adam_b2, t.weight_decay, t.max_grad_norm)
    scheduler = FlaxDDPMScheduler.from_config(scheduler_config)
    noise_state = jax.tree.map(np.asarray, scheduler.create_state())
    settings = StepSettings(
        grad_accum_steps=t.grad_accum_steps, ema_decay=t.ema_decay, caption_dropout=t.caption_dropout,
        gradient_checkpointing=t.gradient_checkpointing, prediction_type=scheduler.config.prediction_type,
        num_train_timesteps=scheduler.config.num_train_timesteps, compute_dtype=jnp.dtype(dtype).name,
    )
    loss_fn = diffusion_loss_fn(unet, controlnet, scheduler, noise_state, settings, uncond)

    def step_for(layout):
        step = make_train_step(loss_fn, tx, schedule, settings, mesh, layout)
        return step if jax.process_count() == 1 else HostSyncedStep(step, "controlnet_train: step compiled")

    return tx, step_for
