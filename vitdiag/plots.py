"""Every figure vitdiag draws, and the one place it makes a figure and writes it as a PNG.

matplotlib is imported only when a plot is drawn (Figure + the Agg canvas, no pyplot), so
importing vitdiag stays light and the caller's backend is left alone. Files appear whole or not
at all (temporary sibling, then rename). The figures read Results (or their JSON), never a model.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vitdiag.errors import VitdiagError
from vitdiag.results import Result, write_atomic


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


# -- collapse family: reliability diagram, mixup geometry ------------------------------------


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

    fig = new_figure(5.0, 6.0)
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
    fig = new_figure(11.0, 4.8)
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


# -- similarity: P(h) against depth (Gong et al. 2021, Fig. 1b) --------------------------------

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


# -- invariance: Ldiv against Linv -------------------------------------------------------------


def plot_invariance(results: Sequence[tuple[str, Result]], path: str | Path) -> Path:
    """A PNG of Ldiv against Linv, one point per augmentation, a marker/colour per checkpoint.

    The file appears whole or not at all (temporary sibling, then rename). Returns the path.
    """
    from vitdiag.probes.invariance import DEFINITION as INVARIANCE_DEFINITION

    if not results:
        raise VitdiagError("nothing to plot: no invariance results were given.")
    for label, res in results:
        if res.probe != "invariance" or "augmentations" not in res.extra:
            raise VitdiagError(f"{label}: not an invariance result (probe {res.probe!r}).")

    markers = "osD^vP*Xh<>p"
    fig = new_figure(6.4, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    for k, (label, res) in enumerate(results):
        names, xs, ys = [], [], []
        for name, vals in res.extra["augmentations"].items():
            x, y = vals.get("linv"), vals.get("ldiv")
            if x is None or y is None or x != x or y != y:
                continue
            names.append(name)
            xs.append(float(x))
            ys.append(float(y))
        ax.scatter(xs, ys, marker=markers[k % len(markers)], s=36, label=label or None, alpha=0.85)
        for name, x, y in zip(names, xs, ys, strict=True):
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    emb = results[0][1].extra.get("embedding", "")
    ax.set_xlabel("Linv (mean cos clean↔view, higher = more invariant)")
    ax.set_ylabel("Ldiv (1 − mean cos view↔view, higher = more diverse)")
    ax.set_title(f"Invariance vs diversity ({INVARIANCE_DEFINITION}, {emb})", fontsize=10)
    ax.grid(True, alpha=0.3)
    if any(label for label, _ in results):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


# -- the figures of a report folder ------------------------------------------------------------


def _slug(label: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.") or "model"
    slug, k = base, 2
    while slug in taken:
        slug, k = f"{base}-{k}", k + 1
    taken.add(slug)
    return slug


def write_plots(folder: Path, entries: list[Any]) -> tuple[dict, list[str]]:
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


# -- trend: diagnostics against epoch, one line per run ----------------------------------------

# (metric, axis title): the panels `vitdiag trend` draws when the metric was measured.
TREND_OVERVIEW = (
    ("collapse.nc1", "NC1 (within-class variability)"),
    ("classifier.w_etf", "classifier ETF distance"),
    ("similarity.last_block", "P(h), last block"),
    ("calibration.ece", "ECE"),
)
TREND_COLLAPSE = (
    ("collapse.nc1", "NC1"),
    ("collapse.nc2_etf_means", "NC2 (ETF distance of class means)"),
    ("collapse.nc3", "NC3 (self-duality)"),
    ("collapse.nc4", "NC4 (≠ nearest class centre)"),
)
TREND_SINGLE = (
    ("eval.top1", "top-1"),
    ("eval.nll", "NLL"),
    ("calibration.ece", "ECE"),
    ("classifier.w_etf", "classifier ETF distance"),
    ("similarity.last_block", "P(h), last block"),
)
_LAYER_MEAN = re.compile(r"similarity\.(.+)\.mean")
_SHIFT = re.compile(r"variance\.shift@([^/_]+)")

# A run as the trend plots read it: (name, x of each row, {"probe.metric": value} of each row).
TrendSeries = tuple[str, Sequence[float], Sequence[dict]]


def _points(xs: Sequence[float], rows: Sequence[dict], key: str) -> tuple[list, list]:
    pairs = [(x, _nan_if_none(r.get(key))) for x, r in zip(xs, rows, strict=True)]
    pairs = [(x, y) for x, y in pairs if math.isfinite(y)]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _measured(runs: Sequence[TrendSeries], key: str) -> bool:
    return any(_points(xs, rows, key)[0] for _, xs, rows in runs)


def plot_trend_panels(
    runs: Sequence[TrendSeries], panels: Sequence[tuple[str, str]], path: str | Path, xlabel: str
) -> Path:
    """One panel per measured metric against the x axis, one line per run (shared colours)."""
    from matplotlib.ticker import MaxNLocator

    shown = [(k, t) for k, t in panels if _measured(runs, k)]
    if not shown:
        raise VitdiagError(f"nothing to plot: none of {', '.join(k for k, _ in panels)} measured.")
    cols = min(2, len(shown))
    nrows = math.ceil(len(shown) / cols)
    fig = new_figure(4.6 * cols, 3.2 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, (key, title) in zip(axes, shown, strict=False):
        for k, (name, xs, rows) in enumerate(runs):
            x, y = _points(xs, rows, key)
            ax.plot(x, y, marker="o", markersize=3, color=f"C{k}", label=name or None)
        ax.set_title(f"{title}  ({key})", fontsize=9)
        ax.set_xlabel(xlabel)
        if all(float(x).is_integer() for _, xs, _ in runs for x in xs):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    for ax in axes[len(shown) :]:
        ax.set_axis_off()
    if len(runs) > 1:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def trend_layers(rows: Sequence[dict]) -> list[str]:
    """The similarity layers measured, in the order the rows name them."""
    found: dict[str, None] = {}
    for r in rows:
        for key in r:
            m = _LAYER_MEAN.fullmatch(key)
            if m:
                found.setdefault(m.group(1))
    return list(found)


def plot_trend_heatmap(run: TrendSeries, path: str | Path, xlabel: str) -> Path:
    """P(h) by x (rows) and layer (columns) for one run."""
    name, xs, rows = run
    layers = trend_layers(rows)
    if not layers:
        raise VitdiagError(f"{name}: no per-layer P(h) (similarity.<layer>.mean) measured.")
    grid = [[_nan_if_none(r.get(f"similarity.{layer}.mean")) for layer in layers] for r in rows]
    fig = new_figure(max(4.5, 0.5 * len(layers) + 2.5), max(3.0, 0.28 * len(rows) + 1.8))
    ax = fig.add_subplot(1, 1, 1)
    # The data's own range: over training P(h) moves by hundredths, invisible on [0, 1].
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
    step = max(1, len(xs) // 12)
    ax.set_yticks(range(0, len(xs), step))
    ax.set_yticklabels([f"{x:g}" for x in xs][::step], fontsize=8)
    ax.set_ylabel(xlabel)
    ax.set_title(f"P(h) by layer{f' — {name}' if name else ''}", fontsize=10)
    fig.colorbar(image, ax=ax, label="patch-wise |cos| P(h)")
    fig.tight_layout()
    return save_png(fig, path)


def plot_trend_shift(runs: Sequence[TrendSeries], path: str | Path, xlabel: str) -> Path:
    """The variance shift r(s)/r0 at each measured size against x, a line per run and size.
    The native size (shift 1 by definition, at every point) is left out."""
    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for k, (name, xs, rows) in enumerate(runs):
        keys = dict.fromkeys(key for r in rows for key in r if _SHIFT.fullmatch(key))
        for j, key in enumerate(keys):
            x, y = _points(xs, rows, key)
            if not y or all(v == 1.0 for v in y):
                continue
            size = _SHIFT.fullmatch(key).group(1)
            label = f"{name} @{size}" if name else f"@{size}"
            ax.plot(x, y, marker="o", markersize=3, color=f"C{k}", label=label,
                    linestyle=("-", "--", ":", "-.")[j % 4])  # fmt: skip
            drawn += 1
    if not drawn:
        raise VitdiagError("nothing to plot: no variance shift at a size other than the native.")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("shift r(s) / r0")
    ax.set_title("Patch / position variance shift at other test sizes", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def write_trend_plots(
    folder: Path, runs: Sequence[TrendSeries], xlabel: str
) -> tuple[list[tuple[str, str]], list[str]]:
    """The PNGs beside trend.md: [(title, file name)] in reading order, and the problems.

    A figure is drawn only when one of its metrics was measured (--probes may leave them out);
    a missing matplotlib costs the figures, not the trend."""
    figures: list[tuple[str, str]] = []
    problems: list[str] = []

    def attempt(title: str, name: str, keys: Sequence[str], make) -> None:
        if not any(_measured(runs, k) for k in keys):
            return
        try:
            make(folder / name)
            figures.append((title, name))
        except VitdiagError as e:
            problems.append(f"{name}: {e}")

    def panels(which: Sequence[tuple[str, str]]):
        return lambda p: plot_trend_panels(runs, which, p, xlabel)

    attempt("Overview", "overview.png", [k for k, _ in TREND_OVERVIEW], panels(TREND_OVERVIEW))
    for key, title in TREND_SINGLE:
        attempt(title, f"{key}.png", [key], panels([(key, title)]))
    attempt(
        "Neural collapse", "collapse.png", [k for k, _ in TREND_COLLAPSE], panels(TREND_COLLAPSE)
    )
    shifts = {k for _, _, rows in runs for r in rows for k in r if _SHIFT.fullmatch(k)}
    if any(v != 1.0 for _, xs, rows in runs for k in shifts for v in _points(xs, rows, k)[1]):
        attempt("Variance shift", "variance_shift.png", sorted(shifts),
                lambda p: plot_trend_shift(runs, p, xlabel))  # fmt: skip
    taken: set[str] = set()
    for run in runs:
        several = len(runs) > 1
        stem = "similarity_heatmap" + (f"-{_slug(run[0], taken)}" if several else "")
        keys = [f"similarity.{layer}.mean" for layer in trend_layers(run[2])]
        title = f"P(h) by layer{f' — {run[0]}' if several else ''}"
        attempt(title, f"{stem}.png", keys, lambda p, r=run: plot_trend_heatmap(r, p, xlabel))
    return figures, problems
