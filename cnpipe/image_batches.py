"""What the model stages share: decode each row's image, run the model on batches, append its output as a
column; an image that cannot be decoded rejects its row with the decoder's reason."""
from __future__ import annotations

from collections import Counter
from typing import Callable

import pyarrow as pa

from cnpipe import images
from cnpipe.dataset import Reject, ShardResult


def map_images(table: pa.Table, model: Callable[[list], list], batch_size: int, column: pa.Field,
               keep_missing_as: str = "") -> ShardResult:
    """`model(pil_images) -> outputs`, one per image. With `keep_missing_as`, a row with no image (a URL not
    downloaded yet) is kept with a null output and counted under that note instead of being rejected."""
    outputs: list = [None] * table.num_rows
    keep = [True] * table.num_rows
    rejects, notes = [], Counter()
    pending: list[tuple[int, object]] = []

    def flush() -> None:
        if pending:
            for (row, _), output in zip(pending, model([image for _, image in pending])):
                outputs[row] = output
            pending.clear()

    for row, (row_id, blob) in enumerate(zip(table.column("id").to_pylist(), table.column("image").to_pylist())):
        if blob is None and keep_missing_as:
            notes[keep_missing_as] += 1
            continue
        try:
            pending.append((row, images.decode_rgb(blob)))
        except images.ImageRejected as err:
            rejects.append(Reject(row_id, err.reason, err.detail))
            keep[row] = False
            continue
        if len(pending) >= batch_size:
            flush()
    flush()
    kept = table.filter(pa.array(keep, type=pa.bool_()))
    values = pa.array([o for o, k in zip(outputs, keep) if k], type=column.type)
    return ShardResult(kept.append_column(column, values), rejects, notes)
