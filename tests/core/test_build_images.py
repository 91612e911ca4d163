"""build_images.sh: the exact docker buildx commands (dry run, or a fake docker on PATH: no Docker engine here), what it
says when docker or buildx is missing, and the Dockerfiles' lint."""
import pathlib
import shutil
import subprocess
import sys

import pytest

import pipeline_configs
from cnpipe.kfp_images import image_ref
from components.registry import FAMILIES, STAGES

REPO = pathlib.Path(__file__).resolve().parents[2]


def build(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = None if path is None else {"PATH": path, "HOME": str(REPO)}
    return subprocess.run([shutil.which("bash"), "build_images.sh", *args], cwd=REPO, capture_output=True, text=True, env=env)


def tools(tmp_path: pathlib.Path, docker: str | None = None) -> str:
    """A PATH holding only what build_images.sh needs besides docker, plus a fake docker (a bash script) when given:
    it logs every call to docker.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "sed", "awk", "sort", "tr"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "python3").symlink_to(sys.executable)
    if docker is not None:
        (bin_dir / "docker").write_text(f"#!{shutil.which('bash')}\necho \"docker $*\" >> {tmp_path / 'docker.log'}\n{docker}\n")
        (bin_dir / "docker").chmod(0o755)
    return str(bin_dir)


NO_BUILDX = '[ "$1" = buildx ] && { echo "docker: unknown command: docker buildx" >&2; exit 1; }; exit 0'


def docker_calls(tmp_path: pathlib.Path) -> list[str]:
    log = tmp_path / "docker.log"
    return log.read_text().splitlines() if log.exists() else []


def test_dry_run_of_every_family_prints_commands_and_the_images_the_pipeline_uses():
    done = build("--namespace", "acme", "--repo", "eu.gcr.io/proj", "--tag", "1.2.3", "--dry-run")
    assert done.returncode == 0, done.stderr
    commands = [l for l in done.stdout.splitlines() if l.startswith("docker buildx build")]
    built = [l.split("image: ")[1] for l in done.stdout.splitlines() if l.startswith("image: ")]
    assert len(commands) == len(built) == len(FAMILIES) + 1  # train in two variants
    images = pipeline_configs.ImagesConfig(registry="eu.gcr.io/proj", namespace="acme", tag="1.2.3")
    expected = {image_ref(images, f) for f in FAMILIES if f != "train"}
    expected |= {f"eu.gcr.io/proj/acme/controlnet-train-{v}:1.2.3" for v in ("cuda12", "tpu")}
    assert set(built) == expected
    assert image_ref(images, "train") in built  # the default variant is one that gets built
    for command in commands:
        assert "--load" in command and "--push" not in command
        family = command.split("images/")[1].split("/Dockerfile")[0]
        assert (REPO / "images" / family / "Dockerfile").exists()
    assert any("--build-arg JAX_VARIANT=tpu" in c for c in commands)


def test_one_component_builds_its_family_and_push_pushes():
    done = build("--namespace", "acme", "--repo", "ghcr.io", "-C", "blip_caption", "--push", "--dry-run")
    assert done.returncode == 0, done.stderr
    (command,) = [l for l in done.stdout.splitlines() if l.startswith("docker")]
    assert "-f images/vision/Dockerfile" in command and "-t ghcr.io/acme/controlnet-vision:0.1.0" in command
    assert command.rstrip().endswith("--push .")


@pytest.mark.parametrize("args", [["-C", "segmentation"], ["-C", "segmentation", "--dry-run"]])
def test_unknown_component_lists_the_valid_ones_without_namespace_or_repo(tmp_path, args):
    done = build(*args, path=tools(tmp_path, docker="exit 0"))
    assert done.returncode == 2
    assert "unknown component 'segmentation'" in done.stderr
    for name in list(STAGES) + ["all"]:
        assert name in done.stderr


def test_dry_run_needs_neither_docker_nor_namespace_and_repo(tmp_path):
    done = build("-C", "blip_caption", "--dry-run", path=tools(tmp_path))
    assert done.returncode == 0, done.stderr
    (command,) = [l for l in done.stdout.splitlines() if l.startswith("docker")]
    assert "-t REPO/NS/controlnet-vision:0.1.0" in command
    assert "REPO and NS stand for them" in done.stderr


def test_without_docker_it_says_so_and_how_to_get_it(tmp_path):
    done = build("--namespace", "acme", "--repo", "ghcr.io", "-C", "core", path=tools(tmp_path))
    assert done.returncode == 3
    assert "docker is not installed" in done.stderr and "https://docs.docker.com/engine/install/" in done.stderr


def test_without_buildx_it_says_so_before_any_build(tmp_path):
    done = build("--namespace", "acme", "--repo", "ghcr.io", "-C", "core", path=tools(tmp_path, docker=NO_BUILDX))
    assert done.returncode == 3
    assert "no buildx plugin" in done.stderr and "docker-buildx-plugin" in done.stderr
    assert "unknown flag" not in done.stderr and "unknown command" not in done.stderr
    assert docker_calls(tmp_path) == ["docker buildx version"]


def test_with_buildx_it_builds(tmp_path):
    done = build("--namespace", "acme", "--repo", "ghcr.io", "-C", "core", path=tools(tmp_path, docker="exit 0"))
    assert done.returncode == 0, done.stderr
    calls = docker_calls(tmp_path)
    assert calls[0] == "docker buildx version" and len(calls) == 2
    assert calls[1].startswith("docker buildx build --platform linux/amd64 -f images/core/Dockerfile -t ghcr.io/acme/controlnet-core:0.1.0")


def test_namespace_and_repo_are_required_for_a_real_build(tmp_path):
    done = build("-C", "core", path=tools(tmp_path, docker="exit 0"))
    assert done.returncode == 2 and "--namespace and --repo are required" in done.stderr
    assert [c for c in docker_calls(tmp_path) if "build " in c] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_dockerfile_is_lint_clean_non_root_and_installs_its_lock(family):
    dockerfile = REPO / "images" / family / "Dockerfile"
    hadolint = shutil.which("hadolint") or str(pathlib.Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, "--failure-threshold", "warning", str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    text = dockerfile.read_text()
    assert f"envs/{family}.lock.txt" in text
    assert text.strip().splitlines()[-1].startswith("USER ") and "USER 10001" in text
    assert text.count("FROM ") >= 2  # multi-stage: build tools stay out of the final image
    if family != "core":
        assert "envs/runner.lock.txt" in text and f"CNPIPE_PYTHON_{family.upper()}=/opt/family/bin/python" in text
