"""user:password in retrieval.service_url reaches the kNN service (HTTP basic auth) and nothing else: not the
manifest, not the compiled YAML or the config a local run hands its tasks, not the stage's log or errors."""
from __future__ import annotations

import base64
import json
import os
import pathlib
import sys

import pytest

from cnpipe import families
from components import registry
from cnpipe.redact import CREDENTIALS_ENV, redact_url, scrub, split_credentials
from tests.core.knn_server import KnnServer, config, empty_seeds, row, run_stage

USER, PASSWORD = "knn-reader-7", "s3cr3t-pw"
TOKEN = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
SECRETS = (PASSWORD, TOKEN)


def with_credentials(url: str, userinfo: str = f"{USER}:{PASSWORD}") -> str:
    return url.replace("http://", f"http://{userinfo}@")


@pytest.fixture
def server():
    """Answers three rows to the right credentials; otherwise 401, echoing what it was sent (as some servers do)."""
    running = KnnServer()

    def answer(handler):
        sent = handler.headers.get("Authorization", "")
        if sent == f"Basic {TOKEN}":
            running.send_json(handler, [row(i) for i in range(3)])
        else:
            decoded = base64.b64decode(sent.removeprefix("Basic ")).decode(errors="replace") if sent else ""
            running.send_json(handler, {"detail": f"bad credentials {decoded!r} ({sent})"}, status=401)

    running.answer = answer
    yield running
    running.close()


@pytest.fixture
def no_credentials_env(monkeypatch):
    """The variable absent during the test and after it, whatever the code under test sets."""
    monkeypatch.setenv(CREDENTIALS_ENV, "placeholder")
    monkeypatch.delenv(CREDENTIALS_ENV)


def files_under(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_split_and_redact():
    assert split_credentials("https://u%40x:p%3Aw@knn.example.com:8443/knn-service?a=1") == (
        "https://knn.example.com:8443/knn-service?a=1", "u@x:p:w")
    assert split_credentials("https://token@knn.example.com/knn") == ("https://knn.example.com/knn", "token")
    assert split_credentials("https://knn.example.com/a@b") == ("https://knn.example.com/a@b", "")
    assert redact_url("failed: https://u:p@ss@h.example/x and http://h2/ok") == "failed: https://***@h.example/x and http://h2/ok"
    assert scrub(f"echoed {PASSWORD} and {TOKEN}", [PASSWORD, TOKEN]) == "echoed *** and ***"


def test_credentials_in_the_url_reach_the_service_but_not_the_manifest(tmp_path, server, no_credentials_env):
    manifest = run_stage(tmp_path, config(with_credentials(server.url)))

    assert manifest.rows_out == 3
    assert server.requests[0]["headers"]["Authorization"] == f"Basic {TOKEN}"
    assert manifest.inputs[-1] == server.url
    written = files_under(tmp_path / "retrieved")
    assert any(name.endswith("manifest.json") for name in written)
    for name, content in written.items():
        for secret in SECRETS:
            assert secret.encode() not in content, name


def test_credentials_from_the_environment_reach_the_service(tmp_path, server, monkeypatch):
    monkeypatch.setenv(CREDENTIALS_ENV, f"{USER}:{PASSWORD}")
    manifest = run_stage(tmp_path, config(server.url))
    assert manifest.rows_out == 3 and server.requests[0]["headers"]["Authorization"] == f"Basic {TOKEN}"


def test_a_resume_is_not_refused_after_a_password_change(tmp_path, server, no_credentials_env):
    """The stage's config hash leaves the credentials out: the same service, a new password, the same run."""
    first = run_stage(tmp_path, config(with_credentials(server.url)))
    again = run_stage(tmp_path, config(with_credentials(server.url, f"{USER}:new-password")))
    assert again.config_hash == first.config_hash and len(server.requests) == 1  # the finished shard was kept


@pytest.mark.parametrize("failure", ["refused", "unavailable"])
def test_the_stage_log_and_its_error_hide_the_credentials(tmp_path, server, monkeypatch, capfd, no_credentials_env,
                                                         failure):
    """Through the stage's command line as the pipeline runs it: 401 (the server echoes what it got) or 500s until
    the retries are spent; the error names the service, without its credentials."""
    if failure == "unavailable":
        server.answer = lambda handler: server.send_json(handler, {"detail": f"down; you sent {handler.headers['Authorization']}"}, 500)
        userinfo = f"{USER}:{PASSWORD}"
    else:
        userinfo = f"{USER}:wrong-{PASSWORD}"
    monkeypatch.setenv("CNPIPE_PYTHON_CORE", sys.executable)
    cfg = config(with_credentials(server.url, userinfo))
    with pytest.raises(families.StageFailed) as failed:
        registry.run_stage("laion_retrieval", cfg.to_json(), {"seeds": empty_seeds(tmp_path).uri}, str(tmp_path / "out"))
    log = capfd.readouterr().err
    message = str(failed.value)
    expected = "refused the query (HTTP 401)" if failure == "refused" else "failed after 2 tries: HTTP 500"
    assert expected in message and expected in log
    assert server.url in message  # the service is named
    for secret in (*SECRETS, f"wrong-{PASSWORD}", base64.b64encode(userinfo.encode()).decode()):
        assert secret not in message and secret not in log


def test_compiled_pipeline_holds_no_credentials(tmp_path, capsys):
    import pipeline

    out = tmp_path / "pipeline.yaml"
    url = f"https://{USER}:{PASSWORD}@knn.example.com/knn-service"
    assert pipeline.main(["compile", "-o", str(out), "--set", "shard_groups=1", "--set", f"retrieval.service_url={url}"]) == 0
    text = out.read_text()
    assert PASSWORD not in text and USER not in text
    assert "https://knn.example.com/knn-service" in text  # the default of the config_json parameter
    note = capsys.readouterr().err
    assert CREDENTIALS_ENV in note and "kubeflow.secrets" in note and PASSWORD not in note


def test_a_local_run_hands_the_credentials_to_its_tasks_by_environment(tmp_path, monkeypatch, no_credentials_env):
    """`pipeline.py run`: the config every task gets holds the URL without credentials; the environment the tasks
    inherit holds them. (The pipeline itself is replaced by a recorder; kfp.local runs tasks as subprocesses.)"""
    import pipeline

    seen = {}

    def recording_build(config):
        def pipeline_func(config_json: str, run_id: str):
            seen.update(config_json=config_json, env=os.environ.get(CREDENTIALS_ENV))

        return pipeline_func

    monkeypatch.setattr(pipeline, "build", recording_build)
    url = f"https://{USER}:{PASSWORD}@knn.example.com/knn-service"
    status = pipeline.main(["run", "--preset", "production", "--run-id", "r1", "--set", f"storage.root={tmp_path}",
                            "--set", f"retrieval.service_url={url}"])
    assert status == 0
    assert json.loads(seen["config_json"])["retrieval"]["service_url"] == "https://knn.example.com/knn-service"
    assert PASSWORD not in seen["config_json"] and seen["env"] == f"{USER}:{PASSWORD}"
