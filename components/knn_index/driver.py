"""What `python pipeline.py index` and `python pipeline.py serve-index` do, from the driver's (core) environment:
each step runs in the interpreter of the family that has its libraries (cnpipe.families.family_python):

    index         the index family (autofaiss; its environment is made on first use, as the others are)
    serve-index   the vision family (faiss 1.15, and the CLIP text model for text queries)

For a preset with embedded assets (embedded-own-index) the index command first makes its embedding set: the
embedded pool embedded by the tiny CLIP plus distractors (components/knn_index/embedded_set.py).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from cnpipe import storage
from cnpipe.families import REPO_ROOT, family_python


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def _run(family: str, *args: str) -> int:
    return subprocess.run([family_python(family), *args], env=_env(), cwd=REPO_ROOT).returncode


def ensure_index_environment() -> None:
    """.venvs/index from envs/index.lock.txt (a no-op when it is up to date); in an image, CNPIPE_PYTHON_INDEX names it."""
    if os.environ.get("CNPIPE_PYTHON_INDEX"):
        return
    subprocess.run(["bash", str(REPO_ROOT / "scripts" / "setup_envs.sh")], check=True, cwd=REPO_ROOT,
                   env={**os.environ, "FAMILIES": "index"})


def _make_embedded_set(config) -> int:
    cfg, assets = config.index, config.embedded_assets
    print(f"index: making the embedded embedding set in {cfg.source} (the pool embedded by {config.clip_embed.model}, "
          "plus distractors)", file=sys.stderr)
    for family, args in (("core", ["-m", "cnpipe.embedded.assets", assets]),
                         ("vision", ["-m", "cnpipe.embedded.tiny_models", f"{assets}/models"]),
                         ("vision", ["-m", "components.knn_index.embedded_set", assets, config.clip_embed.model, cfg.source])):
        status = _run(family, *args)
        if status:
            return status
    return 0


def build(config, force: bool = False) -> int:
    cfg = config.index
    if not cfg.source or not cfg.output:
        print("index: set index.source (embeddings: clip-retrieval's layout or a clip_embed output) and index.output "
              "(where the index goes), e.g. --set index.source=gs://b/embeddings --set index.output=gs://b/knn-index",
              file=sys.stderr)
        return 2
    embedded = config.embedded_assets and cfg.source.startswith(config.embedded_assets)
    if embedded and not storage.exists(storage.join(cfg.source, "img_emb")):
        status = _make_embedded_set(config)
        if status:
            return status
    ensure_index_environment()
    args = ["-m", "components.knn_index.build", "--config-json", config.to_json()] + (["--force"] if force else [])
    return _run("index", *args)


def serve_command(config) -> list[str]:
    from components.knn_index.manifest import text_model

    cfg = config.index
    command = [family_python("vision"), "-m", "components.knn_index.serve",
               "--index", f"{config.retrieval.indice_name}={cfg.output}", "--host", cfg.host, "--port", str(cfg.port),
               "--threads", str(cfg.search_threads), "--local-dir", str(REPO_ROOT / ".cache" / "knn-index")]
    model = text_model(config)
    return command + (["--clip-model", model] if model else [])


def serve(config) -> int:
    """Serve in the foreground until Ctrl-C or SIGTERM (returns only when there is nothing to serve)."""
    if not config.index.output or not storage.exists(storage.join(config.index.output, "index.json")):
        print(f"serve-index: no index at {config.index.output!r} (index.json missing): build it first with "
              f"`python pipeline.py index --preset {config.name}`", file=sys.stderr)
        return 2
    command = serve_command(config)
    os.chdir(REPO_ROOT)
    os.execve(command[0], command, _env())  # this process becomes the server: Ctrl-C and SIGTERM reach it directly


def apply(config) -> int:
    from components.knn_index.manifest import render

    kubectl = shutil.which("kubectl")
    if not kubectl:
        print("serve-index --apply: kubectl is not on PATH (print the manifest with --manifest and apply it yourself)",
              file=sys.stderr)
        return 3
    return subprocess.run([kubectl, "apply", "-f", "-"], input=render(config).encode()).returncode


def compile_pipeline(config, path: str) -> None:
    """The build as a Kubeflow pipeline of its own (components/knn_index/component.py)."""
    from kfp import compiler

    from components.knn_index.component import build_pipeline

    compiler.Compiler().compile(build_pipeline(config), package_path=path)
