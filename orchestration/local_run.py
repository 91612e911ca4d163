"""Run the pipeline on this machine through kfp.local, then print what every stage did.

For the embedded preset this also prepares what production gets from the outside world: seed and
pool images, tiny models saved with save_pretrained, and the loopback web + kNN service that stand
in for the internet and LAION's index. A run id names the run; running it again resumes it.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import warnings

from cnpipe import redact, storage
from cnpipe.dataset import ContractError, Manifest, load_output
from cnpipe.families import REPO_ROOT, family_python
from components.registry import STAGES

EMBEDDED_WEB_PORT = 48721  # loopback only; any free port would do, the same one each run is what matters
STAGE_ORDER = [s for s, spec in STAGES.items() if s != "report" and not spec.output_dir] + ["report"]


def _absolute(path: str) -> str:
    return path if "://" in path else str((REPO_ROOT / path).resolve()) if not os.path.isabs(path) else path


def _run_python(family: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([family_python(family), *args], check=True, env=env, cwd=REPO_ROOT)


def prepare_embedded(config, run_root: str, run_dir: pathlib.Path):
    """Assets, tiny models and the local web service; returns (config with the service URL, web process)."""
    import pipeline_configs

    assets = config.embedded_assets
    print(f"preparing embedded assets in {assets} (generated here, nothing downloaded)", file=sys.stderr)
    _run_python("core", "-m", "cnpipe.embedded.assets", assets)
    _run_python("vision", "-m", "cnpipe.embedded.tiny_models", f"{assets}/models")
    _run_python("vision", "-m", "cnpipe.embedded.tiny_sd", f"{assets}/models")
    if config.base_model.path.startswith(f"{assets}/fill/") or config.hub_load.source.startswith(f"{assets}/fill/"):
        _run_python("vision", "-m", "cnpipe.embedded.fill", assets)  # the fill domain and its pretrained base, made once
    _run_python("vision", "-m", "components.depth.tiny_model", f"{assets}/models")
    # The retrieved URLs name the service's port, and row ids (so the held-out split) come from the URLs: a
    # resumed run serves on the port it used before (remembered on the storage root beside the run's outputs),
    # a fresh one on the same default port, so that two runs give the same ids; a new port only if it is taken.
    remembered = storage.join(run_root, "_embedded", "local_web.json")
    previous = storage.read_json(remembered).get("port", 0) if storage.exists(remembered) else 0
    ready = run_dir / "local_web.json"
    web = None
    for port in dict.fromkeys([previous or EMBEDDED_WEB_PORT, 0]):
        ready.unlink(missing_ok=True)
        web = subprocess.Popen(
            [family_python("vision"), "-m", "orchestration.local_web", "--assets", assets,
             "--clip-model", config.clip_embed.model, "--indice-name", config.retrieval.indice_name,
             "--ready-file", str(ready), "--port", str(port)],
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT,
        )
        deadline = time.time() + 300
        while not ready.exists() and web.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        if ready.exists():
            break
        web.kill()
        if port:  # a taken port the service handles itself (local_web.listen); this is any other failure to start
            print(f"the embedded web did not start on port {port} (its log is above): trying any free port", file=sys.stderr)
    else:
        raise RuntimeError("the embedded web/kNN service did not start (see its log above)")
    storage.write_bytes_atomic(remembered, ready.read_bytes())
    if config.retrieval.service_url:  # a preset that names its own kNN service (embedded-own-index) keeps it
        return config, web
    knn_url = json.loads(ready.read_text())["knn_url"]
    return pipeline_configs.with_overrides(config, [f"retrieval.service_url={knn_url}"]), web


def summary_lines(root: str) -> list[str]:
    """Rows in / out / rejected per stage (and per conditioning type), read back from storage."""
    lines = [f"{'stage':<22}{'rows in':>9}{'rows out':>10}{'rejected':>10}  output"]
    for stage in STAGE_ORDER:
        uri = storage.join(root, stage)
        try:
            result = load_output(uri)
        except ContractError:
            lines.append(f"{stage:<22}{'-':>9}{'-':>10}{'-':>10}  (not finished)")
            continue
        if isinstance(result, Manifest):
            lines.append(f"{stage:<22}{result.rows_in:>9}{result.rows_out:>10}{result.rows_rejected:>10}  {uri}")
            if result.rejections:
                lines.append(f"{'':<22}rejected: " + ", ".join(f"{k} {v}" for k, v in result.rejections.items()))
        elif "types" in result.summary:
            for name, info in result.summary["types"].items():
                lines.append(f"{stage + '/' + name:<22}{info['rows_in']:>9}{info['rows_out']:>10}{info['rows_rejected']:>10}  {info['uri']}")
                if info["rejections"]:
                    lines.append(f"{'':<22}rejected: " + ", ".join(f"{k} {v}" for k, v in info["rejections"].items()))
        else:
            shown = {k: v for k, v in result.summary.items()
                     if isinstance(v, (int, float, str)) and k not in ("uri", "config_hash")}
            lines.append(f"{stage:<22}{'':>29}  {uri}")
            if "metrics" in result.summary:
                shown.update({k: round(v, 4) for k, v in result.summary["metrics"].items() if isinstance(v, float)})
            if shown:
                lines.append(f"{'':<22}" + ", ".join(f"{k}={v}" for k, v in list(shown.items())[:8]))
    return lines


ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


class _KeepStageLines(logging.Filter):
    """kfp.local logs every task's whole executor input and output artifacts; keep its task start/finish lines,
    without their colour codes when they go to a log file rather than a terminal."""

    KEEP = ("Executing task", "finished with status", "Running pipeline", "Pipeline ")

    def __init__(self, colour: bool):
        super().__init__()
        self.colour = colour

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.colour and isinstance(record.msg, str):
            record.msg = ANSI_CODES.sub("", record.msg)
        return record.levelno > logging.INFO or any(k in str(record.msg) for k in self.KEEP)


class _DropExecutorDump(io.TextIOBase):
    """Drops the executor's own INFO lines (its input JSON, module paths) from the streamed task logs."""

    def __init__(self, target):
        self.target, self.skipping, self.pending, self.brace = target, False, "", None

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if "Got executor_input:" in line:
                self.skipping, self.brace = True, None
            elif self.skipping:
                # the JSON block ends at the "}" indented like its opening "{" (tasks in a ParallelFor
                # are indented once more, so the indentation is read, not assumed)
                indent = line[: len(line) - len(line.lstrip())]
                if self.brace is None and line.strip() == "{":
                    self.brace = indent
                elif line.strip() == "}" and indent == self.brace:
                    self.skipping = False
            elif "[KFP Executor" not in line and line.strip():
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()


