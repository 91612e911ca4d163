"""Hub load: validate and normalise every source record into the seed schema, shard by shard."""
from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter

import pyarrow as pa

from cnpipe import images, storage
from cnpipe.dataset import ContractError, Manifest, Reject, ShardedOutput, ShardResult
from cnpipe.progress import bar
from components.hub_load import sources

STAGE = "hub_load"

SEED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("url", pa.string()),
        ("source_caption", pa.string()),
        ("origin", pa.string()),
    ]
)


def clean_caption(raw: bytes | str | None, notes: Counter) -> str | None:
    """Captions are optional: a bad one is dropped and counted, never a reason to lose the image."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            notes["caption_not_utf8"] += 1
            return None
    if not isinstance(raw, str):
        raw = str(raw)
    text = " ".join(raw.split())
    if not text:
        notes["empty_caption"] += 1
        return None
    return text


def normalise(batch: list[sources.RawRecord], seen: set[str], cfg) -> ShardResult:
    rows: dict[str, list] = {name: [] for name in SEED_SCHEMA.names}
    rejects: list[Reject] = []
    notes: Counter = Counter()
    for record in batch:
        if record.id in seen:
            rejects.append(Reject(record.id, "duplicate_id", record.origin))
            continue
        seen.add(record.id)
        if record.refused:
            reason, detail = record.refused
            rejects.append(Reject(record.id, reason, f"{record.origin}: {detail}"))
            continue
        if record.caption_refused:
            notes[f"caption_{record.caption_refused}"] += 1
        encoded, width, height = None, None, None
        if record.image is not None:
            try:
                image = images.decode_rgb(record.image, cfg.min_image_side, cfg.max_image_pixels, notes)
            except images.ImageRejected as err:
                rejects.append(Reject(record.id, err.reason, f"{record.origin}: {err.detail}"))
                continue
            image = images.fit_within(image, cfg.max_image_side)
            encoded, (width, height) = images.encode(image, cfg.encode_format), image.size
        elif not record.url:
            rejects.append(Reject(record.id, "missing_image", record.origin))
            continue
        for name, value in zip(
            SEED_SCHEMA.names,
            [record.id, encoded, width, height, record.url, clean_caption(record.caption, notes), record.origin],
        ):
            rows[name].append(value)
    return ShardResult(pa.table(rows, schema=SEED_SCHEMA), rejects, notes)


KINDS = ("hf", "folder", "table")


def check_settings(config) -> None:
    """The hub_load settings alone, checked before any row is read (and by the driver before any stage)."""
    from pipeline_configs import ConfigError

    cfg = config.hub_load
    if cfg.kind not in KINDS:
        raise ConfigError(f"hub_load.kind must be one of {', '.join(KINDS)}, got {cfg.kind!r}")
    if not cfg.source:
        raise ConfigError(f"hub_load.source is empty: name the {cfg.kind} source to load")
    if cfg.rows_per_shard < 1 or cfg.max_rows < 0:
        raise ConfigError(f"hub_load.rows_per_shard must be at least 1 and hub_load.max_rows at least 0 (all rows), "
                          f"got {cfg.rows_per_shard} and {cfg.max_rows}")
    if not 1 <= cfg.min_image_side <= cfg.max_image_side:
        raise ConfigError(f"hub_load needs 1 <= min_image_side <= max_image_side, got {cfg.min_image_side} and {cfg.max_image_side}")
    if cfg.max_file_bytes < 1:
        raise ConfigError(f"hub_load.max_file_bytes must be at least 1 (the most bytes read of any image or caption file), "
                          f"got {cfg.max_file_bytes}")
    if cfg.kind != "hf" and (cfg.allow_local_paths or cfg.revision):
        raise ConfigError(f"hub_load.allow_local_paths and hub_load.revision apply to kind hf only; kind is {cfg.kind!r}: "
                          "leave them unset")


SOURCE_FILE = "_source.json"


def check_source(output_uri: str, fingerprint: dict) -> None:
    """Shards are cut by position in the source, so shards committed from one state of a source and a resume
    over another would duplicate some rows and drop others. Cutting shards by id instead would need the whole
    source listed and bucketed before the first shard (no streaming of a Hugging Face dataset), so the source's
    fingerprint is kept beside the output instead, and a resume over a changed source is refused, saying what
    changed. The fingerprint also enters the config hash, so shards of another source are refused even without
    this file."""
    url = storage.join(output_uri, SOURCE_FILE)
    recorded = storage.read_json(url) if storage.exists(url) else None
    if recorded == fingerprint:
        return
    if recorded is not None and storage.list_names(storage.join(output_uri, "_commits"), ".json"):
        changed = ", ".join(f"{key} {recorded.get(key)!r} -> {fingerprint.get(key)!r}"
                            for key in sorted(set(recorded) | set(fingerprint)) if recorded.get(key) != fingerprint.get(key))
        raise ContractError(
            f"hub_load's source changed since this run started ({changed}); the shards at {output_uri} were cut from "
            f"the old source and resuming over the new one would duplicate or drop rows. Use a new run id "
            f"(or restore the source)."
        )
    storage.write_json_atomic(url, fingerprint)


def run(config, inputs: dict[str, Manifest], output_uri: str) -> Manifest:
    check_settings(config)
    cfg = config.hub_load
    source = sources.open_source(cfg)
    fingerprint = json.loads(json.dumps(source.fingerprint, sort_keys=True))  # as it reads back from storage
    check_source(output_uri, fingerprint)
    blob = (config.section_hash("hub_load") + json.dumps(fingerprint, sort_keys=True)).encode()
    output = ShardedOutput(output_uri, STAGE, hashlib.sha256(blob).hexdigest()[:16], SEED_SCHEMA)
    seen: set[str] = set()
    names: list[str] = []
    progress = bar(STAGE, total=cfg.max_rows or None)
    stream = itertools.islice(source.records, cfg.max_rows) if cfg.max_rows else source.records
    for index in itertools.count():
        batch = list(itertools.islice(stream, cfg.rows_per_shard))
        if not batch:
            break
        name = f"part-{index:05d}"
        names.append(name)
        if output.is_done(name):
            seen.update(r.id for r in batch)  # ids of finished shards still count for duplicates
        else:
            output.commit(name, normalise(batch, seen, cfg), rows_in=len(batch))
        progress.update(len(batch))
    progress.close()
    return output.finalize(names, inputs=[cfg.source])
