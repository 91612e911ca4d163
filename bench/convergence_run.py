"""bench/convergence.py's heavy part: the data, the held-out scorer, both trainers, the table, JSON and plot.

The training clock of each side runs from the side's start (models loaded, data opened, JAX's compile on the first
step) and pauses while a checkpoint is scored: scoring is the benchmark's, not the trainer's, and is reported apart.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchlib import cores
from convergence import REPO, fill_config, target_f1, time_to_target


class StopSide(Exception):
    """Raised by a side's checkpoint hook to end its training (target reached, or no time left)."""


class Clock:
    """Training wall time: since start, less the time spent scoring."""

    def __init__(self):
        self.start, self.paused, self.scoring_s = time.perf_counter(), None, 0.0

    def train_s(self) -> float:
        now = self.paused if self.paused is not None else time.perf_counter()
        return now - self.start - self.scoring_s

    def pause(self) -> None:
        self.paused = time.perf_counter()

    def resume(self) -> None:
        self.scoring_s += time.perf_counter() - self.paused
        self.paused = None


def ensure_data(run: pathlib.Path) -> float:
    """Makes the preset's data when `run` lacks it, through the project's own command (the embedded-fill pipeline with
    training and evaluation cut to a couple of steps and one sample; only encode's and conditioning's outputs are
    used). Returns the seconds it took (0 when the data was there)."""
    if (run / "encode" / "manifest.json").exists() and (run / "conditioning" / "summary.json").exists():
        return 0.0
    started = time.perf_counter()
    # pipeline.py re-runs itself in the core environment
    command = [sys.executable, "pipeline.py", "run", "--preset", "embedded-fill", "--run-id", run.name,
               "--set", f"storage.root={run.parent}", "--set", "train.max_steps=2", "--set", "train.checkpoint_every=2",
               "--set", "evaluate.num_samples=1"]
    print(f"making the data: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True, cwd=REPO)
    return time.perf_counter() - started


class ScorerProcess:
    """bench/convergence_scorer.py in evaluate's own environment (vision: OpenCV for the edge F1), kept running so that
    the sampler loads once; weights go to it as an .npz file, the mean scores come back as one JSON line."""

    def __init__(self, run: pathlib.Path):
        from cnpipe.families import family_python

        self.folder = tempfile.TemporaryDirectory(prefix="convergence-weights-")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen([family_python("vision"), str(REPO / "bench" / "convergence_scorer.py"), str(run)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.calls = 0

    def __call__(self, weights: dict) -> dict:
        started = time.perf_counter()
        self.calls += 1
        path = os.path.join(self.folder.name, f"weights_{self.calls}.npz")
        np.savez(path, **{k: np.asarray(v, np.float32) for k, v in weights.items()})
        self.process.stdin.write(path + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        os.remove(path)
        if not line:
            raise RuntimeError(f"the scorer process ended (exit status {self.process.wait()})")
        return {**json.loads(line), "scoring_s": round(time.perf_counter() - started, 2)}

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.folder.cleanup()


class Side:
    """One trainer's curve and its stopping rule (target, step cap, deadline); made right before the side starts,
    which starts its clock."""

    def __init__(self, name: str, scorer, target: float, deadline: float, step0: dict):
        self.name, self.scorer, self.target, self.deadline = name, scorer, target, deadline
        self.curve = [{"step": 0, "train_s": 0.0, **step0}]
        self.clock = Clock()
        self.stopped = "step cap"
        self.last_mark = time.perf_counter()

    def checkpoint(self, step: int, weights_fn, final: bool = False) -> None:
        self.clock.pause()
        train_s = self.clock.train_s()
        point = {"step": step, "train_s": round(train_s, 2), **self.scorer(weights_fn())}
        self.curve.append(point)
        print(f"  {self.name:8s} step {step:5d}  train {train_s:7.1f} s  edge F1 {point['edge_f1']:.3f}  "
              f"IoU {point['iou']:.3f}  centre error {point['centre_error']:5.2f} px  (scored in {point['scoring_s']} s)", flush=True)
        self.clock.resume()
        now = time.perf_counter()
        interval, self.last_mark = now - self.last_mark, now
        reached = point["edge_f1"] >= self.target
        if reached:
            self.stopped = "target reached"
        if final:
            return
        if reached:
            raise StopSide
        if now + interval > self.deadline:  # the next checkpoint would land past the bench's budget
            self.stopped = "time budget"
            raise StopSide

    def result(self, **extra) -> dict:
        return {"curve": self.curve, "time_to_target_s": time_to_target(self.curve, self.target), "stopped": self.stopped,
                "train_s": round(self.curve[-1]["train_s"], 2), "scoring_s": round(self.clock.scoring_s, 2), **extra}


class OursObserver:
    """stage.run's observer: every train.validation_every steps, the trainer's current weights scored."""

    def __init__(self, side: Side, shapes: dict, max_steps: int):
        self.side, self.shapes, self.max_steps = side, shapes, max_steps
        self.progress = None

    def run(self, state, unet_params, step, progress) -> None:
        from components.controlnet_train import distributed
        from components.controlnet_train.weights import flax_to_pytorch

        self.progress = progress
        weights = lambda: flax_to_pytorch(distributed.to_host(state.params), self.shapes, "convergence")  # noqa: E731
        self.side.checkpoint(step, weights, final=step == self.max_steps)


def initial_weights(config) -> tuple[dict, dict]:
    """(our stage's initial ControlNet in PyTorch names, PyTorch shapes): the same start for both sides."""
    import jax.numpy as jnp

    from components.controlnet_train import model
    from components.controlnet_train.export import build_pytorch_controlnet
    from components.controlnet_train.weights import flax_to_pytorch

    t = config.train
    folder, unet_config, scheduler_config, vae_config = model.read_base_configs(config.base_model.path)
    base = model.load_base(folder, unet_config, scheduler_config, vae_config, jnp.float32)
    controlnet = model.make_controlnet(model.controlnet_config(unet_config, t.conditioning_embedding_out_channels), jnp.float32)
    params = model.init_controlnet_from_unet(controlnet, base.unet_params, t.seed)
    shapes = {k: tuple(v.shape) for k, v in build_pytorch_controlnet(folder, t.conditioning_embedding_out_channels).state_dict().items()}
    return flax_to_pytorch(params, shapes, "convergence init"), shapes


def train_ours(config, run: pathlib.Path, side: Side, shapes: dict) -> dict:
    from cnpipe.dataset import Manifest
    from components.controlnet_train import stage

    observer = OursObserver(side, shapes, config.train.max_steps)
    with tempfile.TemporaryDirectory(prefix="convergence-ours-") as out:
        try:
            stage.run(config, {"encoded": Manifest.load(str(run / "encode"))}, out, observer=observer)
        except StopSide:
            pass
    progress = observer.progress
    steps = progress.timed_steps if progress else 0
    return side.result(compile_s=round(progress.compile_s, 2) if progress else None,
                       step_time_s=round(progress.timed_s / steps, 4) if steps else None)


def train_pytorch(config, run: pathlib.Path, side: Side, init: dict) -> dict:
    import torch

    from bench.diffusers_reference import ReferenceTrainer
    from cnpipe.dataset import Manifest
    from components.controlnet_train.data import BatchFeed, open_encoded

    t = config.train
    data = open_encoded(Manifest.load(str(run / "encode")))
    trainer = ReferenceTrainer(config.base_model.path, t.conditioning_embedding_out_channels, init, t, torch.float32)
    feed = BatchFeed(data, t.global_batch_size, 0, 1, t.seed, t.shuffle_window_shards)  # our trainer's order
    generator = torch.Generator().manual_seed(t.seed)
    weights = lambda: {k: v.detach().numpy() for k, v in trainer.controlnet.state_dict().items()}  # noqa: E731
    step_times = []
    try:
        for step in range(1, t.max_steps + 1):
            started = time.perf_counter()
            batch = next(feed)
            draws = trainer.draws(t.global_batch_size, data.latent_shape, t.caption_dropout, generator)
            trainer.step(batch, *draws, data.uncond)
            step_times.append(time.perf_counter() - started)
            if step % t.validation_every == 0 or step == t.max_steps:
                side.checkpoint(step, weights, final=step == t.max_steps)
    except StopSide:
        pass
    finally:
        feed.close()
    first = step_times[0] if step_times else None
    rest = step_times[1:]
    return side.result(first_step_s=round(first, 3) if first else None,
                       step_time_s=round(float(np.mean(rest)), 4) if rest else None,
                       step_time_median_s=round(float(np.median(rest)), 4) if rest else None)


def table(results: dict) -> str:
    lines = [f"{'side':8s} {'step':>5s} {'train s':>8s} {'edge F1':>8s} {'IoU':>6s} {'centre px':>9s}"]
    for name, side in results["sides"].items():
        for p in side["curve"]:
            lines.append(f"{name:8s} {p['step']:5d} {p['train_s']:8.1f} {p['edge_f1']:8.3f} {p['iou']:6.3f} {p['centre_error']:9.2f}")
    return "\n".join(lines)


def plot(results: dict) -> bytes:
    from components.report.plots import line_plot

    series = {f"{name} (edge F1)": [(p["train_s"], p["edge_f1"]) for p in side["curve"]] for name, side in results["sides"].items()}
    right = max(p["train_s"] for side in results["sides"].values() for p in side["curve"]) or 1.0
    series[f"target {results['target']:.3f}"] = [(0.0, results["target"]), (right, results["target"])]
    return line_plot(series, "held-out edge F1 vs training wall time (fill domain)", "training seconds (scoring excluded)",
                     "edge F1")


def run_benchmark(args) -> dict:
    import torch

    bench_start = time.perf_counter()
    run = pathlib.Path(args.run).resolve()
    data_s = ensure_data(run)
    torch.set_num_threads(cores())  # train_controlnet.py's default; XLA:CPU's pool is the cores too
    config = fill_config()
    config.train = dataclasses.replace(config.train, max_steps=args.max_steps, validation_every=args.every)
    init, shapes = initial_weights(config)
    scorer = ScorerProcess(run)
    try:
        return _compare(args, config, run, scorer, init, shapes, bench_start, data_s)
    finally:
        scorer.close()


def _compare(args, config, run, scorer, init, shapes, bench_start, data_s) -> dict:
    step0 = scorer(init)
    target = target_f1(step0["edge_f1"])
    print(f"step 0 (both sides): edge F1 {step0['edge_f1']:.3f}, IoU {step0['iou']:.3f}, centre error "
          f"{step0['centre_error']:.2f} px; target edge F1 {target:.3f}; {cores()} threads", flush=True)
    deadline = bench_start + data_s + args.budget_s
    sides = [s for s in args.sides.split(",") if s]
    results = {"target": target, "step0": step0, "threads": cores(), "every": args.every, "max_steps": args.max_steps,
               "data_s": round(data_s, 1), "sides": {}}
    for index, name in enumerate(sides):
        now = time.perf_counter()
        side_deadline = now + (deadline - now) / (len(sides) - index)  # an equal share of what is left; a side that
        side = Side(name, scorer, target, side_deadline, step0)         # ends early leaves its rest to the next
        print(f"{name}: training (deadline in {side_deadline - now:.0f} s)", flush=True)
        if name == "ours":
            results["sides"][name] = train_ours(config, run, side, shapes)
        elif name == "pytorch":
            results["sides"][name] = train_pytorch(config, run, side, init)
        else:
            raise SystemExit(f"unknown side {name!r}: ours, pytorch")
    ours, ref = results["sides"].get("ours", {}), results["sides"].get("pytorch", {})
    if ours.get("time_to_target_s") and ref.get("time_to_target_s"):
        results["ratio_ours_over_pytorch"] = round(ours["time_to_target_s"] / ref["time_to_target_s"], 3)
    elif ours.get("time_to_target_s") and ref:
        results["ratio_ours_over_pytorch_at_most"] = round(ours["time_to_target_s"] / ref["train_s"], 3)
    results["total_s"] = round(time.perf_counter() - bench_start, 1)
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    report(results, pathlib.Path(args.out))
    return results


def report(results: dict, out: pathlib.Path) -> None:
    print("\n" + table(results))
    for name, side in results["sides"].items():
        reached = side["time_to_target_s"]
        when = f"{reached:.1f} s" if reached is not None else f"not reached (> {side['train_s']:.1f} s)"
        print(f"{name}: time-to-target {when}; "
              f"{side['step_time_s']} s/step; stopped: {side['stopped']}; scoring {side['scoring_s']} s"
              + (f"; compile {side['compile_s']} s" if side.get("compile_s") is not None else ""))
    for key in ("ratio_ours_over_pytorch", "ratio_ours_over_pytorch_at_most"):
        if key in results:
            print(f"{key}: {results[key]}")
    print(f"bench total {results['total_s']} s (making the data: {results['data_s']} s); load average {results['load_average']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".png").write_bytes(plot(results))
    print(f"wrote {out} and {out.with_suffix('.png')}")
