"""The report's curation section: how many rows curate removed for each reason, and example duplicate pairs side by
side (the kept row's image beside the dropped one's), read from curate_dedup's summary and a few input shards."""
from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw

from cnpipe import storage
from cnpipe.dataset import Manifest, StageOutput
from components.report.contact_sheet import CELL, _font, _thumbnail

PAIRS_NAME = "duplicate_pairs.png"
TEXT_WIDTH = 300


def _pair_rows(curated: Manifest, examples: list[dict]) -> list[dict]:
    """The examples with both images, read from curate's input (the captioned images), one shard read at most once."""
    images_uri = curated.inputs[0] if curated.inputs else ""
    shards: dict[str, dict] = {}

    def row(shard: str, row_id: str) -> dict | None:
        if shard not in shards:
            url = storage.join(images_uri, "data", f"{shard}.parquet")
            table = storage.read_parquet(url, columns=["id", "image", "width", "height"]) if storage.exists(url) else None
            shards[shard] = {r["id"]: r for r in table.to_pylist()} if table is not None else {}
        return shards[shard].get(row_id)

    pairs = []
    for example in examples:
        kept, dropped = row(example["kept_shard"], example["kept_id"]), row(example["dropped_shard"], example["dropped_id"])
        if kept and dropped:
            pairs.append({**example, "kept": kept, "dropped": dropped})
    return pairs


def render(pairs: list[dict]) -> Image.Image:
    header = 28
    sheet = Image.new("RGB", (2 * CELL + TEXT_WIDTH, header + CELL * max(1, len(pairs))), "white")
    draw = ImageDraw.Draw(sheet)
    font, small = _font(16), _font(12)
    for x, name in ((0, "kept"), (CELL, "dropped"), (2 * CELL, "why")):
        draw.text((x + 6, 6), name, fill="black", font=font)
    for i, pair in enumerate(pairs):
        y = header + i * CELL
        sheet.paste(_thumbnail(pair["kept"]["image"]), (0, y))
        sheet.paste(_thumbnail(pair["dropped"]["image"]), (CELL, y))
        size = lambda r: f"{r['width']}x{r['height']}"  # noqa: E731
        lines = [pair["reason"], pair["evidence"], ""]
        lines += textwrap.wrap(f"kept {pair['kept_id']} ({size(pair['kept'])})", 44)
        lines += textwrap.wrap(f"dropped {pair['dropped_id']} ({size(pair['dropped'])})", 44)
        draw.multiline_text((2 * CELL + 6, y + 6), "\n".join(lines), fill="black", font=small, spacing=3)
    return sheet


def section(inputs: dict) -> tuple[list[str], list[dict]]:
    """(Markdown lines of the curation section, the example pairs with their images); nothing without curate."""
    curated, dedup = inputs.get("curate"), inputs.get("curate_dedup")
    if not isinstance(curated, Manifest):
        return [], []
    lines = ["", "## Curation", "", f"curate kept {curated.rows_out} of {curated.rows_in} rows.", "",
             "| reason | rows removed |", "|---|---:|"]
    lines += [f"| {reason} | {n} |" for reason, n in sorted(curated.rejections.items(), key=lambda kv: -kv[1])]
    pairs: list[dict] = []
    if isinstance(dedup, StageOutput):
        summary = dedup.summary
        evidence = summary.get("evidence", {})
        lines += ["", f"Duplicates among the {summary.get('considered', 0)} rows that passed the per-row filters: "
                  f"{summary.get('duplicate', 0)} with the same pixels as a kept row, {summary.get('near_duplicate', 0)} near "
                  f"(pHash {evidence.get('phash', 0)}, CLIP embedding {evidence.get('embedding', 0)}; a pair may show both)."]
        if summary.get("clip_similarity"):
            quantiles = ", ".join(f"{k} {v}" for k, v in summary["clip_similarity"].items())
            lines += ["", f"Caption-image CLIP similarity (`clip_similarity`): {quantiles}."]
        pairs = _pair_rows(curated, summary.get("examples", []))
        if pairs:
            lines += ["", "| reason | kept | dropped | evidence |", "|---|---|---|---|"]
            lines += [f"| {p['reason']} | `{p['kept_id']}` | `{p['dropped_id']}` | {p['evidence']} |" for p in pairs]
            lines += ["", f"![duplicate pairs]({PAIRS_NAME})"]
    return lines, pairs


def html_sections(inputs: dict, pairs: list[dict], pairs_png: bytes | None) -> list[str]:
    """The same for the HTML report: rows removed per reason, the pairs table and picture (inlined)."""
    from components.report import html

    curated = inputs.get("curate")
    if not isinstance(curated, Manifest):
        return []
    out = ["<h2>Curation</h2>", f"<p>curate kept {curated.rows_out} of {curated.rows_in} rows.</p>",
           html.table(["reason", "rows removed"], [[r, n] for r, n in sorted(curated.rejections.items(), key=lambda kv: -kv[1])],
                      numeric={1})]
    if pairs:
        out.append(html.table(["reason", "kept", "dropped", "evidence"],
                              [[p["reason"], p["kept_id"], p["dropped_id"], p["evidence"]] for p in pairs]))
    if pairs_png:
        out.append(html.figure(pairs_png, "duplicate pairs", "kept | dropped, with why"))
    return out
