"""SIGKILL the download stage's process group (as a pod is killed: img2dataset's workers die with it) after
its first commit, rerun it, and get exactly the uninterrupted result, with no URL of a committed shard
fetched twice: the rerun skips finished shards instead of downloading them again."""
from __future__ import annotations

import os
import subprocess
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from cnpipe.dataset import Manifest, ShardedOutput, ShardResult
from components.registry import stage_command
from components.laion_retrieval.stage import RETRIEVED_SCHEMA
from test_download_stage import config

from tests.stage_kill import commit_markers, kill_after_commits

SHARDS, ROWS_PER_SHARD = 6, 4


def url_shards(tmp_path, web) -> Manifest:
    output = ShardedOutput(str(tmp_path / "retrieved"), "laion_retrieval", "test", RETRIEVED_SCHEMA)
    names = []
    for shard in range(SHARDS):
        ids = [f"u{shard}-{row}" for row in range(ROWS_PER_SHARD)]
        urls = [web.url(f"/photo/{i}.jpg") for i in ids]
        urls[-1] = web.url(f"/missing-{shard}.jpg")  # one rejection per shard, counted across the kill
        table = pa.table({"id": ids, "url": urls, "source_caption": ids, "similarity": [0.5] * len(ids),
                          "query": ["prompt:a test"] * len(ids),
                          "pwatermark": [None] * len(ids), "punsafe": [None] * len(ids)}, schema=RETRIEVED_SCHEMA)
        names.append(f"part-{shard:05d}")
        output.commit(names[-1], ShardResult(table), table.num_rows)
    return output.finalize(names, inputs=[])


def stage_env() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
            "NO_ALBUMENTATIONS_UPDATE": "1"}


def run_stage(argv: list[str]) -> None:
    done = subprocess.run(argv, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_sigkilled_download_resumes_without_refetching_committed_shards(tmp_path, web):
    web.photo_delay_s = 0.05
    # two shards per batch, two threads: three batches, the kill lands inside the second or third
    cfg = config(allowed_networks=["127.0.0.1/32"], batch_rows=2 * ROWS_PER_SHARD, thread_count=2)
    source = url_shards(tmp_path, web)
    out = tmp_path / "resumed"
    argv = stage_command("download", cfg.to_json(), {"retrieved": source.uri}, str(out))

    kill_after_commits(argv, stage_env(), [out], whole_group=True)
    before = commit_markers(out)
    assert 1 <= len(before) < SHARDS and not (out / "manifest.json").exists()
    fetched_before_kill = Counter(web.requests)

    run_stage(argv)
    after = commit_markers(out)
    assert {name: after[name] for name in before} == before, "shards committed before the kill were redone"
    resumed = Manifest.load(str(out))
    done_first = {row_id for name in before
                  for row_id in pq.read_table(out / "data" / name.replace(".json", ".parquet")).column("id").to_pylist()}
    requests = Counter(web.requests)
    for row_id in done_first:
        assert requests[f"/photo/{row_id}.jpg"] == 1, f"{row_id} of a committed shard was fetched again"
    assert sum(fetched_before_kill.values()) < sum(requests.values())  # the rerun did fetch the rest

    reference = tmp_path / "uninterrupted"
    run_stage(stage_command("download", cfg.to_json(), {"retrieved": source.uri}, str(reference)))
    expected = Manifest.load(str(reference))
    for field in ("config_hash", "schema", "shards", "rows_in", "rows_out", "rows_rejected", "rejections", "notes"):
        assert getattr(resumed, field) == getattr(expected, field), field
    assert (resumed.rows_out, resumed.rows_rejected, resumed.rejections) == (18, 6, {"http_404": 6})
    resumed_rows = pa.concat_tables([t for _, t in resumed.iter_shards()])
    expected_rows = pa.concat_tables([t for _, t in expected.iter_shards()])
    ids = resumed_rows.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 18
    assert resumed_rows.equals(expected_rows)
    assert not [p for p in (out / "data").iterdir() if p.name.startswith(".tmp-")]
