"""ControlNet training on CPU: our JAX step vs diffusers' PyTorch step, the trainer's overhead, device scaling.

    PYTHONPATH=. .venvs/train/bin/python bench/train_step.py [--batch 8] [--steps 8] [--repeats 3]

1. step       ours: the trainer's own jitted step (stage.build_training -> step.make_train_step; fp32,
              XLA:CPU with its default optimisation) vs reference: the training step of diffusers'
              examples/controlnet/train_controlnet.py in PyTorch (ControlNetModel.from_unet, frozen UNet,
              noise + DDPMScheduler.add_noise, MSE on epsilon, backward, grad-norm clipping, AdamW step,
              LR scheduler step, zero_grad). Same base (the embedded tiny-sd, 64 px), batch, pre-encoded
              latents / text encodings / controls (the example's VAE and text-encoder passes are left out on
              both sides: our trainer gets them from the encode stage), same hyper-parameters; ours also
              updates its EMA (the example has none), so that every part runs one compiled step. torch
              threads = XLA:CPU's intra-op pool = the cores. images/s.
2. overhead   ours: stage.run end to end on a synthetic encode dataset (data feed with PNG decoding,
              host->device transfer, EMA, logging to metrics.jsonl, an orbax checkpoint every
              --checkpoint-every steps), timed by its own loop clock, which excludes the compiling first
              step and the final save/export; reference: the bare jitted step of part 1 (built by the same
              stage.build_training from the same config) on the same batches, already on the device,
              waiting for the device where the trainer does (its log steps). Overhead % = extra wall time,
              split into the loop's own share (median log interval) and the checkpoint saves'.
3. scaling    the bare step on 1, 2 and 4 virtual CPU devices (one subprocess each, XLA_FLAGS
              --xla_force_host_platform_device_count=N) at a fixed per-device batch. images/s.

Sides are interleaved (A B, B A, ...) and best/median of --repeats reported. Writes bench/results/train_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import benchlib  # (also puts the repo on sys.path)

REPO = benchlib.REPO
RESOLUTION = 64  # the embedded preset's (tiny-sd's VAE: latents 8x8)
CHANNELS = [8, 8, 16, 16]  # the embedded preset's conditioning embedder
HYPER = dict(learning_rate=1e-4, adam_b1=0.9, adam_b2=0.999, weight_decay=1e-2, max_grad_norm=1.0)
# Ours keeps its EMA (TrainConfig's default decay) in every part, so all parts run one compiled step;
# the PyTorch example has no EMA, so in part 1 ours does that (small) extra work.
EMA_DECAY = 0.9999
CACHE = os.path.join(tempfile.gettempdir(), "cnpipe-bench-train-jax-cache")  # compiled steps, across runs and subprocesses


def xla_intra_op_threads() -> int:
    """Threads of XLA:CPU's intra-op (Eigen) pool in this process: it sizes itself to the cores."""
    tasks = pathlib.Path("/proc/self/task")
    return sum("XLAEigen" in (t / "comm").read_text() for t in tasks.iterdir()) if tasks.exists() else -1


def tiny_base() -> str:
    from cnpipe.embedded import tiny_sd

    return tiny_sd.ensure(str(benchlib.default_assets() / "models"))


def train_config(base: str, batch: int, **train):
    import pipeline_configs

    config = pipeline_configs.embedded()
    config.base_model.path = base
    config.encode.resolution = RESOLUTION
    for key, value in {**HYPER, "global_batch_size": batch, "compute_dtype": "float32", "conditioning_embedding_out_channels": CHANNELS,
                       "lr_schedule": "constant", "warmup_steps": 0, "validation_rows": 0, "ema_decay": EMA_DECAY, **train}.items():
        setattr(config.train, key, value)
    return config


