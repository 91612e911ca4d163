"""Per-device memory of the ControlNet train step at real size, known before renting accelerators; and the
sharded training state measured on CPU at the tiny size.

    PYTHONPATH=. .venvs/train/bin/python bench/train_memory.py [--models sd15,sdxl] [--batches 1,2,4,8] [--part compile,state]

1. compile  The trainer's own step (step.train_step_for, what stage.build_training compiles), built from shapes
            alone: nothing is initialised, allocated or downloaded. Models from their published configs:
            - sd15: Stable Diffusion 1.5's UNet (frozen) and the ControlNet the trainer derives from it
              (diffusers' FlaxControlNetModel, 361 M parameters, as lllyasviel/sd-controlnet-*), 512 px;
            - sdxl: SDXL-base's UNet (frozen, text-time conditioning fed zeros: the data contract has no pooled
              text) and an SDXL-size ControlNet (diffusers/controlnet-*-sdxl-1.0's config: transformer depth
              1/2/10, 1246 M parameters; the Flax ControlNet lacks SDXL's text-time embedding, 5 M parameters
              or 0.4 %, which is left out), 1024 px, 2048-wide text encodings.
            Compiled for 8 devices with bf16 compute (as on accelerators), the state replicated and sharded,
            with and without gradient checkpointing, batch per device 1, 2, 4, 8; per device, from XLA's
            memory analysis: arguments (state, frozen UNet, batch), outputs, donated aliases and temporaries;
            total = arguments + outputs - aliases + temporaries.
            On 8 virtual CPU devices. XLA:CPU's default scheduler runs independent ops concurrently and keeps
            their buffers alive together (16 independent 16 MiB temporaries: 256 MiB); it is switched to its
            sequential memory scheduler here (--xla_cpu_enable_concurrency_optimized_scheduler=false: 16 MiB),
            as accelerators schedule for memory. What still differs from an accelerator's compiler: XLA:CPU
            schedules a checkpointed block's recomputation ahead of the backward pass (so checkpointing saves
            little here; an accelerator's scheduler places it where it is used) and computes some bf16
            operations in fp32 (both: more here), while TPUs pad arrays to their tiles (less here). So the
            state bytes are exact (logical sizes), the totals are XLA:CPU's estimate of one device's step, and
            the checkpointing rows show what CPU can show, not what a TPU or GPU would save.
            The largest measured batch per device whose total fits 16 GiB (v5e), 32 GiB (v4) and 80 GiB (H100)
            is printed. Each model compiles in its own subprocess; every result is written as it comes.
2. state    One subprocess with 8 virtual CPU devices, the embedded tiny-sd at 64 px: the stage's build_training
            on meshes of 1, 2, 4 and 8 of them, state replicated and sharded: the training state's bytes on one
            device, and the bare step's time sharded vs replicated (interleaved, best of --repeats).
Writes bench/results/train_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import benchlib  # (also puts the repo on sys.path)

REPO = benchlib.REPO
DEVICES = 8
GIB = 2**30
CAPACITY_GIB = {"v5e": 16, "v4": 32, "H100": 80}
CPU_FLAGS = (f"--xla_force_host_platform_device_count={DEVICES} --xla_cpu_enable_concurrency_optimized_scheduler=false "
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")  # LLVM code quality: no effect on buffers

# runwayml/stable-diffusion-v1-5 unet/config.json and scheduler/scheduler_config.json (the values that shape the model)
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8, "cross_attention_dim": 768, "flip_sin_to_cos": True, "freq_shift": 0, "use_linear_projection": False,
}
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True, "flip_sin_to_cos": True, "freq_shift": 0, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "prediction_type": "epsilon", "clip_sample": False}
CONDITIONING_CHANNELS = [16, 32, 96, 256]  # both published ControlNets
MODELS = {
    "sd15": {"label": "SD 1.5 ControlNet, 512 px", "unet": SD15_UNET, "resolution": 512, "text": (77, 768)},
    "sdxl": {"label": "SDXL-size ControlNet, 1024 px", "unet": SDXL_UNET, "resolution": 1024, "text": (77, 2048)},
}


# ---------------------------------------------------------------- the models, from configs


def sdxl_classes():
    """The Flax UNet with SDXL's text-time inputs fed zeros, and the Flax ControlNet with SDXL's transformer depths."""
    import jax.numpy as jnp
    from diffusers import FlaxControlNetModel, FlaxUNet2DConditionModel
    from diffusers.configuration_utils import flax_register_to_config
    from diffusers.models.controlnets import controlnet_flax

    @flax_register_to_config
    class SDXLUNet(FlaxUNet2DConditionModel):
        def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None, **kwargs):
            if added_cond_kwargs is None:  # pooled text embedding and size/crop ids: the same compute, zeros
                rows = sample.shape[0]
                added_cond_kwargs = {"text_embeds": jnp.zeros((rows, 1280), self.dtype), "time_ids": jnp.zeros((rows, 6), self.dtype)}
            return super().__call__(sample, timesteps, encoder_hidden_states, added_cond_kwargs, **kwargs)

    @flax_register_to_config
    class SDXLControlNet(FlaxControlNetModel):
        """diffusers' setup builds every attention block with one transformer layer; SDXL's have 1, 2 and 10.
        Its block classes are swapped for the length of setup for ones that take the depth (the instances are
        of diffusers' own classes, so the trainer's gradient checkpointing still finds them)."""

        transformer_layers_per_block: tuple = (1, 2, 10)

        def setup(self):
            down, mid = controlnet_flax.FlaxCrossAttnDownBlock2D, controlnet_flax.FlaxUNetMidBlock2DCrossAttn
            depths = iter(n for n, kind in zip(self.transformer_layers_per_block, self.down_block_types) if kind == "CrossAttnDownBlock2D")
            controlnet_flax.FlaxCrossAttnDownBlock2D = lambda **kw: down(**kw, transformer_layers_per_block=next(depths))
            controlnet_flax.FlaxUNetMidBlock2DCrossAttn = lambda **kw: mid(**kw, transformer_layers_per_block=self.transformer_layers_per_block[-1])
            try:
                super().setup()
            finally:
                controlnet_flax.FlaxCrossAttnDownBlock2D, controlnet_flax.FlaxUNetMidBlock2DCrossAttn = down, mid

    return SDXLUNet, SDXLControlNet


def build_models(name: str, dtype):
    """(frozen UNet module, ControlNet module) of a MODELS entry."""
    from diffusers import FlaxUNet2DConditionModel

    from components.controlnet_train import model

    unet_config = MODELS[name]["unet"]
    controlnet_config = model.controlnet_config(unet_config, CONDITIONING_CHANNELS)
    if name == "sd15":
        return FlaxUNet2DConditionModel.from_config(unet_config, dtype=dtype), model.make_controlnet(controlnet_config, dtype)
    unet_class, controlnet_class = sdxl_classes()
    depths = tuple(unet_config["transformer_layers_per_block"])
    controlnet = controlnet_class(**{k: model._tuples(v) for k, v in controlnet_config.items()}, transformer_layers_per_block=depths, dtype=dtype)
    return unet_class.from_config(unet_config, dtype=dtype), controlnet


# ---------------------------------------------------------------- 1. compile (child process per model and platform)


def abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree, shardings)


def shard_bytes(tree, shardings) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(sh.shard_shape(s.shape))) * s.dtype.itemsize for s, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def compile_worker(name: str, batches: list[int], layouts: list[str], remats: list[bool]) -> None:
    """Prints one JSON line per configuration (the parent collects them)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pipeline_configs
    from components.controlnet_train import distributed
    from components.controlnet_train.step import TrainState, layout_for, train_step_for

    assert jax.device_count() == DEVICES, f"{jax.device_count()} devices: run through compile_part (it sets XLA_FLAGS)"
    mesh = distributed.data_mesh()
    spec = MODELS[name]
    dtype = jnp.bfloat16
    unet, controlnet = build_models(name, dtype)
    key = jax.random.PRNGKey(0)
    params = jax.eval_shape(controlnet.init_weights, key)
    unet_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), jax.eval_shape(unet.init_weights, key))
    counts = {"controlnet": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
              "unet": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(unet_params))}
    print(json.dumps({"model": name, "parameters": counts}), flush=True)
    latent = spec["resolution"] // 8
    for remat in remats:
        for per_device in batches:
            t = pipeline_configs.TrainConfig(global_batch_size=per_device * DEVICES, gradient_checkpointing=remat)
            tx, step_for = train_step_for(t, unet, controlnet, SCHEDULER, None, mesh, dtype)
            state = jax.eval_shape(lambda p: TrainState(step=jnp.int32(0), params=p, opt_state=tx.init(p), ema_params=p, rng=key,
                                                        first_bad_step=jnp.int32(-1)), params)
            rows = per_device * DEVICES
            batch = {"latents": jax.ShapeDtypeStruct((rows, 4, latent, latent), jnp.float32),
                     "text": jax.ShapeDtypeStruct((rows, *spec["text"]), jnp.float32),
                     "control": jax.ShapeDtypeStruct((rows, 3, spec["resolution"], spec["resolution"]), jnp.float32)}
            batch = abstract(batch, jax.tree.map(lambda _: distributed.batch_sharded(mesh), batch))
            frozen = abstract(unet_params, jax.tree.map(lambda _: distributed.replicated(mesh), unet_params))
            for layout_name in layouts:
                layout = layout_for(params, tx, True, mesh, layout_name == "sharded")
                started = time.perf_counter()
                memory = step_for(layout).lower(abstract(state, layout), frozen, batch).compile().memory_analysis()
                m = {k: int(getattr(memory, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp", "generated_code")}
                print(json.dumps({
                    "model": name, "layout": layout_name, "gradient_checkpointing": remat, "per_device_batch": per_device,
                    "state_bytes": shard_bytes(state, layout), "unet_bytes": shard_bytes(frozen, jax.tree.map(lambda x: x.sharding, frozen)),
                    **{f"{k}_bytes": v for k, v in m.items()},
                    "total_bytes": m["argument"] + m["output"] - m["alias"] + m["temp"],
                    "compile_s": round(time.perf_counter() - started, 1),
                }), flush=True)


def compile_part(args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": CPU_FLAGS}
    out: dict = {"flags": CPU_FLAGS, "parameters": {}, "results": []}
    for name in args.models.split(","):
        print(f"1. compile {MODELS[name]['label']} for {DEVICES} virtual CPU devices", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--compile-worker", name, "--batches", args.batches,
                   "--layouts", args.layouts, "--remat", args.remat]
        with subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True) as child:
            for line in child.stdout:
                record = json.loads(line)
                if "parameters" in record:
                    out["parameters"][name] = record["parameters"]
                    continue
                out["results"].append(record)
                print(f"  {name} {record['layout']:10s} remat={str(record['gradient_checkpointing']):5s} batch/device "
                      f"{record['per_device_batch']}: total {record['total_bytes'] / GIB:.2f} GiB (state {record['state_bytes'] / GIB:.2f}, "
                      f"temp {record['temp_bytes'] / GIB:.2f}; compile {record['compile_s']} s)", file=sys.stderr, flush=True)
                save(args, compile_out=out)
        if child.returncode:
            raise RuntimeError(f"the compile worker for {name} failed ({child.returncode})")
    return out


BATCHES = (1, 2, 4, 8)


def _linear(totals: dict) -> tuple[float, float] | None:
    """Least-squares total = a + s * batch from two or more measured batches (activations grow with the batch,
    the state and the frozen UNet do not)."""
    if len(totals) < 2:
        return None
    xs, ys = list(totals), list(totals.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def _estimates(rows: dict) -> None:
    """Cells not compiled (an SDXL-size compile takes tens of minutes on 2 cores), estimated and marked as such:
    (1) from the same configuration's measured batches, linear in the batch; (2) a replicated configuration from
    its sharded twin plus the difference of their state bytes (the only thing the layout changes per device:
    everything else is the same program). `method_check` tests both rules on the cells that were measured."""
    for (model, layout, remat), row in rows.items():
        fit = _linear(row["total_gib"])
        if fit:
            row["estimated_gib"] = {b: round(fit[0] + fit[1] * b, 2) for b in BATCHES if b not in row["total_gib"]}
    for (model, layout, remat), row in list(rows.items()):
        twin = rows.get((model, "sharded", remat))
        if layout != "sharded" or twin is None:
            continue
        replicated = rows.setdefault((model, "replicated", remat), {
            "model": model, "layout": "replicated", "gradient_checkpointing": remat, "total_gib": {},
            "state_gib": round(row["replicated_state_bytes"] / GIB, 2), "unet_gib": row["unet_gib"]})
        extra = replicated["state_gib"] - row["state_gib"]
        known = {**row["total_gib"], **row.get("estimated_gib", {})}
        replicated.setdefault("estimated_gib", {})
        for b, gib in known.items():
            if b not in replicated["total_gib"] and b not in replicated["estimated_gib"]:
                replicated["estimated_gib"][b] = round(gib + extra, 2)


def method_check(out: dict) -> dict:
    """Both estimate rules applied to measured cells, per checkpointing setting: batches 4 and 8 from 1 and 2, and
    replicated from sharded. Largest absolute error in GiB and the number of cells checked."""
    rows = _measured_rows(out)
    errors: dict[str, list] = {}
    for (model, lay, remat), row in rows.items():
        checkpointing = "on" if remat else "off"
        fit = _linear({b: g for b, g in row["total_gib"].items() if b in (1, 2)})
        if fit:
            errors.setdefault(f"linear_checkpointing_{checkpointing}", []).extend(
                abs(fit[0] + fit[1] * b - row["total_gib"][b]) for b in (4, 8) if b in row["total_gib"])
        twin = rows.get((model, "sharded", remat))
        if lay == "replicated" and twin:
            extra = row["state_gib"] - twin["state_gib"]
            errors.setdefault(f"replicated_checkpointing_{checkpointing}", []).extend(
                abs(twin["total_gib"][b] + extra - gib) for b, gib in row["total_gib"].items() if b in twin["total_gib"])
    return {rule: {"max_error_gib": round(max(e), 2), "cells": len(e)} for rule, e in sorted(errors.items()) if e}


def _measured_rows(out: dict) -> dict:
    rows: dict[tuple, dict] = {}
    for r in out["results"]:
        row = rows.setdefault((r["model"], r["layout"], r["gradient_checkpointing"]), {
            "model": r["model"], "layout": r["layout"], "gradient_checkpointing": r["gradient_checkpointing"],
            "state_gib": round(r["state_bytes"] / GIB, 2), "unet_gib": round(r["unet_bytes"] / GIB, 2), "total_gib": {}})
        row["total_gib"][r["per_device_batch"]] = round(r["total_bytes"] / GIB, 2)
        parameters = out.get("parameters", {}).get(r["model"], {}).get("controlnet")
        if parameters:  # fp32 weights, two AdamW moments and the EMA copy, whole on every device
            row["replicated_state_bytes"] = 16 * parameters
    return rows


def fits(out: dict) -> list[dict]:
    """Per model, layout and checkpointing: totals per batch (measured, and estimated where not compiled) and the
    largest batch per device under each capacity (from measured and estimated totals alike; estimates are marked)."""
    rows = _measured_rows(out)
    _estimates(rows)
    for row in rows.values():
        every = {**row.get("estimated_gib", {}), **row["total_gib"]}
        row["largest_batch"] = {chip: max([b for b, gib in every.items() if gib <= cap], default=0)
                                for chip, cap in CAPACITY_GIB.items()}
        row.pop("replicated_state_bytes", None)
    return sorted(rows.values(), key=lambda r: (list(MODELS).index(r["model"]), r["layout"], r["gradient_checkpointing"]))


# ---------------------------------------------------------------- 2. state bytes and step time at the tiny size


def state_worker(per_device: int, steps: int, repeats: int) -> None:
    """In a process with 8 virtual CPU devices; prints one JSON line."""
    import jax
    import jax.numpy as jnp

    from components.controlnet_train import distributed, model
    from components.controlnet_train.stage import build_training
    from train_step import random_batch, tiny_base, train_config

    base = tiny_base()
    folder, unet_config, scheduler_config, vae_config = model.read_base_configs(base)
    frozen = model.load_base(folder, unet_config, scheduler_config, vae_config, jnp.float32)
    results = []
    for count in (1, 2, 4, 8):
        mesh = distributed.data_mesh(jax.devices()[:count])
        rows = per_device * count
        batches = [distributed.global_batch(mesh, random_batch(rows, seed), rows) for seed in range(steps)]
        sides, record = {}, {"devices": count, "rows": rows}
        for layout in ("replicated", "sharded"):
            config = train_config(base, rows, shard_state=layout)
            t = config.train
            controlnet = model.make_controlnet(model.controlnet_config(unet_config, t.conditioning_embedding_out_channels), jnp.float32)
            state, unet_params, step_fn = build_training(t, frozen, controlnet, scheduler_config, None, mesh, jnp.float32)
            record[f"{layout}_state_bytes"] = distributed.bytes_per_device(state)
            compiled = step_fn.lower(state, unet_params, batches[0]).compile()
            holder = {"state": state}

            def run(compiled=compiled, unet_params=unet_params, holder=holder):
                for batch in batches:
                    holder["state"], metrics = compiled(holder["state"], unet_params, batch)
                jax.block_until_ready(metrics)

            run()  # warm
            sides[layout] = run
        samples = benchlib.interleaved(sides, repeats)
        for layout in sides:
            record[f"{layout}_step"] = benchlib.summary(samples[layout], rows * steps)
        record["step_time_ratio_sharded_over_replicated"] = {
            "best": round(record["sharded_step"]["best_s"] / record["replicated_step"]["best_s"], 3),
            "median": round(record["sharded_step"]["median_s"] / record["replicated_step"]["median_s"], 3)}
        results.append(record)
        print(f"  {count} device(s): state {record['replicated_state_bytes'] / 2**20:.2f} MiB replicated, "
              f"{record['sharded_state_bytes'] / 2**20:.2f} MiB sharded per device; step time sharded/replicated "
              f"{record['step_time_ratio_sharded_over_replicated']['best']}", file=sys.stderr, flush=True)
    print(json.dumps(results))


def state_part(args) -> dict:
    print("2. training state on 1/2/4/8 virtual CPU devices, tiny size", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
    out = subprocess.run([sys.executable, __file__, "--state-worker", str(args.per_device), "--steps", str(args.steps),
                          "--repeats", str(args.repeats)], env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"the state worker failed:\n{out.stderr[-3000:]}")
    sys.stderr.write(out.stderr[-2000:])
    return {"per_device_batch": args.per_device, "steps": args.steps, "repeats": args.repeats, "resolution": 64,
            "base": "embedded tiny-sd (cnpipe/embedded/tiny_sd.py), fp32", "results": json.loads(out.stdout.strip().splitlines()[-1])}


# ---------------------------------------------------------------- main


def save(args, compile_out=None, state_out=None) -> None:
    path = benchlib.RESULTS / "train_memory.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    payload = {"name": "train_memory", "devices": DEVICES, "capacity_gib": CAPACITY_GIB, "models": {k: v["label"] for k, v in MODELS.items()},
               "compile": previous.get("compile", {}), "state": previous.get("state")}
    if compile_out is not None:  # merged with earlier runs' configurations (a later measurement of the same one wins)
        key = lambda r: (r["model"], r["layout"], r["gradient_checkpointing"], r["per_device_batch"])  # noqa: E731
        merged = {key(r): r for r in payload["compile"].get("results", []) + compile_out["results"]}
        compile_out = {**compile_out, "parameters": {**payload["compile"].get("parameters", {}), **compile_out["parameters"]},
                       "results": sorted(merged.values(), key=key)}
        payload["compile"] = compile_out
    if state_out is not None:
        payload["state"] = state_out
    if payload["compile"].get("results"):
        payload["compile"]["fits"] = fits(payload["compile"])
        payload["compile"]["estimate_check"] = method_check(payload["compile"])
    benchlib.write_result("train_memory", payload, libraries=("jax", "jaxlib", "flax", "optax", "diffusers"))


def print_fits(out: dict) -> None:
    rows = []
    for r in fits(out):
        cells = {**{b: f"~{g:.1f}" for b, g in r.get("estimated_gib", {}).items()}, **{b: f"{g:.1f}" for b, g in r["total_gib"].items()}}
        rows.append([MODELS[r["model"]]["label"], r["layout"], "on" if r["gradient_checkpointing"] else "off", r["state_gib"],
                     " / ".join(cells.get(b, "-") for b in BATCHES),
                     " / ".join(str(r["largest_batch"][chip]) for chip in CAPACITY_GIB)])
    benchlib.print_table(["model", "state", "checkpointing", "state GiB", "total GiB per batch " + "/".join(map(str, BATCHES)),
                          "largest batch " + "/".join(f"{c} {g} GiB" for c, g in CAPACITY_GIB.items())], rows)
    checks = "; ".join(f"{rule.replace('_', ' ')}: within {c['max_error_gib']} GiB ({c['cells']} cells)"
                       for rule, c in method_check(out).items())
    print(f"~ estimated, not compiled (linear in the batch; replicated = sharded + the state's difference). The same rules "
          f"on the measured cells: {checks}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="compile,state")
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--batches", default="1,2,4,8", help="batch sizes per device")
    parser.add_argument("--layouts", default="replicated,sharded")
    parser.add_argument("--remat", default="off,on", help="gradient checkpointing settings to compile")
    parser.add_argument("--per-device", type=int, default=4, help="part 2: rows per device")
    parser.add_argument("--steps", type=int, default=8, help="part 2: steps per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile-worker", help=argparse.SUPPRESS)
    parser.add_argument("--state-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_worker:
        compile_worker(args.compile_worker, [int(b) for b in args.batches.split(",")], args.layouts.split(","),
                       [{"off": False, "on": True}[r] for r in args.remat.split(",")])
        return 0
    if args.state_worker:
        sys.path.insert(0, str(REPO / "bench"))
        state_worker(args.state_worker, args.steps, args.repeats)
        return 0
    parts = args.part.split(",")
    if "compile" in parts:
        save(args, compile_out=compile_part(args))
        print_fits(json.loads((benchlib.RESULTS / "train_memory.json").read_text())["compile"])
    if "state" in parts:
        save(args, state_out=state_part(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
