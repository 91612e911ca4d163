"""Submit the compiled pipeline to a Kubeflow Pipelines host with kfp.Client.

Credentials come only from the environment and go only into request headers, never into the
compiled YAML or the run's parameters:
  KF_PIPELINES_TOKEN                 a bearer token (e.g. `gcloud auth print-identity-token`, a SA token)
  KF_PIPELINES_COOKIE                a session cookie string (e.g. Dex/oauth2-proxy `authservice_session=...`)
  KF_PIPELINES_IAP_OAUTH2_CLIENT_ID  IAP-protected hosts (kfp.Client reads it itself, with google-auth)

The run's page in the Kubeflow UI is <ui>/#/runs/details/<run id>, <ui> being $KF_PIPELINES_UI_ENDPOINT or the host (as
kfp.Client links it). `follow` polls the run and prints each task's state as it changes, then the run's final state.
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
import warnings

ENDPOINT_ENV = "KF_PIPELINES_ENDPOINT"
UI_ENDPOINT_ENV = "KF_PIPELINES_UI_ENDPOINT"
SUCCEEDED = "SUCCEEDED"
FINAL_STATES = {"SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"}
POLL_RETRIES = 10  # consecutive failed reads of the run (network, 5xx) before giving up following it


class SubmitError(RuntimeError):
    """One line a person can act on: which host, what went wrong."""


def resolve_host(flag: str | None, config_host: str) -> str:
    host = flag or os.environ.get(ENDPOINT_ENV) or config_host
    if not host:
        raise SubmitError(f"no Kubeflow host: pass --host, set {ENDPOINT_ENV}, or set kubeflow_host in the config")
    return host.rstrip("/")


def _explain(err: Exception, host: str) -> SubmitError:
    status = getattr(err, "status", None) or getattr(err, "code", None)
    if status in (401, 403):
        return SubmitError(
            f"authentication failed at {host} (HTTP {status}): set KF_PIPELINES_TOKEN, KF_PIPELINES_COOKIE "
            "or KF_PIPELINES_IAP_OAUTH2_CLIENT_ID for this host"
        )
    if status is not None:
        reason = str(getattr(err, "reason", "") or "").strip()
        return SubmitError(f"Kubeflow Pipelines at {host} answered HTTP {status} {reason}".rstrip())
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return SubmitError(f"cannot reach Kubeflow Pipelines at {host}: {text[:200]}")


def probe(host: str, token: str | None, cookie: str | None, timeout_s: float = 15.0) -> None:
    """One request to the health endpoint, so that a wrong host or credential fails fast and says which
    (kfp.Client would retry for half a minute, then report only a timeout)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{host}/apis/v2beta1/healthz")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if cookie:
        request.add_header("Cookie", cookie)
    try:
        urllib.request.urlopen(request, timeout=timeout_s).close()
    except urllib.error.HTTPError as err:
        raise _explain(err, host) from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise SubmitError(f"cannot reach Kubeflow Pipelines at {host}: {getattr(err, 'reason', err)}") from None


def client(host: str, namespace: str | None):
    import kfp

    cookie = os.environ.get("KF_PIPELINES_COOKIE") or None
    token = os.environ.get("KF_PIPELINES_TOKEN") or None
    if not os.environ.get("KF_PIPELINES_IAP_OAUTH2_CLIENT_ID"):  # IAP tokens are minted inside kfp.Client
        probe(host, token, cookie)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline")
            return kfp.Client(host=host, existing_token=token, cookies=cookie, namespace=namespace or "kubeflow")
    except Exception as err:  # noqa: BLE001 - kfp raises whatever its transport raised
        raise _explain(err, host) from None


def submit(pipeline_func, config, host: str, experiment: str, namespace: str | None, run_name: str,
           run_id: str, enable_caching: bool | None):
    """Compile, then create the run; returns the run id the host assigned and the client (to follow the run)."""
    from kfp import compiler

    with tempfile.TemporaryDirectory() as tmp:
        package = os.path.join(tmp, "pipeline.yaml")
        compiler.Compiler().compile(pipeline_func, package_path=package)
        kfp_client = client(host, namespace)
        try:
            result = kfp_client.create_run_from_pipeline_package(
                package, arguments={"config_json": config.to_json(), "run_id": run_id}, run_name=run_name,
                service_account=config.kubeflow.service_account or None,
                experiment_name=experiment, namespace=namespace, enable_caching=enable_caching,
            )
        except Exception as err:  # noqa: BLE001
            raise _explain(err, host) from None
    return result.run_id, kfp_client