@contextlib.contextmanager
def quiet_kfp_logs():
    import builtins

    root, stdout, original_print = logging.getLogger(), sys.stdout, builtins.print
    keep = _KeepStageLines(colour=stdout.isatty())
    root.addFilter(keep)
    sys.stdout = _DropExecutorDump(stdout)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
            warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
            yield
    finally:
        # kfp.local indents task output by swapping builtins.print per task; tasks of a ParallelFor run in
        # threads, so the swaps interleave and one can outlive the run.
        builtins.print = original_print
        sys.stdout = stdout
        root.removeFilter(keep)


def running_stages(processes) -> list[str]:
    """The stages among `processes` (psutil), by their command line (`python -m components.<stage>`)."""
    names = set()
    for process in processes:
        with contextlib.suppress(Exception):
            argv = process.cmdline()
            if "-m" in argv and argv.index("-m") + 1 < len(argv) and argv[argv.index("-m") + 1].startswith("components."):
                names.add(argv[argv.index("-m") + 1].split(".", 1)[1])
    return sorted(names)


def resume_command(run_id: str, argv: list[str] | None = None) -> str:
    """The command that resumes this run: the one that started it (its preset, --set overrides such as the storage
    root) with the run id pinned, since a resume under other settings or another root would start afresh."""
    import shlex

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):  # `python pipeline.py` alone runs `run`
        argv = ["run", *argv]
    if "--run-id" in argv[:-1]:
        argv[argv.index("--run-id") + 1] = run_id
    else:
        argv = [a for a in argv if not a.startswith("--run-id=")] + ["--run-id", run_id]
    return shlex.join(["python", "pipeline.py", *argv])


