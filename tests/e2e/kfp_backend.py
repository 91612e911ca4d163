"""A stand-in for the Kubeflow Pipelines v2 backend on this machine: it executes a compiled pipeline YAML as the
backend's driver and launcher do, each task with its own container command and arguments, in a stand-in for the image
the YAML names. So anything the local run (kfp.local) gets that the YAML does not say fails here, not on a cluster.

The image stand-in is built from that image's Dockerfile (images/<family>/Dockerfile), read, not assumed: its final
stage's COPY'd files (with .dockerignore) under a private root, its virtual environments made from the same locks (a
locked .venvs/<lock> where one exists, else one made here with uv from envs/<lock>.lock.txt), its ENV (paths mapped into
that root), its WORKDIR, HOME of its user. The development-only editable install of this repository in .venvs is
switched off in every interpreter of a task (an image has no such thing), so a module the image does not COPY cannot be
imported from the working tree.

What the backend does that is done here:
- the run's arguments are checked against the pipeline's inputs (an unknown name, a wrong type, a missing required
  one: refused), defaults filled in;
- each task's inputs come from the YAML alone: the enclosing DAG's inputs, constants, upstream output parameters and
  artifacts (URI and the metadata its producer's executor wrote), then the component's defaults; an integer parameter is
  passed as an integer, whatever JSON number the YAML holds;
- the executor input (parameters, input artifacts, output artifacts with fresh URIs under the pipeline root, the
  executor output file) replaces `{{$}}`, and its fields the other placeholders, in the container's command and args;
- the command runs with the image's environment, the container's env, secrets from the platform spec (an optional one
  the cluster lacks is left out, a required one that is missing fails the pod), a private /tmp (TMPDIR);
- the executor output file is read back: output metadata and parameters reach the downstream tasks; an output artifact
  other than metrics that the task did not write fails it (the UI and the next task would find nothing);
- DAG order from dependentTasks and the data edges; ready tasks run at once; a ParallelFor (parameterIterator over a raw
  list or a list parameter) runs its DAG once per item, at most parallelismLimit at a time;
- a failed task stops the run: tasks not started are skipped, and the error quotes the end of its pod log.

Refused where a YAML uses them (so a pipeline that needs them fails here rather than passing untested): conditions
(triggerPolicy), exit handlers, artifact iterators, outputs of a loop's DAG (dsl.Collected), importers and resolvers,
platform settings other than the ones below. Not applied, as they do not change what a task computes: retries, caching,
resources, node selectors, tolerations, image pull settings. Artifacts live under a local pipeline root, so an artifact's
path is its URI (kfp's rule for local URIs; on a cluster the launcher stages gs:// artifacts under /gcs/).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
import uuid

import yaml

# python:3.11-slim's own environment (docker inspect), which every family image starts from.
BASE_IMAGE_ENV = {
    "PATH": "/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "PYTHON_VERSION": "3.11.11",
}
METRICS_TYPES = {"system.Metrics", "system.ClassificationMetrics", "system.SlicedClassificationMetrics"}
TASK_KEYS = {"taskInfo", "componentRef", "inputs", "dependentTasks", "cachingOptions", "retryPolicy",
             "parameterIterator", "iteratorPolicy"}
CONTAINER_KEYS = {"image", "command", "args", "resources", "env"}
# kfp-kubernetes settings: applied (secretAsEnv), or about where and how a pod is scheduled and pulled only.
PLATFORM_KEYS = {"secretAsEnv", "imagePullPolicy", "imagePullSecret", "nodeSelector", "tolerations"}

# sitecustomize for every interpreter of a task: drops the editable install's finder (.venvs only; images have none)
NO_EDITABLE = """\
import sys


def _editable(hook):  # setuptools' finder is installed as a class (meta path) or a bound class method (path hook)
    owner = hook if isinstance(hook, type) else getattr(hook, "__self__", type(hook))
    return getattr(owner, "__module__", "").startswith("__editable__")


