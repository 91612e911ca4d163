"""The compiled Kubeflow YAML itself runs end to end here, as a KFP v2 backend would run it (tests/e2e/kfp_backend.py):
every task with its own container command and arguments, its executor input built from the YAML, in a stand-in for the
image the YAML names (made from that image's Dockerfile). It must give the same rows per stage as the kfp.local run of
the same config (conftest.finished_run). Small pipelines show that what kfp.local gives a task and the YAML does not
say (the driver's environment, the repository on sys.path, a secret) fails here.
"""
import base64
import json
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

import kfp_backend
import test_embedded_run as local_e2e

REPO = pathlib.Path(__file__).resolve().parents[2]
# kfp.local warns that the family images are not Python base images: it runs every task in this interpreter anyway
pytestmark = pytest.mark.filterwarnings("ignore:.*custom or non-Python base image")
LIGHT_SETTINGS = local_e2e.LIGHT[1::2]  # the same light settings as the kfp.local run it is compared with
PER_IMAGE = ("clip_embed", "download", "blip_caption", "conditioning", "encode")


def image_dockerfiles(config) -> dict:
    """Image reference (as the config names each family's image) -> the Dockerfile that builds it."""
    from cnpipe.kfp_images import image_ref
    from components.registry import FAMILIES

    return {image_ref(config.images, family): REPO / "images" / family / "Dockerfile" for family in FAMILIES}


