"""Command line every stage module shares: `python -m components.<stage> --config-json ... --input name=uri --output uri`.

This is what the kfp component runs in the stage's family interpreter, locally and in its image.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import signal
import sys
import threading
from typing import Any, Callable

from cnpipe import storage
from cnpipe.dataset import ContractError, Manifest, StageOutput, load_output

_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}

# Stages whose output is a summary.json (no shards to resume by) and the config sections that shape it. Their summary
# records a hash of those sections and of their inputs, so a rerun that finds the same hash returns it at once
# instead of compiling and training, or sampling, again. Conditioning resumes shard by shard itself.
REUSED_WHEN_FINISHED = {
    "controlnet_train": ("train", "base_model"),
    "evaluate": ("evaluate", "encode", "conditioning", "base_model"),
}


def input_identity(item: "Manifest | StageOutput") -> Any:
    """What an input's content is known by: a dataset's config hash and shards (not created_at, which a resumed
    stage rewrites), a summary stage's own finished hash, else its whole summary."""
    if isinstance(item, Manifest):
        return [item.config_hash, item.shards, item.rows_in, item.rows_out, item.rows_rejected]
    return item.summary.get("config_hash") or item.summary


def finished_hash(stage: str, config, inputs: dict) -> str:
    parts = {"sections": {name: config.section_hash(name) for name in REUSED_WHEN_FINISHED[stage]},
             "inputs": {name: input_identity(item) for name, item in sorted(inputs.items())}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished(stage: str, config, inputs: dict, output_uri: str) -> dict | None:
    """The summary a finished run of this stage with these settings and inputs left at `output_uri`, or None."""
    if stage not in REUSED_WHEN_FINISHED:
        return None
    path = storage.join(output_uri, "summary.json")
    if not storage.exists(path):
        return None
    summary = storage.read_json(path)
    return summary if summary.get("config_hash") == finished_hash(stage, config, inputs) else None


def _forget_finished(output_uri: str) -> None:
    """A stage about to redo its output: the old summary no longer describes what is there."""
    fs, path = storage.filesystem(storage.join(output_uri, "summary.json"))
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


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


class Interrupted(BaseException):
    """SIGINT or SIGTERM: unwinds the stage like an exception, so that its workers and temporaries are cleaned up."""


def _interrupt(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def main(stage: str, run: Callable[..., "Manifest | dict"], argv: list[str] | None = None) -> int:
    import pipeline_configs

    main_thread = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        return _main(stage, run, argv)
    except Interrupted as sig:
        print(f"{stage}: stopped by {sig}; its committed shards are kept, and the same command resumes after them",
              file=sys.stderr)
        return 130
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _main(stage: str, run: Callable[..., "Manifest | dict"], argv: list[str] | None) -> int:
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
    done = finished(stage, config, inputs, args.output)
    if done is not None:
        print(f"{stage}: already finished at {args.output} with these settings and inputs; not run again", file=sys.stderr)
        print(json.dumps(summary(stage, done)))
        return 0
    if stage in REUSED_WHEN_FINISHED:
        _forget_finished(args.output)
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
        if stage in REUSED_WHEN_FINISHED:
            result = {**result, "config_hash": finished_hash(stage, config, inputs)}
        storage.write_json_atomic(storage.join(args.output, "summary.json"), result)
    print(json.dumps(summary(stage, result)))
    return 0