def random_batch(batch: int, seed: int = 0) -> dict:
    import numpy as np

    from cnpipe.embedded import tiny_sd

    rng = np.random.default_rng(seed)
    return {"latents": rng.standard_normal((batch, 4, RESOLUTION // 8, RESOLUTION // 8), dtype=np.float32),
            "text": rng.standard_normal((batch, tiny_sd.MAX_TEXT_LENGTH, tiny_sd.TEXT_HIDDEN), dtype=np.float32),
            "control": rng.random((batch, 3, RESOLUTION, RESOLUTION), dtype=np.float32)}


# ---------------------------------------------------------------- ours: the trainer's step


class OurStep:
    """The trainer's jitted step on every visible device, as stage._train builds it."""

    def __init__(self, config):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from components.controlnet_train import distributed, model
        from components.controlnet_train.stage import build_training

        t = config.train
        folder, unet_config, scheduler_config, vae_config = model.read_base_configs(config.base_model.path)
        base = model.load_base(folder, unet_config, scheduler_config, vae_config, jnp.float32)
        controlnet = model.make_controlnet(model.controlnet_config(unet_config, t.conditioning_embedding_out_channels), jnp.float32)
        self.mesh = distributed.data_mesh()
        uncond = np.zeros((77, unet_config["cross_attention_dim"]), np.float32)  # unused: caption_dropout is 0
        self.state, self.unet_params, self.step_fn = build_training(t, base, controlnet, scheduler_config, uncond, self.mesh, jnp.float32)
        self.batch_rows = t.global_batch_size
        self.jax = jax

    def on_device(self, batch: dict) -> dict:
        from components.controlnet_train import distributed

        return distributed.global_batch(self.mesh, batch, self.batch_rows)

    def compile(self, batch) -> float:
        started = time.perf_counter()
        self.step_fn = self.step_fn.lower(self.state, self.unet_params, batch).compile()
        return time.perf_counter() - started

    def run(self, batches: list) -> float:
        """One step per batch, waiting for the last result; returns its loss."""
        metrics = None
        for batch in batches:
            self.state, metrics = self.step_fn(self.state, self.unet_params, batch)
        return float(self.jax.block_until_ready(metrics)["loss"])


# ---------------------------------------------------------------- reference: diffusers' PyTorch step


class DiffusersStep:
    """One optimisation step as diffusers' examples/controlnet/train_controlnet.py does it (fp32, CPU)."""

    def __init__(self, base: str, threads: int):
        import torch
        from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.torch = torch
        self.unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", use_safetensors=True)
        self.controlnet = ControlNetModel.from_unet(self.unet, conditioning_embedding_out_channels=tuple(CHANNELS))
        self.unet.requires_grad_(False)
        self.controlnet.train()
        self.noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        self.optimizer = torch.optim.AdamW(self.controlnet.parameters(), lr=HYPER["learning_rate"],
                                           betas=(HYPER["adam_b1"], HYPER["adam_b2"]), weight_decay=HYPER["weight_decay"], eps=1e-8)
        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer)

    def on_device(self, batch: dict) -> dict:
        return {k: self.torch.from_numpy(v) for k, v in batch.items()}

    def step(self, batch: dict) -> float:
        torch = self.torch
        latents = batch["latents"]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        down, mid = self.controlnet(noisy_latents, timesteps, encoder_hidden_states=batch["text"],
                                    controlnet_cond=batch["control"], return_dict=False)
        model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states=batch["text"],
                               down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.controlnet.parameters(), HYPER["max_grad_norm"])
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def run(self, batches: list) -> float:
        loss = float("nan")
        for batch in batches:
            loss = self.step(batch)
        return loss


# ---------------------------------------------------------------- 1. step vs step


