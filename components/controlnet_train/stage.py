"""Stage 8, ControlNet training: encoded rows in; a trained ControlNet (PyTorch diffusers folders) out.

Output at output_uri: controlnet/ (EMA weights when EMA is on), controlnet_raw/ (raw weights),
checkpoints/ (orbax), metrics.jsonl, validation/step_<N>/ PNGs, summary.json.
Run it again on the same output and it continues from the last checkpoint (same data position,
same RNG), refusing checkpoints of another model configuration.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from cnpipe import storage
from cnpipe.dataset import Manifest
from components.controlnet_train import checks, distributed, model
from components.controlnet_train.checkpoint import Checkpoints
from components.controlnet_train.data import BatchFeed, first_heldout, open_encoded

STAGE = "controlnet_train"


class TrainingDiverged(RuntimeError):
    """The loss or gradient stopped being finite; the message names the step and the last good checkpoint."""


def compute_dtype(name: str):
    import jax
    import jax.numpy as jnp

    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[name]


@dataclass
class Progress:
    """What the loop measured, for the log lines and the summary."""

    compile_s: float = 0.0
    timed_steps: int = 0
    timed_s: float = 0.0
    last: dict = field(default_factory=dict)
    last_good_checkpoint: int | None = None
    validation: dict = field(default_factory=dict)


def run(config, inputs: dict[str, Manifest], output_uri: str, observer=None) -> dict:
    """`observer`: replaces the sampler validation (called with (state, unet_params, step, progress) every
    train.validation_every steps and at the end); bench/convergence.py scores held-out fidelity there."""
    import jax

    t = config.train
    checks.check_config(config)
    distributed.initialize(t.num_processes, t.coordinator_address)
    checks.check_devices(config, jax.device_count())
    if "encoded" not in inputs:
        raise checks.TrainInputError(f"{STAGE} needs the input 'encoded' (the encode stage's dataset); got {sorted(inputs)}")
    data = open_encoded(inputs["encoded"])
    folder, unet_config, scheduler_config, vae_config = model.read_base_configs(config.base_model.path, config.base_model.revision)
    checks.check_data(config, data, unet_config, vae_config, scheduler_config)
    controlnet_config = model.controlnet_config(unet_config, t.conditioning_embedding_out_channels)
    fingerprint = model.fingerprint(controlnet_config, unet_config, scheduler_config)
    checkpoints = Checkpoints(storage.join(output_uri, "checkpoints"), t.keep_checkpoints)
    latest = checkpoints.latest_step()
    meta = checkpoints.check_compatible(latest, fingerprint) if latest is not None else None
    try:
        return _train(config, data, folder, unet_config, scheduler_config, vae_config, controlnet_config,
                      fingerprint, checkpoints, latest, meta, output_uri, observer)
    finally:
        checkpoints.close()


def build_training(t, base, controlnet, scheduler_config: dict, uncond, mesh, dtype):
    """(fresh train state, frozen UNet params on the mesh, jit-compiled step) from the train config.

    Exactly what the stage trains with; bench/train_step.py times this very step as the bare step.
    """
    import jax

    from components.controlnet_train.step import init_state, state_layout, train_step_for

    tx, step_for = train_step_for(t, base.unet, controlnet, scheduler_config, uncond, mesh, dtype)
    params = model.init_controlnet_from_unet(controlnet, base.unet_params, t.seed)
    shard = distributed.shard_state_on(t.shard_state, mesh.devices.size)
    state = init_state(params, tx, t.seed, t.ema_decay > 0, mesh, shard)
    # The frozen UNet is stored in the compute dtype: its matmuls run there anyway, memory halves on accelerators.
    unet_params = distributed.replicate(mesh, jax.tree.map(lambda x: np.asarray(x).astype(dtype), base.unet_params))
    return state, unet_params, step_for(state_layout(state))


def _train(config, data, folder, unet_config, scheduler_config, vae_config, controlnet_config, fingerprint,
           checkpoints, latest, meta, output_uri, observer=None) -> dict:
    import jax
    import jax.numpy as jnp

    t = config.train
    mesh = distributed.data_mesh()
    primary = jax.process_index() == 0
    dtype = compute_dtype(t.compute_dtype)
    base = model.load_base(folder, unet_config, scheduler_config, vae_config, dtype)
    controlnet = model.make_controlnet(controlnet_config, dtype)
    uncond = None if data.uncond is None else np.asarray(data.uncond, np.float32)
    state, unet_params, step_fn = build_training(t, base, controlnet, scheduler_config, uncond, mesh, dtype)
    if latest is not None:
        state = checkpoints.restore(latest, state)

    from components.controlnet_train.metrics import MetricsLog

    start = int(latest or 0)
    position = int(meta["data_position"]) if meta else 0
    log = MetricsLog(output_uri, primary, start, t.wandb_project, t.tensorboard, config.to_dict())
    progress = Progress(last_good_checkpoint=latest)
    validator = observer or _Validator(config, data, base, controlnet, uncond, mesh, output_uri, primary)
    run_meta = {"fingerprint": fingerprint, "data": data.fingerprint(), "train_config": config.to_dict()["train"]}
    feed = BatchFeed(data, t.global_batch_size, jax.process_index(), jax.process_count(), t.seed,
                     t.shuffle_window_shards, start_batch=position)
    try:
        state = _loop(step_fn, state, unet_params, feed, mesh, checkpoints, log, progress, validator, run_meta, start, position, t)
    finally:
        feed.close()
        checkpoints.wait()
        log.close()

    exported = {}
    # Every host takes part: a state sharded over hosts is gathered collectively; only the primary writes.
    raw = distributed.to_host(state.params)
    final = distributed.to_host(state.ema_params) if t.ema_decay > 0 else raw
    if primary:
        from components.controlnet_train.export import export_controlnet

        for name, weights in (("controlnet", final), ("controlnet_raw", raw)):
            uri = storage.join(output_uri, name)
            export_controlnet(weights, folder, t.conditioning_embedding_out_channels, uri)
            exported[name] = uri
    validator.run(state, unet_params, t.max_steps, progress)

    summary = {
        "output": output_uri,
        "steps": t.max_steps,
        "resumed_from_step": latest,
        "global_batch_size": t.global_batch_size,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "compute_dtype": jnp.dtype(dtype).name,
        "shard_state": "sharded" if distributed.shard_state_on(t.shard_state, jax.device_count()) else "replicated",
        "state_bytes_per_device": distributed.bytes_per_device(state),
        "train_rows": data.num_train,
        "heldout_rows": data.heldout_count,
        "final_loss": progress.last.get("loss", log.records[-1]["loss"] if log.records else None),
        "compile_s": round(progress.compile_s, 3),
        "step_time_s": round(progress.timed_s / progress.timed_steps, 5) if progress.timed_steps else None,
        "images_per_s": round(progress.timed_steps * t.global_batch_size / progress.timed_s, 2) if progress.timed_s else None,
        "ema": t.ema_decay > 0,
        "exported": exported,
        "checkpoints": storage.join(output_uri, "checkpoints"),
        "validation": progress.validation,
    }
    if primary:
        storage.write_json_atomic(storage.join(output_uri, "summary.json"), summary)
    return summary


def _loop(step_fn, state, unet_params, feed, mesh, checkpoints, log, progress, validator, run_meta, start, position, t):
    """Dispatches steps asynchronously; the host waits on the device only at log and checkpoint steps."""
    import jax

    pending: list = []
    mark_time, mark_step = time.perf_counter(), start
    for step in range(start, t.max_steps):
        batch = distributed.global_batch(mesh, next(feed), t.global_batch_size)
        state, metrics = step_fn(state, unet_params, batch)
        pending.append(metrics)
        done = step + 1
        if step == start:  # the first call compiles: keep it out of the step time
            jax.block_until_ready(metrics)
            progress.compile_s = time.perf_counter() - mark_time
            mark_time, mark_step = time.perf_counter(), done
        if done % t.log_every == 0 or done == t.max_steps:
            values = distributed.to_host(pending)
            pending = []
            _stop_if_diverged(state, done, checkpoints, progress)
            now = time.perf_counter()
            record = {
                "step": done,
                "loss": float(np.mean([v["loss"] for v in values])),
                "loss_last": float(values[-1]["loss"]),
                "grad_norm": float(np.mean([v["grad_norm"] for v in values])),
                "lr": float(values[-1]["lr"]),
            }
            if done > mark_step:
                elapsed = now - mark_time
                record["step_time_s"] = elapsed / (done - mark_step)
                record["images_per_s"] = (done - mark_step) * t.global_batch_size / elapsed
                progress.timed_steps += done - mark_step
                progress.timed_s += elapsed
            log.write(record)
            progress.last = record
            mark_time, mark_step = time.perf_counter(), done
        if done % t.checkpoint_every == 0 or done == t.max_steps:
            _stop_if_diverged(state, done, checkpoints, progress)
            checkpoints.save(done, state, {**run_meta, "step": done, "data_position": position + (done - start)})
            progress.last_good_checkpoint = done
        if t.validation_every and done % t.validation_every == 0 and done != t.max_steps:
            validator.run(state, unet_params, done, progress)
            mark_time = time.perf_counter()  # validation time is not training time
    return state


def _stop_if_diverged(state, done: int, checkpoints, progress: Progress) -> None:
    bad = int(distributed.to_host(state.first_bad_step))
    if bad < 0:
        return
    last = progress.last_good_checkpoint
    where = f"step {last} at {checkpoints.path(last)}" if last is not None else "none (no checkpoint was saved yet)"
    raise TrainingDiverged(
        f"loss or gradient became NaN/inf at step {bad} (detected at step {done}); that step and later ones were not "
        f"applied. Last good checkpoint: {where}. Lower train.learning_rate or check the data, then run again."
    )


class _Validator:
    """Loads the VAE and compiles the sampler on first use; does nothing when there is nothing to render."""

    def __init__(self, config, data, base, controlnet, uncond, mesh, output_uri, primary):
        self.config, self.data, self.base, self.controlnet = config, data, base, controlnet
        self.uncond, self.mesh, self.output_uri, self.primary = uncond, mesh, output_uri, primary
        self.rows = first_heldout(data.manifest, config.train.validation_rows, data)
        self.impl = None

    def run(self, state, unet_params, step: int, progress: Progress) -> None:
        t = self.config.train
        if t.validation_rows == 0:
            progress.validation = {"skipped": "train.validation_rows is 0"}
            return
        if not self.rows:
            progress.validation = {"skipped": "the dataset has no held-out rows"}
            return
        if self.impl is None:
            from components.controlnet_train.validate import Validator

            dtype = compute_dtype(t.compute_dtype)
            vae, vae_params = model.load_vae(self.base.folder, self.base.vae_config, dtype)
            self.impl = Validator(self.rows, self.base, self.controlnet, vae, vae_params, self.uncond,
                                  t.validation_inference_steps, t.validation_guidance_scale, self.mesh, t.seed)
        params = state.ema_params if t.ema_decay > 0 else state.params
        images = self.impl.render(params, unet_params)
        folder = storage.join(self.output_uri, "validation", f"step_{step:06d}")
        names = self.impl.write(images, folder) if self.primary else []
        progress.validation = {"latest": folder, "images": names, "rows": [r["id"] for r in self.rows]}