def run_url(host: str, run_id: str) -> str:
    """The run's page in the Kubeflow Pipelines UI (the link kfp.Client prints)."""
    ui = (os.environ.get(UI_ENDPOINT_ENV) or host).rstrip("/")
    return f"{ui}/#/runs/details/{run_id}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return (f"{hours} h " if hours else "") + f"{rest // 60} min {rest % 60} s"


def _task_labels(tasks: list) -> dict:
    """task id -> a name a person recognises: the display name under its loop and iteration when it has parents
    ("for-loop-2 / iteration-1 / clip embed"), numbered where names still repeat."""
    by_id = {t.task_id: t for t in tasks if t.task_id}
    labels = {}
    for task in tasks:
        names, parent, hops = [task.display_name or task.task_id or "?"], by_id.get(task.parent_task_id), 0
        while parent is not None and parent.parent_task_id in by_id and hops < 16:  # the top-most (root DAG) left out
            names.insert(0, parent.display_name or parent.task_id)
            parent, hops = by_id.get(parent.parent_task_id), hops + 1
        labels[task.task_id] = " / ".join(names)
    totals: dict = {}
    for label in labels.values():
        totals[label] = totals.get(label, 0) + 1
    numbered: dict = {}
    for task in sorted(tasks, key=lambda t: (str(t.create_time or ""), t.task_id or "")):
        label = labels[task.task_id]
        if totals[label] > 1:
            numbered[label] = numbered.get(label, 0) + 1
            labels[task.task_id] = f"{label} #{numbered[label]}"
    return labels


def _error_text(error) -> str:
    message = getattr(error, "message", None) if error is not None else None
    return str(message).strip().splitlines()[0][:300] if message else ""


def follow(kfp_client, host: str, run_id: str, poll_s: float = 15.0, out=None, sleep=time.sleep) -> str:
    """Print each task's state as it changes and the run's own, until the run ends; return its final state.

    A failed read (network, HTTP 5xx) is retried POLL_RETRIES times in a row before giving up; refused credentials
    (an expired token) end it at once. Either way the run itself goes on in Kubeflow."""
    out = out or sys.stdout
    seen: dict = {}
    run_state, failures = None, 0

    def say(text: str) -> None:
        print(f"{datetime.datetime.now():%H:%M:%S}  {text}", file=out, flush=True)

    while True:
        try:
            run = kfp_client.get_run(run_id)
            failures = 0
        except Exception as err:  # noqa: BLE001 - whatever the transport raised
            explained = _explain(err, host)
            if getattr(err, "status", None) in (401, 403):
                raise SubmitError(f"{explained}; the run goes on: {run_url(host, run_id)}") from None
            failures += 1
            if failures > POLL_RETRIES:
                raise SubmitError(f"stopped following run {run_id} after {failures} failed reads ({explained}); "
                                  f"the run goes on: {run_url(host, run_id)}") from None
            say(f"could not read the run ({explained}); trying again")
            sleep(poll_s)
            continue
        tasks = list(getattr(run.run_details, "task_details", None) or []) if run.run_details else []
        labels = _task_labels(tasks)
        for task in sorted(tasks, key=lambda t: (str(t.create_time or ""), labels[t.task_id])):
            state = str(task.state or "PENDING")
            if seen.get(task.task_id) != state:
                seen[task.task_id] = state
                error = _error_text(task.error) if state == "FAILED" else ""
                say(f"{labels[task.task_id]}: {state}" + (f" ({error})" if error else ""))
        state = str(run.state or "PENDING")
        if state != run_state:
            run_state = state
            if state not in FINAL_STATES:
                say(f"run {run_id}: {state}")
        if state in FINAL_STATES:
            error = _error_text(run.error)
            took = (run.finished_at - run.created_at).total_seconds() if run.finished_at and run.created_at else None
            say(f"run {run_id} {state}" + (f" after {_duration(took)}" if took is not None and took >= 0 else "")
                + (f": {error}" if error else "") + f" · {run_url(host, run_id)}")
            return state
        sleep(poll_s)
