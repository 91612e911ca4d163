"""The data contract between stages: Parquet shards, a rejected table, commit markers, a manifest.

Layout of a dataset at URI:
    URI/data/<shard>.parquet       rows that passed the stage
    URI/rejected/<shard>.parquet   rows the stage refused: stage, id, reason, detail
    URI/_commits/<shard>.json      written last, created only if absent; a shard exists only once its marker does,
                                   and counts only while the data and rejected files are the versions it names
    URI/manifest.json              written when the stage finishes: schema, shards, accounting

Image bytes live inside the Parquet rows (not as files beside them): one object per shard keeps
commits atomic, object stores free of millions of small files, and a reader from orphan images.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import sys
from collections import Counter
from typing import Iterator

import pyarrow as pa

from cnpipe import storage

FORMAT = "cnpipe.dataset/1"

REJECTED_SCHEMA = pa.schema(
    [
        ("stage", pa.string()),
        ("id", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
# Columns holding encoded images (JPEG, PNG, WebP): written as they are, without compression or dictionary.
ENCODED_IMAGE_COLUMNS = ("image", "control")


class ContractError(RuntimeError):
    """The data on storage does not match what the stage expects."""


@dataclasses.dataclass(frozen=True)
class Reject:
    id: str
    reason: str
    detail: str = ""


@dataclasses.dataclass
class ShardResult:
    """What a stage made of one input shard: rows out, rows rejected, and handled-but-kept notes."""

    table: pa.Table
    rejects: list[Reject] = dataclasses.field(default_factory=list)
    notes: Counter = dataclasses.field(default_factory=Counter)


@dataclasses.dataclass
class Manifest:
    uri: str
    stage: str
    config_hash: str
    schema: list[dict]
    shards: list[dict]
    rows_in: int
    rows_out: int
    rows_rejected: int
    rejections: dict[str, int]
    notes: dict[str, int]
    inputs: list[str]
    created_at: str
    arrow_schema_b64: str = ""
    format: str = FORMAT

    def arrow_schema(self) -> pa.Schema:
        """The exact Arrow schema of the data shards (the `schema` field is its readable form)."""
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.arrow_schema_b64)))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, uri: str) -> "Manifest":
        path = storage.join(uri, "manifest.json")
        if not storage.exists(path):
            raise ContractError(f"no dataset at {uri}: {path} is missing (did the producing stage finish?)")
        data = storage.read_json(path)
        if data.get("format") != FORMAT:
            raise ContractError(f"{path} has format {data.get('format')!r}, expected {FORMAT!r}")
        data["uri"] = uri
        return cls(**data)

    def shard_urls(self) -> list[tuple[str, str]]:
        return [(s["name"], storage.join(self.uri, "data", f"{s['name']}.parquet")) for s in self.shards]

    def iter_shards(self, columns: list[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
        """Yield (shard name, table) one shard at a time: memory stays bounded by one shard."""
        for name, url in self.shard_urls():
            yield name, storage.read_parquet(url, columns=columns)

    def rejected_table(self) -> pa.Table:
        urls = [storage.join(self.uri, "rejected", f"{s['name']}.parquet") for s in self.shards]
        tables = [storage.read_parquet(u) for u in urls if storage.exists(u)]
        return pa.concat_tables(tables) if tables else REJECTED_SCHEMA.empty_table()


@dataclasses.dataclass
class StageOutput:
    """The output of a stage that is not one row dataset (conditioning's per-type datasets, a trained
    model, an evaluation): a folder with a summary.json that the stage wrote last."""

    uri: str
    summary: dict


def load_output(uri: str) -> "Manifest | StageOutput":
    """Whatever a stage left at `uri`: its Manifest, or its summary when it is not a row dataset."""
    if storage.exists(storage.join(uri, "manifest.json")):
        return Manifest.load(uri)
    path = storage.join(uri, "summary.json")
    if not storage.exists(path):
        raise ContractError(f"nothing finished at {uri}: neither manifest.json nor summary.json (did the stage finish?)")
    return StageOutput(uri, storage.read_json(path))


def conditioning_dataset(item: "Manifest | StageOutput", control_type: str) -> Manifest:
    """The dataset of one control type, given the conditioning stage's output (or that dataset itself)."""
    if isinstance(item, Manifest):
        return item
    types = item.summary.get("types", {})
    if control_type not in types:
        raise ContractError(f"{item.uri} has no {control_type!r} conditioning dataset; it has: {', '.join(types) or 'none'}")
    return Manifest.load(types[control_type]["uri"])


def schema_to_json(schema: pa.Schema) -> list[dict]:
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]


