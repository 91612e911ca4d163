"""A Hugging Face dataset chooses the `path` of each image struct that holds no bytes: hub_load must not let a
published dataset pull local files (a service-account token) or URLs into our shards. Such paths are refused
unless hub_load.allow_local_paths is set, and then only real files inside the dataset's own local folder are read,
never more than hub_load.max_file_bytes of them."""
from __future__ import annotations

import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.hub_load.stage import run

datasets = pytest.importorskip("datasets")


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def write_dataset(root, rows: list[dict]) -> None:
    """A parquet file as the hub serves it: an Image feature (in the schema's metadata) of {bytes, path} structs."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"), "key": datasets.Value("string")})
    columns = {name: [row[name] for row in rows] for name in ("image", "text", "key")}
    pq.write_table(pa.table(columns, schema=features.arrow_schema), root / "data" / "train-00000-of-00001.parquet")


@pytest.fixture
def hostile_dataset(tmp_path, images, offline_hf):
    """A local parquet dataset whose rows point at files and URLs instead of holding image bytes."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "token.png").write_bytes(images.png(seed=7))  # stands for a credential: decodable, so it would be kept
    memory = fsspec.filesystem("memory")
    memory.pipe("/internal/secret.png", images.png(seed=8))  # an "internal URL" fsspec can read without a network
    root = tmp_path / "hf-dataset"
    (root / "images").mkdir(parents=True)
    (root / "images" / "inside.png").write_bytes(images.png(seed=1))
    (root / "images" / "huge.png").write_bytes(images.png(seed=2) + b"\0" * 5000)
    os.symlink(outside / "token.png", root / "images" / "link.png")
    os.mkfifo(root / "images" / "pipe.png")
    os.symlink(root / "images", root / "images" / "dir.png")
    path_rows = {
        "bytes": {"bytes": images.png(seed=3), "path": None},
        "absolute": {"bytes": None, "path": str(outside / "token.png")},
        "dotdot": {"bytes": None, "path": "images/../../outside/token.png"},
        "link": {"bytes": None, "path": "images/link.png"},
        "memory": {"bytes": None, "path": "memory://internal/secret.png"},
        "file_url": {"bytes": None, "path": f"file://{outside / 'token.png'}"},
        "chained": {"bytes": None, "path": f"simplecache::file://{outside / 'token.png'}"},
        "inside": {"bytes": None, "path": "images/inside.png"},
        "inside_abs": {"bytes": None, "path": str(root / "images" / "inside.png")},
        "huge": {"bytes": None, "path": "images/huge.png"},
        "fifo": {"bytes": None, "path": "images/pipe.png"},
        "dir": {"bytes": None, "path": "images/dir.png"},
    }
    write_dataset(root, [{"image": image, "text": key, "key": key} for key, image in path_rows.items()])
    yield root
    memory.rm("/internal", recursive=True)


def outcome(manifest) -> dict[str, str]:
    return {r["id"]: r["reason"] for r in manifest.rejected_table().to_pylist()}


def test_a_published_dataset_cannot_pull_a_local_file_or_an_internal_url_into_the_shards(tmp_path, images, offline_hf,
                                                                                        make_config, dataset_rows):
    (tmp_path / "token.png").write_bytes(images.png(seed=7))
    memory = fsspec.filesystem("memory")
    memory.pipe("/internal/secret.png", images.png(seed=8))
    root = tmp_path / "published"
    write_dataset(root, [
        {"image": {"bytes": images.png(seed=1), "path": None}, "text": "ok", "key": "own"},
        {"image": {"bytes": None, "path": str(tmp_path / "token.png")}, "text": "x", "key": "local_file"},
        {"image": {"bytes": None, "path": "memory://internal/secret.png"}, "text": "x", "key": "internal_url"},
    ])
    try:
        manifest = run(make_config(kind="hf", source=str(root), id_column="key"), {}, str(tmp_path / "out"))
    finally:
        memory.rm("/internal", recursive=True)
    assert dataset_rows(str(tmp_path / "out")).column("id").to_pylist() == ["own"]
    assert outcome(manifest) == {"local_file": "image_path_refused", "internal_url": "image_path_refused"}
    assert manifest.rejections == {"image_path_refused": 2}


