"""What the model stages share: decode each row's image, run the model on batches, append its output as a
column; an image that cannot be decoded rejects its row with the decoder's reason.

A model comes as two steps: `prepare(pil_images)` (decoding's companion on the CPU: the processor's resize
and normalisation) and `run(inputs)` (the forward pass). Batches are decoded and prepared on helper threads,
a few ahead of the one the model is running (Pillow, NumPy and torch release the GIL), so the model does
not wait for the CPU work between batches: what a DataLoader's workers do, without a second process.
"""
from __future__ import annotations

import os
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence

import pyarrow as pa

from cnpipe import images
from cnpipe.dataset import Reject, ShardResult


def prepare_threads() -> int:
    """Helper threads for decoding and preparing: one per core, at most 4 (the model waits on the GIL-free parts)."""
    return max(1, min(4, (os.cpu_count() or 2)))


def prefetched(executor: ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """fn(item) for every item, in order, each computed up to `ahead` items before it is consumed (bounded memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def map_images(table: pa.Table, prepare: Callable[[list], object], run: Callable[[object], Sequence], batch_size: int,
               column: pa.Field, keep_missing_as: str = "") -> ShardResult:
    """`run(prepare(pil_images)) -> outputs`, one per image. With `keep_missing_as`, a row with no image (a URL not
    downloaded yet) is kept with a null output and counted under that note instead of being rejected."""
    outputs: list = [None] * table.num_rows
    keep = [True] * table.num_rows
    rejects, notes = [], Counter()
    work = []
    for row, (row_id, blob) in enumerate(zip(table.column("id").to_pylist(), table.column("image").to_pylist())):
        if blob is None and keep_missing_as:
            notes[keep_missing_as] += 1
        else:
            work.append((row, row_id, blob))
    batches = [work[i : i + batch_size] for i in range(0, len(work), batch_size)]

    def decode_and_prepare(batch):
        rows, pil_images, failed = [], [], []
        for row, row_id, blob in batch:
            try:
                pil_images.append(images.decode_rgb(blob))
                rows.append(row)
            except images.ImageRejected as err:
                failed.append((row, Reject(row_id, err.reason, err.detail)))
        return rows, (prepare(pil_images) if pil_images else None), failed

    threads = prepare_threads()
    with ThreadPoolExecutor(threads, thread_name_prefix="prepare") as executor:
        for rows, inputs, failed in prefetched(executor, decode_and_prepare, batches, ahead=threads + 1):
            for row, reject in failed:
                rejects.append(reject)
                keep[row] = False
            if rows:
                for row, output in zip(rows, run(inputs)):
                    outputs[row] = output
    kept = table.filter(pa.array(keep, type=pa.bool_()))
    values = pa.array([o for o, k in zip(outputs, keep) if k], type=column.type)
    return ShardResult(kept.append_column(column, values), rejects, notes)
