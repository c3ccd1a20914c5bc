"""Rendering of results for people: rich tables on a console, and the `vitdiag report` folder.

The folder holds ``report.json`` (all results, the schema every command writes), ``report.md``
(GitHub-flavoured tables, notes and the figures) and the PNGs beside it (`vitdiag.plots`). It is
written into a temporary sibling and renamed into place, so a crash never leaves half a report,
and an existing non-empty folder is only replaced with --force. Section titles and the metrics
of the comparison table are what each probe declares (`title`, `headlines`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitdiag.errors import VitdiagError
from vitdiag.results import (
    Result,
    document,
    dumps,
    json_to_stdout,
    jsonable,
    write_json_text,
    writing,
)


def fmt(value: Any) -> str:
    """Numbers with 4 significant digits; integers as integers; None and NaN as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value.is_integer() and abs(value) < 1e9:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


def render(results: list[Result], console, *, loaded=None, data: dict | None = None) -> None:
    from rich.table import Table as RichTable

    if loaded is not None:
        prov = loaded.provenance
        console.print(
            f"[bold]model[/bold] {prov.get('path') or '(random weights)'}  "
            f"arch={loaded.arch}  size={loaded.img_size[0]}x{loaded.img_size[1]}"
        )
    if data is not None:
        synthetic = "  [yellow]SYNTHETIC DATA[/yellow]" if data.get("synthetic") else ""
        console.print(
            f"[bold]data[/bold] {data.get('source')}  images={data.get('n_images')}{synthetic}"
        )
    for result in results:
        for table in result.tables:
            rt = RichTable(title=table.title, title_justify="left")
            for col in table.columns:
                rt.add_column(str(col))
            for row in table.rows:
                rt.add_row(*[fmt(v) for v in row])
            console.print(rt)
        console.print(f"[dim]definition: {result.definition}[/dim]")
        for note in result.notes:
            console.print(f"note: {note}")


def print_summary(
    con: Any, entries: list[Entry], data: dict, findings: list[dict] | None = None
) -> None:
    from rich.table import Table as RichTable

    if findings is not None:
        print_findings(con, findings)
    for role, d in data.items():
        synthetic = "  [yellow]SYNTHETIC DATA[/yellow]" if d.get("synthetic") else ""
        con.print(f"[bold]{role}[/bold] {d.get('source')}  images={d.get('n_images')}{synthetic}")
    cols, rows = comparison(entries)
    table = RichTable(title="Headline metrics", title_justify="left")
    for c in cols:
        table.add_column(str(c))
    for row in rows:
        table.add_row(
            *[fmt(v) if not isinstance(v, float) or math.isfinite(v) else "–" for v in row]
        )
    con.print(table)
    for e in entries:
        for probe, why in e.results.skipped.items():
            prefix = f"{e.label}: " if len(entries) > 1 else ""
            con.print(f"note: {prefix}{probe} not run: {why}")


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=False)


def emit(
    command: str,
    results: list,
    *,
    loaded=None,
    data: dict | None = None,
    json_path: Path | None = None,
    run: dict | None = None,
    shown: list | None = None,
    then: Callable[[Any], None] | None = None,
) -> None:
    """Print the tables for people and, if asked, write the JSON document (rank 0 only).

    shown: the results printed, when they differ from those written (several checkpoints in
    one table); then: more output for people after the tables, given the console."""
    from vitdiag.distributed import is_main_process

    if not is_main_process():
        return
    out = console(stderr=json_to_stdout(json_path))
    render(results if shown is None else shown, out, loaded=loaded, data=data)
    if then is not None:
        then(out)
    if json_path is None:
        return
    from vitdiag.model import describe

    doc = document(command, results, describe(loaded) if loaded is not None else None, data)
    if run:
        doc["run"] = run
    write_json_text(dumps(doc), json_path)


def side_by_side(labelled: list[tuple[str, Result]]) -> Result:
    """Several checkpoints' similarity curves in one table: layer and value per depth."""
    from vitdiag.results import Table

    results = [r for _, r in labelled]
    rows = []
    for i in range(max(len(r.extra["layers"]) for r in results)):
        row: list = [i]
        for r in results:
            lay, vals = r.extra["layers"], r.extra["mean"]
            row += [lay[i], vals[i]] if i < len(lay) else [None, None]
        rows.append(row)
    cols = ["index"] + [c for label, _ in labelled for c in (label, "P")]
    table = Table("Comparison", cols, rows)
    return Result("similarity.compare", results[0].definition, tables=[table])


