"""Report: what every stage did (rows in/out/rejected, rejections by reason) and a contact sheet.

Reads only manifests, rejected tables' reasons and the first shards of the conditioning datasets
(stops once it has its sample), so it stays cheap at any dataset size.
"""
from __future__ import annotations

import datetime as _dt

from cnpipe import storage
from cnpipe.dataset import Manifest, StageOutput
from components.report import contact_sheet, curation, html
from components.report import training

STAGE = "report"


def stage_rows(inputs: dict) -> list[dict]:
    """One accounting row per dataset, conditioning types each on their own row."""
    rows = []
    for name, item in inputs.items():
        if isinstance(item, Manifest):
            rows.append({"stage": item.stage, "uri": item.uri, "rows_in": item.rows_in, "rows_out": item.rows_out,
                         "rows_rejected": item.rows_rejected, "rejections": item.rejections, "notes": item.notes})
        elif isinstance(item, StageOutput) and "types" in item.summary:
            for type_name, info in item.summary["types"].items():
                m = Manifest.load(info["uri"])
                rows.append({"stage": m.stage, "uri": m.uri, "rows_in": m.rows_in, "rows_out": m.rows_out,
                             "rows_rejected": m.rows_rejected, "rejections": m.rejections, "notes": m.notes})
        else:
            rows.append({"stage": name, "uri": item.uri, **{k: v for k, v in item.summary.items() if not isinstance(v, (dict, list))}})
    return rows


def sample_rows(conditioning: StageOutput, count: int) -> tuple[list[dict], list[str]]:
    """Up to `count` rows, those that have every control type first (people, for pose), then the rest."""
    types = list(conditioning.summary["types"])
    manifests = {t: Manifest.load(conditioning.summary["types"][t]["uri"]) for t in types}
    controls: dict[str, dict] = {}
    for t in types:
        for _, table in manifests[t].iter_shards(columns=["id", "control"]):
            for row_id, blob in zip(table.column("id").to_pylist(), table.column("control").to_pylist()):
                controls.setdefault(row_id, {})[t] = blob
            if sum(len(v) == len(types) for v in controls.values()) >= count:
                break
        for reject in manifests[t].rejected_table().to_pylist():
            controls.setdefault(reject["id"], {}).setdefault(t, reject["reason"])
    complete = [i for i, v in controls.items() if all(isinstance(v.get(t), bytes) for t in types)]
    partial = [i for i in controls if i not in set(complete)]
    wanted = (complete + partial)[:count]
    rows: dict[str, dict] = {}
    for t in types:
        for _, table in manifests[t].iter_shards(columns=["id", "image", "caption", "source_caption", "blip_caption"]):
            for row in table.to_pylist():
                if row["id"] in wanted and row["id"] not in rows:
                    rows[row["id"]] = {**row, "controls": controls[row["id"]]}
            if len(rows) == len(wanted):
                break
    return [rows[i] for i in wanted if i in rows], types


def markdown(rows: list[dict], run_name: str, sheet_name: str | None) -> str:
    lines = [f"# Run report: {run_name}", "", f"Written {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}.", "",
             "## Rows per stage", "", "| stage | rows in | rows out | rows rejected | output |", "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r.get('rows_in', '')} | {r.get('rows_out', '')} | {r.get('rows_rejected', '')} | `{r['uri']}` |")
    lines += ["", "## Rejections by reason", "", "| stage | reason | rows |", "|---|---|---:|"]
    for r in rows:
        for reason, n in sorted((r.get("rejections") or {}).items(), key=lambda kv: -kv[1]):
            lines.append(f"| {r['stage']} | {reason} | {n} |")
    notes = [(r["stage"], k, v) for r in rows for k, v in (r.get("notes") or {}).items()]
    if notes:
        lines += ["", "## Handled and kept (notes)", "", "| stage | note | rows |", "|---|---|---:|"]
        lines += [f"| {s} | {k} | {v} |" for s, k, v in notes]
    if sheet_name:
        lines += ["", "## Contact sheet", "", f"![contact sheet]({sheet_name})", ""]
    return "\n".join(lines) + "\n"


def _read_if_there(uri: str) -> bytes | None:
    return storage.read_bytes(uri) if storage.exists(uri) else None


