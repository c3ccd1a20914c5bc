"""P(h) against depth for one or more checkpoints, the figure of Gong et al. (2021), Fig. 1b."""

from __future__ import annotations

from pathlib import Path

from vitdiag.errors import VitdiagError
from vitdiag.plotting import new_figure, save_png
from vitdiag.results import Result

# Layer names fit under the axis up to about this many ticks; beyond, indices read better.
_MAX_NAMED_TICKS = 16


def plot_similarity(results: list[tuple[str, Result]], path: str | Path) -> Path:
    """Write a PNG of P mean ± std against layer index, one line per (label, Result).

    The file appears whole or not at all (written to a sibling temporary file, then renamed).
    Returns the path written.
    """
    if not results:
        raise VitdiagError("nothing to plot: no similarity results were given.")
    for label, res in results:
        if res.probe != "similarity" or "layers" not in res.extra:
            raise VitdiagError(f"{label}: not a similarity result (probe {res.probe!r}).")

    fig = new_figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for label, res in results:
        mean = [_nan_if_none(v) for v in res.extra["mean"]]
        std = [_nan_if_none(v) for v in res.extra["std"]]
        x = list(range(len(mean)))
        (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label)
        lo = [m - s for m, s in zip(mean, std, strict=True)]
        hi = [m + s for m, s in zip(mean, std, strict=True)]
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)

    names = [tuple(res.extra["layers"]) for _, res in results]
    longest = max(names, key=len)
    # Names only mean something on a shared axis: all checkpoints must have the same layers.
    if len(set(names)) == 1 and len(longest) <= _MAX_NAMED_TICKS:
        ax.set_xticks(range(len(longest)))
        ax.set_xticklabels(longest, rotation=45, ha="right", fontsize=8)
    else:
        ax.set_xlabel("layer index (0 = embedding)")
    ax.set_ylabel("patch-wise |cos| P(h)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Patch-wise absolute cosine similarity (mean ± std over images)")
    ax.grid(True, alpha=0.3)
    if len(results) > 1 or results[0][0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def _nan_if_none(v: float | None) -> float:
    # JSON round trips turn NaN into null; a gap in the line is the honest rendering.
    return float("nan") if v is None else float(v)