def compile_embedded(package: pathlib.Path, settings: list[str]) -> dict:
    argv = [sys.executable, "pipeline.py", "compile", "--preset", "embedded", "-o", str(package)]
    done = subprocess.run(argv + [a for s in settings for a in ("--set", s)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return next(yaml.safe_load_all(package.read_text()))


@pytest.fixture(scope="module")
def yaml_run(tmp_path_factory):
    """The embedded default, compiled, then run from its YAML with the run's arguments as `submit` sends them
    (config_json, run_id); the loopback web and kNN service stand in for the internet as in the local run."""
    import pipeline_configs
    from orchestration import local_run

    work = tmp_path_factory.mktemp("yaml")
    root = work / "runs"
    settings = [f"storage.root={root}", *LIGHT_SETTINGS]
    package = work / "pipeline.yaml"
    spec = compile_embedded(package, settings)
    config = pipeline_configs.with_overrides(pipeline_configs.preset("embedded"), settings)
    config, web = local_run.prepare_embedded(config, str(root / "yaml"), work)
    try:
        backend = kfp_backend.Backend(REPO, work / "backend", image_dockerfiles(config))
        run = backend.run(package, {"config_json": config.to_json(), "run_id": "yaml"}, str(work / "pipeline-root"))
    finally:
        web.terminate()
        web.wait(timeout=30)
    return root / "yaml", run, spec


def test_the_compiled_yaml_gives_the_same_rows_per_stage_as_kfp_local(yaml_run, finished_run):
    run_root, _, _ = yaml_run
    local_root, _ = finished_run
    assert local_e2e.rows_per_stage(str(run_root)) == local_e2e.rows_per_stage(str(local_root))
    train = json.loads((run_root / "controlnet_train" / "summary.json").read_text())
    assert train["steps"] == 6 and (run_root / "controlnet_train" / "controlnet" / "config.json").exists()
    assert "clip_score" in json.loads((run_root / "evaluate" / "metrics.json").read_text())["metrics"]
    assert "| conditioning/pose |" in (run_root / "report" / "report.md").read_text()


def expected_task_paths(spec: dict) -> list[str]:
    """Every container task the YAML asks for, a ParallelFor's once per item (read from the YAML here)."""
    paths = []

    def walk(dag, prefix):
        for name, task in dag["tasks"].items():
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" not in component:
                paths.append(prefix + name)
            elif "parameterIterator" in task:
                for index, _ in enumerate(json.loads(task["parameterIterator"]["items"]["raw"])):
                    walk(component["dag"], f"{prefix}{name}/iteration-{index}/")
            else:
                walk(component["dag"], f"{prefix}{name}/")

    walk(spec["root"]["dag"], "")
    return sorted(paths)


def test_every_task_ran_once_with_its_own_command_in_the_image_the_yaml_names(yaml_run):
    run_root, run, spec = yaml_run
    executors = spec["deploymentSpec"]["executors"]
    assert sorted(t.path for t in run.tasks) == expected_task_paths(spec)
    stages = {}
    for task in run.tasks:
        container = executors[task.executor]["container"]
        command, args = container["command"], container["args"]
        assert task.argv == command + [json.dumps(task.executor_input) if a == "{{$}}" else a for a in args], task.path
        family = re.search(r"/controlnet-(\w+?)(?:-cuda12|-tpu|-cpu)?:", container["image"]).group(1)
        assert task.env["PYTHONPATH"].split(":")[0].endswith(f"images/{family}/app"), task.path
        assert task.env["PATH"].split(":")[0].startswith(str(run.root.parents[2] / "backend" / "images" / family)), task.path
        assert str(REPO) not in json.dumps(task.env), f"{task.path}: the task's environment names the working tree"
        stage = task.executor.removeprefix("exec-").rsplit("-2", 1)[0].replace("-", "_")
        stages[stage] = stages.get(stage, 0) + 1
    groups = 2  # the embedded default's shard_groups: each per-image stage is one task per group, then one more
    assert all(stages[s] == groups + 1 for s in PER_IMAGE), stages


def test_artifacts_reach_the_next_task_with_the_uri_and_metadata_their_producer_wrote(yaml_run):
    run_root, run, _ = yaml_run
    produced = {a["uri"]: a for t in run.tasks for a in t.outputs.values()}
    consumed = 0
    for task in run.tasks:
        for name, listed in task.executor_input["inputs"].get("artifacts", {}).items():
            (artifact,) = listed["artifacts"]
            assert artifact["uri"] in produced, (task.path, name)
            assert artifact["metadata"] == produced[artifact["uri"]]["metadata"], (task.path, name)
            assert artifact["metadata"]["dataset_uri"].startswith(str(run_root)), (task.path, name)
            consumed += 1
        values = task.executor_input["inputs"]["parameterValues"]
        if "/iteration-" in task.path:  # a shard group: its item and the group count, as integers
            assert values["part"] == int(task.path.split("/iteration-")[1].split("/")[0]) and values["parts"] == 2
            assert type(values["part"]) is int and type(values["parts"]) is int
        elif "part" in values:
            assert values["part"] == -1  # the task after the loop: the component's default
    assert consumed >= 20


def inlined_images(page: str) -> list[bytes]:
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/") for s in sources), [s[:60] for s in sources]
    return [base64.b64decode(s.split(",", 1)[1]) for s in sources]


def test_the_ui_gets_html_reports_with_every_picture_inlined(yaml_run):
    run_root, run, _ = yaml_run
    report, evaluate = run.task("report"), run.task("evaluate")
    page = pathlib.Path(report.outputs["report_html"]["uri"]).read_text()
    images = inlined_images(page)
    shown = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", (run_root / "report" / "report.md").read_text())
    assert "contact_sheet.png" in shown and len(shown) >= 3  # contact sheet, loss curve, evaluation grid, ...
    assert [(run_root / "report" / name).read_bytes() for name in shown] == images  # every picture report.md shows
    assert (run_root / "evaluate" / "grid.png").read_bytes() in images
    assert "<svg" in page and "no_pose" in page  # rows per stage as a chart; rejections by reason
    page = pathlib.Path(evaluate.outputs["report_html"]["uri"]).read_text()
    shown = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", (run_root / "evaluate" / "report.md").read_text())
    assert inlined_images(page) == [(run_root / "evaluate" / name).read_bytes() for name in shown]
    assert "<svg" in page and "clip_score" in page  # the training curve
    assert "grid.png" in pathlib.Path(evaluate.outputs["report_md"]["uri"]).read_text()
    assert "clip_score" in evaluate.outputs["metrics"]["metadata"]
    for task in (report, evaluate):
        assert task.outputs["report_html"]["type"]["schemaTitle"] == "system.HTML"


# ---------------------------------------------------------------- what only the local run has fails from the YAML

from kfp import dsl  # noqa: E402
from kfp.dsl import Dataset, Input, Output  # noqa: E402

from cnpipe.kfp_images import DEFAULT_IMAGE  # noqa: E402


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def reads_driver_environment(output: Output[Dataset]):
    import os

    with open(output.path, "w") as f:
        f.write(os.environ["CNPIPE_TEST_DRIVER_ONLY"])


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def imports_code_outside_the_image(output: Output[Dataset]):
    from bench import benchlib  # in the repository, not in any image (their Dockerfiles COPY cnpipe/, components/)

    with open(output.path, "w") as f:
        f.write(benchlib.__name__)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def where_the_code_comes_from(output: Output[Dataset]):
    import importlib.util
    import json

    import pipeline_configs
    from cnpipe import storage

    found = importlib.util.find_spec("pipeline")  # the repository's CLI module: not COPY'd into any image
    with open(output.path, "w") as f:
        json.dump({"pipeline": found and found.origin, "library": [pipeline_configs.__file__, storage.__file__]}, f)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def produce(count: int, output: Output[Dataset]):
    output.metadata.update({"dataset_uri": "gs://bucket/x", "count": count})
    with open(output.path, "w") as f:
        f.write("produced")


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def consume(folder: str, source: Input[Dataset], output: Output[Dataset], part: int = -1, parts: int = 1):
    import json
    import os

    with open(source.path) as f:
        content = f.read()
    record = {"part": part, "parts": parts, "types": [type(part).__name__, type(parts).__name__],
              "metadata": dict(source.metadata), "content": content}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"part{part}.json"), "w") as f:
        json.dump(record, f, sort_keys=True)
    output.metadata["seen"] = part
    with open(output.path, "w") as f:
        f.write("ok")


