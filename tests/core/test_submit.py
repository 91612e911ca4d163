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
    def __init__(self, deny: bool = False):
        self.requests: list[dict] = []
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