def compare_steps(ours: OurStep, base: str, batch: int, steps: int, repeats: int) -> dict:
    threads = benchlib.cores()
    host = [random_batch(batch, seed) for seed in range(steps)]
    our_batches = [ours.on_device(b) for b in host]
    compile_s = ours.compile(our_batches[0])
    reference = DiffusersStep(base, threads)
    ref_batches = [reference.on_device(b) for b in host]
    ours.run(our_batches[:2]), reference.run(ref_batches[:2])  # warm-up (allocations, oneDNN primitives)
    xla_threads = xla_intra_op_threads()
    print(f"1. step: batch {batch} at {RESOLUTION} px, {steps} steps per timing, {threads} cores: torch threads "
          f"{reference.torch.get_num_threads()}, XLA:CPU intra-op threads {xla_threads}; our compile {compile_s:.1f} s", file=sys.stderr)
    seconds = benchlib.interleaved({"ours": lambda: ours.run(our_batches), "diffusers": lambda: reference.run(ref_batches)}, repeats)
    items = batch * steps
    result = {"ours": benchlib.summary(seconds["ours"], items), "reference": benchlib.summary(seconds["diffusers"], items)}
    result["ratio"] = benchlib.speed_ratio(result["ours"], result["reference"])
    result.update(batch=batch, steps=steps, cores=threads, torch_threads=reference.torch.get_num_threads(), xla_intra_op_threads=xla_threads,
                  our_compile_s=round(compile_s, 2))
    return result


# ---------------------------------------------------------------- 2. trainer end to end vs bare step


def wall_summary(wall: list[float], items: int) -> dict:
    """benchlib.summary's wall-time part: the trainer's side is its own loop clock, which has no CPU-time twin."""
    return {"best_s": round(min(wall), 4), "median_s": round(statistics.median(wall), 4), "runs_s": [round(s, 4) for s in wall],
            "items": items, "best_per_s": round(items / min(wall), 2), "median_per_s": round(items / statistics.median(wall), 2)}


def _chunks(items: list, size: int) -> list[list]:
    """The trainer's log intervals over steps 2..N: up to the first multiple of `size`, then `size` each."""
    out, current = [], []
    for step in items:
        current.append(step)
        if step % size == 0 or step == items[-1]:
            out.append(current)
            current = []
    return out


def loop_segments(output: str) -> list[tuple[int, float]]:
    """(steps, seconds) of every log interval the trainer timed, from its metrics.jsonl."""
    records = [json.loads(line) for line in pathlib.Path(output, "metrics.jsonl").read_text().splitlines()]
    segments, previous = [], 0
    for record in records:
        if "step_time_s" in record:
            steps = record["step"] - max(previous, 1)
            segments.append((steps, record["step_time_s"] * steps))
        previous = record["step"]
    return segments


