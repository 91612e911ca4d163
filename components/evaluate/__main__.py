"""Stage 9, evaluate: `python -m components.evaluate --config-json ... --input trained=<train output uri>
--input conditioning=<uri>/<type> --output <uri>`.

`trained` is a folder of models, not a row dataset (it has no manifest.json), so it is passed on as its
URI; every other input is loaded as a Manifest, as cnpipe.cli.main does.
"""
import json
import sys

import pipeline_configs
from cnpipe.cli import parse, summary
from cnpipe.dataset import Manifest
from components.evaluate.stage import run


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    text = args.config_json if args.config_json else open(args.config_file).read()
    try:
        config = pipeline_configs.from_json(text)
    except pipeline_configs.ConfigError as err:
        print(f"evaluate: bad config: {err}", file=sys.stderr)
        return 2
    inputs = {}
    for item in args.input:
        name, _, uri = item.partition("=")
        inputs[name] = uri if name == "trained" else Manifest.load(uri)
    print(json.dumps(summary("evaluate", run(config, inputs, args.output))))
    return 0


sys.exit(main())
