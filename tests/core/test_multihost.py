"""The JobSet a multi-host training run launches, and how the task follows it."""
import pytest

import pipeline_configs
from components.controlnet_train import multihost


def config(**train):
    cfg = pipeline_configs.preset("production")
    cfg.train.num_processes = train.get("hosts", 4)
    return cfg


def test_manifest_has_one_pod_per_host_with_jax_environment_and_tpu_topology():
    body = multihost.manifest(config(hosts=4), "Run_42", "gs://b/runs/r/encode", "gs://b/runs/r/controlnet_train", "team-a")
    assert body["kind"] == "JobSet" and body["metadata"]["namespace"] == "team-a"
    name = body["metadata"]["name"]
    assert name == "cn-train-run-42"
    (job,) = body["spec"]["replicatedJobs"]
    spec = job["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == 4 and spec["completionMode"] == "Indexed"
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["JAX_COORDINATOR_ADDRESS"]["value"] == f"{name}-workers-0-0.{name}:{multihost.COORDINATOR_PORT}"
    assert env["JAX_NUM_PROCESSES"]["value"] == "4"
    assert "job-completion-index" in env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "controlnet-pipeline", "key": "hf-token", "optional": True}
    assert "WANDB_API_KEY" not in env  # no train.wandb_project: the pods read no W&B key, so need no secret
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice", "cloud.google.com/gke-tpu-topology": "2x4"}
    assert container["resources"]["limits"]["google.com/tpu"] == "8"
    assert [t["key"] for t in pod["tolerations"]] == ["google.com/tpu"]
    assert container["image"].endswith("controlnet-train-tpu:0.1.0")  # TPU hosts run the TPU build of the image
    argv = container["command"]
    assert argv[:3] == ["python", "-m", "components.controlnet_train"]
    assert "encoded=gs://b/runs/r/encode" in argv and argv[-1] == "gs://b/runs/r/controlnet_train"
    assert pipeline_configs.from_json(argv[argv.index("--config-json") + 1]).train.num_processes == 4
    assert body["spec"]["network"]["subdomain"] == name


def test_the_worker_pods_get_the_train_tasks_secrets_required_as_there():
    cfg = config(hosts=2)
    cfg.train.wandb_project = "controlnet"
    pod = multihost.manifest(cfg, "r", "e", "o", "ns")["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is False
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_gpu_hosts_select_by_gpu_type():
    cfg = config(hosts=2)
    res = cfg.kubeflow.resources.controlnet_train
    res.accelerator, res.accelerator_count, res.gpu_type = "nvidia.com/gpu", 8, "nvidia-h100-80gb"
    pod = multihost.manifest(cfg, "r", "e", "o", "ns")["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_single_host_is_not_a_jobset():
    with pytest.raises(multihost.MultiHostError, match="2 or more"):
        multihost.manifest(config(hosts=1), "r", "e", "o", "ns")


class FakeCustomObjects:
    """The two calls launch_and_wait makes, answering with a scripted sequence of JobSet statuses."""

    def __init__(self, statuses, exists=False):
        self.statuses, self.created, self.exists = list(statuses), [], exists

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        if self.exists:
            err = RuntimeError("exists")
            err.status = 409
            raise err
        self.created.append((group, version, namespace, plural, body["metadata"]["name"]))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        return {"status": self.statuses.pop(0)}


def _cond(kind, message=""):
    return {"conditions": [{"type": kind, "status": "True", "message": message}]}


def test_waits_until_completed():
    body = multihost.manifest(config(hosts=2), "r", "e", "o", "ns")
    api = FakeCustomObjects([{}, {"conditions": [{"type": "Completed", "status": "False"}]}, _cond("Completed")])
    ended = multihost.launch_and_wait(body, poll_s=0, api=api)
    assert ended["state"] == "Completed" and api.created == [("jobset.x-k8s.io", "v1alpha2", "ns", "jobsets", "cn-train-r")]
    assert api.statuses == []


def test_failure_is_reported_with_its_message_and_a_retry_attaches():
    body = multihost.manifest(config(hosts=2), "r", "e", "o", "ns")
    api = FakeCustomObjects([_cond("Failed", "pod workers-0-1 OOMKilled")], exists=True)
    with pytest.raises(multihost.MultiHostError, match="OOMKilled"):
        multihost.launch_and_wait(body, poll_s=0, api=api)
