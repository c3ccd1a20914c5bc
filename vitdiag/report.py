"""Rendering of results for people: rich tables on a console."""

from __future__ import annotations

import math
from typing import Any

from vitdiag.results import Result


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