def test_a_dataset_cannot_make_hub_load_read_files_or_urls_by_default(tmp_path, hostile_dataset, make_config, dataset_rows):
    config = make_config(kind="hf", source=str(hostile_dataset), id_column="key", streaming=True)
    manifest = run(config, {}, str(tmp_path / "out"))
    rows = dataset_rows(str(tmp_path / "out"))
    assert rows.column("id").to_pylist() == ["bytes"]  # only the row that holds its image
    assert manifest.rows_in == manifest.rows_out + manifest.rows_rejected == 12
    assert set(outcome(manifest).values()) == {"image_path_refused"}
    details = [r["detail"] for r in manifest.rejected_table().to_pylist()]
    assert all("allow_local_paths is false" in d for d in details), details


def test_allowed_local_paths_stay_inside_the_dataset_folder_and_under_the_cap(tmp_path, hostile_dataset, make_config, dataset_rows):
    cap = len((hostile_dataset / "images" / "huge.png").read_bytes()) - 1
    config = make_config(kind="hf", source=str(hostile_dataset), id_column="key", allow_local_paths=True, max_file_bytes=cap)
    manifest = run(config, {}, str(tmp_path / "out"))
    rows = dataset_rows(str(tmp_path / "out"))
    assert sorted(rows.column("id").to_pylist()) == ["bytes", "inside", "inside_abs"]
    assert manifest.rows_in == manifest.rows_out + manifest.rows_rejected == 12
    assert outcome(manifest) == {
        "absolute": "outside_source", "dotdot": "outside_source", "link": "outside_source",
        "memory": "image_path_refused", "file_url": "image_path_refused", "chained": "image_path_refused",
        "huge": "file_too_large", "fifo": "not_a_regular_file", "dir": "not_a_regular_file",
    }
    details = {r["id"]: r["detail"] for r in manifest.rejected_table().to_pylist()}
    assert "is a URL" in details["memory"] and "outside the source root" in details["link"]
    assert "a FIFO" in details["fifo"] and f"max_file_bytes = {cap}" in details["huge"]


def test_stored_bytes_are_capped_too(tmp_path, images, offline_hf, make_config, dataset_rows):
    root = tmp_path / "hf-bytes"
    small, large = images.png(seed=1), images.png(seed=2) + b"\0" * 4000
    write_dataset(root, [{"image": {"bytes": small, "path": None}, "text": "s", "key": "small"},
                         {"image": {"bytes": large, "path": None}, "text": "l", "key": "large"}])
    manifest = run(make_config(kind="hf", source=str(root), id_column="key", max_file_bytes=len(small)), {}, str(tmp_path / "out"))
    assert dataset_rows(str(tmp_path / "out")).column("id").to_pylist() == ["small"]
    assert outcome(manifest) == {"large": "file_too_large"}


def test_the_revision_reaches_datasets(tmp_path, images, offline_hf, make_config, monkeypatch):
    """hub_load.revision pins the dataset's commit: it must reach `datasets` (a local folder ignores it)."""
    import datasets.load

    root = tmp_path / "hf-rev"
    write_dataset(root, [{"image": {"bytes": images.png(seed=1), "path": None}, "text": "t", "key": "k"}])
    seen = []
    real = datasets.load.load_dataset_builder

    def spy(*args, **kwargs):
        seen.append(kwargs.get("revision"))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets.load, "load_dataset_builder", spy)
    monkeypatch.setattr(datasets, "load_dataset_builder", spy)
    manifest = run(make_config(kind="hf", source=str(root), id_column="key", revision="v1.0"), {}, str(tmp_path / "out"))
    assert manifest.rows_out == 1
    assert seen and set(seen) == {"v1.0"}
