"""Submit the compiled pipeline to a Kubeflow Pipelines host with kfp.Client.

Credentials come only from the environment and go only into request headers, never into the
compiled YAML or the run's parameters:
  KF_PIPELINES_TOKEN                 a bearer token (e.g. `gcloud auth print-identity-token`, a SA token)
  KF_PIPELINES_COOKIE                a session cookie string (e.g. Dex/oauth2-proxy `authservice_session=...`)
  KF_PIPELINES_IAP_OAUTH2_CLIENT_ID  IAP-protected hosts (kfp.Client reads it itself, with google-auth)
"""
from __future__ import annotations

import os
import tempfile
import warnings

ENDPOINT_ENV = "KF_PIPELINES_ENDPOINT"


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
           run_id: str, enable_caching: bool | None) -> str:
    """Compile, then create the run; returns the run id the host assigned."""
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
    return result.run_id
