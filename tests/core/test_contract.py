"""The shard contract: atomic writes (local and object-store-like memory://), commit accounting, config
hashes that keep reruns with other settings from reusing shards, temporaries cleaned, manifest totals."""
from __future__ import annotations

import uuid
from collections import Counter

import fsspec
import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem

from cnpipe import storage
from cnpipe.dataset import (
    REJECTED_SCHEMA, ContractError, Manifest, Reject, ShardedOutput, ShardResult, StageOutput, conditioning_dataset,
    load_output,
)
from cnpipe.stage import run_per_shard

SCHEMA = pa.schema([("id", pa.string()), ("value", pa.int32())])


def rows(*ids: str) -> pa.Table:
    return pa.table({"id": list(ids), "value": list(range(len(ids)))}, schema=SCHEMA)


@pytest.fixture
def memory_root():
    root = f"memory://cnpipe-tests-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path, memory_root):
    return str(tmp_path / "store") if request.param == "local" else memory_root


def test_atomic_write_round_trips_and_leaves_no_temporaries(root):
    url = storage.join(root, "a", "b", "blob.bin")
    storage.write_bytes_atomic(url, b"first")
    storage.write_bytes_atomic(url, b"second")  # overwrite in place
    assert storage.read_bytes(url) == b"second"
    storage.write_json_atomic(storage.join(root, "a", "obj.json"), {"k": [1, 2]})
    assert storage.read_json(storage.join(root, "a", "obj.json")) == {"k": [1, 2]}
    table = rows("x", "y")
    storage.write_parquet_atomic(storage.join(root, "a", "t.parquet"), table)
    assert storage.read_parquet(storage.join(root, "a", "t.parquet")).equals(table)
    assert storage.list_names(storage.join(root, "a")) == ["b", "obj.json", "t.parquet"]
    files = list(storage.iter_files(root))
    assert not any(".tmp-" in f for f in files)
    if root.startswith("memory://"):
        assert all(f.startswith("memory://") for f in files)  # full URLs with their protocol