def trainer_overhead(bare: OurStep, config, repeats: int, root: str) -> dict:
    """`bare` is part 1's compiled step, built from this very `config`."""
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from synthetic import write_encoded

    from cnpipe.embedded import tiny_sd
    from components.controlnet_train import stage
    from components.controlnet_train.data import BatchFeed, open_encoded

    t = config.train
    batch, steps, log_every, checkpoint_every = t.global_batch_size, t.max_steps, t.log_every, t.checkpoint_every
    rows = 4 * batch  # 4 steps an epoch: epoch boundaries and shard windows are crossed
    encoded = write_encoded(f"{root}/encoded", rows=rows, resolution=RESOLUTION, text_shape=(tiny_sd.MAX_TEXT_LENGTH, tiny_sd.TEXT_HIDDEN),
                            rows_per_shard=batch, holdout_fraction=0.0)
    feed = BatchFeed(open_encoded(encoded), batch, 0, 1, t.seed, t.shuffle_window_shards)
    batches = [bare.on_device(next(feed)) for _ in range(steps)]  # the trainer's batches, in its order
    feed.close()
    timed = batches[1:]  # the trainer's clock starts after its first (compiling) step
    # The bare loop waits for the device where the trainer does (at its log steps), so both spans split
    # into the same intervals; the median interval holds no checkpoint save on either side.
    intervals = [len(c) for c in _chunks(list(range(2, steps + 1)), log_every)]
    seconds: dict[str, list[float]] = {"trainer": [], "bare step": []}
    per_step = {"trainer": [], "bare step": []}  # seconds per step of every full log interval
    compile_s = []
    for round_ in range(repeats):
        for name in ("trainer", "bare step") if round_ % 2 == 0 else ("bare step", "trainer"):
            if name == "trainer":
                output = f"{root}/train-{round_}"
                summary = stage.run(config, {"encoded": encoded}, output)
                segments = loop_segments(output)
                assert [n for n, _ in segments] == intervals, (segments, intervals)
                compile_s.append(summary["compile_s"])
                note = f" (its loop clock; compile {summary['compile_s']:.1f} s excluded)"
            else:
                segments, start = [], 0
                for n in intervals:
                    started = time.perf_counter()
                    bare.run(timed[start : start + n])
                    segments.append((n, time.perf_counter() - started))
                    start += n
                note = ""
            seconds[name].append(sum(t for _, t in segments))
            per_step[name] += [t / n for n, t in segments if n == log_every]
            print(f"  {name}: {seconds[name][-1]:.2f} s{note}", file=sys.stderr)
    items = batch * len(timed)
    result = {"ours": wall_summary(seconds["trainer"], items), "reference": wall_summary(seconds["bare step"], items)}
    result["ratio"] = {k: round(result["reference"][f"{k}_s"] / result["ours"][f"{k}_s"], 3) for k in ("best", "median")}
    result["overhead_pct"] = {k: round(100 * (result["ours"][f"{k}_s"] / result["reference"][f"{k}_s"] - 1), 1) for k in ("best", "median")}
    # Where the extra time goes: the median log interval (no save in it) is the loop's own cost per step;
    # what the trainer's span holds beyond its median intervals is the checkpoint save(s).
    import pipeline_configs

    default_every = pipeline_configs.TrainConfig().checkpoint_every
    saves = [s for s in range(2, steps) if s % checkpoint_every == 0]
    bare_step, loop_step = statistics.median(per_step["bare step"]), statistics.median(per_step["trainer"])
    save_s = max(result["ours"]["median_s"] - loop_step * len(timed), 0.0) / max(len(saves), 1)
    result["breakdown"] = {
        "bare_step_s": round(bare_step, 5), "trainer_step_without_save_s": round(loop_step, 5),
        "loop_overhead_pct": round(100 * (loop_step / bare_step - 1), 1),
        "seconds_per_checkpoint_save": round(save_s, 3),
        "overhead_pct_at_default_interval": round(100 * ((loop_step + save_s / default_every) / bare_step - 1), 1),
        "default_checkpoint_every": default_every,
        "note": f"per step: the median {log_every}-step interval of each side (none holds a save); per save: the trainer's "
                f"span minus its median intervals; the last figure is derived from those for train.checkpoint_every's default",
    }
    result.update(batch=batch, steps=steps, timed_steps=len(timed), checkpoint_every=checkpoint_every, log_every=log_every,
                  checkpoints_in_timed_span=saves, trainer_compile_s=compile_s)
    return result


# ---------------------------------------------------------------- 3. scaling over virtual devices


def scaling_worker(per_device: int, steps: int, repeats: int) -> None:
    """In a subprocess with N virtual devices: best images/s of the bare step; prints one JSON line."""
    import jax

    base = tiny_base()
    count = jax.device_count()
    ours = OurStep(train_config(base, per_device * count))
    batches = [ours.on_device(random_batch(per_device * count, seed)) for seed in range(steps)]
    compile_s = ours.compile(batches[0])
    ours.run(batches[:2])
    samples: dict[str, list[float]] = {"wall": [], "cpu": []}
    for _ in range(repeats):
        cpu, started = benchlib.cpu_seconds(), time.perf_counter()
        ours.run(batches)
        samples["wall"].append(time.perf_counter() - started)
        samples["cpu"].append(benchlib.cpu_seconds() - cpu)
    print(json.dumps({"devices": count, "compile_s": round(compile_s, 2), **benchlib.summary(samples, per_device * count * steps)}))


