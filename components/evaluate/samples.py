"""Which rows evaluate generates from: held-out rows (never trained on), read shard by shard until enough."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

from cnpipe import images, splits
from cnpipe.dataset import Manifest
from components.encode.captions import choose_caption
from components.encode.pixels import square_crop

COLUMNS = ["id", "image", "control", "caption", "blip_caption", "source_caption"]


@dataclass
class Sample:
    id: str
    prompt: str
    control: Image.Image  # R×R, as the ControlNet sees it (encode's geometry and filter); fidelity measures against it
    reference: Image.Image  # R×R target image


@dataclass
class Selection:
    samples: list[Sample]
    heldout_fallback: bool  # True: no held-out row existed, the first rows were used (they were trained on)
    skipped: Counter = field(default_factory=Counter)  # rows the chosen pass met but could not use, by reason


def _sample(row: dict, resolution: int, caption_source: str) -> Sample:
    image = images.decode_rgb(row["image"])
    try:
        control = images.decode_rgb(row["control"])
    except images.ImageRejected as err:
        raise images.ImageRejected(f"control_{err.reason}", err.detail) from None
    prompt, _ = choose_caption(caption_source, row["source_caption"], row["blip_caption"], row["caption"])
    return Sample(
        id=row["id"],
        prompt=prompt,
        control=square_crop(control, resolution, Image.Resampling.BILINEAR),
        reference=square_crop(image, resolution, Image.Resampling.BICUBIC),
    )


def _collect(conditioning: Manifest, wanted: int, enc, keep) -> tuple[list[Sample], Counter]:
    samples, skipped = [], Counter()
    for _, table in conditioning.iter_shards(columns=COLUMNS):
        for row in table.to_pylist():
            if not keep(row["id"]):
                continue
            try:
                samples.append(_sample(row, enc.resolution, enc.caption_source))
            except images.ImageRejected as err:
                skipped[err.reason] += 1
                continue
            if len(samples) >= wanted:
                return samples, skipped
    return samples, skipped


def select(conditioning: Manifest, num_samples: int, enc) -> Selection:
    """Up to `num_samples` usable held-out rows; with no usable held-out row, the first usable rows, flagged."""
    samples, skipped = _collect(conditioning, num_samples, enc, lambda i: splits.is_heldout(i, enc.holdout_fraction))
    if samples:
        return Selection(samples, heldout_fallback=False, skipped=skipped)
    samples, more = _collect(conditioning, num_samples, enc, lambda i: True)
    return Selection(samples, heldout_fallback=True, skipped=more)
