"""The whole embedded pipeline through kfp.local: wall time per stage, and what kfp.local adds per task.

    PYTHONPATH=. .venvs/core/bin/python bench/end_to_end.py [--keep] [--set section.key=value ...]

Runs `python pipeline.py run --run-id bench-<time> --set storage.root=<temporary folder>` and reads two clocks:
  task    kfp.local's own log lines, "Executing task 'x'" to "Task 'x' finished with status" (ms resolution)
  stage   the stage's subprocess in its family's interpreter, recorded by cnpipe/families.py when
          CNPIPE_STAGE_TIMINGS names a file (one JSON line per `python -m components.<stage>`)
kfp.local's overhead per task = task wall time - the stage subprocess's wall time inside it: the executor
process kfp starts, its imports, artifact bookkeeping. Asset preparation (seeds, tiny models, the loopback
web) comes before the first task and is reported on its own. Writes bench/results/end_to_end.json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import benchlib  # noqa: E402  (puts the repo on sys.path)

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) - \w+ - (Executing task '([^']+)'|Task '([^']+)' finished with status (\w+))")


def parse_events(lines: list[str], day: _dt.date, not_before: float) -> list[dict]:
    """kfp.local's "Executing task" / "finished with status" lines -> [{kind, task, clock, status}]."""
    events = []
    for raw in lines:
        match = LINE.match(ANSI.sub("", raw).strip())
        if not match:
            continue
        clock = _dt.datetime.combine(day, _dt.time.fromisoformat(match.group(1))).timestamp()
        if clock < not_before - 60:  # the run went past midnight
            clock += 86400
        if match.group(3):
            events.append({"kind": "start", "task": match.group(3), "clock": clock})
        else:
            events.append({"kind": "end", "task": match.group(4), "clock": clock, "status": match.group(5)})
    return events


def stage_of(task: str) -> str:
    """kfp task name -> stage name: 'clip-embed-2' -> 'clip_embed' (kfp numbers a component's later uses)."""
    return re.sub(r"-\d+$", "", task).replace("-", "_")


