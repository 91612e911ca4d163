"""conditioning_merge: when the configured conditioning types span image families, each family's task
writes its own types' datasets and a groups/<family>.json; this writes the summary.json that lists them
all, which is what makes the conditioning output complete (cnpipe.dataset.load_output)."""
import sys

from cnpipe import storage
from components.registry import conditioning_groups

STAGE = "conditioning_merge"


def run(config, inputs: dict, output_uri: str) -> dict:
    groups = conditioning_groups(config.conditioning.types)
    types: dict = {}
    for family in groups:
        path = storage.join(output_uri, "groups", f"{family}.json")
        if not storage.exists(path):
            raise RuntimeError(f"conditioning for the {family!r} family has not finished: {path} is missing")
        types.update(storage.read_json(path)["types"])
    return {"uri": output_uri, "types": {name: types[name] for name in config.conditioning.types}}


if __name__ == "__main__":
    from cnpipe.cli import main

    sys.exit(main(STAGE, run))
