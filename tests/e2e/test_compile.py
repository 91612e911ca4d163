"""The compiled Kubeflow YAML is the same pipeline as the local run: every stage, its family's image, no local state."""
import subprocess
import sys

import pytest
import yaml

import pipeline_configs
from components.registry import STAGES

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def compile_yaml(tmp_path, *args: str):
    out = tmp_path / "pipeline.yaml"
    done = subprocess.run([sys.executable, "pipeline.py", "compile", "-o", str(out), *args], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return next(yaml.safe_load_all(out.read_text())), out.read_text()


def kubernetes_spec(text: str) -> dict:
    """The platform document kfp-kubernetes appends: executor name -> its Kubernetes settings."""
    docs = list(yaml.safe_load_all(text))
    assert len(docs) == 2, "no Kubernetes platform spec compiled in"
    return docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_every_stage_is_a_task_on_its_family_image(tmp_path):
    spec, _ = compile_yaml(tmp_path, "--set", "images.registry=registry.example.com", "--set", "images.tag=v9")
    executors = spec["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {s.replace("_", "-") for s in STAGES}
    for name, task in tasks.items():
        image = executors[task["componentRef"]["name"].replace("comp-", "exec-")]["container"]["image"]
        family = STAGES[name.replace("-", "_")].family
        suffix = "-cuda12" if family == "train" else ""
        assert image == f"registry.example.com/controlnet-pipeline/controlnet-{family}{suffix}:v9"


def test_dag_edges_follow_the_data(tmp_path):
    spec, _ = compile_yaml(tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks["download"]["dependentTasks"]) == {"laion-retrieval", "clip-embed"}
    assert tasks["encode"]["dependentTasks"] == ["conditioning"]
    assert set(tasks["evaluate"]["dependentTasks"]) == {"controlnet-train", "conditioning"}
    assert len(tasks["report"]["dependentTasks"]) == len(STAGES) - 1


def test_config_is_a_parameter_with_the_preset_as_default_and_nothing_local_leaks(tmp_path):
    spec, text = compile_yaml(tmp_path, "--preset", "production")
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert pipeline_configs.from_json(params["config_json"]["defaultValue"]) == pipeline_configs.preset("production")
    assert str(REPO) not in text and ".venvs" not in text


def test_bad_override_fails_naming_the_field(tmp_path):
    done = subprocess.run([sys.executable, "pipeline.py", "compile", "-o", str(tmp_path / "x.yaml"), "--set", "download.thread_cnt=4"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert "download.thread_cnt" in done.stderr
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.parametrize("preset", sorted(pipeline_configs.PRESETS))
def test_every_preset_compiles(tmp_path, preset):
    spec, _ = compile_yaml(tmp_path, "--preset", preset)
    assert spec["pipelineInfo"]["name"].startswith("controlnet-")


def test_every_task_has_resources_and_the_accelerators_its_stage_needs(tmp_path):
    spec, text = compile_yaml(tmp_path, "--preset", "production")
    executors = spec["deploymentSpec"]["executors"]
    platform = kubernetes_spec(text)
    config = pipeline_configs.preset("production")
    for stage in STAGES:
        name = f"exec-{stage.replace('_', '-')}"
        resources = executors[name]["container"]["resources"]
        wanted = getattr(config.kubeflow.resources, stage)
        assert resources["cpuRequest"] == float(wanted.cpu) and resources["memoryRequest"] > 0
        assert resources["cpuLimit"] == float(wanted.cpu) and resources["memoryLimit"] == resources["memoryRequest"]
        if wanted.accelerator:
            assert resources["accelerator"]["resourceType"] == wanted.accelerator
            assert int(resources["accelerator"]["resourceCount"]) == wanted.accelerator_count
            assert any(t["key"] == wanted.accelerator for t in platform[name]["tolerations"])
        else:
            assert "accelerator" not in resources
        env = {(s["secretName"], k["secretKey"], k["envVar"]) for s in platform[name]["secretAsEnv"] for k in s["keyToEnv"]}
        assert env == {("controlnet-pipeline", "hf-token", "HF_TOKEN"), ("controlnet-pipeline", "wandb-api-key", "WANDB_API_KEY")}
    train = platform["exec-controlnet-train"]["nodeSelector"]["labels"]
    assert train == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice", "cloud.google.com/gke-tpu-topology": "2x4"}
    assert spec["defaultPipelineRoot"] == "gs://controlnet-pipeline-data/kfp-root"


def test_download_and_retrieval_retry_with_backoff(tmp_path):
    spec, _ = compile_yaml(tmp_path, "--preset", "production")
    tasks = spec["root"]["dag"]["tasks"]
    for name in ("download", "laion-retrieval"):
        policy = tasks[name]["retryPolicy"]
        assert policy["maxRetryCount"] == 3 and policy["backoffDuration"] == "30s" and policy["backoffFactor"] == 2
    assert "retryPolicy" not in tasks["controlnet-train"]


def test_gpu_type_becomes_a_node_selector(tmp_path):
    _, text = compile_yaml(tmp_path, "--preset", "production", "--set", "kubeflow.resources.controlnet_train.accelerator=nvidia.com/gpu",
                           "--set", "kubeflow.resources.controlnet_train.gpu_type=nvidia-h100-80gb")
    labels = kubernetes_spec(text)["exec-controlnet-train"]["nodeSelector"]["labels"]
    assert labels == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}


def test_no_secret_value_reaches_the_yaml(tmp_path):
    """Secrets are referenced by name; their values live in the environment and in Kubernetes only."""
    import os

    values = {"HF_TOKEN": "hf_SECRETVALUE123", "WANDB_API_KEY": "wandb-SECRET-456", "KF_PIPELINES_TOKEN": "kfp-SECRET-789"}
    out = tmp_path / "p.yaml"
    done = subprocess.run([sys.executable, "pipeline.py", "compile", "-o", str(out), "--preset", "production"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **values})
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    for value in values.values():
        assert value not in text