@contextlib.contextmanager
def stop_everything_on_signal(run_id: str):
    """Ctrl-C (or SIGTERM) stops the run within seconds: every process it started (kfp's tasks, the stages and their
    workers, the embedded web) is terminated, then killed if still there, and one line says what was interrupted and
    how to resume. Without this, kfp.local retried an interrupted task and an orphaned worker held the run open."""
    import psutil

    from cnpipe.families import DRIVER_STOPS_ENV, STOP_GRACE_S

    def stop(signum, _frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        children = psutil.Process().children(recursive=True)
        stages = running_stages(children)
        for process in children:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(children, timeout=STOP_GRACE_S + 1)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        print(f"\nrun {run_id} interrupted ({signal.Signals(signum).name}) while running {', '.join(stages) or 'no stage'}; "
              f"every process it started is stopped and committed work is kept. Resume with: "
              f"{resume_command(run_id)}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(128 + signum)

    saved = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    os.environ[DRIVER_STOPS_ENV] = "1"  # the tasks leave Ctrl-C to this handler, which sees every stage still running
    try:
        yield
    finally:
        os.environ.pop(DRIVER_STOPS_ENV, None)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run(config, build_pipeline, run_id: str | None = None) -> int:
    from kfp import local

    run_id = run_id or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = _absolute(config.storage.root)
    import pipeline_configs

    config = pipeline_configs.with_overrides(config, [f"storage.root={root}"])
    # user:password in the service URL would be written into every task's config_json (its command line, kfp's
    # logs); the tasks, this process's children, get them by environment instead (cnpipe.redact)
    config, credentials = redact.config_without_credentials(config)
    if credentials:
        os.environ[redact.CREDENTIALS_ENV] = credentials
    run_root = storage.join(root, run_id)
    # kfp.local's own artifacts stay on this machine; beside the outputs when those are local too
    remote_key = hashlib.sha1(run_root.encode()).hexdigest()[:12]
    local_dir = pathlib.Path(run_root if "://" not in run_root else REPO_ROOT / ".cache" / "kfp" / remote_key)
    local_dir.mkdir(parents=True, exist_ok=True)
    web = None
    started = time.time()
    with stop_everything_on_signal(run_id):
        if config.embedded_assets:
            config, web = prepare_embedded(config, run_root, local_dir)
        print(f"run {run_id}: outputs under {run_root}", file=sys.stderr)
        started = time.time()
        try:
            local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(local_dir / "_kfp"))
            with quiet_kfp_logs():
                build_pipeline(config)(config_json=config.to_json(), run_id=run_id)
            status = 0
        except Exception as err:  # kfp.local raises after printing the failing task's log
            print(f"\nrun {run_id} failed: {err}\nresume (after the fix) with: {resume_command(run_id)}", file=sys.stderr)
            status = 1
        finally:
            if web is not None:
                web.terminate()
                web.wait(timeout=30)
    print(f"\nrun {run_id} {'finished' if status == 0 else 'stopped'} in {time.time() - started:.0f} s\n")
    print("\n".join(summary_lines(run_root)))
    report = storage.join(run_root, "report", "report.md")
    if storage.exists(report):
        print(f"\nreport: {report}\ncontact sheet: {storage.join(run_root, 'report', 'contact_sheet.png')}")
    return status

