"""Two writers of one shard (a retried task while the old pod still runs): the commit marker is created only if
absent and names the versions of the files it counted, so a manifest never disagrees with its data."""
from __future__ import annotations

import uuid

import fsspec
import pyarrow as pa
import pytest

from cnpipe import storage
from cnpipe.dataset import ContractError, Manifest, Reject, ShardedOutput, ShardResult

SCHEMA = pa.schema([("id", pa.string()), ("value", pa.int32())])


def result(*ids: str, rejected: tuple[str, ...] = ()) -> ShardResult:
    table = pa.table({"id": list(ids), "value": list(range(len(ids)))}, schema=SCHEMA)
    return ShardResult(table, [Reject(r, "bad") for r in rejected])


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    root = f"memory://cnpipe-writers-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def writer(root: str) -> ShardedOutput:
    return ShardedOutput(storage.join(root, "stage"), "stage", "hash", SCHEMA)


def test_exclusive_create_keeps_the_first_writers_object(root):
    url = storage.join(root, "marker.json")
    storage.write_json_atomic(url, {"writer": "a"}, exclusive=True)
    with pytest.raises(FileExistsError):
        storage.write_json_atomic(url, {"writer": "b"}, exclusive=True)
    assert storage.read_json(url) == {"writer": "a"}
    assert [n for n in storage.list_names(root)] == ["marker.json"]  # the loser left no temporary


def test_a_write_returns_the_version_that_is_then_there_and_another_write_changes_it(root):
    url = storage.join(root, "blob.parquet")
    first = storage.write_parquet_atomic(url, result("a").table)
    assert storage.version(url) == first
    second = storage.write_parquet_atomic(url, result("a").table)  # same bytes, but another write
    assert storage.version(url) == second
    if root.startswith("memory://"):
        assert second == first  # object stores: the content's MD5, as GCS's md5Hash
    else:
        assert second != first
    assert storage.version(storage.join(root, "absent")) is None


def test_data_replaced_after_the_commit_is_never_finalized_and_the_resume_redoes_the_shard(root):
    first = writer(root)
    first.commit("part-0", result("a", "b", rejected=("c",)), rows_in=3)
    # The second writer's data lands after the first writer's commit; its own commit then finds the marker taken.
    second = writer(root)
    with pytest.raises(ContractError, match="two writers"):
        second.commit("part-0", result("a", rejected=("b", "c")), rows_in=3)
    with pytest.raises(ContractError, match="not finalizing.*part-0"):
        first.finalize(["part-0"], inputs=[])
    assert not storage.exists(storage.join(root, "stage", "manifest.json"))

    resumed = writer(root)
    assert not resumed.is_done("part-0")  # the stale commit is dropped, so the shard is done again
    resumed.commit("part-0", result("a", "b", rejected=("c",)), rows_in=3)
    manifest = resumed.finalize(["part-0"], inputs=[])
    data = storage.read_parquet(storage.join(root, "stage", "data", "part-0.parquet"))
    assert (manifest.rows_out, manifest.rows_rejected) == (data.num_rows, 1) == (2, 1)
    assert Manifest.load(manifest.uri).rows_out == 2


def test_a_commit_that_lost_the_race_but_whose_files_were_replaced_keeps_the_winners_commit(root):
    """The second writer's files were written first, then replaced by the first writer's, which committed: the
    shard is consistent, so the loser carries on and the manifest counts the winner's rows."""
    shard = "part-0"
    loser, winner = writer(root), writer(root)
    real_write = storage.write_json_atomic
    raced = []

    def winner_commits_first(url, obj, exclusive=False):
        if exclusive and not raced:
            raced.append(url)
            winner.commit(shard, result("a", "b", rejected=("c",)), rows_in=3)
        return real_write(url, obj, exclusive)

    storage.write_json_atomic = winner_commits_first
    try:
        loser.commit(shard, result("a", rejected=("b", "c")), rows_in=3)
    finally:
        storage.write_json_atomic = real_write
    manifest = loser.finalize([shard], inputs=[])
    assert (manifest.rows_out, manifest.rows_rejected) == (2, 1)
    assert storage.read_parquet(storage.join(root, "stage", "data", f"{shard}.parquet")).num_rows == 2
