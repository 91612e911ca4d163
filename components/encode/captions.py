"""Which caption a row is trained (and evaluated) with: `encode.caption_source`, with a stated fallback."""
from __future__ import annotations

from pipeline_configs import CAPTION_SOURCES


def _clean(text) -> str:
    return text.strip() if isinstance(text, str) else ""


def choose_caption(mode: str, source_caption, blip_caption, caption) -> tuple[str, str]:
    """Return (text, origin); origin is source | blip | caption | none.

    prefer_source: the source's own caption when non-empty, else BLIP's, else the conditioning
    stage's `caption` column. blip / source: only that column. origin "none" means the row has no
    caption at all: it is trained with the empty prompt (as with caption dropout) and counted.
    """
    if mode not in CAPTION_SOURCES:
        raise ValueError(f"encode.caption_source must be one of {', '.join(CAPTION_SOURCES)}, got {mode!r}")
    candidates = {
        "prefer_source": (("source", source_caption), ("blip", blip_caption), ("caption", caption)),
        "blip": (("blip", blip_caption),),
        "source": (("source", source_caption),),
    }[mode]
    for origin, text in candidates:
        if _clean(text):
            return _clean(text), origin
    return "", "none"