def pair_tasks(events: list[dict], records: list[dict]) -> list[dict]:
    """One task per stage subprocess: the latest start of a task of that stage before it began, and the first
    finish after it ended. A ParallelFor's tasks run at once under the same name, so log lines alone
    cannot tell which finish belongs to which start; the subprocess in between does."""
    starts = [e for e in events if e["kind"] == "start"]
    ends = [e for e in events if e["kind"] == "end"]
    tasks = []
    for record in sorted(records, key=lambda r: r["start"]):
        begun = [e for e in starts if not e.get("used") and stage_of(e["task"]) == record["stage"] and e["clock"] <= record["start"] + 0.01]
        if not begun:
            continue
        start = max(begun, key=lambda e: e["clock"])
        done = [e for e in ends if not e.get("used") and e["task"] == start["task"] and e["clock"] >= record["end"] - 0.01]
        if done:
            end = min(done, key=lambda e: e["clock"])
        else:
            # kfp.local sometimes loses a concurrent task's finish line (its log handler is swapped per task);
            # the next task to start bounds it from above
            later = [e["clock"] for e in starts if e["clock"] >= record["end"] - 0.01]
            end = {"clock": min(later) if later else record["end"], "status": "SUCCESS (finish line missing; end = next task's start)"}
        start["used"] = end["used"] = True
        stage_s = record["end"] - record["start"]
        label = record["stage"] + (f" [{record['part']}]" if record["part"] else "")
        label += f" ({record['family']})" if record["family"] else ""
        tasks.append({"task": start["task"], "stage": label, "stage_name": record["stage"], "start": start["clock"],
                      "end": end["clock"], "status": end["status"], "task_s": round(end["clock"] - start["clock"], 3),
                      "stage_s": round(stage_s, 3), "overhead_s": round(end["clock"] - start["clock"] - stage_s, 3)})
    unpaired = [e["task"] for e in events if not e.get("used") and e["kind"] == "start"]
    if unpaired:
        print(f"kfp task lines without a stage subprocess: {unpaired}", file=sys.stderr)
    return sorted(tasks, key=lambda t: t["start"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (printed) instead of removing it")
    parser.add_argument("--preset", default="embedded")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="passed to pipeline.py")
    args = parser.parse_args(argv)

    run_id = "bench-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    timings = tmp / "stage_timings.jsonl"
    log = tmp / "pipeline.log"
    command = [sys.executable, "pipeline.py", "run", "--preset", args.preset, "--run-id", run_id,
               "--set", f"storage.root={tmp / 'runs'}", *sum((["--set", s] for s in args.set), [])]
    env = {**__import__("os").environ, "PYTHONPATH": str(benchlib.REPO), "CNPIPE_STAGE_TIMINGS": str(timings)}
    print(f"end_to_end: {' '.join(command)}", file=sys.stderr)
    started = time.time()
    lines = []
    with open(log, "w") as keep:
        process = subprocess.Popen(command, env=env, cwd=benchlib.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace")
        for line in process.stdout:
            lines.append(line)
            keep.write(line)
            if LINE.match(ANSI.sub("", line).strip()):
                sys.stderr.write(line)
        code = process.wait()
    total = time.time() - started
    if code != 0:
        sys.stderr.write("".join(lines[-60:]))
        print(f"the pipeline failed (exit {code}); log: {log}", file=sys.stderr)
        return 1

    records = [json.loads(x) for x in timings.read_text().splitlines()] if timings.exists() else []
    tasks = pair_tasks(parse_events(lines, _dt.date.fromtimestamp(started), started), records)
    if not tasks:
        print(f"no kfp task lines found in {log}", file=sys.stderr)
        return 1
    per_stage: dict[str, dict] = {}
    for t in tasks:
        agg = per_stage.setdefault(t["stage_name"], {"tasks": 0, "task_s": 0.0, "stage_s": 0.0, "overhead_s": 0.0})
        agg["tasks"] += 1
        for key in ("task_s", "stage_s", "overhead_s"):
            agg[key] = round(agg[key] + t[key], 3)
    overheads = sorted(t["overhead_s"] for t in tasks)
    summary = {
        "total_s": round(total, 2),
        "before_first_task_s": round(tasks[0]["start"] - started, 2),  # interpreter, kfp import, assets, tiny models, loopback web
        "tasks_s": round(max(t["end"] for t in tasks) - tasks[0]["start"], 2),  # wall: a ParallelFor's tasks overlap
        "stage_subprocesses_s": round(sum(t["stage_s"] for t in tasks), 2),  # summed: more than the wall when they overlap
        "kfp_overhead_s": round(sum(overheads), 2),
        "kfp_overhead_per_task_median_s": overheads[len(overheads) // 2],
        "kfp_overhead_per_task_min_max_s": [overheads[0], overheads[-1]],
        "tasks": len(tasks),
    }
    print(f"\nend to end ({args.preset} preset, run {run_id}): wall time per kfp task (s); overhead = task - stage subprocess")
    benchlib.print_table(["task", "stage", "task s", "stage s", "kfp overhead s"],
                         [[t["task"], t["stage"], t["task_s"], t["stage_s"], t["overhead_s"]] for t in tasks])
    print()
    benchlib.print_table(["stage", "tasks", "task s", "stage s", "kfp overhead s"],
                         [[k, v["tasks"], v["task_s"], v["stage_s"], v["overhead_s"]] for k, v in per_stage.items()])
    print(f"\ntotal {summary['total_s']} s: {summary['before_first_task_s']} s before the first task (assets, models, "
          f"web), {summary['tasks_s']} s from the first task's start to the last one's end; summed over tasks "
          f"(shard-group tasks run two at a time): stage subprocesses {summary['stage_subprocesses_s']} s, "
          f"kfp.local overhead {summary['kfp_overhead_s']} s ({summary['tasks']} tasks, median "
          f"{summary['kfp_overhead_per_task_median_s']} s each)")
    benchlib.write_result("end_to_end", {"preset": args.preset, "overrides": args.set, "run_id": run_id, "summary": summary,
                                         "per_stage": per_stage, "tasks": tasks}, libraries=("kfp",))
    if args.keep:
        print(f"kept {tmp}", file=sys.stderr)
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
