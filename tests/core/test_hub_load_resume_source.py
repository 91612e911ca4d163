"""hub_load cuts shards by position in its source, so a resume over a source that changed since the run started
would duplicate some rows and drop others. Such a resume is refused, saying what changed; the unchanged (or
restored) source resumes as before."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cnpipe.dataset import ContractError
from cnpipe.ids import stable_id
from components.hub_load import stage


def crash_after(monkeypatch, decodes: int) -> None:
    """The stage dies (as a killed pod would) at the `decodes`+1-th image, after committing what came before."""
    real, calls = stage.images.decode_rgb, []

    def decode(*args, **kwargs):
        calls.append(1)
        if len(calls) > decodes:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(stage.images, "decode_rgb", decode)


def test_resume_after_a_file_was_added_is_refused(tmp_path, images, make_config, dataset_rows, monkeypatch):
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for name in ("a", "b", "c", "d"):
        (seeds / f"{name}.png").write_bytes(images.png(seed=ord(name)))
    config = make_config(kind="folder", source=str(seeds), rows_per_shard=2)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        crash_after(patch, 2)
        with pytest.raises(RuntimeError, match="killed"):
            stage.run(config, {}, str(out))
    assert sorted(p.name for p in (out / "_commits").iterdir()) == ["part-00000.json"]  # a, b

    (seeds / "0.png").write_bytes(images.png(seed=0))  # sorts first: every later row moves one place
    with pytest.raises(ContractError, match="source changed since this run started") as refused:
        stage.run(config, {}, str(out))
    assert "images 4 -> 5" in str(refused.value) and "new run id" in str(refused.value)
    assert json.loads((out / "_source.json").read_text())["images"] == 4  # still the source the shards came from

    (seeds / "0.png").unlink()  # the source restored: the run resumes, every row exactly once
    manifest = stage.run(config, {}, str(out))
    ids = dataset_rows(str(out)).column("id").to_pylist()
    assert ids == [stable_id("folder", f"{n}.png") for n in "abcd"]
    assert manifest.rows_in == 4


def test_a_finished_run_is_not_reused_for_a_changed_folder(tmp_path, images, make_config):
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "a.png").write_bytes(images.png(seed=1))
    (seeds / "a.txt").write_text("first caption")
    config = make_config(kind="folder", source=str(seeds))
    stage.run(config, {}, str(tmp_path / "out"))
    (seeds / "a.txt").write_text("another caption, same image")
    with pytest.raises(ContractError, match="source changed since this run started"):
        stage.run(config, {}, str(tmp_path / "out"))


def test_a_changed_table_is_refused(tmp_path, make_config):
    table = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://example.com/1.jpg", "http://example.com/2.jpg"]}), table)
    config = make_config(kind="table", source=str(table), rows_per_shard=1)
    stage.run(config, {}, str(tmp_path / "out"))
    pq.write_table(pa.table({"url": ["http://example.com/0.jpg", "http://example.com/1.jpg", "http://example.com/2.jpg"]}), table)
    with pytest.raises(ContractError, match="source changed since this run started"):
        stage.run(config, {}, str(tmp_path / "out"))


def test_a_changed_local_hf_dataset_is_refused(tmp_path, images, make_config, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    root = tmp_path / "hf"
    (root / "data").mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})

    def write(n: int) -> None:
        rows = {"image": [{"bytes": images.png(seed=i), "path": None} for i in range(n)], "text": [str(i) for i in range(n)]}
        pq.write_table(pa.table(rows, schema=features.arrow_schema), root / "data" / "train-00000-of-00001.parquet")

    write(2)
    config = make_config(kind="hf", source=str(root), rows_per_shard=1)
    assert stage.run(config, {}, str(tmp_path / "out")).rows_out == 2
    write(3)
    with pytest.raises(ContractError, match="source changed since this run started"):
        stage.run(config, {}, str(tmp_path / "out"))

