"""What every kfp component body calls: resolve input URIs, run the stage, publish its output URI.

Only URIs cross kfp's boundary: an output `dsl.Dataset` holds a small JSON pointer and carries the
dataset's URI and row counts in its metadata; the rows stay on the storage root.
"""
from __future__ import annotations

import json

from cnpipe import storage
from cnpipe import cli
from cnpipe.families import run_stage


def dataset_uri(artifact) -> str:
    uri = artifact.metadata.get("dataset_uri")
    if not uri:
        raise ValueError(f"input artifact {artifact.name} carries no dataset_uri")
    return uri


def run_component(stage: str, config_json: str, run_id: str, inputs: dict, output, part: int = -1, parts: int = 1) -> dict:
    """part >= 0: this task is shard group `part` of `parts` (inside a ParallelFor); the task after the
    loop runs with part = -1 and, finding every shard committed, only writes the manifest."""
    import pipeline_configs

    config = pipeline_configs.from_json(config_json)
    output_uri = storage.join(config.storage.root, run_id, stage)
    group = f"{part}/{parts}" if part >= 0 and parts > 1 else ""
    result = run_stage(stage, config_json, {k: dataset_uri(a) for k, a in inputs.items()}, output_uri, group)
    summary = {"dataset_uri": result.uri, **cli.summary(stage, result)}
    output.metadata.update(summary)
    with open(output.path, "w") as f:
        json.dump(summary, f)
    return summary
