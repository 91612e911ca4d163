"""Command line every stage module shares: `python -m components.<stage> --config-json ... --input name=uri --output uri`.

This is what the kfp component runs in the stage's family interpreter, locally and in its image.
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
from typing import Callable

from cnpipe.dataset import ContractError, Manifest, StageOutput, load_output

_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config-json", help="the whole PipelineConfig as JSON")
    source.add_argument("--config-file", help="a file holding that JSON")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=URI")
    parser.add_argument("--output", required=True, metavar="URI")
    parser.add_argument("--part", metavar="I/N", help="process shard group I of N only (a fanned-out task); no manifest")
    return parser.parse_args(argv)


def summary(stage: str, result: "Manifest | StageOutput | dict") -> dict:
    """A row dataset reports its accounting; other stages (conditioning, train, evaluate) their own summary."""
    if isinstance(result, StageOutput):
        return {"stage": stage, "uri": result.uri, **result.summary}
    if not isinstance(result, Manifest):
        return {"stage": stage, **result}
    return {
        "stage": stage,
        "uri": result.uri,
        "rows_in": result.rows_in,
        "rows_out": result.rows_out,
        "rows_rejected": result.rows_rejected,
        "rejections": result.rejections,
    }


def main(stage: str, run: Callable[..., "Manifest | dict"], argv: list[str] | None = None) -> int:
    import pipeline_configs

    args = parse(argv)
    text = args.config_json if args.config_json else open(args.config_file).read()
    try:
        config = pipeline_configs.from_json(text)
    except pipeline_configs.ConfigError as err:
        print(f"{stage}: bad config: {err}", file=sys.stderr)
        return 2
    if config.allow_pickle_weights:  # read by cnpipe.torch_models in this process and its children
        import os

        from cnpipe.torch_models import ALLOW_PICKLE_ENV

        os.environ[ALLOW_PICKLE_ENV] = "1"
    if args.part:
        from cnpipe import stage as stage_loop

        index, _, count = args.part.partition("/")
        stage_loop.set_part(int(index), int(count))
    inputs = {}
    for item in args.input:
        name, _, uri = item.partition("=")
        inputs[name] = load_output(uri)
    try:
        result = run(config, inputs, args.output)
    except OSError as err:
        if err.errno in _UNWRITABLE:
            print(f"{stage}: cannot write its output under {args.output}: {err.strerror} ({err.filename or 'storage'}); "
                  "committed shards are intact, rerun once the location is writable", file=sys.stderr)
            return 3
        if type(err).__name__ == "PickleWeightsRefused":
            print(f"{stage}: {err}", file=sys.stderr)
            return 2
        raise
    except (pipeline_configs.ConfigError, ContractError) as err:
        print(f"{stage}: {err}", file=sys.stderr)
        return 2
    if isinstance(result, dict):  # not a row dataset: its summary marks the output finished (load_output)
        from cnpipe import storage

        storage.write_json_atomic(storage.join(args.output, "summary.json"), result)
    print(json.dumps(summary(stage, result)))
    return 0
