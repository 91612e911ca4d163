"""The README's run command end to end: all stages through kfp.local on the embedded default."""
import json
import pathlib
import subprocess
import sys

import pytest

from cnpipe.dataset import Manifest, load_output

REPO = pathlib.Path(__file__).resolve().parents[2]


LIGHT = ["--set", "train.max_steps=6", "--set", "train.checkpoint_every=3", "--set", "evaluate.num_inference_steps=2",
         "--set", "evaluate.num_samples=2"]


# Both runs train the same tiny model: the second reuses the first's compiled step.
JAX_CACHE = {"JAX_COMPILATION_CACHE_DIR": str(__import__("tempfile").gettempdir() + "/cnpipe-e2e-jax-cache")}


def run_pipeline(root: str, run_id: str, env: dict | None = None, *extra: str) -> str:
    env = {**(env or __import__("os").environ), **JAX_CACHE}
    argv = [sys.executable, "pipeline.py", "run", "--run-id", run_id, "--set", f"storage.root={root}", *LIGHT, *extra]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    return done.stdout


# finished_run: tests/e2e/conftest.py (one kfp.local run per session, shared with test_yaml_run)


def rows_per_stage(run_root: str) -> dict:
    counts = {}
    for stage in ("hub_load", "clip_embed", "laion_retrieval", "download", "blip_caption", "curate", "encode"):
        m = Manifest.load(f"{run_root}/{stage}")
        counts[stage] = (m.rows_in, m.rows_out, m.rows_rejected, m.rejections)
    for name, info in load_output(f"{run_root}/conditioning").summary["types"].items():
        counts[f"conditioning/{name}"] = (info["rows_in"], info["rows_out"], info["rows_rejected"], info["rejections"])
    return counts


def test_every_row_is_accounted_for_at_every_stage(finished_run):
    run_root, _ = finished_run
    manifests = [Manifest.load(str(run_root / s)) for s in ("hub_load", "clip_embed", "laion_retrieval", "download", "blip_caption",
                                                          "curate", "curate/keys", "encode")]
    conditioning = load_output(str(run_root / "conditioning")).summary["types"]
    manifests += [Manifest.load(info["uri"]) for info in conditioning.values()]
    for m in manifests:
        assert m.rows_in == m.rows_out + m.rows_rejected, m.stage
        assert sum(m.rejections.values()) == m.rows_rejected
        assert len(m.rejected_table()) == m.rows_rejected
        ids = [i for _, t in m.iter_shards(columns=["id"]) for i in t.column("id").to_pylist()]
        assert len(ids) == len(set(ids)) == m.rows_out, m.stage
    by_stage = {m.stage: m for m in manifests}
    # Each stage consumes what the one before produced.
    assert by_stage["clip_embed"].rows_in == by_stage["hub_load"].rows_out
    assert by_stage["download"].rows_in == by_stage["laion_retrieval"].rows_out + by_stage["clip_embed"].rows_out
    assert by_stage["blip_caption"].rows_in == by_stage["download"].rows_out
    assert by_stage["curate"].rows_in == by_stage["curate/keys"].rows_out == by_stage["blip_caption"].rows_out
    assert by_stage["conditioning/pose"].rows_in == by_stage["curate"].rows_out
    # The embedded data is built to exercise every rejection path.
    assert {"corrupt_image", "truncated_image", "not_an_image", "too_small"} <= set(by_stage["hub_load"].rejections)
    assert {"http_404", "not_an_image", "too_small"} <= set(by_stage["download"].rejections)
    assert by_stage["laion_retrieval"].rejections.get("duplicate_url", 0) > 0
    pose_rejections = by_stage["conditioning/pose"].rejections  # no person, or a skeleton no person could have
    assert 0 < by_stage["conditioning/pose"].rows_rejected == pose_rejections["no_pose"] + pose_rejections.get("implausible_pose", 0)
    assert by_stage["conditioning/pose"].rows_out > 0


def test_curate_removes_the_duplicates_the_embedded_web_holds(finished_run):
    """The pool serves the chelsea seed's picture at two more URLs and sizes, and one file at two URLs; two seeds are
    converted copies of two others (CMYK, 16-bit gray). curate keeps the seeds and one of the two identical files."""
    run_root, _ = finished_run
    curated = Manifest.load(str(run_root / "curate"))
    where = {r["id"]: (r["url"] or r["origin"]).rsplit("/", 1)[-1]
             for _, t in Manifest.load(str(run_root / "blip_caption")).iter_shards(columns=["id", "url", "origin"]) for r in t.to_pylist()}
    dropped = {where[r["id"]]: (r["reason"], where[r["detail"].split()[1].rstrip(":")]) for r in curated.rejected_table().to_pylist()}
    assert dropped["chelsea_web.jpg"] == dropped["chelsea_web_small.jpg"] == ("near_duplicate", "folder:chelsea.jpg")
    assert dropped["folder:odd_cmyk.jpg"] == ("near_duplicate", "folder:chelsea.jpg")
    assert dropped["folder:odd_16bit.png"] == ("near_duplicate", "folder:coffee.jpg")
    pair = {"rocket_mirror.jpg", "rocket_mirror_copy.jpg"}
    assert [(name, why) for name, why in dropped.items() if name in pair] in (
        [("rocket_mirror.jpg", ("duplicate", "rocket_mirror_copy.jpg"))], [("rocket_mirror_copy.jpg", ("duplicate", "rocket_mirror.jpg"))])
    kept = {where[i] for _, t in curated.iter_shards(columns=["id"]) for i in t.column("id").to_pylist()}
    assert {"folder:chelsea.jpg", "folder:coffee.jpg"} <= kept and len(pair & kept) == 1
    assert set(curated.rejections) <= {"duplicate", "near_duplicate", "low_resolution", "bad_aspect_ratio"}
    keys = Manifest.load(str(run_root / "curate" / "keys"))  # the seeds' embeddings come from clip_embed, not again
    assert keys.notes["clip_embedding_reused"] == Manifest.load(str(run_root / "clip_embed")).rows_out


