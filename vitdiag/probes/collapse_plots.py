"""Figures for the collapse family of probes: the reliability diagram and the mixup geometry.

matplotlib is imported inside each function (Figure + the Agg canvas, no pyplot), so importing
the probes stays light and the caller's backend is left alone. Files appear whole or not at all.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vitdiag.errors import VitdiagError
from vitdiag.plotting import new_figure as _figure
from vitdiag.plotting import save_png
from vitdiag.results import Result


def _save(fig: Any, path: str | Path) -> Path:
    return save_png(fig, path, tight_bbox=True)


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def plot_reliability(result: Result, path: str | Path) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, bin counts below."""
    if result.probe != "calibration" or "bins" not in result.extra:
        raise VitdiagError(f"not a calibration result (probe {result.probe!r}).")
    bins = result.extra["bins"]
    lower = [b["lower"] for b in bins]
    width = [b["upper"] - b["lower"] for b in bins]
    acc = [_num(b["accuracy"]) for b in bins]
    conf = [_num(b["confidence"]) for b in bins]
    counts = [b["count"] for b in bins]

    fig = _figure(5.0, 6.0)
    ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(lower, acc, width=width, align="edge", edgecolor="black", label="accuracy")
    gap_base = [min(a, c) for a, c in zip(acc, conf, strict=True)]
    gap = [abs(a - c) for a, c in zip(acc, conf, strict=True)]
    ax.bar(
        lower, gap, bottom=gap_base, width=width, align="edge", color="red", alpha=0.3, label="gap"
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    m = result.metrics
    ax.set_title(f"Reliability — ECE {_num(m.get('ece')):.4f}, MCE {_num(m.get('mce')):.4f}")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax_n.bar(lower, counts, width=width, align="edge", color="grey", edgecolor="black")
    ax_n.set_xlabel("top-label confidence")
    ax_n.set_ylabel("images")
    return _save(fig, path)


def plot_mixup_geometry(result: Result, path: str | Path) -> Path:
    """Left: h_λ of pairs among three classes on the plane of their classifiers (black).
    Right: the mean different-class margin against λ, ± one std, with λ*."""
    if result.probe != "mixup_geometry" or "per_lambda" not in result.extra:
        raise VitdiagError(f"not a mixup-geometry result (probe {result.probe!r}).")
    from matplotlib import colormaps, colors

    stats = result.extra["per_lambda"]
    proj = result.extra.get("projection")
    fig = _figure(11.0, 4.8)
    ax_p, ax_m = fig.subplots(1, 2)

    if proj:
        lam = proj["lambda"]
        norm = colors.Normalize(0, 1)
        cmaps = {"same": colormaps["Blues"], "diff": colormaps["Oranges"]}
        for pair in proj["pairs"]:
            xs = [p[0] for p in pair["xy"]]
            ys = [p[1] for p in pair["xy"]]
            cmap = cmaps[pair["kind"]]
            ax_p.plot(xs, ys, color=cmap(0.6), linewidth=0.6, alpha=0.6)
            ax_p.scatter(xs, ys, c=[cmap(0.3 + 0.7 * norm(v)) for v in lam], s=10)
        extent = max([abs(v) for pair in proj["pairs"] for p in pair["xy"] for v in p] or [1.0])
        for cls, (cx, cy) in zip(proj["classes"], proj["classifiers"], strict=True):
            scale = extent / max(math.hypot(cx, cy), 1e-12)
            ax_p.plot([0, cx * scale], [0, cy * scale], color="black", linewidth=1.5)
            ax_p.annotate(f"w_{cls}", (cx * scale, cy * scale))
        ax_p.plot([], [], color=colormaps["Blues"](0.8), label="same class")
        ax_p.plot([], [], color=colormaps["Oranges"](0.8), label="different class")
        ax_p.legend(loc="best", fontsize=8)
        ax_p.set_title(f"h_λ on span{{w−w̄}} of classes {proj['classes']} (light → dark: λ 0 → 1)")
        ax_p.set_aspect("equal", adjustable="datalim")
    else:
        ax_p.text(0.5, 0.5, "no projection (fewer than three classes)", ha="center", va="center")
        ax_p.set_axis_off()

    lam = stats["lambda"]
    margin = [_num(v) for v in stats["diff_margin"]]
    std = [_num(v) for v in stats["diff_margin_std"]]
    ax_m.plot(lam, margin, marker="o", color="tab:orange", label="mean margin")
    ax_m.fill_between(
        lam,
        [m - s for m, s in zip(margin, std, strict=True)],
        [m + s for m, s in zip(margin, std, strict=True)],
        color="tab:orange",
        alpha=0.2,
        linewidth=0,
    )
    ax_m.axhline(0, color="black", linewidth=0.8)
    star = _num(result.metrics.get("lambda_star"))
    if not math.isnan(star):
        ax_m.axvline(star, color="grey", linestyle="--", label=f"λ* = {star:.3f}")
    ax_m.set_xlabel("λ  (x_λ = λ·x_a + (1−λ)·x_b)")
    ax_m.set_ylabel("(w_i − w_i')ᵀh_λ + b_i − b_i'")
    ax_m.set_title("Different-class margin")
    ax_m.grid(True, alpha=0.3)
    ax_m.legend(loc="best", fontsize=8)
    return _save(fig, path)