def html_page(rows: list[dict], run_name: str, sheet: bytes | None, inputs: dict, curated: list[str] = (),
              output_uri: str = "") -> str:
    """The report as one self-contained page for the Kubeflow UI: what report.md shows, every picture inlined (the
    contact sheet, the curation pairs, and the plots and grid that training.section wrote beside report.md in
    `output_uri`), plus rows in/out per stage as an inline SVG chart."""
    sections = [f'<p class="muted">Written {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}.</p>', "<h2>Rows per stage</h2>",
                html.table(["stage", "rows in", "rows out", "rows rejected", "output"],
                           [[r["stage"], r.get("rows_in", ""), r.get("rows_out", ""), r.get("rows_rejected", ""), r["uri"]]
                            for r in rows], numeric={1, 2, 3}),
                html.bar_chart([(r["stage"], r.get("rows_in"), r.get("rows_out")) for r in rows if "rows_in" in r])]
    rejections = [[r["stage"], reason, n] for r in rows
                  for reason, n in sorted((r.get("rejections") or {}).items(), key=lambda kv: -kv[1])]
    if rejections:
        sections += ["<h2>Rejections by reason</h2>", html.table(["stage", "reason", "rows"], rejections, numeric={2})]
    notes = [[r["stage"], k, v] for r in rows for k, v in (r.get("notes") or {}).items()]
    if notes:
        sections += ["<h2>Handled and kept (notes)</h2>", html.table(["stage", "note", "rows"], notes, numeric={2})]
    if sheet:
        sections += ["<h2>Contact sheet</h2>", html.figure(sheet, "contact sheet", "image, captions and control images per sample row")]
    sections += list(curated)  # curation: rows removed per reason, duplicate pairs (components/report/curation.py)
    return html.page(f"Run report: {run_name}", sections + _training_html(inputs, output_uri))


def _training_html(inputs: dict, output_uri: str) -> list[str]:
    """training.section's part of report.md as HTML: the loss curve, the evaluation grid, the fidelity plot and the
    untrained-vs-trained metrics, the pictures read back from where it wrote them."""
    picture = (lambda name: _read_if_there(storage.join(output_uri, name))) if output_uri else (lambda name: None)
    sections = []
    train = inputs.get("controlnet_train")
    loss = picture(training.LOSS_PNG)
    if isinstance(train, StageOutput) and loss:
        sections += ["<h2>Training</h2>", html.figure(loss, "training loss", f"from {train.uri}/metrics.jsonl")]
    evaluated = inputs.get("evaluate")
    if isinstance(evaluated, StageOutput):
        sections.append("<h2>How much training helped</h2>")
        grid, bars = picture(training.GRID_PNG), picture(training.FIDELITY_PNG)
        if grid:
            sections.append(html.figure(grid, "control | untrained | trained | reference",
                                        "Rows: control | untrained ControlNet (the base alone) | trained ControlNet | "
                                        "reference, held-out controls, the same prompt and seed in each row."))
        if bars:
            sections.append(html.figure(bars, "control fidelity, untrained vs trained"))
        trained, untrained = evaluated.summary.get("metrics") or {}, evaluated.summary.get("metrics_untrained") or {}
        if trained:
            sections.append(html.table(["metric", "untrained ControlNet", "trained ControlNet"],
                                       [[k, training._number(untrained.get(k)), training._number(v)] for k, v in trained.items()],
                                       numeric={1, 2}))
    return sections


def run(config, inputs: dict, output_uri: str) -> StageOutput:
    rows = stage_rows(inputs)
    conditioning = next((v for v in inputs.values() if isinstance(v, StageOutput) and "types" in v.summary), None)
    sheet_name, sheet = None, None
    if conditioning is not None and config.report.sample_rows > 0:
        samples, types = sample_rows(conditioning, config.report.sample_rows)
        sheet_name = "contact_sheet.png"
        sheet = contact_sheet.to_png(contact_sheet.render(samples, types))
        storage.write_bytes_atomic(storage.join(output_uri, sheet_name), sheet)
    text = markdown(rows, config.name, sheet_name)
    curated, pairs = curation.section(inputs)  # rows curate removed per reason, example duplicate pairs side by side
    pairs_png = contact_sheet.to_png(curation.render(pairs)) if pairs else None
    if pairs_png:
        storage.write_bytes_atomic(storage.join(output_uri, curation.PAIRS_NAME), pairs_png)
    text += "\n".join(curated) + ("\n" if curated else "")
    helped = training.section(inputs, output_uri)  # loss curve and untrained-vs-trained fidelity, as PNG plots
    text += "\n".join(helped) + ("\n" if helped else "")
    storage.write_bytes_atomic(storage.join(output_uri, "report.md"), text.encode())
    page = html_page(rows, config.name, sheet, inputs, curation.html_sections(inputs, pairs, pairs_png), output_uri)
    storage.write_bytes_atomic(storage.join(output_uri, "report.html"), page.encode())
    summary = {"report": storage.join(output_uri, "report.md"), "report_html": storage.join(output_uri, "report.html"),
               "contact_sheet": sheet_name and storage.join(output_uri, sheet_name), "stages": rows}
    storage.write_json_atomic(storage.join(output_uri, "summary.json"), summary)
    return StageOutput(output_uri, summary)
