"""Batches from the encode dataset: deterministic order, one host's slice each, prefetched, resumable.

The order of an epoch is a pure function of (seed, epoch, which rows are "train"), computed from
metadata only, so a restarted run resumes at the exact batch by counting, without reading the
skipped shards. Rows are shuffled within windows of a few shards, so memory stays bounded by that
window however large the dataset. Each host decodes only its own slice of every global batch.
"""
from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from cnpipe import images, storage
from cnpipe.dataset import Manifest
from cnpipe.tensors import from_bf16_bytes

REQUIRED_COLUMNS = ("id", "split", "latent", "latent_shape", "text_encoding", "text_shape", "control")
BATCH_COLUMNS = ["id", "latent", "text_encoding", "control"]
UNCOND_ENCODING = "uncond_text_encoding.bin"
UNCOND_SHAPE = "uncond_text_shape.json"


class DataError(ValueError):
    """The encoded dataset cannot feed this training run; the message says which row or shape."""


@dataclass
class EncodedData:
    """What training needs to know about the encode output before it reads a single latent."""

    manifest: Manifest
    train_rows: list[np.ndarray]  # per shard: indices of its "train" rows
    heldout_count: int
    latent_shape: tuple[int, ...]  # [C, h, w]
    text_shape: tuple[int, ...]  # [seq_len, hidden]
    control_size: tuple[int, int]  # (height, width) of the control PNGs
    uncond: np.ndarray | None = field(default=None, repr=False)  # [seq_len, hidden], the empty prompt

    @property
    def num_train(self) -> int:
        return int(sum(len(r) for r in self.train_rows))

    def fingerprint(self) -> dict:
        """Identifies the data a checkpoint's data position refers to."""
        return {"uri": self.manifest.uri, "shards": [s["name"] for s in self.manifest.shards], "num_train": self.num_train}


def open_encoded(manifest: Manifest) -> EncodedData:
    """Reads only the small columns (split and shapes) of every shard, and one control image."""
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.arrow_schema().names]
    if missing:
        raise DataError(f"{manifest.uri} is not an encode dataset: columns {missing} are missing")
    train_rows, heldout, latent_shape, text_shape, first = [], 0, None, None, None
    for shard, table in manifest.iter_shards(["id", "split", "latent_shape", "text_shape"]):
        splits = np.asarray(table.column("split").to_pylist(), dtype=object)
        train_rows.append(np.flatnonzero(splits == "train").astype(np.int64))
        heldout += int(np.sum(splits == "heldout"))
        ids = table.column("id").to_pylist()
        for row_id, lshape, tshape in zip(ids, table.column("latent_shape").to_pylist(), table.column("text_shape").to_pylist()):
            lshape, tshape = tuple(lshape), tuple(tshape)
            if latent_shape is None:
                latent_shape, text_shape, first = lshape, tshape, (shard, row_id)
            if lshape != latent_shape or tshape != text_shape:
                raise DataError(
                    f"row {row_id} (shard {shard}) has latent shape {list(lshape)} and text shape {list(tshape)}, "
                    f"but row {first[1]} (shard {first[0]}) has {list(latent_shape)} and {list(text_shape)}"
                )
    if latent_shape is None:
        raise DataError(f"{manifest.uri} has no rows")
    control_size = _first_control_size(manifest)
    return EncodedData(manifest, train_rows, heldout, latent_shape, text_shape, control_size, load_uncond(manifest.uri))


def _first_control_size(manifest: Manifest) -> tuple[int, int]:
    for _, table in manifest.iter_shards(["id", "control"]):
        if table.num_rows:
            row_id, blob = table.column("id")[0].as_py(), table.column("control")[0].as_py()
            image = decode_control(row_id, blob)
            return image.shape[1], image.shape[2]
    raise DataError(f"{manifest.uri} has no rows")


def load_uncond(uri: str) -> np.ndarray | None:
    """The empty-prompt encoding stored once beside the shards (None when the producer did not write it)."""
    blob, shape = storage.join(uri, UNCOND_ENCODING), storage.join(uri, UNCOND_SHAPE)
    if not (storage.exists(blob) and storage.exists(shape)):
        return None
    return from_bf16_bytes(storage.read_bytes(blob), storage.read_json(shape))


def decode_control(row_id: str, blob: bytes) -> np.ndarray:
    """Control PNG -> float32 [3, H, W] in [0, 1], as diffusers' ControlNet pipelines feed it."""
    try:
        image = images.decode_rgb(blob)
    except images.ImageRejected as err:
        raise DataError(f"row {row_id}: control image cannot be decoded ({err})") from err
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0


