"""curate_dedup: the global duplicate pass, in one process, over compact keys only (never an image).

It reads curate_keys' shards column by column into arrays of fixed-size keys: per row a 64-bit pixel hash, the
64-bit pHashes (whole image and centred crops), the CLIP embedding as a faiss code (curate.embedding_index: 8-bit
scalar-quantised, d bytes), its size and whether it is a seed. Rows that failed a per-row filter take no part.

The rule: rows are visited in priority order, seed rows before retrieved ones, then the larger image (pixels), then
dataset order; a row is dropped if an already kept row is its duplicate, else it is kept. So each group keeps its
first row by that order, and every dropped row names the kept row it duplicates:
  duplicate       the same pixel hash as a kept row
  near_duplicate  pHashes at most curate.phash_max_distance bits apart (the whole image against the other's whole
                  image or crops, both ways), or CLIP cosine >= curate.embedding_min_cosine
Kept rows are searched, batch by batch, in two indexes that grow as rows are kept: a multi-index of the pHashes
(four 16-bit quarters in sorted arrays: a pair within 3 bits always shares a quarter, most pairs within 8 do) and a
faiss index of the embeddings (the NEIGHBOURS nearest kept rows); rows of the same batch are compared all pairs.

Output, under <run>/curate/dedup/: decisions/<shard>.parquet (id, reason, kept_id, detail) for every shard with a
dropped row, then summary.json (counts, example pairs for the report, the index used, memory of the keys). A rerun
with the same settings and keys finds the summary and returns it; otherwise the pass is redone from the start (it
reads no images, so it costs a small part of the per-shard work).
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np
import pyarrow as pa

from cnpipe import storage
from cnpipe.dataset import ContractError, Manifest, StageOutput
from components.curate import hashes, settings

STAGE = "curate_dedup"
BATCH = 512  # rows searched together (and compared all pairs); fixed, so that decisions never depend on a knob
NEIGHBOURS = 10  # kept rows examined per row in the embedding index
BANDS = 4  # pHash multi-index: 64 bits as four 16-bit quarters
FLAT_UP_TO = 20_000  # embedding_index auto: exact search over 8-bit codes up to this many rows, IVF above
NO_MATCH = 255  # a pHash distance that never matches (a row without a pHash)
DECISIONS_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("kept_id", pa.string()),
                              ("detail", pa.string()), ("phash_distance", pa.int16()), ("cosine", pa.float32())])
EXAMPLES = 4  # example pairs per reason, for the report


def dedup_hash(config, keys: Manifest) -> str:
    import hashlib
    import json

    identity = [settings.config_hash(config), keys.config_hash, keys.shards, keys.rows_out]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def index_spec(spec: str, rows: int) -> str:
    if spec != "auto":
        return spec
    if rows <= FLAT_UP_TO:
        return "SQ8"
    return f"IVF{1 << round(math.log2(4 * math.sqrt(rows)))},SQ8"


class Keys:
    """Every row's compact keys, position = dataset order (shard by shard)."""

    def __init__(self, keys: Manifest, config):
        cfg = config.curate
        self.shards = [s["name"] for s in keys.shards]
        counts = np.array([s["rows"] for s in keys.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        n = int(self.offsets[-1])
        self.n = n
        self.scales = len(settings.crop_scales(config))
        self.valid = np.zeros(n, dtype=bool)
        self.seed = np.zeros(n, dtype=bool)
        self.area = np.zeros(n, dtype=np.int64)
        self.pixel = np.zeros(n, dtype=np.uint64)
        self.phash = np.zeros((n, self.scales), dtype=np.uint64)
        self.has_phash = np.zeros((n, self.scales), dtype=bool)
        self.codes: np.ndarray | None = None
        self.index = None
        self.spec = ""
        self.similarity = np.full(n, np.nan, dtype=np.float32)
        self.uri = keys.uri
        if cfg.embedding_dedup:
            self._prepare_index(keys, cfg)
        columns = ["seed", "width", "height", "pixel_hash", "phash", "reason", "clip_similarity"]
        if self.index is not None:
            columns.append("clip_embedding")
        for number, name in enumerate(self.shards):
            table = storage.read_parquet(storage.join(keys.uri, "data", f"{name}.parquet"), columns=columns)
            self._fill(int(self.offsets[number]), table)

    def _shard_table(self, name: str, columns: list[str]) -> pa.Table:
        return storage.read_parquet(storage.join(self.uri, "data", f"{name}.parquet"), columns=columns)

    def _vectors(self, name: str) -> np.ndarray:
        """The shard's embeddings (rows that have one) as a float32 matrix, straight from Arrow's buffers."""
        column = self._shard_table(name, ["clip_embedding"]).column("clip_embedding").combine_chunks().drop_null()
        if not len(column):
            return np.empty((0, 0), dtype=np.float32)
        flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        return np.ascontiguousarray(flat.reshape(len(column), -1))

    def _prepare_index(self, keys: Manifest, cfg) -> None:
        """The faiss index of the configured kind, trained (when it needs it) on embeddings from evenly spread shards."""
        import faiss

        dim = next((v.shape[1] for name in self.shards if len(v := self._vectors(name))), 0)
        if not dim:
            return
        self.spec = index_spec(cfg.embedding_index, self.n)
        try:
            index = faiss.index_factory(dim, self.spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ContractError(f"curate.embedding_index {cfg.embedding_index!r} ({self.spec}) is not a faiss index "
                                f"factory string: {str(err).splitlines()[-1]}") from None
        if not index.is_trained:  # on whole shards spread evenly over the dataset: deterministic, one read each
            nlist = faiss.extract_index_ivf(index).nlist if "IVF" in self.spec else 0
            wanted = max(20_000, 32 * nlist)
            per_shard = max(1.0, self.n / max(1, len(self.shards)))
            count = min(len(self.shards), math.ceil(wanted / per_shard))
            picked = np.unique(np.linspace(0, len(self.shards) - 1, count).round().astype(int))
            sample = np.concatenate([self._vectors(self.shards[number]) for number in picked])
            if len(sample) < max(1, nlist):
                raise ContractError(f"curate.embedding_index {self.spec} has {nlist} lists to train but the dataset has "
                                    f"{len(sample)} rows: use auto, or fewer lists")
            index.train(sample)
        if "IVF" in self.spec:
            faiss.extract_index_ivf(index).nprobe = cfg.embedding_nprobe
        self.index = index
        self.codes = np.zeros((self.n, index.sa_code_size()), dtype=np.uint8)

    def _fill(self, start: int, table: pa.Table) -> None:
        stop = start + table.num_rows
        valid = (table.column("reason").is_null().to_numpy(zero_copy_only=False)
                 & table.column("pixel_hash").is_valid().to_numpy(zero_copy_only=False))
        self.valid[start:stop] = valid
        self.seed[start:stop] = table.column("seed").fill_null(False).to_numpy(zero_copy_only=False)
        width = table.column("width").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        height = table.column("height").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        self.area[start:stop] = width * height
        self.pixel[start:stop] = table.column("pixel_hash").fill_null(0).to_numpy(zero_copy_only=False)
        self.similarity[start:stop] = table.column("clip_similarity").to_numpy(zero_copy_only=False).astype(np.float32)
        hashes_ = table.column("phash").combine_chunks()  # list<uint64> per row: whole image, then the crops
        if len(hashes_):
            import pyarrow.compute as pc

            take = np.minimum(pc.list_value_length(hashes_).fill_null(0).to_numpy(zero_copy_only=False), self.scales)
            rows = np.repeat(np.arange(len(hashes_)), take)
            scale = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
            at = hashes_.offsets.to_numpy()[rows] + scale
            values = hashes_.values
            self.phash[start + rows, scale] = values.fill_null(0).to_numpy(zero_copy_only=False)[at]
            self.has_phash[start + rows, scale] = values.is_valid().to_numpy(zero_copy_only=False)[at]
            self.has_phash[start:stop] &= self.has_phash[start:stop, :1]  # no whole-image hash (a plain image): none
        if self.index is not None:
            rows = np.flatnonzero(valid)
            if len(rows):
                chosen = table.column("clip_embedding").take(pa.array(rows)).combine_chunks()
                vectors = chosen.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(rows), -1)
                self.codes[start + rows] = self.index.sa_encode(np.ascontiguousarray(vectors))

    def nbytes(self) -> int:
        arrays = [self.valid, self.seed, self.area, self.pixel, self.phash, self.has_phash, self.similarity]
        return sum(a.nbytes for a in arrays) + (self.codes.nbytes if self.codes is not None else 0)

    def locate(self, position: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.offsets, position, side="right")) - 1
        return shard, position - int(self.offsets[shard])


class BandIndex:
    """Kept rows' pHashes, searchable by any of their four 16-bit quarters. Per quarter, sorted runs of (value, row),
    merged as a binary counter merges (a new run joins the last one while it is at least as large), so that adding n
    rows in batches costs O(n log n) and a lookup searches O(log n) runs."""

    def __init__(self, position_type):
        self.position_type = position_type
        self.runs: list[tuple[list[np.ndarray], list[np.ndarray]]] = []  # (values per band, rows per band)

    @staticmethod
    def quarter(hashes: np.ndarray, band: int) -> np.ndarray:
        return ((hashes >> np.uint64(16 * band)) & np.uint64(0xFFFF)).astype(np.uint16)

    def add(self, hashes: np.ndarray, rows: np.ndarray) -> None:
        if not len(hashes):
            return
        rows = rows.astype(self.position_type)
        values, owners = [], []
        for band in range(BANDS):
            v = self.quarter(hashes, band)
            order = np.argsort(v, kind="stable")
            values.append(v[order])
            owners.append(rows[order])
        self.runs.append((values, owners))
        while len(self.runs) > 1 and len(self.runs[-1][0][0]) >= len(self.runs[-2][0][0]):
            (v2, r2), (v1, r1) = self.runs.pop(), self.runs.pop()
            merged_v, merged_r = [], []
            for band in range(BANDS):
                v = np.concatenate([v1[band], v2[band]])
                order = np.argsort(v, kind="stable")
                merged_v.append(v[order])
                merged_r.append(np.concatenate([r1[band], r2[band]])[order])
            self.runs.append((merged_v, merged_r))

    def nbytes(self) -> int:
        return sum(a.nbytes for values, rows in self.runs for a in (*values, *rows))

    def query(self, hashes: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(owner, kept row) for every stored hash that shares a quarter with a query hash."""
        found_owner, found_row = [], []
        for values, rows in self.runs:
            for band in range(BANDS):
                wanted = self.quarter(hashes, band)
                lo = np.searchsorted(values[band], wanted, side="left")
                hi = np.searchsorted(values[band], wanted, side="right")
                counts = hi - lo
                total = int(counts.sum())
                if not total:
                    continue
                starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
                found_owner.append(np.repeat(owners, counts))
                found_row.append(rows[band][starts + np.arange(total)])
        if not found_owner:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        return np.concatenate(found_owner), np.concatenate(found_row).astype(np.int64)


def phash_distance(keys: Keys, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pair (a[i], b[i]): the least distance of a's whole-image hash to any of b's hashes and of any of a's to
    b's whole-image hash (a crop of one image matches the other's whole); NO_MATCH where a hash is missing."""
    pa_, pb = keys.phash[a], keys.phash[b]
    ha, hb = keys.has_phash[a], keys.has_phash[b]
    whole_a = np.where(ha[:, :1] & hb, hashes.hamming(pa_[:, :1], pb), NO_MATCH)
    whole_b = np.where(hb[:, :1] & ha, hashes.hamming(pa_, pb[:, :1]), NO_MATCH)
    return np.minimum(whole_a.min(axis=1), whole_b.min(axis=1)).astype(np.int64)


def batch_distances(keys: Keys, batch: np.ndarray) -> np.ndarray:
    """phash_distance of every pair of rows of a batch, as a matrix (one (B, B, scales) popcount, no gathers)."""
    ph, has = keys.phash[batch], keys.has_phash[batch]
    bits = hashes.hamming(ph[:, None, :1], ph[None, :, :])  # a's whole-image hash against each of b's
    one_way = np.where(has[:, None, :1] & has[None, :, :], bits, NO_MATCH).min(axis=2)
    return np.minimum(one_way, one_way.T).astype(np.int64)


def greedy(keys: Keys, config) -> dict:
    """Visit the valid rows in priority order and drop each one that duplicates a row kept before it."""
    cfg = config.curate
    n = keys.n
    positions = np.arange(n, dtype=np.int64)
    candidates = positions[keys.valid]
    order = candidates[np.lexsort((candidates, -keys.area[candidates], ~keys.seed[candidates]))]
    rank = np.full(n, n, dtype=np.int64)
    rank[order] = np.arange(len(order))
    first_with_pixels = np.full(n, -1, dtype=np.int64)
    if cfg.exact_dedup and len(order):
        by_hash = order[np.lexsort((rank[order], keys.pixel[order]))]
        same = np.concatenate([[False], keys.pixel[by_hash][1:] == keys.pixel[by_hash][:-1]])
        group_start = np.maximum.accumulate(np.where(~same, np.arange(len(by_hash)), 0))
        first_with_pixels[by_hash[same]] = by_hash[group_start[same]]
    kept = np.zeros(n, dtype=bool)
    match = np.full(n, -1, dtype=np.int64)
    reason = np.zeros(n, dtype=np.int8)  # 1 duplicate, 2 near_duplicate
    distance = np.full(n, -1, dtype=np.int16)
    cosine = np.full(n, np.nan, dtype=np.float32)
    position_type = np.int32 if n < 2**31 else np.int64
    # kept rows' whole-image pHashes, and their crops' apart: a query's whole hash is looked up in both, its crops'
    # hashes among whole-image ones only (crop against crop is never a criterion)
    bands = BandIndex(position_type) if cfg.phash_dedup else None
    crop_bands = BandIndex(position_type) if cfg.phash_dedup else None
    index = keys.index
    kept_in_index = np.empty(0, dtype=np.int64)  # faiss id -> position
    limit, min_cos = cfg.phash_max_distance, cfg.embedding_min_cosine

    def vectors(rows: np.ndarray) -> np.ndarray:
        return index.sa_decode(keys.codes[rows])

    for start in range(0, len(order), BATCH):
        batch = order[start:start + BATCH]
        size = len(batch)
        decoded = vectors(batch) if index is not None else None
        # candidates among rows kept in earlier batches: (batch index, kept position)
        # Candidates among rows kept in earlier batches, (batch index, kept position): rows sharing a pHash quarter
        # (their cosine is not needed: unknown, -2), and the embedding index's nearest kept rows (its scores).
        owners, found, scores_ = [], [], []
        if bands is not None:
            for scale in range(keys.scales):
                here = np.flatnonzero(keys.has_phash[batch, scale])
                for table in ((bands, crop_bands) if scale == 0 else (bands,)):
                    o, r = table.query(keys.phash[batch[here], scale], here)
                    owners.append(o)
                    found.append(r)
                    scores_.append(np.full(len(r), -2.0, dtype=np.float32))
        if index is not None and index.ntotal:
            scores, ids = index.search(decoded, min(NEIGHBOURS, index.ntotal))
            hit = ids >= 0
            owners.append(np.repeat(np.arange(size), hit.sum(axis=1)))
            found.append(kept_in_index[ids[hit]])
            scores_.append(scores[hit].astype(np.float32))
        earlier_owner = np.concatenate(owners) if owners else np.empty(0, dtype=np.int64)
        earlier_row = np.concatenate(found) if found else np.empty(0, dtype=np.int64)
        pair_cosine = np.concatenate(scores_) if scores_ else np.empty(0, dtype=np.float32)
        pair_distance = phash_distance(keys, batch[earlier_owner], earlier_row) if bands is not None and len(earlier_row) \
            else np.full(len(earlier_row), NO_MATCH, dtype=np.int64)
        # within the batch: every pair
        inner_distance = inner_cosine = None
        if bands is not None:
            inner_distance = batch_distances(keys, batch)
        if index is not None:
            inner_cosine = decoded @ decoded.T
        by_owner = np.argsort(earlier_owner, kind="stable")
        bounds = np.searchsorted(earlier_owner[by_owner], np.arange(size + 1))
        # Rows with nothing that could be their duplicate (no pixel twin, no near candidate kept before this batch,
        # no near row earlier in it) are kept at once; the others are decided one by one, in priority order.
        near_pair = np.zeros(len(earlier_row), dtype=bool)
        if bands is not None:
            near_pair |= pair_distance <= limit
        if index is not None:
            near_pair |= pair_cosine >= min_cos
        maybe = np.zeros(size, dtype=bool)
        maybe[earlier_owner[near_pair]] = True
        maybe |= first_with_pixels[batch] >= 0
        inner_near = np.zeros((size, size), dtype=bool)
        if inner_distance is not None:
            inner_near |= inner_distance <= limit
        if inner_cosine is not None:
            inner_near |= inner_cosine >= min_cos
        maybe |= np.tril(inner_near, k=-1).any(axis=1)
        kept[batch[~maybe]] = True
        for j in np.flatnonzero(maybe):
            row = batch[j]
            twin = first_with_pixels[row]
            if twin >= 0 and kept[twin]:
                match[row], reason[row] = twin, 1
                continue
            picks = by_owner[bounds[j]:bounds[j + 1]]
            rows_ = earlier_row[picks]
            dist, cos = pair_distance[picks], pair_cosine[picks]
            if j:
                inner = batch[:j]
                keep_mask = kept[inner]
                rows_ = np.concatenate([rows_, inner[keep_mask]])
                dist = np.concatenate([dist, inner_distance[j, :j][keep_mask] if inner_distance is not None
                                       else np.full(int(keep_mask.sum()), NO_MATCH)])
                cos = np.concatenate([cos, inner_cosine[j, :j][keep_mask] if inner_cosine is not None
                                      else np.full(int(keep_mask.sum()), -2.0)])
            near = ((dist <= limit) if bands is not None else np.zeros(len(rows_), dtype=bool)) | \
                   ((cos >= min_cos) if index is not None else np.zeros(len(rows_), dtype=bool))
            if near.any():
                # the most alike kept row: fewest differing hash bits, then highest cosine, then priority
                which = np.lexsort((rank[rows_[near]], -cos[near], dist[near]))[0]
                match[row], reason[row] = rows_[near][which], 2
                distance[row] = min(int(dist[near][which]), 32767) if dist[near][which] != NO_MATCH else -1
                cosine[row] = cos[near][which] if cos[near][which] > -2.0 else np.nan
                continue
            kept[row] = True
        newly = batch[kept[batch]]
        if bands is not None and len(newly):
            for scale in range(keys.scales):
                has = newly[keys.has_phash[newly, scale]]
                (bands if scale == 0 else crop_bands).add(keys.phash[has, scale], has)
        if index is not None and len(newly):
            index.add(vectors(newly))
            kept_in_index = np.concatenate([kept_in_index, newly])
    # a pixel twin of a kept row: its pHash and embedding are the kept row's own
    twins = reason == 1
    distance[twins] = 0
    cosine[twins] = 1.0
    if index is not None:  # the cosine of a pair found by its pHash, for the record
        unknown = np.flatnonzero((reason == 2) & np.isnan(cosine))
        for start in range(0, len(unknown), BATCH):
            rows = unknown[start:start + BATCH]
            cosine[rows] = np.einsum("ij,ij->i", vectors(rows), vectors(match[rows]))
    return {"kept": kept, "match": match, "reason": reason, "distance": distance, "cosine": cosine,
            "bands_bytes": bands.nbytes() + crop_bands.nbytes() if bands else 0,
            "index_bytes": int(index.sa_code_size()) * int(index.ntotal) if index is not None else 0}


def evidence(reason: int, distance: int, cosine: float) -> str:
    if reason == 1:
        return "same pixels"
    parts = []
    if distance >= 0:
        parts.append(f"phash distance {distance}")
    if not math.isnan(cosine):
        parts.append(f"cosine {cosine:.4f}")
    return ", ".join(parts)


def write_decisions(keys: Keys, result: dict, output_uri: str) -> tuple[list[str], list[dict]]:
    """decisions/<shard>.parquet for every shard with a dropped row; the kept rows' ids are read shard by shard
    (id column only), so only the dropped rows' ids and their kept rows' ids are ever held."""
    dropped = np.flatnonzero(result["reason"] > 0)
    if not len(dropped):
        return [], []
    kept_of = result["match"][dropped]
    wanted = np.unique(np.concatenate([dropped, kept_of]))
    ids: dict[int, str] = {}
    shard_of = np.searchsorted(keys.offsets, wanted, side="right") - 1
    for shard in np.unique(shard_of):
        table = keys._shard_table(keys.shards[shard], ["id"]).column("id")
        rows = wanted[shard_of == shard]
        for position, value in zip(rows, table.take(pa.array(rows - keys.offsets[shard])).to_pylist()):
            ids[int(position)] = value
    names = ["", "duplicate", "near_duplicate"]
    written, examples = [], []
    dropped_shard = np.searchsorted(keys.offsets, dropped, side="right") - 1
    for shard in np.unique(dropped_shard):
        rows = dropped[dropped_shard == shard]
        records = {"id": [], "reason": [], "kept_id": [], "detail": [], "phash_distance": [], "cosine": []}
        for row in rows:
            r, kept_row = int(result["reason"][row]), int(result["match"][row])
            d, c = int(result["distance"][row]), float(result["cosine"][row])
            records["id"].append(ids[int(row)])
            records["reason"].append(names[r])
            records["kept_id"].append(ids[kept_row])
            records["detail"].append(f"kept {ids[kept_row]}: {evidence(r, d, c)}")
            records["phash_distance"].append(d if d >= 0 else None)
            records["cosine"].append(None if math.isnan(c) else c)
        name = keys.shards[shard]
        storage.write_parquet_atomic(storage.join(output_uri, "decisions", f"{name}.parquet"),
                                     pa.table(records, schema=DECISIONS_SCHEMA))
        written.append(name)
    for code in (1, 2):  # the first few of each reason, in dataset order
        for row in dropped[result["reason"][dropped] == code][:EXAMPLES]:
            kept_row = int(result["match"][row])
            examples.append({
                "reason": names[code], "dropped_id": ids[int(row)], "dropped_shard": keys.shards[keys.locate(int(row))[0]],
                "kept_id": ids[kept_row], "kept_shard": keys.shards[keys.locate(kept_row)[0]],
                "evidence": evidence(code, int(result["distance"][row]), float(result["cosine"][row]))})
    return written, examples


def run(config, inputs: dict, output_uri: str) -> StageOutput:
    settings.check_settings(config)
    keys_manifest = inputs["keys"]
    if not isinstance(keys_manifest, Manifest):
        raise ContractError(f"{STAGE}: its input 'keys' at {keys_manifest.uri} is not a dataset (curate_keys' output)")
    identity = dedup_hash(config, keys_manifest)
    summary_url = storage.join(output_uri, "summary.json")
    if storage.exists(summary_url):
        done = storage.read_json(summary_url)
        if done.get("config_hash") == identity:
            print(f"{STAGE}: already done at {output_uri} for these keys and settings", file=sys.stderr)
            return StageOutput(output_uri, done)
        storage.filesystem(summary_url)[0].rm(storage.filesystem(summary_url)[1])
    decisions = storage.join(output_uri, "decisions")
    fs, path = storage.filesystem(decisions)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    started = time.monotonic()
    keys = Keys(keys_manifest, config)
    loaded = time.monotonic()
    result = greedy(keys, config)
    searched = time.monotonic()
    written, examples = write_decisions(keys, result, output_uri)
    reasons = result["reason"]
    evidence_counts = {
        "pixel_hash": int((reasons == 1).sum()),
        "phash": int(((reasons == 2) & (result["distance"] >= 0) & (result["distance"] <= config.curate.phash_max_distance)).sum()),
        "embedding": int(((reasons == 2) & (result["cosine"] >= config.curate.embedding_min_cosine)).sum()),
    }
    similarity = keys.similarity[~np.isnan(keys.similarity)]
    summary = {
        "uri": output_uri, "config_hash": identity, "keys": keys_manifest.uri,
        "rows": keys.n, "considered": int(keys.valid.sum()), "kept": int(result["kept"].sum()),
        "duplicate": int((reasons == 1).sum()), "near_duplicate": int((reasons == 2).sum()),
        "evidence": evidence_counts, "embedding_index": keys.spec or None,
        "keys_bytes": int(keys.nbytes()), "search_bytes": int(result["bands_bytes"] + result["index_bytes"]),
        "seconds": {"read_keys": round(loaded - started, 3), "search": round(searched - loaded, 3),
                    "write": round(time.monotonic() - searched, 3)},
        "clip_similarity": {f"p{q:02d}": round(float(np.percentile(similarity, q)), 4) for q in (5, 50, 95)} if len(similarity) else {},
        "decision_shards": written, "examples": examples,
    }
    storage.write_json_atomic(summary_url, summary)
    print(f"{STAGE}: {summary['considered']} rows considered, {summary['kept']} kept, {summary['duplicate']} duplicate, "
          f"{summary['near_duplicate']} near_duplicate ({summary['seconds']['search']} s search)", file=sys.stderr)
    return StageOutput(output_uri, summary)


if __name__ == "__main__":
    from cnpipe.cli import main

    sys.exit(main(STAGE, run))
