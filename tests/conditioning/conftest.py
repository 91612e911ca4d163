"""Fixtures of the conditioning family's tests: real photos (the embedded seeds, made from scikit-image's
bundled images by the core family's interpreter, as the embedded pipeline makes them) and image datasets
in the schema conditioning reads (what blip_caption writes)."""
from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from cnpipe.dataset import Manifest, ShardedOutput, ShardResult
from cnpipe.families import family_python

REPO = pathlib.Path(__file__).resolve().parents[2]

# The columns conditioning reads and carries along: what blip_caption hands it (download's rows + blip_caption).
CAPTIONED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source_caption", pa.string()),
        ("origin", pa.string()),
        ("blip_caption", pa.string()),
    ]
)


def stage_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("GLOG_minloglevel", "2")
    return env


@pytest.fixture(scope="session")
def seeds_folder(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.getbasetemp() / "embedded-assets"
    if not (root / "seeds").exists():
        done = subprocess.run([family_python("core"), "-m", "cnpipe.embedded.assets", str(root)], env=stage_env(),
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.skip(f"the embedded seed photos need scikit-image (the core family's environment): {done.stderr[-800:]}")
    return root / "seeds"


@pytest.fixture(scope="session")
def astronaut(seeds_folder) -> Image.Image:
    return Image.open(seeds_folder / "astronaut.jpg").convert("RGB")


@pytest.fixture(scope="session")
def grace_hopper() -> Image.Image:
    """A portrait photo that matplotlib (a MediaPipe dependency, so in this family's environment) ships."""
    import importlib.util

    folder = pathlib.Path(importlib.util.find_spec("matplotlib").origin).parent
    return Image.open(folder / "mpl-data" / "sample_data" / "grace_hopper.jpg").convert("RGB")


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG") -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def flat(width: int = 96, height: int = 80, value: int = 128) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def write_captioned(uri: str, rows: list[dict], rows_per_shard: int) -> Manifest:
    """rows: dicts with id, image (bytes or None), source_caption, blip_caption."""
    output = ShardedOutput(uri, "blip_caption", "test", CAPTIONED_SCHEMA)
    names = []
    for start in range(0, len(rows), rows_per_shard):
        chunk = rows[start : start + rows_per_shard]
        table = pa.table(
            {
                "id": [r["id"] for r in chunk],
                "image": [r["image"] for r in chunk],
                "width": [r.get("width") for r in chunk],
                "height": [r.get("height") for r in chunk],
                "source_caption": [r.get("source_caption") for r in chunk],
                "origin": [f"test:{r['id']}" for r in chunk],
                "blip_caption": [r.get("blip_caption", "a blip caption") for r in chunk],
            },
            schema=CAPTIONED_SCHEMA,
        )
        name = f"part-{start // rows_per_shard:05d}"
        output.commit(name, ShardResult(table), table.num_rows)
        names.append(name)
    return output.finalize(names, inputs=[])


@pytest.fixture(scope="session")
def helpers():
    """Plain helpers as one namespace (no tests package to import them from)."""

    class Helpers:
        schema = CAPTIONED_SCHEMA
        env = staticmethod(stage_env)
        encode = staticmethod(encode)
        flat = staticmethod(flat)
        write_captioned = staticmethod(write_captioned)

        @staticmethod
        def argv(config_json: str, output: str, images_uri: str) -> list[str]:
            return [sys.executable, "-m", "components.conditioning", "--config-json", config_json,
                    "--input", f"images={images_uri}", "--output", output]

    return Helpers
