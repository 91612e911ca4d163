"""The compiled Kubeflow YAML is the same pipeline as the local run: every stage, its family's image, no local state."""
import subprocess
import sys

import pytest
import yaml

import pipeline_configs
from components.registry import STAGES

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def compile_yaml(tmp_path, *args: str) -> dict:
    out = tmp_path / "pipeline.yaml"
    done = subprocess.run([sys.executable, "pipeline.py", "compile", "-o", str(out), *args], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(out.read_text()), out.read_text()


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
