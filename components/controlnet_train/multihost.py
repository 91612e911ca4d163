"""Multi-host training on Kubernetes: the train task launches a JobSet of `train.num_processes` pods,
one per host (a TPU VM slice or a GPU node), waits for it and reports how it ended.

Each pod runs the same `python -m components.controlnet_train` as a single-host run; jax.distributed
finds its peers from the environment set here: JAX_COORDINATOR_ADDRESS (pod 0 behind the JobSet's
headless service), JAX_NUM_PROCESSES, and JAX_PROCESS_ID from the Job's completion index.
"""
from __future__ import annotations

import json
import re
import time

from cnpipe.kfp_images import image_ref
from components.registry import secrets_for

GROUP, VERSION, PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"
COORDINATOR_PORT = 8476
REPLICATED_JOB = "workers"


class MultiHostError(RuntimeError):
    pass


def jobset_name(run_id: str) -> str:
    """A DNS-1035 label from the run id (JobSet names become pod host names)."""
    name = re.sub(r"[^a-z0-9-]", "-", f"cn-train-{run_id}".lower()).strip("-")
    return name[:40].rstrip("-")


def manifest(config, run_id: str, encoded_uri: str, output_uri: str, namespace: str) -> dict:
    """The JobSet: one replicated Job whose `hosts` pods each run the trainer with its process id."""
    train, res = config.train, config.kubeflow.resources.controlnet_train
    hosts = train.num_processes
    if hosts < 2:
        raise MultiHostError(f"train.num_processes is {hosts}: a JobSet is for 2 or more hosts")
    name = jobset_name(run_id)
    coordinator = f"{name}-{REPLICATED_JOB}-0-0.{name}:{COORDINATOR_PORT}"
    argv = ["python", "-m", "components.controlnet_train", "--config-json", config.to_json(),
            "--input", f"encoded={encoded_uri}", "--output", output_uri]
    limits = {"cpu": res.cpu_limit or res.cpu, "memory": res.memory_limit or res.memory}
    if res.accelerator and res.accelerator_count:
        limits[res.accelerator] = str(res.accelerator_count)
    selectors = {}
    if res.accelerator == "google.com/tpu":
        selectors = {"cloud.google.com/gke-tpu-accelerator": res.tpu_type, "cloud.google.com/gke-tpu-topology": res.tpu_topology}
    elif res.gpu_type:
        selectors = {"cloud.google.com/gke-accelerator": res.gpu_type}
    env = [
        {"name": "JAX_COORDINATOR_ADDRESS", "value": coordinator},
        {"name": "JAX_NUM_PROCESSES", "value": str(hosts)},
        {"name": "JAX_PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
    ]
    env += [{"name": s.env, "valueFrom": {"secretKeyRef": {"name": s.secret_name, "key": s.key, "optional": s.optional}}}
            for s in secrets_for("controlnet_train", config)]  # the same secrets as the train task itself
    container = {
        "name": "trainer",
        "image": image_ref(config.images, "train"),
        "command": argv,
        "env": env,
        "ports": [{"containerPort": COORDINATOR_PORT, "name": "coordinator"}],
        "resources": {"requests": {"cpu": res.cpu, "memory": res.memory, **{k: v for k, v in limits.items() if "/" in k}},
                      "limits": limits},
    }
    pod_spec = {
        "restartPolicy": "Never",
        "subdomain": name,
        "containers": [container],
        "nodeSelector": selectors,
        "tolerations": [{"key": t.key, "operator": t.operator, "effect": t.effect, **({"value": t.value} if t.value else {})}
                        for t in config.kubeflow.tolerations if t.key == res.accelerator],
    }
    if config.kubeflow.service_account:
        pod_spec["serviceAccountName"] = config.kubeflow.service_account
    if config.kubeflow.image_pull_secret:
        pod_spec["imagePullSecrets"] = [{"name": config.kubeflow.image_pull_secret}]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "JobSet",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "controlnet-pipeline"}},
        "spec": {
            "failurePolicy": {"maxRestarts": 2},  # a host lost mid-run restarts the whole set, which resumes from its checkpoint
            "network": {"enableDNSHostnames": True, "subdomain": name},
            "replicatedJobs": [{
                "name": REPLICATED_JOB,
                "replicas": 1,
                "template": {"spec": {
                    "parallelism": hosts, "completions": hosts, "completionMode": "Indexed", "backoffLimit": 0,
                    "template": {"spec": pod_spec},
                }},
            }],
        },
    }


def _custom_objects():
    from kubernetes import client, config as kube_config

    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    return client.CustomObjectsApi()


def launch_and_wait(body: dict, poll_s: float = 30.0, timeout_s: float = 7 * 24 * 3600, api=None) -> dict:
    """Create the JobSet (or attach to it when a retried task finds it already there) and wait for its end."""
    api = api or _custom_objects()
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    except Exception as err:  # noqa: BLE001 - kubernetes.client.ApiException, imported lazily
        if getattr(err, "status", None) != 409:  # 409: exists, a retried task attaches to it
            raise MultiHostError(f"cannot create JobSet {namespace}/{name}: {err}") from None
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status", {})
        conditions = {c["type"]: c for c in status.get("conditions", []) if c.get("status") == "True"}
        if "Completed" in conditions:
            return {"jobset": name, "state": "Completed", "status": status}
        if "Failed" in conditions:
            raise MultiHostError(f"JobSet {namespace}/{name} failed: {conditions['Failed'].get('message', '')}"
                                 f" (status: {json.dumps(status)[:500]})")
        time.sleep(poll_s)
    raise MultiHostError(f"JobSet {namespace}/{name} did not finish within {timeout_s:.0f} s")


def _pod_namespace() -> str:
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "kubeflow"


def launch(config, run_id: str, input_uris: dict, output_uri: str):
    """The train task's launcher (components.registry): on `train.num_processes` > 1 hosts a JobSet does the work
    and this task waits for it; on one host None, and the task runs the trainer itself."""
    if config.train.num_processes <= 1:
        return None
    from cnpipe.dataset import load_output

    body = manifest(config, run_id, input_uris["encoded"], output_uri, _pod_namespace())
    ended = launch_and_wait(body)
    print(f"JobSet {ended['jobset']}: {ended['state']}")
    return load_output(output_uri)
