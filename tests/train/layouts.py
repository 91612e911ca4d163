"""The training state's two layouts, trained side by side in one process with 8 virtual CPU devices.

    python tests/train/layouts.py <base folder> <output folder>     (XLA_FLAGS=--xla_force_host_platform_device_count=8)

Started by process_runs.py at the beginning of the test session; test_sharded_state.py reads what it writes.
- equivalence: the stage's own build_training on meshes of the first 1, 2, 4 and 8 devices, state replicated
  and sharded, the same batches and seeds for LAYOUT_STEPS steps: losses, gradient norms and the final
  weights, EMA and AdamW moments of every run, plus each state leaf's sharding and the bytes on one device
  (on one device the sharded setting gives the replicated layout: its layout is recorded, not trained again);
- resume: a run saved (orbax, through the stage's Checkpoints) after RESUME_AT steps in one layout and device
  count, restored into another (the target state's shardings) and trained to LAYOUT_STEPS; the saved and
  the restored state are kept for comparison.
One process, meshes over subsets of its devices: a device count change is a change of mesh, as for orbax
(a checkpoint holds global arrays; a restore places them by the target shardings, whatever wrote them).
Writes results.json (losses, norms, shardings, bytes) and results.npz (final states, flattened per run).
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np

from base_model import RESOLUTION, TEXT_SHAPE
from runs import LAYOUT_RUN, LAYOUT_STEPS, RESUME_AT, RESUMES, make_config

DEVICE_COUNTS = (1, 2, 4, 8)


def batches(rows: int, steps: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"latents": rng.standard_normal((rows, 4, RESOLUTION // 8, RESOLUTION // 8), dtype=np.float32),
             "text": rng.standard_normal((rows, *TEXT_SHAPE), dtype=np.float32),
             "control": rng.random((rows, 3, RESOLUTION, RESOLUTION), dtype=np.float32)} for _ in range(steps)]


def flat(state) -> dict[str, np.ndarray]:
    """The state's float trees as single vectors (the order of jax.tree.leaves)."""
    import jax

    from components.controlnet_train import distributed

    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    trees = {"params": state.params, "ema": state.ema_params, "mu": adam.mu, "nu": adam.nu}
    return {name: np.concatenate([np.ravel(x) for x in jax.tree.leaves(distributed.to_host(tree))]) for name, tree in trees.items()}


def shardings(state) -> list[dict]:
    """Per leaf of the weights, moments and EMA: shape, partition spec and the shape of one device's shard."""
    import jax

    adam = state.opt_state[1][0]
    out = []
    for group, tree in (("params", state.params), ("mu", adam.mu), ("nu", adam.nu), ("ema", state.ema_params)):
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            out.append({"group": group, "path": jax.tree_util.keystr(path), "shape": list(x.shape),
                        "spec": [a for a in x.sharding.spec] + [None] * (x.ndim - len(x.sharding.spec)),
                        "shard": list(x.addressable_shards[0].data.shape)})
    return out


def main(base: str, output: str) -> None:
    import jax
    import jax.numpy as jnp

    from components.controlnet_train import distributed, model
    from components.controlnet_train.checkpoint import Checkpoints
    from components.controlnet_train.stage import build_training
    from components.controlnet_train.step import state_layout

    out = pathlib.Path(output)
    config = make_config(base, **LAYOUT_RUN)
    t = config.train
    folder, unet_config, scheduler_config, vae_config = model.read_base_configs(base)
    frozen = model.load_base(folder, unet_config, scheduler_config, vae_config, jnp.float32)
    controlnet = model.make_controlnet(model.controlnet_config(unet_config, t.conditioning_embedding_out_channels), jnp.float32)
    uncond = np.random.default_rng(1).standard_normal(TEXT_SHAPE).astype(np.float32)
    data = batches(t.global_batch_size, LAYOUT_STEPS)
    built: dict[str, tuple] = {}

    def build(count: int, layout: str):
        key = f"{count}-{layout}"
        if key not in built:
            t.shard_state = layout
            mesh = distributed.data_mesh(jax.devices()[:count])
            built[key] = (mesh, *build_training(t, frozen, controlnet, scheduler_config, uncond, mesh, jnp.float32))
        return built[key]

    def fresh(count: int, layout: str):
        """A copy of that layout's initial state (the step donates the state it is given)."""
        state = build(count, layout)[1]
        return jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=state_layout(state))(state)

    def train(state, count: int, layout: str, start: int, stop: int):
        mesh, _, unet_params, step_fn = build(count, layout)
        losses, norms = [], []
        for step in range(start, stop):
            state, metrics = step_fn(state, unet_params, distributed.global_batch(mesh, data[step], t.global_batch_size))
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
        return state, losses, norms

    started = time.perf_counter()
    results: dict = {"runs": {}, "resumes": {}}
    arrays: dict[str, np.ndarray] = {}
    finals = {}
    for count in DEVICE_COUNTS:
        for layout in ("replicated", "sharded"):
            key = f"{count}-{layout}"
            state = fresh(count, layout)
            if key == "1-replicated":
                arrays["initial/params"] = flat(state)["params"]
            results["runs"][key] = {"bytes_per_device": distributed.bytes_per_device(state), "shardings": shardings(state)}
            if count == 1 and layout == "sharded":
                continue  # on one device the sharded layout is the replicated one (the test checks): nothing new to train
            state, losses, norms = train(state, count, layout, 0, LAYOUT_STEPS)
            results["runs"][key].update(losses=losses, grad_norms=norms)
            arrays.update({f"{key}/{name}": v for name, v in flat(state).items()})
            finals[key] = state
            print(key, losses, f"{time.perf_counter() - started:.1f} s", flush=True)

    for saved, resumed in RESUMES:
        (save_count, save_layout), (count, layout) = saved, resumed
        checkpoints = Checkpoints(str(out / f"checkpoints-{save_count}-{save_layout}"), keep=1)
        try:
            state, first, _ = train(fresh(save_count, save_layout), save_count, save_layout, 0, RESUME_AT)
            checkpoints.save(RESUME_AT, state, {"data_position": RESUME_AT})
            checkpoints.wait()
            restored = checkpoints.restore(RESUME_AT, finals[f"{count}-{layout}"])  # placed like the target's state
        finally:
            checkpoints.close()
        key = f"{save_count}-{save_layout}->{count}-{layout}"
        same = all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(finals[f"{count}-{layout}"])))
        results["resumes"][key] = {"restored_in_target_shardings": same, "bytes_per_device": distributed.bytes_per_device(restored)}
        arrays.update({f"{key}/saved/{name}": v for name, v in flat(state).items()})
        arrays.update({f"{key}/restored/{name}": v for name, v in flat(restored).items()})
        state, rest, _ = train(restored, count, layout, RESUME_AT, LAYOUT_STEPS)
        results["resumes"][key]["losses"] = first + rest
        arrays.update({f"{key}/final/{name}": v for name, v in flat(state).items()})
        print(key, first + rest, f"{time.perf_counter() - started:.1f} s", flush=True)

    np.savez(out / "results.npz", **arrays)
    (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
