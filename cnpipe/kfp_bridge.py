"""What every kfp component body calls: resolve input URIs, run the stage, publish its output URI.

Only URIs cross kfp's boundary: an output `dsl.Dataset` holds a small JSON pointer and carries the
dataset's URI and row counts in its metadata; the rows stay on the storage root.

It takes the stage's spec (components.registry.StageSpec) rather than importing components/, which sit above this
library: a component's body calls components.registry.run_component, which looks the spec up.
"""
from __future__ import annotations

import importlib
import json

from cnpipe import storage
from cnpipe import cli
from cnpipe.dataset import StageOutput, load_output
from cnpipe.families import run_stage


def dataset_uri(artifact) -> str:
    uri = artifact.metadata.get("dataset_uri")
    if not uri:
        raise ValueError(f"input artifact {artifact.name} carries no dataset_uri")
    return uri


def _launcher(spec):
    """The stage's own way to run this task elsewhere (spec.launcher, "module:function"), if it has one."""
    if not getattr(spec, "launcher", ""):
        return None
    module, _, function = spec.launcher.partition(":")
    return getattr(importlib.import_module(module), function)


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


def run_component(spec, config_json: str, run_id: str, inputs: dict, output, part: int = -1, parts: int = 1,
                  family: str = "") -> dict:
    """part >= 0: this task is shard group `part` of `parts` (inside a ParallelFor); the task after the
    loop runs with part = -1 and, finding every shard committed, only writes the manifest. A stage with a
    launcher (multi-host training's JobSet) may run the task elsewhere: it returns None when it does not."""
    import pipeline_configs

    stage = spec.name
    config = pipeline_configs.from_json(config_json)
    output_uri = storage.join(config.storage.root, run_id, spec.output_dir or stage)
    group = f"{part}/{parts}" if part >= 0 and parts > 1 else ""
    input_uris = {k: dataset_uri(a) for k, a in inputs.items()}
    result = finished_output(stage, config, input_uris, output_uri) if part < 0 else None
    launch = _launcher(spec) if result is None else None
    if launch is not None:
        result = launch(config, run_id, input_uris, output_uri)
    if result is None:
        result = run_stage(spec, config_json, input_uris, output_uri, group, family)
    summary = {"dataset_uri": result.uri, **cli.summary(stage, result)}
    output.metadata.update(summary)
    with open(output.path, "w") as f:
        json.dump(summary, f)
    return summary