class ShardedOutput:
    """Writes a stage's output shard by shard, so a killed stage resumes where it stopped."""

    def __init__(self, uri: str, stage: str, config_hash: str, schema: pa.Schema, shards: list[str] | None = None):
        """`shards`: the only shards this writer will commit, when it is one of a stage's shard groups running at
        once; it then removes leftovers of those shards' writes only, never a file another group is writing."""
        self.uri = uri
        self.stage = stage
        self.config_hash = config_hash
        self.schema = schema
        targets = None if shards is None else {f"{s}{ext}" for s in shards for ext in (".parquet", ".json")}
        for sub in ("data", "rejected", "_commits"):
            storage.remove_temporaries(storage.join(uri, sub), targets)

    def _commit_url(self, shard: str) -> str:
        return storage.join(self.uri, "_commits", f"{shard}.json")

    def _shard_urls(self, shard: str) -> dict[str, str]:
        return {sub: storage.join(self.uri, sub, f"{shard}.parquet") for sub in ("data", "rejected")}

    def _stale_files(self, marker: dict) -> list[str]:
        """The files of a committed shard that are no longer the versions its marker counted: another writer of
        the same shard (a retried task while the old pod still runs) replaced them after the commit."""
        versions = marker.get("versions", {})
        return [sub for sub, url in self._shard_urls(marker["shard"]).items()
                if versions.get(sub) is None or storage.version(url) != versions[sub]]

    def is_done(self, shard: str) -> bool:
        """Whether `shard` is committed; a commit whose files another writer replaced since is dropped (the shard
        is then redone), so that a resume never keeps counts that disagree with the data."""
        url = self._commit_url(shard)
        if not storage.exists(url):
            return False
        marker = storage.read_json(url)
        if marker["config_hash"] != self.config_hash:
            raise ContractError(
                f"{self.uri} holds shard {shard} made with another {self.stage} config "
                f"({marker['config_hash']} != {self.config_hash}); write to a new run id or remove it"
            )
        stale = self._stale_files(marker)
        if stale:
            print(f"{self.stage}: shard {shard}'s {' and '.join(stale)} changed after it was committed (two writers of "
                  "one shard); redoing it", file=sys.stderr)
            storage.filesystem(url)[0].rm(storage.filesystem(url)[1])
            return False
        return True

    def commit(self, shard: str, result: ShardResult, rows_in: int) -> None:
        """Write data and rejected shards, then the marker that makes them count."""
        table = result.table
        if table.schema != self.schema:
            table = table.cast(self.schema)
        rows_out, rows_rejected = table.num_rows, len(result.rejects)
        if rows_in != rows_out + rows_rejected:
            raise ContractError(
                f"{self.stage} shard {shard}: {rows_in} rows in but {rows_out} out + {rows_rejected} rejected"
            )
        rejected = pa.table(
            {
                "stage": [self.stage] * rows_rejected,
                "id": [r.id for r in result.rejects],
                "reason": [r.reason for r in result.rejects],
                "detail": [r.detail[:500] for r in result.rejects],
            },
            schema=REJECTED_SCHEMA,
        )
        urls = self._shard_urls(shard)
        marker = {
            "shard": shard,
            "config_hash": self.config_hash,
            "rows_in": rows_in,
            "rows_out": rows_out,
            "rows_rejected": rows_rejected,
            "rejections": dict(Counter(r.reason for r in result.rejects)),
            "notes": dict(result.notes),
            "versions": {  # what this writer wrote: finalize and resume check the files are still these
                "data": storage.write_parquet_atomic(urls["data"], table, ENCODED_IMAGE_COLUMNS),
                "rejected": storage.write_parquet_atomic(urls["rejected"], rejected),
            },
        }
        try:
            storage.write_json_atomic(self._commit_url(shard), marker, exclusive=True)
        except FileExistsError:
            # Another writer committed this shard while we worked on it. Its commit stands if the files are still
            # the ones it counted (then ours were replaced by its); if ours replaced them, nothing may finalize.
            stale = self._stale_files(storage.read_json(self._commit_url(shard)))
            if stale:
                raise ContractError(
                    f"{self.stage} shard {shard} was written by two writers at once (a retried task while the first "
                    f"still ran?): its {' and '.join(stale)} no longer match its commit; rerun with the same run id "
                    "once the other writer has stopped, and the shard is redone") from None
            print(f"{self.stage}: shard {shard} was committed by another writer at the same time; keeping its commit",
                  file=sys.stderr)

    def finalize(self, expected_shards: list[str], inputs: list[str]) -> Manifest:
        """Aggregate commit markers into the manifest; every expected shard must be committed."""
        markers = [storage.read_json(self._commit_url(s)) for s in expected_shards]
        stale = {m["shard"]: files for m in markers if (files := self._stale_files(m))}
        if stale:
            raise ContractError(
                f"{self.stage}: not finalizing {self.uri}: the files of shard(s) {', '.join(sorted(stale))} changed after "
                "they were committed (two writers of one shard: a retried task while the first still ran?); rerun with "
                "the same run id once the other writer has stopped, and those shards are redone")
        rejections: Counter = Counter()
        notes: Counter = Counter()
        for m in markers:
            rejections.update(m["rejections"])
            notes.update(m["notes"])
        manifest = Manifest(
            uri=self.uri,
            stage=self.stage,
            config_hash=self.config_hash,
            schema=schema_to_json(self.schema),
            shards=[{"name": m["shard"], "rows": m["rows_out"], "rejected": m["rows_rejected"]} for m in markers],
            rows_in=sum(m["rows_in"] for m in markers),
            rows_out=sum(m["rows_out"] for m in markers),
            rows_rejected=sum(m["rows_rejected"] for m in markers),
            rejections=dict(sorted(rejections.items())),
            notes=dict(sorted(notes.items())),
            inputs=inputs,
            created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            arrow_schema_b64=base64.b64encode(self.schema.serialize().to_pybytes()).decode(),
        )
        storage.write_json_atomic(storage.join(self.uri, "manifest.json"), manifest.to_json())
        return manifest