def test_model_half_trains_exports_and_evaluates(finished_run):
    run_root, _ = finished_run
    train = json.loads((run_root / "controlnet_train" / "summary.json").read_text())
    assert train["steps"] == 6
    assert (run_root / "controlnet_train" / "controlnet" / "config.json").exists()
    metrics = json.loads((run_root / "evaluate" / "metrics.json").read_text())
    assert metrics["samples"] > 0 and "clip_score" in metrics["metrics"]
    assert (run_root / "evaluate" / "grid.png").stat().st_size > 0


def test_report_and_printed_summary(finished_run):
    run_root, stdout = finished_run
    report = (run_root / "report" / "report.md").read_text()
    assert "| conditioning/pose |" in report and "no_pose" in report
    assert "## Curation" in report and "| near_duplicate |" in report and "duplicate_pairs.png" in report
    assert (run_root / "report" / "duplicate_pairs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_root / "report" / "contact_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("hub_load", "download", "curate", "conditioning/canny", "encode", "controlnet_train", "evaluate", "report"):
        assert stage in stdout


def test_same_rows_per_stage_with_storage_on_a_gcs_emulator(finished_run, monkeypatch):
    """Every stage reads and writes gs:// (gcsfs; orbax through tensorstore) against gcp-storage-emulator
    on a loopback port."""
    import os
    import socket

    import logging

    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # it logs every 404 of an existence check

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="cnpipe-test")
    server.start()
    try:
        emulator = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        # one shard group here (the local run uses the default two): rows must not depend on the fan-out either
        stdout = run_pipeline("gs://cnpipe-test/runs", "gcs", {**os.environ, **emulator}, "--set", "shard_groups=1",
                              "--set", "train.checkpoint_every=6")
        for key, value in emulator.items():
            monkeypatch.setenv(key, value)
        on_gcs = rows_per_stage("gs://cnpipe-test/runs/gcs")
        from cnpipe import storage

        assert storage.exists("gs://cnpipe-test/runs/gcs/controlnet_train/controlnet/config.json")
        assert storage.exists("gs://cnpipe-test/runs/gcs/report/contact_sheet.png")
        assert storage.exists("gs://cnpipe-test/runs/gcs/evaluate/metrics.json")
    finally:
        server.stop()
    local_root, _ = finished_run
    assert on_gcs == rows_per_stage(str(local_root))
    assert "gs://cnpipe-test/runs/gcs/report/report.md" in stdout


def _processes_tagged(tag: str) -> list:
    """Every live process that inherited the environment variable CNPIPE_TEST_TAG=tag (the run's whole tree: the
    driver, kfp's tasks, the stages in their own sessions, their spawned workers, the embedded web)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("CNPIPE_TEST_TAG") == tag and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            pass
    return found


def _command_line(process) -> str:
    """The process's command line, or "" when it ended (or became a zombie) since it was listed."""
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _interrupt_while(stage: str, argv: list[str], env: dict) -> str:
    """Start the run as a terminal would (its own process group), press Ctrl-C once `stage` runs; its stderr."""
    import os
    import signal
    import time

    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if any(f"components.{stage}" in _command_line(p) for p in _processes_tagged(env["CNPIPE_TEST_TAG"])):
            break
        time.sleep(0.2)
    assert process.poll() is None, f"the run ended before {stage} started: {process.stderr.read()[-3000:]}"
    # at once: a stage the cache makes short (training with a warm compilation cache) may otherwise be over already
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: SIGINT to the terminal's foreground group
    stopped = time.time()
    _, stderr = process.communicate(timeout=60)
    assert time.time() - stopped < 20, "the run took more than 20 s to stop"
    assert process.returncode == 130, stderr[-3000:]
    assert _processes_tagged(env["CNPIPE_TEST_TAG"]) == [], "processes of the interrupted run survived it"
    return stderr


def test_ctrl_c_stops_the_whole_run_at_once_and_the_resume_gives_the_uninterrupted_rows(finished_run, tmp_path):
    import os
    import uuid

    tag = uuid.uuid4().hex
    env = {**os.environ, **JAX_CACHE, "CNPIPE_TEST_TAG": tag}
    root = tmp_path / "runs"
    argv = [sys.executable, "pipeline.py", "run", "--run-id", "interrupted", "--set", f"storage.root={root}", *LIGHT]
    for stage in ("download", "controlnet_train"):
        stderr = _interrupt_while(stage, argv, env)
        said = [line for line in stderr.splitlines() if "interrupted (SIGINT)" in line]
        assert len(said) == 1 and stage in said[0] and "--run-id interrupted" in said[0], stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
    run_pipeline(str(root), "interrupted")
    local_root, _ = finished_run
    assert rows_per_stage(str(root / "interrupted")) == rows_per_stage(str(local_root))
