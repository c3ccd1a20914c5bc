"""`vitdiag report`: every probe that applies, one pass per dataset, one folder readable on GitHub.

The folder holds ``report.json`` (all results, the schema every command writes), ``report.md``
(GitHub-flavoured tables, notes and the figures) and the PNGs beside it. It is written into a
temporary sibling and renamed into place, so a crash never leaves half a report, and an existing
non-empty folder is only replaced with --force.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from vitdiag import options as o
from vitdiag.errors import VitdiagError

Checkpoints = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="CKPT...",
        help="One or more checkpoints; several are reported side by side with a comparison "
        "table. Leave out and give --arch for random weights.",
        show_default=False,
    ),
]


@dataclass
class Entry:
    """One checkpoint's part of a report."""

    label: str
    model: dict  # vitdiag.model.describe(...)
    results: Any  # runner.Results


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
    from vitdiag.report import fmt

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


_FIXED_HEADLINES = (
    "eval.top1",
    "eval.nll",
    "calibration.ece",
    "classifier.w_etf",
    "collapse.nc1",
    "collapse.nc2_etf_means",
    "collapse.nc3",
    "collapse.nc4",
    "mixup_geometry.lambda_star",
    "similarity.last_block",
    "similarity.max",
    "variance.r0",
)


_VARIANCE_HEADLINES = r"shift@[^/]+|top1@.+/(none|empirical)"


def headline_names(entries: list[Entry]) -> list[str]:
    """The metrics of the comparison table, in a stable order, among those measured."""
    names: list[str] = []
    for e in entries:
        for r in e.results:
            for key in r.metrics:
                name = f"{r.probe}.{key}"
                dynamic = (r.probe == "invariance" and key.endswith(".linv")) or (
                    r.probe == "variance" and re.fullmatch(_VARIANCE_HEADLINES, key)
                )
                if (name in _FIXED_HEADLINES or dynamic) and name not in names:
                    if r.probe == "variance" and "@" in key:
                        native = r.extra.get("native_size") or []
                        size = key.split("@", 1)[1].split("/")[0]
                        if native and size in (f"{native[0]}", f"{native[0]}x{native[-1]}"):
                            continue  # shift is 1 at s0 by definition
                    names.append(name)
    fixed = [n for n in _FIXED_HEADLINES if n in names]
    return fixed + [n for n in names if n not in _FIXED_HEADLINES]


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


_TITLES = {
    "classifier": "Classifier geometry (no data)",
    "eval": "Evaluation",
    "calibration": "Calibration",
    "variance": "Variance shift (patch vs position embedding)",
    "collapse": "Neural collapse",
    "mixup_geometry": "Mixup geometry",
    "similarity": "Patch-wise cosine similarity (over-smoothing)",
    "invariance": "Invariance and diversity of augmented views",
}


def render_markdown(entries: list[Entry], data: dict, plots: dict, version: str) -> str:
    """report.md: data, comparison (several checkpoints), then one section per checkpoint.

    plots: {("shared" | label, probe): file name} of the figures written beside the file.
    """
    lines = ["# vitdiag report", "", f"vitdiag {version}"]
    if data:
        lines += ["", "Data:", ""] + [_data_line(role, d) for role, d in data.items()]
    several = len(entries) > 1
    cols, rows = comparison(entries)
    if rows:
        lines += ["", "## Comparison" if several else "## Headline metrics", ""]
        lines += md_table(cols, rows)
    if several:
        for probe in ("similarity", "invariance"):
            if ("shared", probe) in plots:
                lines += ["", f"![{_TITLES[probe]}]({plots['shared', probe]})"]
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
            lines += ["", f"### {_TITLES.get(r.probe, r.probe)}{on}", ""]
            lines.append(f"`{r.probe}` · definition `{r.definition}`")
            for t in r.tables:
                lines += ["", f"**{md_cell(t.title)}**", ""] + md_table(t.columns, t.rows)
            if (e.label, r.probe) in plots:
                lines += ["", f"![{_TITLES.get(r.probe, r.probe)}]({plots[e.label, r.probe]})"]
            if r.notes:
                lines.append("")
                lines += [f"- {md_cell(n)}" for n in r.notes]
    return "\n".join(lines) + "\n"


