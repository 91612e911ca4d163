"""Combine bench/results/*.json into one Markdown section (for the README's "Performance").

    python bench/report.py [--output bench/results/report.md]

Standard library only: any of the family interpreters runs it. Targets: every speed ratio (ours ÷ the plain
reference, as throughput, from the same run) >= 1.0; peak RSS at 10x data < 1.5x that at 1x.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ORDER = ["conditioning", "download", "clip_blip", "curate", "memory", "end_to_end", "train_step", "train_memory",
         "real_sizes"]


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def table(headers: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def conditioning(r: dict) -> list[str]:
    out = [f"**Conditioning** (`bench/conditioning.py`): {r['images']} images (mean {r['mean_kpixels']:.0f} kpx), "
           f"our stage with {r['workers']} worker threads vs the plain single-process loop a user would write for the "
           f"same control images (OpenCV decode, cv2.Canny / one MediaPipe Pose + skeleton, OpenCV PNG encode); best of "
           f"{r['repeats']}, images/s. *Compute* = that loop on pre-decoded arrays without encoding (the bare operation). "
           f"Fixed cost of one stage run (2 images, canny+pose: imports, one MediaPipe graph per worker, Parquet): "
           f"{r['fixed_cost_s']:.1f} s.", ""]
    rows = []
    for label, e in r["results"].items():
        ratio = e["ratio_vs_reference"]
        rows.append([label, e["ours"]["best_per_s"], e["reference"]["best_per_s"], e["compute"]["best_per_s"],
                     f"{ratio['best']:.2f} / {ratio['median']:.2f}", f"{e['ratio_vs_compute']['best']:.2f}",
                     " / ".join(f"{e[side].get('cpu_ms_per_item', float('nan')):.1f}" for side in ("ours", "reference", "compute")),
                     met(ratio["best"] >= 1.0)])
    return out + table(["types", "ours img/s", "reference img/s", "compute img/s", "ratio best / median", "ratio vs compute",
                        "CPU ms/img ours / ref / compute", "≥ 1.0"], rows)


def download(r: dict) -> list[str]:
    out = [f"**Download** (`bench/download.py`): {r['urls']} URLs ({r['distinct_images']} distinct JPEGs of 512–1024 px, mean "
           f"{r['mean_kb']:.0f} kB) from a loopback server; `python -m components.download` vs the `img2dataset` command, "
           f"same settings (image_size {r['image_size']} {r['resize_mode']}, {r['threads']} threads, {r['processes']} "
           f"process(es); ours reads {r.get('input_shards_ours', 1)} input shard(s), img2dataset one URL file); whole commands "
           f"timed, best of {r['repeats']}.", ""]
    res, speed = r["results"], r["speed_ratio"]
    rows = [["ours", res["ours"]["best_s"], res["ours"]["best_per_s"], sorted(set(r["downloaded"]["ours"]))],
            ["img2dataset", res["img2dataset"]["best_s"], res["img2dataset"]["best_per_s"], sorted(set(r["downloaded"]["img2dataset"]))]]
    out += table(["command", "wall s (best)", "images/s", "downloaded"], rows)
    return out + [f"Overhead ratio (ours ÷ img2dataset wall time): {r['overhead_ratio']['best']:.3f} best, "
                  f"{r['overhead_ratio']['median']:.3f} median; speed ratio {speed['best']:.3f} / {speed['median']:.3f} "
                  f"(≥ 1.0: {met(speed['best'] >= 1.0)}); CPU time ours ÷ img2dataset "
                  f"{res['ours']['cpu_median_s'] / res['img2dataset']['cpu_median_s']:.3f} (median).", ""]


def clip_blip(r: dict) -> list[str]:
    out = [f"**CLIP embed / BLIP caption** (`bench/clip_blip.py`): our stages (batched) vs a plain transformers loop at "
           f"batch 1 on the same images, model loading included on both sides, {r['torch_threads']} torch threads, best "
           f"of {r['repeats']}, each model size in a fresh process; the small models (compute-bound, as real checkpoints "
           f"are) at the stages' default batch sizes; outputs compared (embeddings within 1e-4, captions equal).", ""]
    rows = []
    for size, e in r["results"].items():
        for name in ("clip", "blip"):
            x = e[name]
            batch = e[f"{name}_batch_size"]
            images = e["images"][name] if isinstance(e["images"], dict) else e["images"]
            rows.append([f"{name} {size}", images, batch, x["ours"]["best_per_s"], x["reference"]["best_per_s"],
                         f"{x['ratio']['best']:.2f} / {x['ratio']['median']:.2f}", x["ratio"].get("cpu", "-"),
                         "yes" if x["same_output"] else "**no**", met(x["ratio"]["best"] >= 1.0)])
    return out + table(["stage, model", "images", "batch", "ours img/s", "reference img/s", "ratio best / median",
                        "CPU ratio ref/ours", "same output", "≥ 1.0"], rows)


def curate(r: dict) -> list[str]:
    out, st = [], r["settings"]
    if "quality" in r:
        q = r["quality"]
        recipes = list(next(iter(q.values()))["recipes"])
        first = next(iter(q.values()))
        out += [f"**Curate, dedup quality** (`bench/curate.py`): {first['rows']} rows from {st['bases']} originals "
                f"(scikit-image photo windows and shape scenes), {first['duplicates']} of them copies made by one recipe "
                f"each (the recipes are what counts as a duplicate); look-alike distinct pictures must stay apart. The three "
                f"curate steps as kfp runs them; precision = true drops / drops, recall = true drops / copies. Target: "
                f"recall ≥ 0.95 at precision ≥ 0.99. The embedding rows use the tiny random-weight CLIP, so they say "
                f"nothing of a real CLIP's quality.", ""]
        rows = [[name, v["precision"], v["recall"], *[v["recipes"][x]["recall"] for x in recipes],
                 met(v["recall"] >= 0.95 and v["precision"] >= 0.99)] for name, v in q.items()]
        out += table(["dedup signals", "precision", "recall", *[f"recall {x}" for x in recipes], "target"], rows)
    if "speed" in r:
        sp = r["speed"]
        out += [f"**Curate, speed** ({sp['ours']['items']} images, tiny CLIP, exact + pHash): our three steps vs a plain "
                f"single-process loop doing the same hashing, CLIP and brute-force search, best of {st['repeats']}: "
                f"{sp['ours']['best_per_s']} vs {sp['plain loop']['best_per_s']} images/s, ratio "
                f"{sp['ratio']['best']:.2f} best / {sp['ratio']['median']:.2f} median (≥ 1.0: {met(sp['ratio']['best'] >= 1.0)}), "
                f"CPU ratio {sp['ratio']['cpu']:.2f}; rows kept ours / loop: {sp['kept']['ours']} / {sp['kept']['plain loop']}.", ""]
    if "memory" in r:
        m = r["memory"]
        out += [f"**Curate, peak memory**: each step's command on the set and on one {st['scale']}× larger "
                f"(same shard size); process = its largest process, tree = summed PSS.", ""]
        rows = [[name, f"{v['1x']['rows']} / {v['10x']['rows']}", v["1x"]["max_process_mib"], v["10x"]["max_process_mib"],
                 v["1x"]["tree_mib"], v["10x"]["tree_mib"], f"{v['ratio_process']:.2f} / {v['ratio_tree']:.2f}",
                 met(max(v["ratio_process"], v["ratio_tree"]) < 1.5)] for name, v in m.items()]
        out += table(["step", "rows 1× / 10×", "process MiB 1×", "process MiB 10×", "tree MiB 1×", "tree MiB 10×",
                      "ratio process / tree", "< 1.5"], rows)
    if "global_pass" in r:
        out += [f"**Curate, the global pass alone** (curate_dedup's command on synthetic keys: 768-d embeddings, 5 % near "
                f"copies, 1 % exact; exact + pHash + embedding ≥ 0.95, curate.embedding_index "
                f"{st.get('keys_index', 'auto')}): memory and time, per million rows.", ""]
        rows = [[n, g["index"], g["max_process_mib"], g["bytes_per_row"], g["seconds"], g.get("cpu_seconds", "-"),
                 g["seconds_per_million"], g.get("cpu_seconds_per_million", "-")] for n, g in r["global_pass"].items()]
        out += table(["rows", "index", "process MiB", "keys + search bytes/row", "wall s", "CPU s", "stage s per million",
                      "CPU s per million"], rows)
    return out


def real_sizes(r: dict) -> list[str]:
    out = [f"**Real sizes** (`bench/real_sizes.py`, CPU): the production preset's models built from their published "
           f"configs with random weights, {r['rows']} rows through the real stages at {r['resolution']} px (evaluate "
           f"{r['eval_steps']} steps); each stage's command, its wall time, peak memory and bytes per row written.", ""]
    rows = [[name, v["seconds"], v["max_process_mib"], v["tree_mib"], v.get("bytes_per_row", "-")]
            for name, v in r.get("stages", {}).items()]
    out += table(["stage", "wall s", "process MiB", "tree PSS MiB", "bytes/row"], rows)
    flops = r.get("flops_per_image") or {}
    if flops:
        out += table(["model, per image", "GFLOP"], [[name, f"{value / 1e9:,.0f}"] for name, value in flops.items()])
    return out


def memory(r: dict) -> list[str]:
    n = r["scale"]
    out = [f"**Peak memory** (`bench/memory.py`): each data stage as its own command, on the embedded seed folder and on "
           f"{n} copies of it, {r['rows_per_shard']} rows per shard at both scales. *Process*: the largest single "
           f"process (`/usr/bin/time`); *tree*: the stage with its worker processes, summed proportional set size "
           f"(shared pages counted once), sampled from /proc.", ""]
    rows = []
    for stage, e in r["results"].items():
        a, b = e["1x"], e[f"{n}x"]
        rows.append([stage, f"{a['rows_in']} / {b['rows_in']}", a["max_process_mib"], b["max_process_mib"], a["tree_mib"],
                     b["tree_mib"], f"{e['ratio']['max_process']:.2f} / {e['ratio']['tree']:.2f}", met(e["flat"])])
    return out + table(["stage", f"rows in 1× / {n}×", "process MiB 1×", f"process MiB {n}×", "tree PSS MiB 1×", f"tree PSS MiB {n}×",
                        f"ratio {n}×/1× process / tree", "< 1.5"], rows)


def end_to_end(r: dict) -> list[str]:
    s = r["summary"]
    out = [f"**End to end** (`bench/end_to_end.py`): `python pipeline.py run` ({r['preset']} preset) through kfp.local: "
           f"{s['total_s']:.0f} s in all, {s['before_first_task_s']:.0f} s of it before the first task (assets, tiny models, "
           f"loopback web). kfp.local's overhead per task (task wall time − the stage subprocess's): median "
           f"{s['kfp_overhead_per_task_median_s']:.2f} s, {s['kfp_overhead_per_task_min_max_s'][0]:.2f}–"
           f"{s['kfp_overhead_per_task_min_max_s'][1]:.2f} s over {s['tasks']} tasks. Shard-group tasks run two at a "
           f"time, so their times overlap.", ""]
    rows = [[stage, v["tasks"], v["task_s"], v["stage_s"], v["overhead_s"]] for stage, v in r["per_stage"].items()]
    return out + table(["stage", "kfp tasks", "task s (summed)", "stage subprocess s", "kfp.local overhead s"], rows)


def train_step(r: dict) -> list[str]:
    step, over, scale = r["step"], r["trainer_overhead"], r["scaling"]
    b = over["breakdown"]
    out = [f"**ControlNet training** (`bench/train_step.py`, CPU, {step['cores']} threads on both sides, the embedded tiny "
           f"SD base at {r['resolution']} px, fp32). *Step*: our jitted JAX step vs the training step of diffusers' "
           f"`examples/controlnet/train_controlnet.py` in PyTorch, same batch ({step['batch']}), hyper-parameters and "
           f"pre-encoded inputs, best of {r['repeats']}. *Trainer*: the whole stage (data feed, logging, orbax checkpoints "
           f"every {over['checkpoint_every']} steps) over {over['timed_steps']} timed steps vs the bare step on the same "
           f"batches, best of {r['trainer_repeats']}. *Scaling*: the bare step on virtual CPU devices, {scale['per_device_batch']} "
           f"rows each (these share the same {step['cores']} cores, so they show the data-parallel machinery's cost, not a speed-up).", ""]
    rows = [["step: ours JAX vs diffusers PyTorch", step["ours"]["best_per_s"], step["reference"]["best_per_s"],
             f"{step['ratio']['best']:.2f} / {step['ratio']['median']:.2f}", met(step["ratio"]["best"] >= 1.0)],
            [f"trainer end to end vs bare step (overhead {over['overhead_pct']['best']}% best / {over['overhead_pct']['median']}% median)",
             over["ours"]["best_per_s"], over["reference"]["best_per_s"], f"{over['ratio']['best']:.2f} / {over['ratio']['median']:.2f}",
             met(over["overhead_pct"]["median"] < 5.0)]]
    one = scale["results"][0]["best_per_s"]
    rows += [[f"bare step on {s['devices']} virtual device(s) vs 1", s["best_per_s"], one, f"{s['best_per_s'] / one:.2f}", "-"]
             for s in scale["results"]]
    out += table(["measure", "ours images/s", "reference images/s", "ratio best / median", "target met"], rows)
    return out + [f"Trainer breakdown: loop without saves {b['loop_overhead_pct']}% over the bare step, "
                  f"{b['seconds_per_checkpoint_save']} s per checkpoint save (orbax, asynchronous). Compile of our step "
                  f"{step['our_compile_s']:.1f} s (excluded on both sides). CPU ms per image ours / PyTorch: "
                  f"{step['ours']['cpu_ms_per_item']:.1f} / {step['reference']['cpu_ms_per_item']:.1f}.", ""]


def train_memory(r: dict) -> list[str]:
    out = []
    c = r.get("compile") or {}
    if c.get("results"):
        batches = sorted({x["per_device_batch"] for x in c["results"]})
        chips = " / ".join(f"{chip} {gib}" for chip, gib in r["capacity_gib"].items())
        params = "; ".join(f"{r['models'][m]}: ControlNet {p['controlnet'] / 1e6:.0f} M, UNet {p['unet'] / 1e6:.0f} M parameters"
                           for m, p in c["parameters"].items())
        out += [f"**Training memory per device** (`bench/train_memory.py`, compile only): the trainer's step compiled for "
                f"{r['devices']} virtual CPU devices, bf16 compute, AdamW + EMA, fp32 state, frozen bf16 UNet replicated; "
                f"XLA's memory analysis per device: arguments + outputs - donated aliases + temporaries ({params}). "
                f"*State*: fp32 weights, both AdamW moments and EMA on one device (exact). Totals are XLA:CPU's "
                f"(sequential memory scheduler): it schedules checkpointed recomputation early and computes some bf16 in "
                f"fp32, so checkpointing shows little here; TPUs also pad to tiles. '-': not compiled in this run.", ""]
        rows = []
        for f in c["fits"]:
            totals = " / ".join(f"{f['total_gib'][str(b)]:.1f}" if str(b) in f["total_gib"] else "-" for b in batches)
            measured = sorted(int(b) for b in f["total_gib"])
            largest = " / ".join(
                (f"≥ {n}" if n == measured[-1] else str(n)) if n else f"< {measured[0]}" for n in f["largest_batch"].values())
            rows.append([r["models"][f["model"]], f["layout"], "on" if f["gradient_checkpointing"] else "off", f["state_gib"],
                         f["unet_gib"], totals, largest])
        out += table(["model", "state", "checkpointing", "state GiB", "UNet GiB", "total GiB at batch/device " + " / ".join(map(str, batches)),
                      f"largest batch/device that fits {chips} GiB"], rows)
    s = r.get("state")
    if s:
        out += [f"**Training state on CPU** (`bench/train_memory.py --part state`): {s['base']} at {s['resolution']} px, "
                f"{s['per_device_batch']} rows per device, the stage's build_training on 1/2/4/8 of 8 virtual CPU devices: the "
                f"state's bytes on one device (measured on the arrays) and the bare step's time sharded ÷ replicated "
                f"(interleaved, best of {s['repeats']}; the devices share the machine's cores).", ""]
        rows = [[x["devices"], f"{x['replicated_state_bytes'] / 2**20:.2f}", f"{x['sharded_state_bytes'] / 2**20:.2f}",
                 f"{x['replicated_state_bytes'] / x['sharded_state_bytes']:.2f}",
                 f"{x['step_time_ratio_sharded_over_replicated']['best']:.2f} / {x['step_time_ratio_sharded_over_replicated']['median']:.2f}"]
                for x in s["results"]]
        out += table(["devices", "state MiB/device replicated", "sharded", "replicated ÷ sharded", "step time sharded ÷ replicated best / median"], rows)
    return out


def machine_lines(results: dict) -> list[str]:
    first = next(iter(results.values()))["machine"]
    lines = [f"Machine: {first['cpu']}, {first['cores']} cores, {first['ram_gib']} GiB RAM, {first['os']}, "
             f"Python {first['python']}. The load average when each benchmark ended is given (the benchmark's own "
             f"processes and threads count in it); speed is only ever a ratio between two sides measured in the same run, "
             f"interleaved.", ""]
    rows = []
    for name, r in results.items():
        libs = ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v)
        rows.append([name, r["created"], " / ".join(f"{v:.1f}" for v in r["machine"]["load_average"]), libs])
    return lines + table(["benchmark", "run at", "load avg 1/5/15 min", "libraries (its family's environment)"], rows)


def render(results: dict) -> str:
    lines = ["### Performance", "", "Produced by `bash bench/run_all.sh` (the scripts and their options: `bench/`).", ""]
    lines += machine_lines(results)
    for name in ORDER:
        if name in results:
            lines += globals()[name](results[name])
    missing = [n for n in ORDER if n not in results]
    if missing:
        lines += [f"Not run: {', '.join(missing)}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--output", help="also write the Markdown here")
    args = parser.parse_args(argv)
    found = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(args.results).glob("*.json"))}
    results = {name: found[name] for name in ORDER if name in found}
    if not results:
        print(f"no results in {args.results}: run bash bench/run_all.sh first", file=sys.stderr)
        return 1
    text = render(results)
    print(text)
    if args.output:
        pathlib.Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
