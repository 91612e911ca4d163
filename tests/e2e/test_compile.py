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


def all_tasks(spec: dict):
    """(task name, task, executor name, stage) over the root DAG and the DAGs of ParallelFor loops."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    for dag in dags:
        for name, task in dag["tasks"].items():
            component = task["componentRef"]["name"]
            if component.startswith("comp-for-loop"):
                continue
            executor = spec["components"][component]["executorLabel"]
            stage = executor.removeprefix("exec-").rsplit("-2", 1)[0].replace("-", "_")
            yield name, task, executor, stage


def kubernetes_spec(text: str) -> dict:
    """The platform document kfp-kubernetes appends: executor name -> its Kubernetes settings."""
    docs = list(yaml.safe_load_all(text))
    assert len(docs) == 2, "no Kubernetes platform spec compiled in"
    return docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_every_stage_is_a_task_on_its_family_image(tmp_path):
    spec, _ = compile_yaml(tmp_path, "--set", "images.registry=registry.example.com", "--set", "images.tag=v9")
    executors = spec["deploymentSpec"]["executors"]
    tasks = list(all_tasks(spec))
    assert {stage for *_, stage in tasks} == set(STAGES) - {"conditioning_merge"}  # one conditioning family: no merge
    for name, task, executor, stage in tasks:
        image = executors[executor]["container"]["image"]
        family = STAGES[stage].family
        suffix = "-tpu" if family == "train" else ""  # the production preset trains on TPU v5e
        assert image == f"registry.example.com/controlnet-pipeline/controlnet-{family}{suffix}:v9"


def test_dag_edges_follow_the_data(tmp_path):
    spec, _ = compile_yaml(tmp_path, "--set", "shard_groups=1")
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks["download"]["dependentTasks"]) == {"laion-retrieval", "clip-embed"}
    assert tasks["encode"]["dependentTasks"] == ["conditioning"]
    assert set(tasks["evaluate"]["dependentTasks"]) == {"controlnet-train", "conditioning"}
    assert len(tasks["report"]["dependentTasks"]) == len(STAGES) - 2  # all but itself and conditioning_merge


def test_conditioning_types_from_two_families_run_in_two_images_then_merge(tmp_path):
    spec, _ = compile_yaml(tmp_path, "--set", "shard_groups=1", "--set", 'conditioning.types=["canny","pose","depth"]')
    executors = spec["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    conditioning = {n: t for n, t in tasks.items() if n.startswith("conditioning") and n != "conditioning-merge"}
    images = {executors[spec["components"][t["componentRef"]["name"]]["executorLabel"]]["container"]["image"] for t in conditioning.values()}
    assert len(conditioning) == 2 and {i.split("/")[-1].split(":")[0] for i in images} == {"controlnet-conditioning", "controlnet-vision"}
    families = {t["inputs"]["parameters"]["family"]["runtimeValue"]["constant"] for t in conditioning.values()}
    assert families == {"conditioning", "vision"}
    assert set(tasks["conditioning-merge"]["dependentTasks"]) == set(conditioning)
    assert tasks["encode"]["dependentTasks"] == ["conditioning-merge"]


PER_IMAGE = ("clip_embed", "download", "blip_caption", "curate_keys", "curate", "conditioning", "encode")


def test_per_image_stages_fan_out_over_shard_groups_then_finish_in_one_task(tmp_path):
    spec, _ = compile_yaml(tmp_path, "--preset", "production", "--set", "shard_groups=3")
    root = spec["root"]["dag"]["tasks"]
    loops = {name: task for name, task in root.items() if name.startswith("for-loop")}
    assert len(loops) == len(PER_IMAGE)
    for loop in loops.values():
        assert loop["parameterIterator"]["items"]["raw"] == "[0, 1, 2]"
        assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    for stage in PER_IMAGE:
        inside = [(n, t) for n, t, _, s in all_tasks(spec) if s == stage and n not in root]
        (after,) = [(n, t) for n, t, _, s in all_tasks(spec) if s == stage and n in root]
        assert len(inside) == 1
        assert inside[0][1]["inputs"]["parameters"]["parts"]["runtimeValue"]["constant"] == 3
        assert "componentInputParameter" in inside[0][1]["inputs"]["parameters"]["part"]
        assert any(d.startswith("for-loop") for d in after[1]["dependentTasks"])


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
    for _, _, name, stage in all_tasks(spec):
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
    train = platform["exec-controlnet-train"]["nodeSelector"]["labels"]
    assert train == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice", "cloud.google.com/gke-tpu-topology": "2x4"}
    assert spec["defaultPipelineRoot"] == "gs://controlnet-pipeline-data/kfp-root"


def test_download_and_retrieval_retry_with_backoff(tmp_path):
    spec, _ = compile_yaml(tmp_path, "--preset", "production")
    for name, task, _, stage in all_tasks(spec):
        if stage in ("download", "laion_retrieval"):
            policy = task["retryPolicy"]
            assert policy["maxRetryCount"] == 3 and policy["backoffDuration"] == "30s" and policy["backoffFactor"] == 2
        elif stage == "controlnet_train":
            assert "retryPolicy" not in task


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


# The stages that may read a Hugging Face token (they load models or datasets; curate_keys loads CLIP); W&B is
# training's only.
HUB_STAGES = {"clip_embed", "blip_caption", "curate_keys", "encode", "controlnet_train", "evaluate"}


def secret_env(platform: dict, executor: str) -> dict:
    """env var -> whether the secret behind it is optional, for one executor."""
    return {k["envVar"]: s.get("optional", False) for s in platform.get(executor, {}).get("secretAsEnv", [])
            for k in s["keyToEnv"]}


@pytest.mark.parametrize("preset", ["embedded", "production"])
def test_a_task_gets_only_the_secrets_it_reads_and_can_start_without_them(tmp_path, preset):
    """A cluster without the secret runs the pipeline: Hub token optional and only where models or datasets
    load; no W&B key while train.wandb_project is empty."""
    spec, text = compile_yaml(tmp_path, "--preset", preset)
    platform = kubernetes_spec(text)
    hub_seeds = pipeline_configs.preset(preset).hub_load.kind == "hf"
    for _, _, executor, stage in all_tasks(spec):
        env = secret_env(platform, executor)
        wanted = {"HF_TOKEN"} if stage in HUB_STAGES or (stage == "hub_load" and hub_seeds) else set()
        assert set(env) == wanted, (stage, env)
        assert all(env.values()), f"{stage}: a secret it can do without is required"


def test_wandb_key_goes_to_training_only_and_is_required_there(tmp_path):
    spec, text = compile_yaml(tmp_path, "--preset", "production", "--set", "train.wandb_project=cn",
                              "--set", 'conditioning.types=["canny","pose","depth"]')
    platform = kubernetes_spec(text)
    for _, task, executor, stage in all_tasks(spec):
        env = secret_env(platform, executor)
        assert ("WANDB_API_KEY" in env) == (stage == "controlnet_train"), stage
        if stage == "controlnet_train":
            assert env["WANDB_API_KEY"] is False  # wandb.init fails without it: better the pod says so at once
        if stage == "conditioning":  # the depth model loads from the Hub; canny and pose load nothing
            family = task["inputs"]["parameters"]["family"]["runtimeValue"]["constant"]
            assert ("HF_TOKEN" in env) == (family == "vision"), family