sys.meta_path[:] = [f for f in sys.meta_path if not _editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not _editable(h)]
sys.path[:] = [p for p in sys.path if not p.startswith("__editable__")]
sys.path_importer_cache.clear()
"""


class BackendError(RuntimeError):
    """The YAML asks for something this backend refuses or cannot find (an unknown image, a missing required input)."""


class TaskFailed(RuntimeError):
    def __init__(self, task: str, message: str, log_tail: str = ""):
        super().__init__(f"task {task} failed: {message}" + (f"\n--- end of its log ---\n{log_tail}" if log_tail else ""))
        self.task, self.log_tail = task, log_tail


# ------------------------------------------------------------------------------------------------ image stand-ins

def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per Dockerfile instruction, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _dockerignore(context: pathlib.Path):
    """A predicate on context-relative paths: True when .dockerignore excludes it (or a folder above it)."""
    path = context / ".dockerignore"
    patterns = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("!"):
            raise BackendError(f".dockerignore exception patterns are not supported here: {line}")
        regex = re.escape(line.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        patterns.append(re.compile(regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]") + "$"))

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        return any(p.match("/".join(parts[:i])) for p in patterns for i in range(1, len(parts) + 1))

    return ignored


def _expand(value: str, env: dict) -> str:
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m.group(1) or m.group(2), ""), value)


@dataclasses.dataclass
class ImageStandIn:
    """One image: a private root holding what the Dockerfile puts there, and the environment a container gets."""

    name: str
    root: pathlib.Path
    env: dict
    workdir: pathlib.Path
    venvs: dict  # image path -> local virtual environment standing in for it
    not_emulated: list  # final-stage instructions that act on the system (apt packages, users)

    def path(self, image_path: str) -> str:
        """An absolute path inside the image, as it is in the stand-in's root (paths the image does not hold unchanged)."""
        if not image_path.startswith("/"):
            return image_path
        top = image_path.strip("/").split("/", 1)[0]
        return str(self.root / image_path.lstrip("/")) if top and (self.root / top).exists() else image_path

    def map_value(self, value: str) -> str:
        return ":".join(self.path(part) for part in value.split(":"))


def _lock_of_venv(stages: dict, stage: str, venv: str) -> str:
    """The lock a build stage installs into `venv` (`uv venv V && uv pip install ... --python V/bin/python -r L`)."""
    for instruction, rest in stages.get(stage, []):
        if instruction != "RUN" or f"uv venv {venv}" not in rest:
            continue
        found = re.search(rf"--python {re.escape(venv)}/bin/python -r /src/envs/([\w.-]+)\.lock\.txt", rest)
        if found:
            return found.group(1)
    raise BackendError(f"stage {stage!r} builds no virtual environment {venv} from an envs/*.lock.txt")