def _on_core_image(task):
    import pipeline_configs
    from cnpipe.kfp_images import image_ref

    return task.set_container_image(image_ref(pipeline_configs.preset("embedded").images, "core"))


def single(component):
    @dsl.pipeline(name="single")
    def one():
        _on_core_image(component())

    return one


@dsl.pipeline(name="fan-out")
def fan_out(folder: str, count: int = 3):
    made = _on_core_image(produce(count=count))
    with dsl.ParallelFor(items=[0, 1, 2], parallelism=2) as item:
        part = _on_core_image(consume(folder=folder, source=made.output, part=item, parts=3))
    _on_core_image(consume(folder=folder, source=made.output)).after(part)


def run_locally(pipeline_func, tmp_path: pathlib.Path, **arguments) -> None:
    """kfp.local as `pipeline.py run` uses it: every task in this interpreter's environment and working directory."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "local-root"))
    pipeline_func(**arguments)


def run_from_yaml(pipeline_func, tmp_path: pathlib.Path, secrets=None, **arguments) -> kfp_backend.Run:
    import pipeline_configs
    from kfp import compiler

    tmp_path.mkdir(parents=True, exist_ok=True)
    package = tmp_path / "p.yaml"
    compiler.Compiler().compile(pipeline_func, package_path=str(package))
    backend = kfp_backend.Backend(REPO, tmp_path / "backend", image_dockerfiles(pipeline_configs.preset("embedded")),
                                  secrets=secrets, task_timeout_s=120)
    return backend.run(package, arguments, str(tmp_path / "root"))


@pytest.mark.parametrize("component, cause", [
    (reads_driver_environment, "KeyError: 'CNPIPE_TEST_DRIVER_ONLY'"),
    (imports_code_outside_the_image, "No module named 'bench'"),
])
def test_what_only_the_local_run_gives_a_task_fails_from_the_yaml(component, cause, tmp_path, monkeypatch):
    monkeypatch.setenv("CNPIPE_TEST_DRIVER_ONLY", "set by the driver")
    run_locally(single(component), tmp_path)  # kfp.local passes: the task inherits the driver's environment and cwd
    with pytest.raises(kfp_backend.TaskFailed) as failed:
        run_from_yaml(single(component), tmp_path)
    assert cause in failed.value.log_tail


def test_a_task_imports_what_its_image_copies_and_nothing_else(tmp_path):
    """The repository (on kfp.local's path, and in .venvs as an editable install) is not in the image stand-in: the
    library comes from the image's /app, and a module the Dockerfile does not COPY is not found."""
    run_locally(single(where_the_code_comes_from), tmp_path)
    local_output = next((tmp_path / "local-root").rglob("where-the-code-comes-from/output"))
    assert json.loads(local_output.read_text())["pipeline"] == str(REPO / "pipeline.py")
    run = run_from_yaml(single(where_the_code_comes_from), tmp_path)
    seen = json.loads(pathlib.Path(run.tasks[0].outputs["output"]["uri"]).read_text())
    assert seen["pipeline"] is None
    image_app = tmp_path / "backend" / "images" / "core" / "app"
    assert seen["library"] == [str(image_app / "pipeline_configs.py"), str(image_app / "cnpipe" / "storage.py")]


def test_parallel_for_and_artifact_metadata_reach_tasks_as_in_kfp_local(tmp_path):
    run_locally(fan_out, tmp_path, folder=str(tmp_path / "local"))
    run = run_from_yaml(fan_out, tmp_path, folder=str(tmp_path / "yaml"))
    local = {p.name: json.loads(p.read_text()) for p in (tmp_path / "local").iterdir()}
    from_yaml = {p.name: json.loads(p.read_text()) for p in (tmp_path / "yaml").iterdir()}
    assert sorted(from_yaml) == ["part-1.json", "part0.json", "part1.json", "part2.json"]
    assert from_yaml == local
    assert from_yaml["part1.json"]["metadata"] == {"dataset_uri": "gs://bucket/x", "count": 3}
    assert from_yaml["part1.json"]["types"] == ["int", "int"]
    assert len(run.tasks) == 5


def test_secrets_come_from_the_cluster_only_a_missing_required_one_stops_the_pod(tmp_path):
    from kfp import kubernetes

    @dsl.pipeline(name="secrets")
    def with_secrets():
        task = _on_core_image(reads_driver_environment())
        kubernetes.use_secret_as_env(task, secret_name="s", secret_key_to_env={"required": "CNPIPE_TEST_DRIVER_ONLY"})
        kubernetes.use_secret_as_env(task, secret_name="s", secret_key_to_env={"optional": "CNPIPE_TEST_OPTIONAL"},
                                     optional=True)

    with pytest.raises(kfp_backend.TaskFailed, match="CreateContainerConfigError: secret 's' key 'required'"):
        run_from_yaml(with_secrets, tmp_path / "a")
    run = run_from_yaml(with_secrets, tmp_path / "b", secrets={("s", "required"): "from the secret"})
    assert pathlib.Path(run.tasks[0].outputs["output"]["uri"]).read_text() == "from the secret"
    assert "CNPIPE_TEST_OPTIONAL" not in run.tasks[0].env


def test_a_task_on_an_image_no_dockerfile_here_builds_fails(tmp_path):
    @dsl.pipeline(name="base-image")
    def left_on_the_base_image():
        reads_driver_environment()  # no set_container_image: python:3.11-slim, which has neither kfp's bridge nor cnpipe

    with pytest.raises(kfp_backend.BackendError, match="no Dockerfile here builds image python:3.11-slim"):
        run_from_yaml(left_on_the_base_image, tmp_path)
