"""`pipeline.py submit` against a loopback stand-in of the KFP v2beta1 REST API (no cluster is reachable
here): what the client sends, where credentials go, and the one-line errors."""
import json
import pathlib
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TOKEN = "s3cr3t-token-value"


class FakeKfp:
    """`runs`: what successive reads of the created run return (the last one repeats), each a v2beta1 Run as JSON, or
    {"status": code} for an HTTP error."""

    def __init__(self, deny: bool = False, runs: list[dict] | None = None):
        self.requests: list[dict] = []
        self.runs = list(runs or [])
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _record(self, body=None):
                fake.requests.append({"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})

            def do_GET(self):
                self._record()
                if deny:
                    return self._reply(401, {"error": "unauthenticated"})
                if self.path.startswith("/apis/v2beta1/healthz"):
                    return self._reply(200, {"multi_user": False})
                if self.path.startswith("/apis/v2beta1/experiments"):
                    return self._reply(200, {"experiments": [], "total_size": 0})
                if self.path.startswith("/apis/v2beta1/runs/run-42") and fake.runs:
                    run = fake.runs.pop(0) if len(fake.runs) > 1 else fake.runs[0]
                    if "status" in run:
                        return self._reply(run["status"], {"error": "scripted"})
                    return self._reply(200, {"run_id": "run-42", "display_name": "nightly", **run})
                return self._reply(404, {"error": self.path})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                self._record(body)
                if deny:
                    return self._reply(401, {"error": "unauthenticated"})
                if self.path.startswith("/apis/v2beta1/experiments"):
                    return self._reply(200, {"experiment_id": "exp-1", "display_name": body.get("display_name")})
                if self.path.startswith("/apis/v2beta1/runs"):
                    return self._reply(200, {"run_id": "run-42", "display_name": body.get("display_name"), "state": "PENDING"})
                return self._reply(404, {"error": self.path})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def submit(*args, env_extra=None):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("KF_PIPELINES")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "pipeline.py", "submit", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=120)


def test_submit_sends_the_compiled_pipeline_with_config_as_a_parameter_and_token_only_in_headers():
    fake = FakeKfp()
    done = submit("--host", fake.url, "--experiment", "exp-a", "--run-name", "nightly", "--run-id", "r1",
                  "--caching", "off", env_extra={"KF_PIPELINES_TOKEN": TOKEN})
    assert done.returncode == 0, done.stderr
    assert "run-42" in done.stdout
    runs = [r for r in fake.requests if r["method"] == "POST" and r["path"].startswith("/apis/v2beta1/runs")]
    experiments = [r for r in fake.requests if r["method"] == "POST" and "experiments" in r["path"]]
    assert len(runs) == 1 and experiments[0]["body"]["display_name"] == "exp-a"
    run = runs[0]["body"]
    assert run["display_name"] == "nightly" and run["experiment_id"] == "exp-1"
    params = run["runtime_config"]["parameters"]
    assert params["run_id"] == "r1" and json.loads(params["config_json"])["name"] == "production"
    # with Kubernetes settings the client sends {"pipeline_spec": ..., "platform_spec": ...}
    spec, platform = run["pipeline_spec"]["pipeline_spec"], run["pipeline_spec"]["platform_spec"]
    assert "secretAsEnv" in json.dumps(platform) and "google.com/tpu" in json.dumps(spec)
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"].split("/")[-1].split(":")[0] for e in executors.values()} >= {"controlnet-core", "controlnet-vision"}
    for request in fake.requests:
        assert request["headers"].get("authorization") == f"Bearer {TOKEN}"
        assert TOKEN not in json.dumps(request["body"])
    # caching off reaches every task
    assert not any(t.get("cachingOptions", {}).get("enableCache") for t in spec["root"]["dag"]["tasks"].values())


def test_host_from_environment_and_caching_on_by_default():
    fake = FakeKfp()
    done = submit(env_extra={"KF_PIPELINES_ENDPOINT": fake.url})
    assert done.returncode == 0, done.stderr
    (run,) = [r["body"] for r in fake.requests if r["path"].startswith("/apis/v2beta1/runs")]
    tasks = run["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]
    stage_tasks = [t for name, t in tasks.items() if not name.startswith("for-loop")]  # loops are DAGs, not cached tasks
    assert stage_tasks and all(t["cachingOptions"]["enableCache"] for t in stage_tasks)


def test_failed_auth_is_one_clear_line():
    fake = FakeKfp(deny=True)
    done = submit("--host", fake.url)
    assert done.returncode == 1
    lines = [l for l in done.stderr.strip().splitlines() if l.startswith("submit:")]
    assert len(lines) == 1 and "authentication failed" in lines[0] and "HTTP 401" in lines[0]
    assert "Traceback" not in done.stderr


def test_unreachable_host_is_one_clear_line():
    done = submit("--host", "http://127.0.0.1:9")
    assert done.returncode == 1
    assert "cannot reach Kubeflow Pipelines at http://127.0.0.1:9" in done.stderr
    assert "Traceback" not in done.stderr


def test_no_host_at_all():
    done = submit()
    assert done.returncode == 1 and "no Kubeflow host" in done.stderr


# ---------------------------------------------------------------- the run's URL, and --wait following it

def task(task_id, name, state, parent="root", error=None, at=0):
    row = {"task_id": task_id, "display_name": name, "state": state, "parent_task_id": parent,
           "create_time": f"2026-01-01T00:00:{at:02d}Z"}
    if error:
        row["error"] = {"code": 2, "message": error}
    return row


ROOT = {"task_id": "root", "display_name": "controlnet-production", "state": "RUNNING", "create_time": "2026-01-01T00:00:00Z"}


def snapshot(state, *tasks, error=None, finished=False):
    run = {"state": state, "created_at": "2026-01-01T00:00:00Z", "run_details": {"task_details": [ROOT, *tasks]}}
    if finished:
        run["finished_at"] = "2026-01-01T01:02:03Z"
    if error:
        run["error"] = {"code": 2, "message": error}
    return run


def loop_tasks(state):
    return [task("loop", "for-loop-2", state, at=2), task("it0", "iteration-0", state, parent="loop", at=2),
            task("it1", "iteration-1", state, parent="loop", at=2),
            task("c0", "clip embed", state, parent="it0", at=3), task("c1", "clip embed", state, parent="it1", at=3)]


def wait(fake, *extra, env_extra=None):
    return submit("--host", fake.url, "--run-id", "r1", "--wait", "--poll-interval", "0.01", *extra, env_extra=env_extra)


def followed(stdout: str) -> list[str]:
    """The lines --wait printed, without their time of day."""
    return [line.split("  ", 1)[1] for line in stdout.splitlines() if line[:2].isdigit() and "  " in line]


def test_submit_prints_the_runs_page_in_the_kubeflow_ui():
    fake = FakeKfp()
    done = submit("--host", fake.url)
    assert done.returncode == 0, done.stderr
    assert f"run: {fake.url}/#/runs/details/run-42" in done.stdout.splitlines()
    assert not any(r["path"].startswith("/apis/v2beta1/runs/run-42") for r in fake.requests)  # no --wait: no polling
    done = submit("--host", fake.url, env_extra={"KF_PIPELINES_UI_ENDPOINT": "https://kubeflow.example.com/pipeline"})
    assert "run: https://kubeflow.example.com/pipeline/#/runs/details/run-42" in done.stdout.splitlines()


def test_wait_prints_each_task_state_as_it_changes_then_the_final_state():
    fake = FakeKfp(runs=[
        snapshot("PENDING"),
        snapshot("RUNNING", task("hub", "hub load", "RUNNING", at=1)),
        snapshot("RUNNING", task("hub", "hub load", "RUNNING", at=1)),  # nothing changed: nothing printed
        snapshot("RUNNING", task("hub", "hub load", "SUCCEEDED", at=1), *loop_tasks("RUNNING")),
        snapshot("SUCCEEDED", task("hub", "hub load", "SUCCEEDED", at=1), *loop_tasks("SUCCEEDED"), finished=True),
    ])
    done = wait(fake)
    assert done.returncode == 0, done.stderr
    lines = followed(done.stdout)
    url = f"{fake.url}/#/runs/details/run-42"
    assert lines == [
        "controlnet-production: RUNNING",
        "run run-42: PENDING",
        "hub load: RUNNING",
        "run run-42: RUNNING",
        "hub load: SUCCEEDED",
        "for-loop-2: RUNNING",
        "for-loop-2 / iteration-0: RUNNING",
        "for-loop-2 / iteration-1: RUNNING",
        "for-loop-2 / iteration-0 / clip embed: RUNNING",
        "for-loop-2 / iteration-1 / clip embed: RUNNING",
        "for-loop-2: SUCCEEDED",
        "for-loop-2 / iteration-0: SUCCEEDED",
        "for-loop-2 / iteration-1: SUCCEEDED",
        "for-loop-2 / iteration-0 / clip embed: SUCCEEDED",
        "for-loop-2 / iteration-1 / clip embed: SUCCEEDED",
        f"run run-42 SUCCEEDED after 1 h 2 min 3 s · {url}",
    ]
    assert f"run: {url}" in done.stdout


def test_wait_exits_non_zero_when_the_run_fails_and_says_which_task_and_why():
    fake = FakeKfp(runs=[
        snapshot("RUNNING", task("dl", "download", "RUNNING", at=1)),
        {"status": 503},  # a read that fails on the way is retried, not the end of following
        snapshot("RUNNING", task("dl", "download", "FAILED", at=1, error="stage download exited with status 1\nmore")),
        snapshot("FAILED", task("dl", "download", "FAILED", at=1, error="stage download exited with status 1"),
                 error="task download failed", finished=True),
    ])
    done = wait(fake)
    assert done.returncode == 1
    lines = followed(done.stdout)
    assert "download: FAILED (stage download exited with status 1)" in lines
    assert any(line.startswith("could not read the run (Kubeflow Pipelines at") and "503" in line for line in lines)
    assert lines[-1].startswith("run run-42 FAILED after 1 h 2 min 3 s: task download failed · http://127.0.0.1:")
    assert "Traceback" not in done.stderr


def test_wait_exits_non_zero_when_the_run_is_cancelled():
    fake = FakeKfp(runs=[snapshot("RUNNING", task("tr", "controlnet train", "RUNNING")),
                         snapshot("CANCELING", task("tr", "controlnet train", "CANCELING")),
                         snapshot("CANCELED", task("tr", "controlnet train", "CANCELED"), finished=True)])
    done = wait(fake)
    assert done.returncode == 1
    lines = followed(done.stdout)
    assert "controlnet train: CANCELING" in lines and "controlnet train: CANCELED" in lines
    assert "run run-42: CANCELING" in lines and lines[-1].startswith("run run-42 CANCELED")


def test_wait_stops_at_once_with_one_line_when_the_token_is_refused_mid_run():
    fake = FakeKfp(runs=[snapshot("RUNNING"), {"status": 401}])
    done = wait(fake, env_extra={"KF_PIPELINES_TOKEN": TOKEN})
    assert done.returncode == 1
    (line,) = [l for l in done.stderr.splitlines() if l.startswith("submit:")]
    assert "authentication failed" in line and "HTTP 401" in line and "/#/runs/details/run-42" in line
    assert "Traceback" not in done.stderr