class ImageFactory:
    """Builds (once each) the stand-in of the image a Dockerfile makes."""

    def __init__(self, repo: pathlib.Path, work: pathlib.Path, venvs: pathlib.Path | None = None):
        self.repo, self.work = repo, work
        self.venvs = venvs or repo / ".venvs"
        self.made: dict[str, ImageStandIn] = {}
        self.lock = threading.Lock()
        self.site = work / "site"
        self.site.mkdir(parents=True, exist_ok=True)
        (self.site / "sitecustomize.py").write_text(NO_EDITABLE)

    def venv_for_lock(self, lock: str) -> pathlib.Path:
        """A virtual environment holding exactly envs/<lock>.lock.txt: the project's .venvs/<lock> when it is set up from
        that lock (scripts/setup_envs.sh stamps it), else one made here once with uv (from its cache when it can)."""
        lock_file = self.repo / "envs" / f"{lock}.lock.txt"
        if not lock_file.exists():
            raise BackendError(f"no lock file {lock_file}")
        local = self.venvs / lock
        if (local / "bin" / "python").exists() and (local / ".lock-sha").exists():
            return local
        digest = hashlib.sha256(lock_file.read_bytes()).hexdigest()[:12]
        made = self.repo / ".cache" / "kfp-backend" / f"{lock}-{digest}"
        made.parent.mkdir(parents=True, exist_ok=True)
        with open(made.parent / f"{made.name}.lock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # another test session may be making the same one
            if (made / ".complete").exists():
                return made
            uv = shutil.which("uv") or str(pathlib.Path.home() / ".local" / "bin" / "uv")
            shutil.rmtree(made, ignore_errors=True)
            subprocess.run([uv, "venv", "--quiet", "--python", "python3.11", str(made)], check=True)
            install = [uv, "pip", "install", "--quiet", "--compile-bytecode", "--python", str(made / "bin" / "python"),
                       "-r", str(lock_file)]
            if subprocess.run([*install, "--offline"], capture_output=True).returncode != 0:
                subprocess.run(install, check=True)
            (made / ".complete").write_text("")
        return made

    def image(self, dockerfile: pathlib.Path) -> ImageStandIn:
        key = str(dockerfile)
        with self.lock:
            if key not in self.made:
                self.made[key] = self._build(dockerfile)
            return self.made[key]

    def _build(self, dockerfile: pathlib.Path) -> ImageStandIn:
        name = dockerfile.parent.name
        stages: dict[str, list] = {}
        order: list[str] = []
        for instruction, rest in _instructions(dockerfile.read_text()):
            if instruction == "FROM":
                words = rest.split()
                stage = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"#{len(order)}"
                stages[stage], order = [], [*order, stage]
            elif order:
                stages[order[-1]].append((instruction, rest))
        final = stages[order[-1]]
        root = self.work / "images" / name
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        env = dict(BASE_IMAGE_ENV)
        workdir, venvs, not_emulated, user_home = "/", {}, [], "/root"
        ignored = _dockerignore(self.repo)
        for instruction, rest in final:
            if instruction == "COPY":
                words = shlex.split(rest)
                source_stage = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
                paths = [w for w in words if not w.startswith("--")]
                sources, dest = paths[:-1], paths[-1]
                for source in sources:
                    if source_stage is not None:
                        if source_stage not in stages:
                            continue  # from another image (uv's binary): build tooling, not used at run time
                        venv = self.venv_for_lock(_lock_of_venv(stages, source_stage, source))
                        target = root / dest.lstrip("/")
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.symlink_to(venv, target_is_directory=True)
                        venvs[dest] = venv
                    else:
                        self._copy(source, dest, root, ignored)
            elif instruction == "ENV":
                for item in shlex.split(rest):
                    key, _, value = item.partition("=")
                    env[key] = _expand(value, env)
            elif instruction == "WORKDIR":
                workdir = rest.strip()
                (root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
            elif instruction == "RUN":
                not_emulated.append(f"RUN {rest}")
                user = re.search(r"useradd .*--create-home.*?(\w+)\s*$", rest)
                if user:
                    user_home = f"/home/{user.group(1)}"
            elif instruction in ("USER", "ARG", "LABEL"):
                continue
            else:
                raise BackendError(f"{dockerfile}: {instruction} in the final stage is not emulated")
        (root / user_home.lstrip("/")).mkdir(parents=True, exist_ok=True)
        env.setdefault("HOME", user_home)
        image = ImageStandIn(name, root, env, root / workdir.lstrip("/"), venvs, not_emulated)
        image.env = {k: image.map_value(v) for k, v in env.items()}
        return image

    def _copy(self, source: str, dest: str, root: pathlib.Path, ignored) -> None:
        """COPY <source> <dest> from the build context (this repository), as Docker does: a folder's contents into
        dest, a file into dest/ when dest ends with a slash; .dockerignore'd paths left out."""
        src = self.repo / source
        if not src.exists() or ignored(source.strip("/")):
            raise BackendError(f"COPY {source}: not in the build context (or excluded by .dockerignore)")
        target = root / dest.lstrip("/")
        if src.is_dir():
            for path in sorted(src.rglob("*")):
                rel = path.relative_to(self.repo).as_posix()
                if path.is_file() and not ignored(rel):
                    out = target / path.relative_to(src)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, out)
        else:
            out = target / src.name if dest.endswith("/") else target
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)


# ------------------------------------------------------------------------------------------------ the run

