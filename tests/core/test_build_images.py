"""build_images.sh: the exact docker buildx commands (dry run: no Docker engine here) and the Dockerfiles' lint."""
import pathlib
import shutil
import subprocess
import sys

import pytest

import pipeline_configs
from cnpipe.kfp_images import image_ref
from components.registry import FAMILIES, STAGES

REPO = pathlib.Path(__file__).resolve().parents[2]


def build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "build_images.sh", *args], cwd=REPO, capture_output=True, text=True)


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


def test_unknown_component_lists_the_valid_ones():
    done = build("--namespace", "acme", "--repo", "ghcr.io", "-C", "segmentation", "--dry-run")
    assert done.returncode == 2
    assert "unknown component 'segmentation'" in done.stderr
    for name in list(STAGES) + ["all"]:
        assert name in done.stderr


def test_namespace_and_repo_are_required():
    done = build("--dry-run")
    assert done.returncode == 2 and "--namespace and --repo are required" in done.stderr


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