def test_local_failed_write_leaves_the_old_object_and_no_temporary(tmp_path, monkeypatch):
    url = str(tmp_path / "d" / "blob.bin")
    storage.write_bytes_atomic(url, b"old")

    def broken_move(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(LocalFileSystem, "mv", broken_move)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes_atomic(url, b"new" * 1000)
    assert storage.read_bytes(url) == b"old"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["blob.bin"]


def test_temporaries_are_invisible_and_removed_when_a_stage_starts(root):
    for sub in ("data", "rejected", "_commits"):
        storage.write_bytes_atomic(storage.join(root, sub, "keep.bin"), b"k")
        fs, path = storage.filesystem(storage.join(root, sub, ".tmp-0123abcd-part-00000.parquet"))
        fs.pipe_file(path, b"half a write")  # what a killed process leaves
        assert storage.list_names(storage.join(root, sub)) == ["keep.bin"]
    ShardedOutput(root, "test", "hash", SCHEMA)
    leftovers = [p for p in storage.iter_files(root) if ".tmp-" in p]
    assert leftovers == []
    assert all(storage.exists(storage.join(root, sub, "keep.bin")) for sub in ("data", "rejected", "_commits"))


def test_a_shard_group_starting_leaves_other_groups_writes_alone(root):
    """Shard groups of one stage run at once (a ParallelFor): one starting must not delete the temporary file
    another is writing into (it did: the other's commit then failed), only leftovers of its own shards."""
    fs, _ = storage.filesystem(root)
    other = storage.join(root, "data", "part-00000.parquet")
    mine = storage.join(root, "data", ".tmp-0123abcd-part-00001.parquet")
    fs.makedirs(storage.filesystem(storage.join(root, "data"))[1], exist_ok=True)
    fs.pipe_file(storage.filesystem(mine)[1], b"left by a killed run of this group")
    with storage._atomic_local_file(fs, storage.filesystem(other)[1]) as writing:
        writing.write(b"group 0's shard")
        ShardedOutput(root, "test", "hash", SCHEMA, shards=["part-00001"])
    assert storage.read_bytes(other) == b"group 0's shard"
    assert not storage.exists(mine)
    assert [p for p in storage.iter_files(root) if ".tmp-" in p] == []


def test_commit_refuses_rows_that_do_not_add_up_and_writes_nothing(root):
    output = ShardedOutput(root, "test", "hash", SCHEMA)
    with pytest.raises(ContractError, match=r"3 rows in but 1 out \+ 1 rejected"):
        output.commit("part-00000", ShardResult(rows("a"), [Reject("b", "bad")]), rows_in=3)
    assert not output.is_done("part-00000")
    assert list(storage.iter_files(root)) == []


def test_commit_then_manifest_counts(root):
    output = ShardedOutput(root, "test", "hash-1", SCHEMA)
    output.commit("part-00000", ShardResult(rows("a", "b"), [Reject("c", "corrupt_image", "x" * 900)], Counter(empty_caption=1)), 3)
    output.commit("part-00001", ShardResult(rows("d"), [Reject("e", "too_small"), Reject("f", "corrupt_image")]), 3)
    output.commit("part-00002", ShardResult(rows(), []), 0)
    assert output.is_done("part-00001") and not output.is_done("part-00003")
    manifest = output.finalize(["part-00000", "part-00001", "part-00002"], inputs=["upstream"])
    loaded = Manifest.load(root)
    assert loaded.to_json() == {**manifest.to_json(), "uri": root}
    assert (loaded.rows_in, loaded.rows_out, loaded.rows_rejected) == (6, 3, 3)
    assert loaded.rejections == {"corrupt_image": 2, "too_small": 1}
    assert loaded.notes == {"empty_caption": 1}
    assert loaded.shards == [{"name": "part-00000", "rows": 2, "rejected": 1}, {"name": "part-00001", "rows": 1, "rejected": 2},
                             {"name": "part-00002", "rows": 0, "rejected": 0}]
    assert loaded.inputs == ["upstream"] and loaded.stage == "test" and loaded.config_hash == "hash-1"
    assert loaded.arrow_schema() == SCHEMA
    assert [t.column("id").to_pylist() for _, t in loaded.iter_shards()] == [["a", "b"], ["d"], []]
    rejected = loaded.rejected_table()
    assert rejected.schema == REJECTED_SCHEMA
    assert rejected.to_pylist()[0] == {"stage": "test", "id": "c", "reason": "corrupt_image", "detail": "x" * 500}
    assert sorted(rejected.column("id").to_pylist()) == ["c", "e", "f"]
    assert set(rejected.column("stage").to_pylist()) == {"test"}


def test_commit_casts_to_the_declared_schema(root):
    output = ShardedOutput(root, "test", "h", SCHEMA)
    output.commit("p", ShardResult(pa.table({"id": ["a"], "value": pa.array([7], pa.int64())})), 1)
    assert storage.read_parquet(storage.join(root, "data", "p.parquet")).schema == SCHEMA


def test_shard_from_another_config_hash_is_refused(root):
    ShardedOutput(root, "test", "aaaa", SCHEMA).commit("part-00000", ShardResult(rows("a")), 1)
    assert ShardedOutput(root, "test", "aaaa", SCHEMA).is_done("part-00000")
    with pytest.raises(ContractError) as err:
        ShardedOutput(root, "test", "bbbb", SCHEMA).is_done("part-00000")
    assert "aaaa != bbbb" in str(err.value) and "part-00000" in str(err.value)


def test_finalize_needs_every_shard_committed(root):
    output = ShardedOutput(root, "test", "h", SCHEMA)
    output.commit("part-00000", ShardResult(rows("a")), 1)
    with pytest.raises((ContractError, FileNotFoundError)):
        output.finalize(["part-00000", "part-00001"], inputs=[])
    assert not storage.exists(storage.join(root, "manifest.json"))


def test_manifest_load_errors_are_contract_errors(root):
    with pytest.raises(ContractError, match="did the producing stage finish"):
        Manifest.load(root)
    storage.write_json_atomic(storage.join(root, "manifest.json"), {"format": "something/0"})
    with pytest.raises(ContractError, match="format"):
        Manifest.load(root)


def test_load_output_reads_a_summary_when_there_is_no_manifest(root):
    with pytest.raises(ContractError, match="nothing finished"):
        load_output(root)
    canny = storage.join(root, "canny")
    ShardedOutput(canny, "conditioning/canny", "h", SCHEMA).commit("p", ShardResult(rows("a")), 1)
    ShardedOutput(canny, "conditioning/canny", "h", SCHEMA).finalize(["p"], [])
    storage.write_json_atomic(storage.join(root, "summary.json"), {"types": {"canny": {"uri": canny}}})
    item = load_output(root)
    assert isinstance(item, StageOutput) and item.uri == root
    assert conditioning_dataset(item, "canny").rows_out == 1
    with pytest.raises(ContractError, match="no 'pose' conditioning dataset; it has: canny"):
        conditioning_dataset(item, "pose")


def test_run_per_shard_resumes_committed_shards_and_accounts_every_row(root):
    source = ShardedOutput(storage.join(root, "in"), "upstream", "h", SCHEMA)
    for i in range(3):
        source.commit(f"part-{i:05d}", ShardResult(rows(*[f"r{i}-{j}" for j in range(4)])), 4)
    upstream = source.finalize([f"part-{i:05d}" for i in range(3)], [])
    seen: list[str] = []
    fail_on = {"r1-0"}

    def process(table: pa.Table, manifest: Manifest) -> ShardResult:
        ids = table.column("id").to_pylist()
        seen.extend(ids)
        if ids[0] in fail_on:
            raise RuntimeError("killed while on the second shard")
        return ShardResult(table.slice(1), [Reject(ids[0], "first_of_shard")])

    out = storage.join(root, "out")
    with pytest.raises(RuntimeError):
        run_per_shard("test", [upstream], out, "h", SCHEMA, process)
    assert storage.list_names(storage.join(out, "_commits")) == ["part-00000.json"]
    assert not storage.exists(storage.join(out, "manifest.json"))
    fail_on.clear()
    seen.clear()
    manifest = run_per_shard("test", [upstream], out, "h", SCHEMA, process)
    assert seen == [f"r{i}-{j}" for i in (1, 2) for j in range(4)]  # shard 0 was not processed again
    assert (manifest.rows_in, manifest.rows_out, manifest.rows_rejected) == (12, 9, 3)
    assert manifest.rejections == {"first_of_shard": 3}
    assert [t.column("id").to_pylist() for _, t in manifest.iter_shards()] == [[f"r{i}-{j}" for j in (1, 2, 3)] for i in range(3)]


def test_a_stage_rerun_with_other_settings_refuses_the_old_shards(tmp_path, images, make_config):
    from components.hub_load.stage import run as hub_load

    folder = tmp_path / "seeds"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(images.png(seed=i))
    out = str(tmp_path / "out")
    first = hub_load(make_config(source=str(folder), rows_per_shard=2), {}, out)
    config = make_config(source=str(folder), rows_per_shard=2)
    config.clip_embed.batch_size += 1  # another stage's setting: the shards stay valid and are reused
    assert hub_load(config, {}, out).shards == first.shards
    with pytest.raises(ContractError, match="another hub_load config"):
        hub_load(make_config(source=str(folder), rows_per_shard=2, min_image_side=8), {}, out)