def scaling(per_device: int, steps: int, repeats: int, device_counts: list[int]) -> list[dict]:
    results = []
    for n in device_counts:
        env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_COMPILATION_CACHE_DIR": CACHE}
        out = subprocess.run([sys.executable, __file__, "--scaling-worker", str(per_device), "--steps", str(steps), "--repeats", str(repeats)],
                             env=env, cwd=REPO, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"scaling worker with {n} devices failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {n} device(s): {results[-1]['best_per_s']:.1f} images/s (compile {results[-1]['compile_s']:.1f} s)", file=sys.stderr)
    return results


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="rows per step in parts 1 and 2")
    parser.add_argument("--steps", type=int, default=8, help="steps per timing in parts 1 and 3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trainer-steps", type=int, default=1001, help="max_steps of each trainer run (part 2)")
    parser.add_argument("--checkpoint-every", type=int, default=500,
                        help="part 2 (train.checkpoint_every's default): saves inside the timed span, whose background "
                             "writes overlap the later steps")
    parser.add_argument("--trainer-repeats", type=int, default=2, help="part 2's repeats (each trainer run is a whole stage run)")
    parser.add_argument("--per-device-batch", type=int, help="part 3 (default: --batch, so 1 device runs part 1's compiled step)")
    parser.add_argument("--devices", default="1,2,4", help="part 3's virtual device counts")
    parser.add_argument("--scaling-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE)
    if args.scaling_worker:
        scaling_worker(args.scaling_worker, args.steps, args.repeats)
        return 0
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        parser.error("run without --xla_force_host_platform_device_count: part 3 sets it per subprocess")

    load_start, started = os.getloadavg(), time.perf_counter()
    base = tiny_base()
    config = train_config(base, args.batch, max_steps=args.trainer_steps, log_every=10, checkpoint_every=args.checkpoint_every,
                          keep_checkpoints=2)
    ours = OurStep(config)
    step = compare_steps(ours, base, args.batch, args.steps, args.repeats)
    print(f"2. trainer end to end vs the bare step ({time.perf_counter() - started:.0f} s so far)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as root:
        overhead = trainer_overhead(ours, config, args.trainer_repeats, root)
    print(f"3. scaling over virtual CPU devices ({time.perf_counter() - started:.0f} s so far)", file=sys.stderr)
    per_device = args.per_device_batch or args.batch
    scale = scaling(per_device, args.steps, args.repeats, [int(n) for n in args.devices.split(",")])

    one = scale[0]["best_per_s"]
    b = overhead["breakdown"]
    rows = [
        {"metric": f"train step images/s (batch {args.batch}, {RESOLUTION} px, fp32, {step['cores']} threads): ours JAX vs diffusers PyTorch",
         "ours": step["ours"]["best_per_s"], "reference": step["reference"]["best_per_s"], "ratio": step["ratio"]["best"]},
        {"metric": f"trainer end to end vs bare step, images/s, a checkpoint every {overhead['checkpoint_every']} steps "
                   f"(overhead {overhead['overhead_pct']['best']}% best, {overhead['overhead_pct']['median']}% median)",
         "ours": overhead["ours"]["best_per_s"], "reference": overhead["reference"]["best_per_s"], "ratio": overhead["ratio"]["best"]},
        {"metric": f"of which: loop without saves {b['loop_overhead_pct']}%, {b['seconds_per_checkpoint_save']} s per save; derived "
                   f"overhead at the default checkpoint_every={b['default_checkpoint_every']}: {b['overhead_pct_at_default_interval']}%",
         "ours": round(args.batch / b["trainer_step_without_save_s"], 2), "reference": round(args.batch / b["bare_step_s"], 2),
         "ratio": round(b["bare_step_s"] / b["trainer_step_without_save_s"], 3)},
    ] + [
        {"metric": f"bare step images/s on {s['devices']} virtual CPU device(s), {per_device} rows each (reference: 1 device)",
         "ours": s["best_per_s"], "reference": one, "ratio": round(s["best_per_s"] / one, 3)} for s in scale
    ]
    benchlib.print_table(["metric", "ours", "reference", "ratio"], [[r["metric"], r["ours"], r["reference"], r["ratio"]] for r in rows])
    benchlib.write_result("train_step", {
        "name": "train_step", "rows": rows, "load_average_at_start": [round(v, 2) for v in load_start],
        "resolution": RESOLUTION, "base": "embedded tiny-sd (cnpipe/embedded/tiny_sd.py)", "repeats": args.repeats,
        "trainer_repeats": args.trainer_repeats,
        "step": step, "trainer_overhead": overhead, "scaling": {"per_device_batch": per_device, "results": scale},
    }, libraries=("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "diffusers"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