@dataclasses.dataclass
class TaskRun:
    path: str  # e.g. for-loop-2/iteration-1/clip-embed
    component: str
    executor: str
    image: str
    argv: list
    env: dict
    returncode: int
    seconds: float
    log: pathlib.Path
    executor_input: dict
    outputs: dict  # output name -> {"uri", "metadata", "type", "path_written"}
    parameters: dict  # output parameter name -> value


@dataclasses.dataclass
class Run:
    run_id: str
    root: pathlib.Path
    tasks: list = dataclasses.field(default_factory=list)

    def task(self, suffix: str) -> TaskRun:
        found = [t for t in self.tasks if t.path == suffix or t.path.endswith("/" + suffix)]
        if len(found) != 1:
            raise KeyError(f"{len(found)} tasks named {suffix}: {[t.path for t in self.tasks]}")
        return found[0]


def _check_type(name: str, value, parameter_type: str):
    """A value as the backend passes it for this parameter type, or BackendError."""
    kinds = {"STRING": str, "BOOLEAN": bool, "LIST": list, "STRUCT": dict}
    if parameter_type == "NUMBER_INTEGER":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise BackendError(f"parameter {name}: {value!r} is not an integer")
        return int(value)
    if parameter_type == "NUMBER_DOUBLE":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BackendError(f"parameter {name}: {value!r} is not a number")
        return value
    if parameter_type in kinds:
        if not isinstance(value, kinds[parameter_type]):
            raise BackendError(f"parameter {name}: {value!r} is not a {parameter_type}")
        return value
    raise BackendError(f"parameter {name}: type {parameter_type} is not emulated")


def _with_defaults(component: dict, parameters: dict, artifacts: dict, what: str) -> dict:
    """Defaults of the parameters not given; a required input missing, or an input the component does not declare,
    is an error (the driver's)."""
    definitions = component.get("inputDefinitions", {})
    declared = definitions.get("parameters", {})
    unknown = set(parameters) - set(declared)
    if unknown:
        raise BackendError(f"{what}: inputs {sorted(unknown)} are not declared by its component")
    resolved = {}
    for name, spec in declared.items():
        if name in parameters:
            resolved[name] = _check_type(name, parameters[name], spec["parameterType"])
        elif "defaultValue" in spec:
            resolved[name] = _check_type(name, spec["defaultValue"], spec["parameterType"])
        elif not spec.get("isOptional"):
            raise BackendError(f"{what}: required input parameter {name} has no value")
    for name, spec in definitions.get("artifacts", {}).items():
        if name not in artifacts and not spec.get("isOptional"):
            raise BackendError(f"{what}: required input artifact {name} has no producer")
    unknown = set(artifacts) - set(definitions.get("artifacts", {}))
    if unknown:
        raise BackendError(f"{what}: input artifacts {sorted(unknown)} are not declared by its component")
    return resolved


PLACEHOLDER = re.compile(r"\{\{\$(.*?)\}\}")


def _substitute(text: str, executor_input: dict) -> str:
    inputs, outputs = executor_input["inputs"], executor_input["outputs"]

    def value(match: re.Match) -> str:
        expr = match.group(1)
        if expr == "":
            return json.dumps(executor_input)
        m = re.fullmatch(r"\.inputs\.parameters\['([^']+)'\]", expr)
        if m:
            v = inputs.get("parameterValues", {})[m.group(1)]
            return v if isinstance(v, str) else json.dumps(v)
        m = re.fullmatch(r"\.(inputs|outputs)\.artifacts\['([^']+)'\]\.(uri|path)", expr)
        if m:
            artifact = (inputs if m.group(1) == "inputs" else outputs)["artifacts"][m.group(2)]["artifacts"][0]
            return artifact["uri"]  # local pipeline root: the path is the URI
        m = re.fullmatch(r"\.outputs\.parameters\['([^']+)'\]\.output_file", expr)
        if m:
            return outputs["parameters"][m.group(1)]["outputFile"]
        raise BackendError(f"placeholder {{{{${expr}}}}} is not emulated")

    return PLACEHOLDER.sub(value, text)


