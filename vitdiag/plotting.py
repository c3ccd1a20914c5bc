"""The one place vitdiag makes a figure and writes it as a PNG.

matplotlib is imported only when a plot is drawn (Figure + the Agg canvas, no pyplot), so
importing a probe stays light and the caller's backend is left alone. Files appear whole or not
at all (temporary sibling, then rename).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from vitdiag.errors import VitdiagError
from vitdiag.results import write_atomic


def new_figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise VitdiagError(
            "plotting needs matplotlib; install it with: pip install 'vitdiag[plot]'"
        ) from exc
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | Path, *, tight_bbox: bool = False) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **({"bbox_inches": "tight"} if tight_bbox else {}))
    path = Path(path)
    write_atomic(path, buf.getvalue())
    return path
