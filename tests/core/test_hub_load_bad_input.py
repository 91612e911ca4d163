"""hub_load against the inputs real folders, tables and Hugging Face datasets hold: every unusable row is
rejected with its reason, awkward-but-usable ones become clean RGB rows, caption problems are notes,
and rows in = rows out + rows rejected."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cnpipe import images as cn_images
from cnpipe.dataset import Manifest
from cnpipe.ids import stable_id
from components.hub_load.stage import SEED_SCHEMA, run


def decode(blob: bytes) -> Image.Image:
    return cn_images.decode_rgb(blob)


def check_accounting(manifest: Manifest, rows: pa.Table) -> None:
    rejected = manifest.rejected_table()
    assert manifest.rows_in == manifest.rows_out + manifest.rows_rejected
    assert rows.num_rows == manifest.rows_out == sum(s["rows"] for s in manifest.shards)
    assert rejected.num_rows == manifest.rows_rejected == sum(manifest.rejections.values())
    assert set(rejected.column("stage").to_pylist()) <= {"hub_load"}
    assert len(set(rows.column("id").to_pylist())) == rows.num_rows
    assert manifest.arrow_schema() == SEED_SCHEMA


@pytest.fixture
def bad_folder(tmp_path, images):
    folder = tmp_path / "seeds"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    noise_png = images.encode(noise, "PNG")
    sixteen = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    rgba = np.zeros((32, 64, 4), np.uint8)
    rgba[:, 32:] = (10, 20, 30, 255)  # left half fully transparent, right half opaque
    files = {
        "good_a.jpg": images.jpeg(seed=1),
        "good_a.txt": "a   warm\ngradient ".encode(),
        "sub/good_b.png": images.png(seed=2),
        "good_c.jpg": images.jpeg(seed=3),
        "good_c.txt": b"   \n\t ",  # empty caption: a note, the image stays
        "good_d.jpg": images.jpeg(seed=4),
        "good_d.txt": b"caf\xe9 \xff\xfe",  # not UTF-8: a note, the image stays
        "cmyk.jpg": images.encode(images.rgb(seed=5).convert("CMYK"), "JPEG"),
        "sixteen.png": images.encode(Image.fromarray(sixteen), "PNG"),
        "rgba.png": images.encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(64),
        "truncated.png": noise_png[: len(noise_png) // 2],
        "one.png": images.png(1, 1),
        "bomb.png": images.bomb_png(20000, 20000),
        "big.png": images.png(250, 200),
        "page.jpg": b"<!doctype html><html><body>404 Not Found</body></html>",
        "README.md": b"not an image file name: not a row",
        "orphan.txt": b"a caption without an image",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


EXPECTED_REJECTIONS = {
    "corrupt.jpg": "corrupt_image",
    "truncated.png": "truncated_image",
    "one.png": "too_small",
    "bomb.png": "decompression_bomb",
    "big.png": "decompression_bomb",  # 50,000 pixels > hub_load.max_image_pixels = 40,000
    "page.jpg": "not_an_image",
}
KEPT = ["cmyk.jpg", "good_a.jpg", "good_c.jpg", "good_d.jpg", "rgba.png", "sixteen.png", "sub/good_b.png"]


def test_folder_bad_input_matrix(tmp_path, bad_folder, make_config, dataset_rows):
    config = make_config(kind="folder", source=str(bad_folder), rows_per_shard=4, max_image_pixels=40_000, encode_format="png")
    manifest = run(config, {}, str(tmp_path / "out"))
    rows = dataset_rows(str(tmp_path / "out"))
    check_accounting(manifest, rows)
    assert manifest.rows_in == len(KEPT) + len(EXPECTED_REJECTIONS) == 13  # README.md and orphan.txt are not rows
    assert len(manifest.shards) == 4

    rejected = {r["id"]: r for r in manifest.rejected_table().to_pylist()}
    assert {name: rejected[stable_id("folder", name)]["reason"] for name in EXPECTED_REJECTIONS} == EXPECTED_REJECTIONS
    assert all(r["detail"].startswith("folder:") for r in rejected.values())
    assert "40000" in rejected[stable_id("folder", "big.png")]["detail"] or "80000" in rejected[stable_id("folder", "big.png")]["detail"]
    assert manifest.rejections == {"corrupt_image": 1, "decompression_bomb": 2, "not_an_image": 1, "too_small": 1, "truncated_image": 1}
    # every conversion kept is counted by kind, as the README says
    assert manifest.notes == {"caption_not_utf8": 1, "empty_caption": 1, "composited_alpha": 1, "converted_16bit": 1,
                              "converted_cmyk": 1}

    by_origin = {r["origin"]: r for r in rows.to_pylist()}
    assert sorted(o.removeprefix("folder:") for o in by_origin) == KEPT
    for origin, row in by_origin.items():
        assert row["id"] == stable_id("folder", origin.removeprefix("folder:"))
        image = Image.open(io.BytesIO(row["image"]))
        assert image.format == "PNG" and image.mode == "RGB"
        assert (row["width"], row["height"]) == image.size
        assert row["url"] is None
    assert by_origin["folder:good_a.jpg"]["source_caption"] == "a warm gradient"  # whitespace normalised
    for name in ("good_c.jpg", "good_d.jpg", "sub/good_b.png"):
        assert by_origin[f"folder:{name}"]["source_caption"] is None

    gray = np.asarray(decode(by_origin["folder:sixteen.png"]["image"]))
    assert gray.shape == (32, 64, 3)
    assert gray[0, 0].tolist() == [0, 0, 0] and gray[0, -1].tolist() == [255, 255, 255]
    assert 120 <= gray[0, 32, 0] <= 136  # scaled from 16 bits, not clipped to white
    assert np.all(np.diff(gray[0, :, 0].astype(int)) >= 0)
    composited = np.asarray(decode(by_origin["folder:rgba.png"]["image"]))
    assert composited[:, :32].reshape(-1, 3).tolist() == [[255, 255, 255]] * 32 * 32  # transparent -> white
    assert composited[:, 32:].reshape(-1, 3).tolist() == [[10, 20, 30]] * 32 * 32
    cmyk = np.asarray(decode(by_origin["folder:cmyk.jpg"]["image"])).astype(int)
    original = np.asarray(cn_images.to_rgb(Image.open(bad_folder / "cmyk.jpg"))).astype(int)
    assert cmyk.shape == (48, 64, 3) and np.abs(cmyk - original).max() <= 2


def test_max_image_pixels_and_max_side_are_the_configs(tmp_path, images, make_config, dataset_rows):
    folder = tmp_path / "seeds"
    folder.mkdir()
    (folder / "big.png").write_bytes(images.png(250, 200))
    (folder / "bomb.png").write_bytes(images.bomb_png(20000, 20000))
    manifest = run(make_config(source=str(folder), max_image_side=100), {}, str(tmp_path / "out"))
    (row,) = dataset_rows(str(tmp_path / "out")).to_pylist()
    assert row["origin"] == "folder:big.png"  # accepted under the default pixel limit ...
    assert (row["width"], row["height"]) == (100, 80)  # ... and downscaled to max_image_side
    assert decode(row["image"]).size == (100, 80)
    assert manifest.rejections == {"decompression_bomb": 1}  # 400 million pixels stay refused


def test_missing_folder_is_a_clear_error(tmp_path, make_config):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(make_config(source=str(tmp_path / "nope")), {}, str(tmp_path / "out"))


def test_parquet_table_of_urls_with_an_id_column(tmp_path, make_config, dataset_rows):
    table = pa.table({
        "url": ["http://example.com/1.jpg", "http://example.com/2.jpg", "", "http://example.com/4.jpg", None],
        "text": ["one", None, "no url", "second k1", "null url"],
        "key": ["k1", "k2", "k3", "k1", "k5"],
    })
    pq.write_table(table, tmp_path / "urls.parquet")
    config = make_config(kind="table", source=str(tmp_path / "urls.parquet"), id_column="key", rows_per_shard=2)
    manifest = run(config, {}, str(tmp_path / "out"))
    rows = dataset_rows(str(tmp_path / "out"))
    check_accounting(manifest, rows)
    assert rows.column("id").to_pylist() == ["k1", "k2"]
    assert rows.column("url").to_pylist() == ["http://example.com/1.jpg", "http://example.com/2.jpg"]
    assert rows.column("source_caption").to_pylist() == ["one", None]
    assert rows.column("image").to_pylist() == [None, None]  # downloaded later, by the download stage
    rejected = manifest.rejected_table().to_pylist()
    assert [(r["stage"], r["id"], r["reason"]) for r in rejected] == [
        ("hub_load", "k3", "missing_image"), ("hub_load", "k1", "duplicate_id"), ("hub_load", "k5", "missing_image"),
    ]
    assert rejected[1]["detail"] == "table:3"  # a duplicate across shards is still found
    assert manifest.rows_in == 5


def test_csv_table_with_bad_captions_and_derived_ids(tmp_path, make_config, dataset_rows):
    (tmp_path / "urls.csv").write_bytes(
        b"url,text\n"
        b"http://example.com/a.jpg,a cat\n"
        b"http://example.com/a.jpg,same url again\n"
        b"http://example.com/b.jpg,caf\xe9\n"
        b"http://example.com/c.jpg,\"   \"\n"
    )
    config = make_config(kind="table", source=str(tmp_path / "urls.csv"))
    manifest = run(config, {}, str(tmp_path / "out"))
    rows = dataset_rows(str(tmp_path / "out"))
    check_accounting(manifest, rows)
    assert manifest.rows_rejected == 0 and rows.num_rows == 4
    assert rows.column("source_caption").to_pylist() == ["a cat", "same url again", None, None]
    assert manifest.notes == {"caption_not_utf8": 1, "empty_caption": 1}
    ids = rows.column("id").to_pylist()
    assert ids[0] == stable_id("url", "http://example.com/a.jpg", 0) and len(set(ids)) == 4


def test_table_without_the_url_column_is_a_clear_error(tmp_path, make_config):
    pq.write_table(pa.table({"link": ["http://example.com/1.jpg"]}), tmp_path / "urls.parquet")
    with pytest.raises(ValueError, match="no URL column 'url'"):
        run(make_config(kind="table", source=str(tmp_path / "urls.parquet")), {}, str(tmp_path / "out"))


def test_hugging_face_datasets_from_local_files(tmp_path, images, make_config, dataset_rows, monkeypatch):
    """`datasets.load_dataset` on local files: a parquet dataset with an Image feature (bytes inside, streamed)
    and an imagefolder (paths, prepared into a cache, read with hub_load.allow_local_paths). No network: the hub
    is switched off."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")

    parquet_root = tmp_path / "hf-parquet"
    (parquet_root / "data").mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"), "key": datasets.Value("string")})
    datasets.Dataset.from_dict(
        {
            "image": [{"bytes": images.png(seed=1), "path": None}, {"bytes": b"<html></html>", "path": None},
                      {"bytes": images.jpeg(seed=2), "path": None}, {"bytes": images.png(8, 8), "path": None}],
            "text": ["first", "html", "same key", "tiny"],
            "key": ["a", "b", "a", "d"],
        },
        features=features,
    ).to_parquet(str(parquet_root / "data" / "train-00000-of-00001.parquet"))
    config = make_config(kind="hf", source=str(parquet_root), split="train", id_column="key", rows_per_shard=3)
    manifest = run(config, {}, str(tmp_path / "out-parquet"))
    rows = dataset_rows(str(tmp_path / "out-parquet"))
    check_accounting(manifest, rows)
    assert rows.column("id").to_pylist() == ["a"]
    assert rows.column("source_caption").to_pylist() == ["first"]
    assert decode(rows.column("image")[0].as_py()).size == (64, 48)
    assert {(r["id"], r["reason"]) for r in manifest.rejected_table().to_pylist()} == {
        ("b", "not_an_image"), ("a", "duplicate_id"), ("d", "too_small"),
    }

    folder = tmp_path / "hf-imagefolder" / "train"
    folder.mkdir(parents=True)
    (folder / "x.png").write_bytes(images.png(seed=3))
    (folder / "y.jpg").write_bytes(images.jpeg(seed=4))
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "x.png", "text": "an x"}) + "\n" + json.dumps({"file_name": "y.jpg", "text": ""}) + "\n"
    )
    # an imagefolder's rows name their files (no bytes): refused unless hub_load.allow_local_paths is set
    config = make_config(kind="hf", source=str(folder.parent), split="train", streaming=False)
    refused = run(config, {}, str(tmp_path / "out-refused"))
    assert (refused.rows_in, refused.rows_out, refused.rejections) == (2, 0, {"image_path_refused": 2})
    assert all("allow_local_paths is false" in r["detail"] for r in refused.rejected_table().to_pylist())
    config = make_config(kind="hf", source=str(folder.parent), split="train", streaming=False, allow_local_paths=True)
    manifest = run(config, {}, str(tmp_path / "out-imagefolder"))
    rows = dataset_rows(str(tmp_path / "out-imagefolder"))
    check_accounting(manifest, rows)
    assert manifest.rows_in == manifest.rows_out == 2
    assert sorted(map(str, rows.column("source_caption").to_pylist())) == ["None", "an x"]
    assert manifest.notes == {"empty_caption": 1}
    assert rows.column("id").to_pylist() == [stable_id("hf", str(folder.parent), "train", i) for i in range(2)]
    assert sorted(decode(b).size for b in rows.column("image").to_pylist()) == [(64, 48), (64, 48)]