class Backend:
    """Runs a compiled pipeline YAML. `images`: image reference -> Dockerfile; `secrets`: {(secret, key): value}
    present in the cluster (the rest are absent)."""

    def __init__(self, repo: pathlib.Path, work: pathlib.Path, images: dict, secrets: dict | None = None,
                 task_timeout_s: float = 900, venvs: pathlib.Path | None = None):
        self.repo, self.work = pathlib.Path(repo), pathlib.Path(work)
        self.images, self.secrets = images, secrets or {}
        self.task_timeout_s = task_timeout_s
        self.factory = ImageFactory(self.repo, self.work, venvs)
        self.stopping = threading.Event()

    # -- the run --

    def run(self, package: pathlib.Path, arguments: dict, pipeline_root: str) -> Run:
        self.stopping.clear()
        documents = list(yaml.safe_load_all(pathlib.Path(package).read_text()))
        spec = documents[0]
        platform = {}
        for doc in documents[1:]:
            platform = doc.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
        for name, settings in platform.items():
            unknown = set(settings) - PLATFORM_KEYS
            if unknown:
                raise BackendError(f"{name}: platform settings {sorted(unknown)} are not emulated")
        root_component = spec["root"]
        parameters = _with_defaults(root_component, arguments, {}, "the run")
        run_id = uuid.uuid4().hex[:12]
        run = Run(run_id, pathlib.Path(pipeline_root) / spec["pipelineInfo"]["name"] / run_id)
        self.spec, self.platform, self.record_lock = spec, platform, threading.Lock()
        self._dag(root_component["dag"], parameters, {}, "", run)
        return run

    def _dag(self, dag: dict, parameters: dict, artifacts: dict, prefix: str, run: Run) -> None:
        """Every task of one DAG, each once its upstream tasks have succeeded; ready ones at the same time."""
        tasks = dag["tasks"]
        for name, task in tasks.items():
            unknown = set(task) - TASK_KEYS
            if unknown:
                raise BackendError(f"task {prefix}{name}: {sorted(unknown)} not emulated")
        upstream = {name: set(task.get("dependentTasks", [])) | {
            source[kind]["producerTask"] for kinds in ("parameters", "artifacts")
            for source in task.get("inputs", {}).get(kinds, {}).values()
            for kind in ("taskOutputParameter", "taskOutputArtifact") if kind in source} for name, task in tasks.items()}
        outputs: dict[str, dict] = {}  # task -> {"artifacts": {...}, "parameters": {...}}
        done: set[str] = set()
        failure: BaseException | None = None
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(tasks))) as pool:
            running: dict = {}
            while True:
                if failure is None and not self.stopping.is_set():
                    for name in tasks:
                        if name not in done and name not in running.values() and upstream[name] <= done:
                            future = pool.submit(self._task, name, tasks[name], parameters, artifacts, outputs, prefix, run)
                            running[future] = name
                if not running:
                    break
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    name = running.pop(future)
                    try:
                        outputs[name] = future.result()
                        done.add(name)
                    except BaseException as err:  # noqa: BLE001 - the first failure is the run's
                        failure = failure or err
                        self.stopping.set()
        if failure is not None:
            raise failure
        missing = set(tasks) - done
        if missing:
            raise BackendError(f"tasks {sorted(missing)} never became ready (a dependency cycle or an unknown task)")

    def _resolve(self, task: dict, name: str, parameters: dict, artifacts: dict, outputs: dict):
        params, arts = {}, {}
        for key, source in task.get("inputs", {}).get("parameters", {}).items():
            if "componentInputParameter" in source:
                params[key] = parameters[source["componentInputParameter"]]
            elif "runtimeValue" in source:
                params[key] = source["runtimeValue"]["constant"]
            elif "taskOutputParameter" in source:
                ref = source["taskOutputParameter"]
                params[key] = outputs[ref["producerTask"]]["parameters"][ref["outputParameterKey"]]
            else:
                raise BackendError(f"task {name}: input parameter {key} from {sorted(source)} is not emulated")
        for key, source in task.get("inputs", {}).get("artifacts", {}).items():
            if "componentInputArtifact" in source:
                arts[key] = artifacts[source["componentInputArtifact"]]
            elif "taskOutputArtifact" in source:
                ref = source["taskOutputArtifact"]
                produced = outputs[ref["producerTask"]]["artifacts"]
                if ref["outputArtifactKey"] not in produced:
                    raise BackendError(f"task {name}: {ref['producerTask']} has no output artifact {ref['outputArtifactKey']}")
                arts[key] = produced[ref["outputArtifactKey"]]
            else:
                raise BackendError(f"task {name}: input artifact {key} from {sorted(source)} is not emulated")
        return params, arts

    def _task(self, name: str, task: dict, parameters: dict, artifacts: dict, outputs: dict, prefix: str, run: Run) -> dict:
        component = self.spec["components"][task["componentRef"]["name"]]
        params, arts = self._resolve(task, prefix + name, parameters, artifacts, outputs)
        if "dag" in component:
            return self._sub_dag(name, task, component, params, arts, prefix, run)
        if "executorLabel" not in component:
            raise BackendError(f"task {prefix}{name}: component {task['componentRef']['name']} has neither dag nor executor")
        params = _with_defaults(component, params, arts, f"task {prefix}{name}")
        return self._execute(prefix + name, task, component, params, arts, run)

    def _sub_dag(self, name, task, component, params, arts, prefix, run) -> dict:
        if component["dag"].get("outputs"):
            raise BackendError(f"task {prefix}{name}: outputs of a sub-DAG (dsl.Collected) are not emulated")
        iterator = task.get("parameterIterator")
        if "artifactIterator" in task:
            raise BackendError(f"task {prefix}{name}: artifact iterators are not emulated")
        if iterator is None:
            declared = _with_defaults(component, params, arts, f"task {prefix}{name}")
            self._dag(component["dag"], declared, arts, f"{prefix}{name}/", run)
            return {"artifacts": {}, "parameters": {}}
        items = iterator["items"]
        values = json.loads(items["raw"]) if "raw" in items else params[items["inputParameter"]]
        if isinstance(values, str):
            values = json.loads(values)
        limit = task.get("iteratorPolicy", {}).get("parallelismLimit", 0) or len(values) or 1

        def iteration(index_item):
            index, item = index_item
            inner = _with_defaults(component, {**params, iterator["itemInput"]: item}, arts, f"task {prefix}{name}")
            self._dag(component["dag"], inner, arts, f"{prefix}{name}/iteration-{index}/", run)

        with concurrent.futures.ThreadPoolExecutor(max_workers=limit) as pool:
            for future in [pool.submit(iteration, pair) for pair in enumerate(values)]:
                future.result()
        return {"artifacts": {}, "parameters": {}}

    # -- one container --

    def _pod_env(self, image: ImageStandIn, container: dict, executor: str, task_dir: pathlib.Path) -> dict:
        env = dict(image.env)
        env["PYTHONPATH"] = ":".join(filter(None, [env.get("PYTHONPATH"), str(self.factory.site)]))
        for item in container.get("env", []):
            env[item["name"]] = _expand(item.get("value", ""), env)
        for secret in self.platform.get(executor, {}).get("secretAsEnv", []):
            for pair in secret["keyToEnv"]:
                key = (secret["secretName"], pair["secretKey"])
                if key in self.secrets:
                    env[pair["envVar"]] = self.secrets[key]
                elif not secret.get("optional", False):
                    raise TaskFailed(executor, f"CreateContainerConfigError: secret {key[0]!r} key {key[1]!r} not found")
        (task_dir / "tmp").mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(task_dir / "tmp")
        env["HOSTNAME"] = task_dir.name
        return env

    def _execute(self, path: str, task: dict, component: dict, params: dict, arts: dict, run: Run) -> dict:
        executor_label = component["executorLabel"]
        executor = self.spec["deploymentSpec"]["executors"][executor_label]
        if "container" not in executor:
            raise BackendError(f"task {path}: executor {executor_label} is not a container (importer/resolver not emulated)")
        container = executor["container"]
        unknown = set(container) - CONTAINER_KEYS
        if unknown:
            raise BackendError(f"task {path}: container fields {sorted(unknown)} are not emulated")
        if container["image"] not in self.images:
            raise BackendError(f"task {path}: no Dockerfile here builds image {container['image']} "
                               f"(known: {', '.join(sorted(self.images))})")
        image = self.factory.image(self.images[container["image"]])
        task_dir = run.root / path
        task_dir.mkdir(parents=True, exist_ok=True)
        out_defs = component.get("outputDefinitions", {})
        output_artifacts = {
            key: {"artifacts": [{"name": key, "type": spec["artifactType"], "uri": str(task_dir / key), "metadata": {}}]}
            for key, spec in out_defs.get("artifacts", {}).items()}
        executor_input = {
            "inputs": {
                "parameterValues": params,
                "artifacts": {key: {"artifacts": [{"name": a["name"], "type": a["type"], "uri": a["uri"],
                                                   "metadata": copy.deepcopy(a["metadata"])}]} for key, a in arts.items()},
            },
            "outputs": {
                "parameters": {key: {"outputFile": str(task_dir / "outputs" / key)}
                               for key in out_defs.get("parameters", {})},
                "artifacts": output_artifacts,
                "outputFile": str(task_dir / "kfp_outputs" / "output_metadata.json"),
            },
        }
        argv = [_substitute(a, executor_input) for a in [*container.get("command", []), *container.get("args", [])]]
        env = self._pod_env(image, container, executor_label, task_dir)
        log = task_dir / "pod.log"
        started = time.time()
        with open(log, "wb") as sink:
            process = subprocess.Popen(argv, env=env, cwd=image.workdir, stdout=sink, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                returncode = process.wait(timeout=self.task_timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:  # the pod is gone once its container ends: nothing it started outlives it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        seconds = time.time() - started
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        if returncode is None:
            raise TaskFailed(path, f"timed out after {self.task_timeout_s} s", tail)
        if returncode != 0:
            raise TaskFailed(path, f"container exited with status {returncode}", tail)
        produced, out_params = self._read_executor_output(path, executor_input, out_defs, tail)
        record = TaskRun(path, component.get("executorLabel"), executor_label, container["image"], argv, env, returncode,
                         seconds, log, executor_input, produced, out_params)
        with self.record_lock:
            run.tasks.append(record)
        return {"artifacts": produced, "parameters": out_params}

    def _read_executor_output(self, path: str, executor_input: dict, out_defs: dict, tail: str):
        output_file = pathlib.Path(executor_input["outputs"]["outputFile"])
        written = json.loads(output_file.read_text()) if output_file.exists() else {}
        produced = {}
        for key, listed in executor_input["outputs"]["artifacts"].items():
            artifact = dict(listed["artifacts"][0])
            reported = written.get("artifacts", {}).get(key, {}).get("artifacts", [])
            if reported:
                artifact["metadata"] = {**artifact["metadata"], **reported[0].get("metadata", {})}
                artifact["uri"] = reported[0].get("uri") or artifact["uri"]
            artifact["path_written"] = os.path.exists(artifact["uri"])
            if artifact["type"]["schemaTitle"] not in METRICS_TYPES and not artifact["path_written"]:
                raise TaskFailed(path, f"output artifact {key} was not written at {artifact['uri']}", tail)
            produced[key] = artifact
        unknown = set(written.get("artifacts", {})) - set(produced)
        if unknown:
            raise TaskFailed(path, f"executor output names undeclared artifacts {sorted(unknown)}", tail)
        out_params = {}
        for key, spec in out_defs.get("parameters", {}).items():
            if key in written.get("parameterValues", {}):
                out_params[key] = written["parameterValues"][key]
            else:
                file = pathlib.Path(executor_input["outputs"]["parameters"][key]["outputFile"])
                if not file.exists():
                    raise TaskFailed(path, f"output parameter {key} was not written", tail)
                text = file.read_text()
                out_params[key] = text if spec["parameterType"] == "STRING" else json.loads(text)
        return produced, out_params