def _slug(label: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.") or "model"
    slug, k = base, 2
    while slug in taken:
        slug, k = f"{base}-{k}", k + 1
    taken.add(slug)
    return slug


def write_plots(folder: Path, entries: list[Entry]) -> tuple[dict, list[str]]:
    """The PNGs beside report.md; a missing matplotlib costs the figures, not the report."""
    plots: dict = {}
    problems: list[str] = []
    several = len(entries) > 1

    def attempt(key, name: str, make) -> None:
        try:
            make(folder / name)
            plots[key] = name
        except VitdiagError as e:
            problems.append(f"{name}: {e}")

    from vitdiag.probes.collapse_plots import plot_mixup_geometry, plot_reliability
    from vitdiag.probes.invariance import plot_invariance
    from vitdiag.probes.similarity_plot import plot_similarity

    for probe, plot in (("similarity", plot_similarity), ("invariance", plot_invariance)):
        found = [(e.label, r) for e in entries for r in e.results if r.probe == probe]
        if found:
            key = ("shared", probe) if several else (entries[0].label, probe)
            attempt(key, f"{probe}.png", lambda p, f=found, fn=plot: fn(f, p))
    taken: set[str] = set()
    for e in entries:
        slug = _slug(e.label, taken)
        for r in e.results:
            for probe, stem, plot in (
                ("calibration", "reliability", plot_reliability),
                ("mixup_geometry", "mixup_geometry", plot_mixup_geometry),
            ):
                if r.probe == probe:
                    name = f"{stem}-{slug}.png" if several else f"{stem}.png"
                    attempt((e.label, probe), name, lambda p, res=r, fn=plot: fn(res, p))
    return plots, problems


def _labels(ckpts: list[str | None], arch: str | None) -> list[str]:
    names = [Path(c).name if c else f"{arch} (random)" for c in ckpts]
    if len(set(names)) < len(names):
        names = [str(c) if c else f"{arch} (random)" for c in ckpts]
    return names


def report_document(entries: list[Entry], data: dict, seconds: float, world: int) -> dict:
    from vitdiag.results import document

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
    from vitdiag.results import _jsonable

    return _jsonable(doc)


def report(
    ckpts: Checkpoints = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Images: collapse, mixup geometry, similarity and invariance run here (the "
            "training split), and everything else too when --val is not given.",
        ),
    ] = None,
    val: Annotated[
        str | None,
        typer.Option("--val", help="Validation images: eval, calibration and variance."),
    ] = None,
    sizes: Annotated[
        str | None,
        typer.Option("--sizes", help="Extra test sizes for the variance probe, e.g. 288,384."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for report.md, report.json and the PNGs.")
    ] = Path("vitdiag-report"),
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing non-empty --out folder.")
    ] = False,
    plots: Annotated[
        bool, typer.Option("--plots/--no-plots", help="Draw the PNG figures (matplotlib).")
    ] = True,
    probes: Annotated[
        str,
        typer.Option(
            "--probes",
            help="Comma list of probes (classifier, eval, calibration, variance, collapse, "
            "mixup_geometry, similarity, invariance) or all: every one that applies.",
        ),
    ] = "all",
    per_class: Annotated[
        int | None, typer.Option("--per-class", help="At most N --data images per class.")
    ] = None,
    layers: Annotated[
        str | None, typer.Option("--layers", help="Similarity: comma-separated layer names.")
    ] = None,
    aug: Annotated[
        str,
        typer.Option(
            "--aug",
            help="Invariance augmentations (comma list or all); each costs --views extra "
            "forwards per image.",
        ),
    ] = "all",
    views: Annotated[int, typer.Option("--views", help="Invariance: views per image.")] = 4,
    embedding: Annotated[
        str, typer.Option("--embedding", help="Invariance: prelogits, cls or gap.")
    ] = "prelogits",
    pairs: Annotated[int, typer.Option("--pairs", help="Mixup geometry: pairs of each kind.")] = 64,
    budget: Annotated[
        int, typer.Option("--nc4-budget", help="Images kept for NC4 (exact up to this many).")
    ] = 10000,
    arch: o.Arch = None,
    ema: o.Ema = False,
    unsafe_pickle: o.UnsafePickle = False,
    model_arg: o.ModelArg = None,
    native_size: o.NativeSize = None,
    limit: o.Limit = None,
    batch_size: o.BatchSize = 64,
    workers: o.Workers = 0,
    seed: o.Seed = 0,
    strict: o.Strict = False,
    mean: o.Mean = None,
    std: o.Std = None,
    interpolation: o.Interpolation = None,
    crop_pct: o.CropPct = None,
    device: o.Device = "auto",
    amp: o.Amp = "off",
    channels_last: o.ChannelsLast = False,
    json_out: o.JsonOut = None,
    quiet: o.Quiet = False,
) -> None:
    """Run every probe that applies in one pass per dataset and write a report folder."""
    from vitdiag import __version__
    from vitdiag.commands.common import (
        DataOptions,
        Output,
        check_invariance_options,
        check_outputs,
        check_ranges,
        console,
        json_to_stdout,
        load_model,
        parse_norm,
        parse_sizes,
        write_json_text,
    )
    from vitdiag.engine import init_distributed, is_main_process
    from vitdiag.model import describe
    from vitdiag.results import dumps
    from vitdiag.runner import Settings, open_source, parse_probes, run_all

    wanted = parse_probes(probes)
    size_list = parse_sizes(sizes) if sizes else None
    if data is None and val is None and wanted != {"classifier"}:
        raise VitdiagError("report needs images: give --data DIR (and --val DIR for held-out).")
    DataOptions(
        data, limit, batch_size, workers, seed, strict, mean, std, interpolation, crop_pct
    ).validate()
    check_ranges(pairs=pairs, nc4_budget=budget, per_class=per_class, native_size=native_size)
    check_invariance_options(aug, views, embedding)
    targets: list[str | None] = list(ckpts) if ckpts else [None]
    check_outputs(
        [Output("--out", out, folder=True, replace="empty"), Output("--json", json_out)],
        [*targets, data, val],
        force=force,
    )
    prepare_out(out, force)
    mean_t, std_t = parse_norm(mean, std)
    settings = Settings(
        batch_size=batch_size,
        workers=workers,
        limit=limit,
        seed=seed,
        strict=strict,
        per_class=per_class,
        mean=mean_t,
        std=std_t,
        interpolation=interpolation,
        crop_pct=crop_pct,
        device=device,
        amp=amp,
        channels_last=channels_last,
        quiet=quiet,
        layers=[v.strip() for v in layers.split(",")] if layers else None,
        aug=aug,
        views=views,
        embedding=embedding,
        pairs=pairs,
        nc4_budget=budget,
    )
    init_distributed()
    source = open_source(data, settings)
    val_source = open_source(val, settings)
    entries: list[Entry] = []
    seconds = 0.0
    world = 1
    data_desc: dict = {}
    for ckpt, label in zip(targets, _labels(targets, arch), strict=True):
        loaded = load_model(
            ckpt,
            arch,
            ema=ema,
            unsafe_pickle=unsafe_pickle,
            model_arg=model_arg,
            native_size=native_size,
        )
        results = run_all(
            loaded,
            source,
            probes=wanted,
            val_source=val_source,
            sizes=size_list,
            settings=settings,
        )
        entries.append(Entry(label, describe(loaded), results))
        seconds += results.seconds
        world = results.world_size
        data_desc = data_desc or dict(results.data)
        del loaded  # checkpoints can be large: one in memory at a time

    if not is_main_process():
        return
    doc = report_document(entries, data_desc, seconds, world)
    text = dumps(doc)

    def fill(folder: Path) -> None:
        figures, problems = write_plots(folder, entries) if plots else ({}, [])
        md = render_markdown(entries, data_desc, figures, __version__)
        if problems:
            md += "\n" + "\n".join(f"- figure not written: {md_cell(p)}" for p in problems) + "\n"
        (folder / "report.json").write_text(text, encoding="utf-8")
        (folder / "report.md").write_text(md, encoding="utf-8")

    write_folder(out, fill, force)
    con = console(stderr=json_to_stdout(json_out))
    _print_summary(con, entries, data_desc)
    con.print(f"report written to {out / 'report.md'}")
    if json_out is not None:
        write_json_text(text, json_out)


def _print_summary(con: Any, entries: list[Entry], data: dict) -> None:
    from rich.table import Table as RichTable

    from vitdiag.report import fmt

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
