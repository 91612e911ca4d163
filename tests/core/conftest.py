"""Fixtures of the core family's data-half tests: image files of every awkward kind, configs, and the
stage command line exactly as the pipeline runs it (`python -m components.<stage>` in this interpreter)."""
from __future__ import annotations

import io
import os
import pathlib
import struct
import sys
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import pipeline_configs
from cnpipe import storage
from cnpipe.dataset import Manifest

REPO = pathlib.Path(__file__).resolve().parents[2]


class Images:
    """Encoded test images; every one is small except the bomb's header, which only claims to be big."""

    @staticmethod
    def rgb(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
        rng = np.random.default_rng(seed)
        base = rng.integers(0, 255, (1, 1, 3))
        gradient = np.linspace(0, 120, width)[None, :, None]
        return Image.fromarray(np.clip(base + gradient + np.zeros((height, width, 3)), 0, 255).astype(np.uint8))

    @staticmethod
    def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kwargs)
        return buffer.getvalue()

    @classmethod
    def jpeg(cls, width: int = 64, height: int = 48, seed: int = 0) -> bytes:
        return cls.encode(cls.rgb(width, height, seed), "JPEG", quality=90)

    @classmethod
    def png(cls, width: int = 64, height: int = 48, seed: int = 0) -> bytes:
        return cls.encode(cls.rgb(width, height, seed), "PNG")

    @staticmethod
    def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
        """A valid 1-bit PNG of width×height black pixels: about 50 MB raw, a few dozen KB compressed."""

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
        compressor = zlib.compressobj(9)
        full, rest = divmod(height, 500)
        idat = b"".join(compressor.compress(row * 500) for _ in range(full)) + compressor.compress(row * rest) + compressor.flush()
        header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def images() -> type[Images]:
    return Images


@pytest.fixture
def make_config():
    """A complete PipelineConfig (the embedded preset) with hub_load settings overridden."""

    def make(**hub_load) -> pipeline_configs.PipelineConfig:
        config = pipeline_configs.embedded()
        for key, value in hub_load.items():
            assert hasattr(config.hub_load, key), key
            setattr(config.hub_load, key, value)
        return pipeline_configs.from_json(config.to_json())  # through the strict parser, as the CLI does

    return make


def stage_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def stage_argv(stage: str, config_json: str, output: str, inputs: dict[str, str] | None = None) -> list[str]:
    argv = [sys.executable, "-m", f"components.{stage}", "--config-json", config_json, "--output", output]
    for name, uri in (inputs or {}).items():
        argv += ["--input", f"{name}={uri}"]
    return argv


@pytest.fixture(scope="session")
def cli():
    """(argv builder, environment) for running a stage module in a real subprocess."""
    return stage_argv, stage_env()


def all_rows(uri: str) -> pa.Table:
    """Every data row of the dataset at `uri`, in shard order."""
    manifest = Manifest.load(uri)
    tables = [table for _, table in manifest.iter_shards()]
    return pa.concat_tables(tables) if tables else manifest.arrow_schema().empty_table()


@pytest.fixture(scope="session")
def dataset_rows():
    return all_rows


@pytest.fixture(scope="session")
def leftover_temporaries():
    def find(uri: str) -> list[str]:
        return [p for p in storage.iter_files(uri) if p.rsplit("/", 1)[-1].startswith(".tmp-")]

    return find