def stacked(results: list[Result], labels: list[str]) -> list[Result]:
    """Several checkpoints' invariance tables as one, a `checkpoint` column first."""
    from vitdiag.results import Table

    first = results[0].tables[0]
    rows = [
        [label, *row] for label, r in zip(labels, results, strict=True) for row in r.tables[0].rows
    ]
    notes = list(dict.fromkeys(n for r in results for n in r.notes))
    table = Table(first.title, ["checkpoint", *first.columns], rows)
    return [Result("invariance", results[0].definition, tables=[table], notes=notes)]


def render_model(loaded: Any, out: Any) -> None:
    """`vitdiag info`'s tables: what the model is, and every assumption with its override."""
    from rich.table import Table as RichTable

    from vitdiag.families import has_abs_pos_table

    t = RichTable(title="Model", show_header=False, title_justify="left")
    t.add_column("field")
    t.add_column("value")
    prov = loaded.provenance
    n_params = sum(p.numel() for p in loaded.model.parameters())
    rows = [
        ("source", str(prov.get("path") or "(random weights)")),
        ("format", str(prov.get("format", "–"))),
        ("sha256", str(prov.get("sha256") or "–")),
        ("architecture", loaded.arch),
        ("family", loaded.family.label),
        ("decided by", str(prov.get("decided_by", "–"))),
        ("classes", str(loaded.num_classes)),
        ("parameters", f"{n_params:,}"),
        ("native size", "x".join(map(str, loaded.native_size))),
        ("built at", "x".join(map(str, loaded.img_size))),
        ("absolute position table", "yes" if has_abs_pos_table(loaded.model) else "no"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)
    a = RichTable(title="Assumptions", title_justify="left")
    for col in ("what", "value", "decided from", "override with"):
        a.add_column(col)
    for item in loaded.assumptions:
        a.add_row(item.name, str(item.value), item.source, item.override)
    out.print(a)


# -- a report: one entry per checkpoint ----------------------------------------------------------


@dataclass
class Entry:
    """One checkpoint's part of a report."""

    label: str
    model: dict  # vitdiag.model.describe(...)
    results: Any  # runner.Results


def checkpoint_labels(ckpts: list[str | None], arch: str | None) -> list[str]:
    names = [Path(c).name if c else f"{arch} (random)" for c in ckpts]
    if len(set(names)) < len(names):
        names = [str(c) if c else f"{arch} (random)" for c in ckpts]
    return names


def report_document(entries: list[Entry], data: dict, seconds: float, world: int) -> dict:
    results = []
    for e in entries:
        for r in e.results:
            r.extra["checkpoint"] = e.label
            results.append(r)
    single = entries[0].model if len(entries) == 1 else None
    doc = document("report", results, single, data or None)
    doc["checkpoints"] = [
        {
            "label": e.label,
            "model": e.model,
            "skipped": dict(e.results.skipped),
            "passes": list(e.results.passes),
        }
        for e in entries
    ]
    if len(entries) > 1:
        cols, rows = comparison(entries)
        doc["comparison"] = {"columns": cols, "rows": rows}
    doc["run"] = {"seconds": seconds, "world_size": world}
    return with_findings(jsonable(doc))


def with_findings(doc: dict) -> dict:
    """The document with its `findings` block: the rules applied to the document itself, so a
    saved report judged again (`vitdiag findings`) gives the same findings."""
    from vitdiag.findings import evaluate, findings_block

    doc["findings"] = findings_block(evaluate(doc))
    return doc


# -- findings, for people ---------------------------------------------------------------------


def _against(item: dict) -> str:
    ref = item.get("reference") or {}
    value = fmt(ref.get("value")) if ref.get("value") is not None else "–"
    interval = ref.get("interval")
    return value + (f" [{fmt(interval[0])}, {fmt(interval[1])}]" if interval else "")


def _measured(item: dict) -> str:
    value = fmt(item["value"]) if item.get("value") is not None else "–"
    interval = item.get("interval")
    return value + (f" [{fmt(interval[0])}, {fmt(interval[1])}]" if interval else "")


def print_findings(con: Any, items: list[dict]) -> None:
    """The findings for people, most severe first: rule, value against reference, what to do."""
    from rich.markup import escape

    if not items:
        con.print("Findings: no rule fired.")
        return
    colour = {"fail": "bold red", "warn": "yellow", "info": "cyan"}
    con.print(f"[bold]Findings[/bold] ({len(items)}; 95 % intervals over images)")
    for item in items:
        sev = item["severity"]
        where = f" ({escape(item['checkpoint'])})" if item.get("checkpoint") else ""
        con.print(f"[{colour[sev]}]{sev.upper()}[/{colour[sev]}] {item['rule']}{where}")
        method = f" ({item['interval_method']})" if item.get("interval_method") else ""
        con.print(f"  measured {_measured(item)}{method} against {_against(item)}")
        con.print(f"  {escape(item['message'])}")
        if item.get("remedy"):
            con.print(f"  → {escape(item['remedy'])}")


def findings_markdown(items: list[dict]) -> list[str]:
    """report.md's opening section: one row per finding, then how each reference was made."""
    lines = ["## Findings", ""]
    if not items:
        return lines + ["No rule fired.", ""]
    rows = []
    for item in items:
        rule = item["rule"] + (f" ({item['checkpoint']})" if item.get("checkpoint") else "")
        remedy = f"`{item['remedy']}`" if item.get("remedy") else "–"
        method = item.get("interval_method") or "–"
        rows.append(
            [item["severity"], f"`{rule}`", _measured(item), method, _against(item),
             item["message"], remedy]
        )  # fmt: skip
    cols = ["severity", "rule", "measured [95 %]", "interval", "reference", "finding", "remedy"]
    lines += md_table(cols, rows)
    hows = sorted({(item["rule"], (item.get("reference") or {}).get("how")) for item in items})
    lines += ["", "References:", ""]
    lines += [f"- `{rule}`: {md_cell(how)}" for rule, how in hows if how]
    return lines + [""]


def write_report(
    out: Path,
    entries: list[Entry],
    data: dict,
    text: str,
    *,
    version: str,
    plots: bool = True,
    force: bool = False,
) -> None:
    """The report folder: report.json (`text`), report.md (opening with the document's
    findings) and, with `plots`, the PNGs."""
    from vitdiag.plots import write_plots

    findings = json.loads(text).get("findings", {}).get("items")

    def fill(folder: Path) -> None:
        figures, problems = write_plots(folder, entries) if plots else ({}, [])
        md = render_markdown(entries, data, figures, version, findings)
        if problems:
            md += "\n" + "\n".join(f"- figure not written: {md_cell(p)}" for p in problems) + "\n"
        (folder / "report.json").write_text(text, encoding="utf-8")
        (folder / "report.md").write_text(md, encoding="utf-8")

    write_folder(out, fill, force)


# -- the output folder ----------------------------------------------------------------------------


def prepare_out(out: Path, force: bool) -> None:
    """Fail before any work when --out cannot be written as asked."""
    if out.exists() and not out.is_dir():
        raise VitdiagError(f"--out {out} is a file; give a folder for the report.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise VitdiagError(
            f"--out {out} exists and is not empty; choose another folder or pass --force to "
            "replace it."
        )


def write_folder(out: Path, fill, force: bool) -> None:
    """Call ``fill(tmp_dir)`` on a temporary sibling of `out`, then rename it into place.

    An existing `out` is moved aside first and deleted only after the rename, so at every moment
    either the old or the new folder is complete.
    """
    out = Path(out)
    prepare_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    with writing(out):
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        old = None
        try:
            fill(tmp)
            # mkdtemp and write_atomic's temporary files are private (0700/0600); a report is for
            # reading, by CI artifact viewers too.
            os.chmod(tmp, 0o755)
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            if out.exists():
                if any(out.iterdir()):
                    old = out.with_name(f".{out.name}.old-{os.getpid()}")
                    os.rename(out, old)
                else:
                    out.rmdir()
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not out.exists():
                os.rename(old, out)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- markdown -------------------------------------------------------------------------------------


def md_cell(value: Any) -> str:
    text = fmt(value).replace("\n", " ")
    # | ends a cell; < could open an HTML tag; * and _ could start emphasis; \ escapes.
    for ch in ("\\", "|", "*", "_", "<"):
        text = text.replace(ch, "\\" + ch)
    return text


def md_table(columns: list[Any], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(md_cell(c) for c in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = [md_cell(v) for v in row] + [""] * (len(columns) - len(row))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def title_of(probe: str) -> str:
    """A probe's section heading, as the probe declares it."""
    from vitdiag.probes.registry import probe_classes

    cls = probe_classes().get(probe)
    return cls.title if cls is not None and cls.title else probe


def _at_native_size(result: Any, key: str) -> bool:
    """Whether a metric keyed at a size (``shift@224/…``) is at the result's native size, where
    a shift is 1 by definition and so no headline."""
    native = result.extra.get("native_size") or []
    if "@" not in key or not native:
        return False
    size = key.split("@", 1)[1].split("/")[0]
    return size in (f"{native[0]}", f"{native[0]}x{native[-1]}")


def headline_names(entries: list[Entry]) -> list[str]:
    """The metrics of the comparison table, among those measured: the keys each probe declares
    in `headlines`. Plain keys come first, by (`headline_rank`, place in `headlines`); keys
    matched by a pattern follow in the order they are met."""
    from vitdiag.probes.registry import probe_classes

    classes = probe_classes()
    fixed: dict[str, tuple[int, int]] = {}
    found: list[str] = []
    for e in entries:
        for r in e.results:
            cls = classes.get(r.probe)
            if cls is None:
                continue
            for key in r.metrics:
                name = f"{r.probe}.{key}"
                if name in fixed or name in found:
                    continue
                for i, pattern in enumerate(cls.headlines):
                    if not re.fullmatch(pattern, key):
                        continue
                    if re.escape(pattern) == pattern:
                        fixed[name] = (cls.headline_rank, i)
                    elif not _at_native_size(r, key):
                        found.append(name)
                    break
    return sorted(fixed, key=fixed.__getitem__) + found


def metric_of(entry: Entry, name: str) -> float | None:
    probe, key = name.split(".", 1)
    for r in entry.results:
        if r.probe == probe and key in r.metrics:
            return r.metrics[key]
    return None


def comparison(entries: list[Entry]) -> tuple[list[str], list[list[Any]]]:
    cols = ["metric", *(e.label for e in entries)]
    rows = [[n, *(metric_of(e, n) for e in entries)] for n in headline_names(entries)]
    return cols, rows


def _data_line(role: str, d: dict) -> str:
    what = [f"{d.get('n_images')} images"]
    if d.get("labelled"):
        what.append(f"{d.get('n_classes')} classes")
    else:
        what.append("unlabelled")
    if d.get("synthetic"):
        what.append("**synthetic**")
    if d.get("n_unreadable"):
        what.append(f"{d['n_unreadable']} unreadable skipped")
    name = "--data" if role == "data" else "--val"
    return f"- {name}: `{d.get('path') or d.get('source')}` ({', '.join(what)})"


def render_markdown(
    entries: list[Entry], data: dict, plots: dict, version: str, findings: list[dict] | None = None
) -> str:
    """report.md: data, findings, comparison (several checkpoints), then one section per
    checkpoint.

    plots: {("shared" | label, probe): file name} of the figures written beside the file.
    """
    lines = ["# vitdiag report", "", f"vitdiag {version}"]
    if data:
        lines += ["", "Data:", ""] + [_data_line(role, d) for role, d in data.items()]
    if findings is not None:
        lines += [""] + findings_markdown(findings)
    several = len(entries) > 1
    cols, rows = comparison(entries)
    if rows:
        lines += ["", "## Comparison" if several else "## Headline metrics", ""]
        lines += md_table(cols, rows)
    if several:
        for probe in ("similarity", "invariance"):
            if ("shared", probe) in plots:
                lines += ["", f"![{title_of(probe)}]({plots['shared', probe]})"]
    for e in entries:
        m = e.model
        lines += ["", f"## {e.label}" if several else "## Model", ""]
        size = "×".join(map(str, m.get("img_size") or []))
        native = "×".join(map(str, m.get("native_size") or []))
        sha = m.get("sha256")
        lines += md_table(
            ["", ""],
            [
                ["checkpoint", m.get("path") or "(random weights)"],
                ["architecture", f"{m.get('arch')} (family {m.get('family')})"],
                ["decided by", m.get("decided_by")],
                ["sha256", sha[:16] + "…" if sha else None],
                ["classes", m.get("num_classes")],
                ["image size", f"{size} (native {native})"],
            ],
        )
        for probe, why in e.results.skipped.items():
            lines += ["", f"- not run: **{probe}** — {why}"]
        for r in e.results:
            where = r.extra.get("dataset")
            on = f" — on {'--val' if where == 'val' else '--data'}" if where else ""
            lines += ["", f"### {title_of(r.probe)}{on}", ""]
            lines.append(f"`{r.probe}` · definition `{r.definition}`")
            for t in r.tables:
                lines += ["", f"**{md_cell(t.title)}**", ""] + md_table(t.columns, t.rows)
            if (e.label, r.probe) in plots:
                lines += ["", f"![{title_of(r.probe)}]({plots[e.label, r.probe]})"]
            if r.notes:
                lines.append("")
                lines += [f"- {md_cell(n)}" for n in r.notes]
    return "\n".join(lines) + "\n"


# -- a trend: diagnostics over training ----------------------------------------------------------

# The columns of a run's table in trend.md, when measured.
TREND_COLUMNS = (
    "eval.top1",
    "eval.nll",
    "calibration.ece",
    "collapse.nc1",
    "collapse.nc2_etf_means",
    "collapse.nc3",
    "collapse.nc4",
    "classifier.w_etf",
    "similarity.last_block",
)


def trend_axis(runs: list[Any]) -> str:
    """What the x axis counts: epochs, logged steps, or places in the order given."""
    hows = {r.order_by for r in runs}
    if hows == {"logged step"}:
        return "step"
    if "order given" in hows:
        return "epoch (checkpoint position where none is known)"
    return "epoch"


def render_trend_markdown(runs: list[Any], figures: list[tuple[str, str]], version: str) -> str:
    """trend.md: the figures, then one table per run (a row per checkpoint or logged step)."""
    lines = ["# vitdiag trend", "", f"vitdiag {version}"]
    data = next((r.data for r in runs if r.data), None)
    if data:
        lines += ["", "Data:", ""] + [_data_line(role, d) for role, d in data.items()]
    for title, name in figures:
        lines += ["", f"![{md_cell(title)}]({name})"]
    for run in runs:
        lines += ["", f"## {run.name}" if len(runs) > 1 else "## Checkpoints", ""]
        lines.append(f"Ordered by {run.order_by}.")
        cols = [c for c in TREND_COLUMNS if any(row.metrics.get(c) is not None for row in run.rows)]
        shifts = sorted(
            {
                k
                for row in run.rows
                for k in row.metrics
                if re.fullmatch(r"variance\.shift@[^/_]+", k)
            }
        )
        cols += [
            k for k in shifts if any(row.metrics.get(k) not in (None, 1.0) for row in run.rows)
        ]
        lines.append("")
        lines += md_table(
            ["", "epoch", *cols],
            [[row.label, row.epoch, *(row.metrics.get(c) for c in cols)] for row in run.rows],
        )
        if run.notes:
            lines.append("")
            lines += [f"- {md_cell(n)}" for n in run.notes]
    return "\n".join(lines) + "\n"


def write_trend(
    out: Path, runs: list[Any], text: str, *, version: str, plots: bool, force: bool
) -> None:
    """The trend folder: trend.json (`text`), trend.md and, with `plots`, the PNGs."""
    from vitdiag.plots import write_trend_plots

    def fill(folder: Path) -> None:
        series = [
            (r.name, [row.x for row in r.rows], [row.metrics for row in r.rows]) for r in runs
        ]
        figures, problems = (
            write_trend_plots(folder, series, trend_axis(runs)) if plots else ([], [])
        )
        md = render_trend_markdown(runs, figures, version)
        if problems:
            md += "\n" + "\n".join(f"- figure not written: {md_cell(p)}" for p in problems) + "\n"
        (folder / "trend.json").write_text(text, encoding="utf-8")
        (folder / "trend.md").write_text(md, encoding="utf-8")

    write_folder(out, fill, force)