def epoch_order(train_rows: list[np.ndarray], seed: int, epoch: int, window: int) -> np.ndarray:
    """[N, 2] (shard, row) pairs of one epoch: shards permuted, rows permuted within windows of shards."""
    rng = np.random.default_rng([seed, epoch])
    shards = [s for s in rng.permutation(len(train_rows)) if len(train_rows[s])]
    parts = []
    for start in range(0, len(shards), window):
        pairs = np.concatenate(
            [np.stack([np.full(len(train_rows[s]), s), train_rows[s]], axis=1) for s in shards[start : start + window]]
        )
        parts.append(pairs[rng.permutation(len(pairs))])
    return np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)


class ShardCache:
    """The last few shards' batch columns as Python lists (bounded: a couple of shuffle windows)."""

    def __init__(self, manifest: Manifest, capacity: int):
        self.urls = [url for _, url in manifest.shard_urls()]
        self.capacity = capacity
        self.tables: OrderedDict[int, dict[str, list]] = OrderedDict()

    def get(self, shard: int) -> dict[str, list]:
        if shard in self.tables:
            self.tables.move_to_end(shard)
            return self.tables[shard]
        table = storage.read_parquet(self.urls[shard], columns=BATCH_COLUMNS)
        self.tables[shard] = {name: table.column(name).to_pylist() for name in BATCH_COLUMNS}
        while len(self.tables) > self.capacity:
            self.tables.popitem(last=False)
        return self.tables[shard]


class BatchFeed:
    """Yields this host's slice of every global batch, as float32 numpy arrays, from `start_batch` on.

    A background thread decodes ahead (`prefetch` batches) so the device never waits on PNG decoding.
    """

    def __init__(self, data: EncodedData, global_batch: int, process_index: int, process_count: int,
                 seed: int, window_shards: int, start_batch: int = 0, prefetch: int = 2):
        self.data = data
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.offset = process_index * self.local_batch
        self.seed, self.window = seed, window_shards
        self.steps_per_epoch = data.num_train // global_batch
        self.start_batch = start_batch
        self.cache = ShardCache(data.manifest, capacity=2 * window_shards)
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True, name="batch-feed")
        self._thread.start()

    def _positions(self):
        position = self.start_batch
        while True:
            epoch, first = divmod(position, self.steps_per_epoch)
            order = epoch_order(self.data.train_rows, self.seed, epoch, self.window)
            for b in range(first, self.steps_per_epoch):
                batch = order[b * self.global_batch : (b + 1) * self.global_batch]
                yield batch[self.offset : self.offset + self.local_batch]
            position = (epoch + 1) * self.steps_per_epoch

    def load(self, pairs: np.ndarray) -> dict[str, np.ndarray]:
        latents, texts, controls = [], [], []
        for shard, row in pairs:
            columns = self.cache.get(int(shard))
            row_id = columns["id"][row]
            try:
                latents.append(from_bf16_bytes(columns["latent"][row], self.data.latent_shape))
                texts.append(from_bf16_bytes(columns["text_encoding"][row], self.data.text_shape))
            except ValueError as err:
                raise DataError(f"row {row_id}: {err}") from err
            control = decode_control(row_id, columns["control"][row])
            if control.shape[1:] != self.data.control_size:
                raise DataError(
                    f"row {row_id}: control image is {control.shape[2]}x{control.shape[1]}, "
                    f"the dataset's first is {self.data.control_size[1]}x{self.data.control_size[0]}"
                )
            controls.append(control)
        return {"latents": np.stack(latents), "text": np.stack(texts), "control": np.stack(controls)}

    def _fill(self) -> None:
        try:
            for pairs in self._positions():
                item = self.load(pairs)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as err:  # handed to the consumer, raised there
            self._queue.put(err)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def first_heldout(manifest: Manifest, count: int, data: EncodedData) -> list[dict]:
    """The first `count` held-out rows in shard order, decoded; stops reading once it has them."""
    rows: list[dict] = []
    if count <= 0:
        return rows
    for _, table in manifest.iter_shards(["id", "split", "caption", "text_encoding", "control", "image"]):
        for record in table.to_pylist():
            if record["split"] != "heldout":
                continue
            rows.append({
                "id": record["id"],
                "caption": record["caption"],
                "text": from_bf16_bytes(record["text_encoding"], data.text_shape),
                "control": decode_control(record["id"], record["control"]),
                "image": record["image"],
            })
            if len(rows) == count:
                return rows
    return rows
