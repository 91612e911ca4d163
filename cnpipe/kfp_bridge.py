"""What every kfp component body calls: resolve input URIs, run the stage, publish its output URI.

Only URIs cross kfp's boundary: an output `dsl.Dataset` holds a small JSON pointer and carries the
dataset's URI and row counts in its metadata; the rows stay on the storage root.
"""
from __future__ import annotations

import json

from cnpipe import storage
from cnpipe import cli
from cnpipe.dataset import StageOutput, load_output
from cnpipe.families import run_stage
from components.registry import STAGES


def dataset_uri(artifact) -> str:
    uri = artifact.metadata.get("dataset_uri")
    if not uri:
        raise ValueError(f"input artifact {artifact.name} carries no dataset_uri")
    return uri


def _pod_namespace() -> str:
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "kubeflow"


def run_multihost_training(config, run_id: str, encoded_uri: str, output_uri: str):
    """Train on `train.num_processes` hosts: a JobSet does the work, this task waits for it."""
    from cnpipe import multihost
    from cnpipe.dataset import load_output

    body = multihost.manifest(config, run_id, encoded_uri, output_uri, _pod_namespace())
    ended = multihost.launch_and_wait(body)
    print(f"JobSet {ended['jobset']}: {ended['state']}")
    return load_output(output_uri)


def finished_output(stage: str, config, input_uris: dict, output_uri: str) -> StageOutput | None:
    """A stage finished earlier with these settings and inputs (cli.finished): returned without starting its
    family's interpreter, let alone its models or a JobSet."""
    if stage not in cli.REUSED_WHEN_FINISHED:
        return None
    done = cli.finished(stage, config, {k: load_output(u) for k, u in input_uris.items()}, output_uri)
    if done is None:
        return None
    print(f"{stage}: already finished at {output_uri} with these settings and inputs; not run again")
    return StageOutput(output_uri, done)


def run_component(stage: str, config_json: str, run_id: str, inputs: dict, output, part: int = -1, parts: int = 1,
                  family: str = "") -> dict:
    """part >= 0: this task is shard group `part` of `parts` (inside a ParallelFor); the task after the
    loop runs with part = -1 and, finding every shard committed, only writes the manifest."""
    import pipeline_configs

    config = pipeline_configs.from_json(config_json)
    output_uri = storage.join(config.storage.root, run_id, STAGES[stage].output_dir or stage)
    group = f"{part}/{parts}" if part >= 0 and parts > 1 else ""
    input_uris = {k: dataset_uri(a) for k, a in inputs.items()}
    result = finished_output(stage, config, input_uris, output_uri) if part < 0 else None
    if result is None and stage == "controlnet_train" and config.train.num_processes > 1:
        result = run_multihost_training(config, run_id, input_uris["encoded"], output_uri)
    elif result is None:
        result = run_stage(stage, config_json, input_uris, output_uri, group, family)
    summary = {"dataset_uri": result.uri, **cli.summary(stage, result)}
    output.metadata.update(summary)
    with open(output.path, "w") as f:
        json.dump(summary, f)
    return summary
