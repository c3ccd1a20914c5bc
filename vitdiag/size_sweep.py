"""The variance probe across test sizes, below the runner: the study behind `vitdiag variance`
and the report's variance section (the runner and `vitdiag variance` call it).

The variance-shift study over test sizes (SPEC §1, 2405.14115): r(s) = Var X_s / Var P_s at
every size, shift = r/r0, k̂ = r0/r, the empirical c = 1/√k̂, and accuracy under each rescale.

How the passes are arranged: the empirical c(s) needs Var[X_s] over the whole data before any
accuracy can be measured with it, so each size costs two passes over the data at most.
Pass A (every size) accumulates X's variance and measures accuracy under every rescale known in
advance (`none` is the engine's own forward; `sqrt-axis`, `sqrt-area` and numeric factors are
extra forwards of the same batch with the table swapped in place — only the table differs, so
the batch, its patch embedding and everything else is shared). Pass B (sizes other than s0,
labelled data only) runs the model with the empirical table as the engine's model. At s0 every
factor is exactly 1, so no extra forward runs there. Swapping the table, rather than re-entering
the network after ``patch_embed``, keeps one code path for every family (ViT, EVA, CaiT, PiT…):
the forward that runs is the model's own, exactly the one ``fix-posembed`` would write.

The gain of a rescale (top-1 with it − top-1 without, same images: FINDINGS.md) is bootstrapped
replicate-wise: every accuracy pass keeps B replicate sums Σw·correct and Σw with the weights of
`vitdiag.intervals.poisson_weights`, a pure function of (seed, global image index, replicate),
so passes A and B weight each image alike and nothing is kept per image.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vitdiag.errors import VitdiagError
from vitdiag.families import pos_prefix_rows
from vitdiag.intervals import BOOTSTRAP, interval_record, percentile_interval, ratio_interval
from vitdiag.posembed import (
    REDUCTIONS,
    as_hw,
    grid_tokens,
    k_readings,
    layout_of,
    require_abs_pos,
    rescale_factor,
    set_table,
    size_label,
    swapped_table,
    table_grid,
    table_variance,
    target_table,
)
from vitdiag.probes.variance import (
    DEFINITION,
    DEFINITION_DETAIL,
    RescaleGroup,
    VarianceShiftProbe,
    fixed_groups,
    rescale_name,
    variances_from_sums,
)
from vitdiag.results import Result, Table

if TYPE_CHECKING:
    from vitdiag.engine import RunSummary
    from vitdiag.model import LoadedModel

_KEY = {"per-token": "per_token", "global": "global"}

# -- models at a size ---------------------------------------------------------------------------


def native_of(loaded: LoadedModel) -> LoadedModel:
    """The model built at the size its table was trained for."""
    from vitdiag.model import at_size

    if as_hw(loaded.img_size) == as_hw(loaded.native_size):
        return loaded
    return at_size(loaded, as_hw(loaded.native_size))


def build_at_size(
    native: LoadedModel, size: Any, *, c: float = 1.0, interpolation: str = "bicubic"
) -> LoadedModel:
    """`native` rebuilt at `size`, its table = native table resampled (timm's way) × c.

    The architecture comes from `model.at_size` (which also rejects sizes the patch grid cannot
    take, naming valid ones); the table is then set here from the native table, so the model
    that runs is exactly the one `write_checkpoint` saves, whatever at_size did to the table.
    """
    from vitdiag.model import at_size

    require_abs_pos(native.model)
    same = as_hw(size) == as_hw(native.img_size)
    if same and c == 1.0:
        return native
    target = at_size(native, as_hw(size))
    if target is native or target.model is native.model:
        # a rescaled table must never reach the caller's own model
        target = dataclasses.replace(target, model=copy.deepcopy(native.model))
    set_table(target.model, target_table(native.model, target.model, c, interpolation))
    return target


# -- the study ----------------------------------------------------------------------------------


@dataclass
class SizeReading:
    size: tuple[int, int]
    grid: tuple[int, int]
    var_p: dict[str, dict[str, float]]  # interpolation -> {global, per_token}
    var_x: dict[str, float] | None = None
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # rescale -> numbers
    # rescale -> its bootstrap sums (`VarianceShiftProbe.bootstrap_by_name`); kept apart from
    # `accuracy`, which the Result writes as it is
    bootstrap: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class VarianceStudy:
    native: tuple[int, int]
    interpolations: list[str]
    reduction: str
    readings: dict[tuple[int, int], SizeReading]
    rescales: list[str]
    n_images: int = 0
    n_unreadable: int = 0
    seconds: float = 0.0
    passes: list[str] = field(default_factory=list)  # one label per engine pass, in order
    labelled: bool = False
    notes: list[str] = field(default_factory=list)
    native_loaded: LoadedModel | None = None  # the model at the native size

    # -- derived numbers ------------------------------------------------------------------
    @property
    def primary(self) -> str:
        return self.interpolations[0]

    @property
    def has_data(self) -> bool:
        return self.readings[self.native].var_x is not None

    def r(self, size: Any, key: str = "per_token", interpolation: str | None = None) -> float:
        reading = self.readings[as_hw(size)]
        if reading.var_x is None:
            return math.nan
        vp = reading.var_p[interpolation or self.primary][key]
        return reading.var_x[key] / vp if vp > 0 else math.nan

    def r0(self, key: str = "per_token") -> float:
        return self.r(self.native, key)

    def shift(self, size: Any, key: str = "per_token", interpolation: str | None = None) -> float:
        return self.r(size, key, interpolation) / self.r0(key)

    def c_empirical(self, size: Any, key: str | None = None) -> float:
        key = key or _KEY[self.reduction]
        return rescale_factor(
            "empirical", size=size, native=self.native, r=self.r(size, key), r0=self.r0(key)
        )

    def gain(self, size: Any, name: str) -> tuple[float, float, float, np.ndarray] | None:
        """top-1 with rescale `name` − top-1 without (`none`) at `size`, on the same images:
        (point, lo, hi, the B replicate gains); None unless both were measured. Replicate r is
        Σw_r·correct_name/Σw_r − Σw_r·correct_none/Σw_r, the same weights in both passes."""
        rd = self.readings[as_hw(size)]
        if "none" not in rd.bootstrap or name not in rd.bootstrap:
            return None
        replicates = _ratio(rd.bootstrap[name]) - _ratio(rd.bootstrap["none"])
        lo, hi = percentile_interval(replicates)
        point = rd.accuracy[name]["top1"] - rd.accuracy["none"]["top1"]
        return point, lo, hi, replicates

    # -- the Result -----------------------------------------------------------------------
    def result(self) -> Result:
        metrics: dict[str, float] = {}
        tables: list[Table] = []
        if self.has_data:
            tables += self._shift_tables(metrics)
        tables.append(self._table_variance_table(metrics))
        accuracy = self._accuracy_table(metrics)
        if accuracy is not None:
            tables.append(accuracy)
        extra: dict[str, Any] = {
            "native_size": list(self.native),
            "interpolation": self.primary,
            "interpolations": self.interpolations,
            "empirical_reduction": self.reduction,
            "definition_detail": DEFINITION_DETAIL,
            "sizes": self._size_records(),
        }
        # after every existing metric, so those keep their places
        extra.update(self._paired_extra(metrics))
        return Result(
            probe="variance",
            definition=DEFINITION,
            metrics=metrics,
            tables=tables,
            notes=list(self.notes),
            extra=extra,
        )

    def _shift_tables(self, metrics: dict[str, float]) -> list[Table]:
        """r0, and per size Var X, Var P, r, shift, k̂ and c, by each reduction (into
        `metrics` too)."""
        for key, suffix in (("per_token", ""), ("global", "_global")):
            metrics[f"r0{suffix}"] = self.r0(key)
        tables = []
        for key, suffix, title in (
            ("per_token", "", "per-token reduction (what LayerNorm sees)"),
            ("global", "_global", "global reduction (all entries)"),
        ):
            rows = [self._shift_row(size, key, suffix, metrics) for size in self.readings]
            tables.append(
                Table(
                    f"Variance shift, {title}; table resampled {self.primary}. "
                    "r = Var X / Var P, shift = r/r0, k̂ = r0/r, c = 1/√k̂ restores r0; "
                    "k readings: s/s0 and (s/s0)²",
                    ["size", "Var X", "Var P", "r", "shift", "k̂", "s/s0", "(s/s0)²", "c"],
                    rows,
                )
            )
        return tables

    def _shift_row(
        self, size: tuple[int, int], key: str, suffix: str, metrics: dict[str, float]
    ) -> list[Any]:
        rd = self.readings[size]
        s = size_label(size)
        r, r0 = self.r(size, key), self.r0(key)
        khat = r0 / r
        axis, area = k_readings(size, self.native)
        c = 1 / math.sqrt(khat)
        metrics[f"var_x{suffix}@{s}"] = rd.var_x[key]
        metrics[f"var_p{suffix}@{s}"] = rd.var_p[self.primary][key]
        metrics[f"r{suffix}@{s}"] = r
        metrics[f"shift{suffix}@{s}"] = r / r0
        metrics[f"khat{suffix}@{s}"] = khat
        metrics[f"c{suffix}@{s}"] = c
        return [s, rd.var_x[key], rd.var_p[self.primary][key], r, r / r0, khat, axis, area, c]

    def _table_variance_table(self, metrics: dict[str, float]) -> Table:
        """Var P at each size under each interpolation (and the shift it gives, with data)."""
        data = self.has_data
        rows = []
        native_vp = self.readings[self.native].var_p[self.primary]
        for size, rd in self.readings.items():
            s = size_label(size)
            for interp in self.interpolations:
                vp = rd.var_p[interp]
                metrics[f"var_p@{s}/{interp}"] = vp["per_token"]
                metrics[f"var_p_global@{s}/{interp}"] = vp["global"]
                row = [
                    s,
                    "x".join(map(str, rd.grid)),
                    interp,
                    vp["per_token"],
                    vp["global"],
                    vp["per_token"] / native_vp["per_token"],
                ]
                if data:
                    sh = self.shift(size, "per_token", interp)
                    metrics[f"shift@{s}/{interp}"] = sh
                    metrics[f"shift_global@{s}/{interp}"] = self.shift(size, "global", interp)
                    row.append(sh)
                rows.append(row)
        cols = ["size", "grid", "interp.", "Var P token", "Var P global", "/ Var P0"]
        if data:
            cols.append("shift")
        return Table(
            "Position table variance by interpolation (per-token unless said; "
            "/ Var P0 = factor the resampling applied)",
            cols,
            rows,
        )

    def _accuracy_table(self, metrics: dict[str, float]) -> Table | None:
        """Top-1 and NLL under each rescale at each size; None when none was measured."""
        acc_rows = []
        for size, rd in self.readings.items():
            s = size_label(size)
            present = [n for n in self.rescales if n in rd.accuracy]
            for name in present:
                a = rd.accuracy[name]
                metrics[f"top1@{s}/{name}"] = a["top1"]
                metrics[f"nll@{s}/{name}"] = a["nll"]
                metrics[f"c@{s}/{name}"] = a["c"]
            if len(present) > 1 and all(rd.accuracy[n]["c"] == 1.0 for n in present):
                a = rd.accuracy[present[0]]  # s0: every rescale is c = 1, one forward
                acc_rows.append([s, "all (c = 1)", 1.0, a["top1"], a["nll"]])
                continue
            for name in present:
                a = rd.accuracy[name]
                acc_rows.append([s, name, a["c"], a["top1"], a["nll"]])
        if not acc_rows:
            return None
        return Table(
            f"Accuracy by position-table rescale (empirical c from the {self.reduction} reduction)",
            ["size", "rescale", "c", "top-1", "NLL"],
            acc_rows,
        )

    def _paired_extra(self, metrics: dict[str, float]) -> dict[str, Any]:
        """`gain@SIZE/RESCALE` (into `metrics`) with its paired interval, the `none@SIZE`
        reference and McNemar's discordant counts, at every size but the native one (where
        every factor is 1, so every gain is 0 by construction)."""
        intervals: dict[str, Any] = {}
        references: dict[str, Any] = {}
        discordant: dict[str, Any] = {}
        method = f"{BOOTSTRAP} (paired)"
        for size, rd in self.readings.items():
            if size == self.native or "none" not in rd.bootstrap:
                continue
            s = size_label(size)
            for name in self.rescales:
                found = None if name == "none" else self.gain(size, name)
                if found is None:
                    continue
                key = f"gain@{s}/{name}"
                metrics[key] = found[0]
                intervals[key] = interval_record(found[1], found[2], method)
                counts = rd.bootstrap[name]["discordant"]
                if counts is not None:
                    discordant[key] = {
                        "right_with_rescale_only": counts[0],
                        "right_without_only": counts[1],
                    }
            none = rd.bootstrap["none"]
            references[f"none@{s}"] = {
                "metric": f"top1@{s}/none",
                "value": rd.accuracy["none"]["top1"],
                "interval": list(ratio_interval(none["correct"], none["weight"])),
                "how": f"the same model at {s} without the rescale, on the same images",
            }
        if not intervals:
            return {}
        return {"intervals": intervals, "references": references, "mcnemar": discordant}

    def _size_records(self) -> list[dict[str, Any]]:
        return [
            {
                "size": list(size),
                "grid": list(rd.grid),
                "var_x": rd.var_x,
                "var_p": rd.var_p,
                "accuracy": rd.accuracy,
            }
            for size, rd in self.readings.items()
        ]


@dataclass
class _Passes:
    """The engine passes of one study: where and how they run, and what they add to it."""

    study: VarianceStudy
    batches_at: Callable[[Any, tuple[int, int]], Iterable]
    device: torch.device
    engine: dict[str, Any]  # amp, channels_last, seed, quiet
    total_images: int | None

    def run(
        self, at: LoadedModel, size: tuple[int, int], probe: VarianceShiftProbe, what: str
    ) -> None:
        from vitdiag.engine import run_probes

        summary = run_probes(
            at.model,
            self.batches_at(at, size),
            [probe],
            device=self.device,
            loaded=at,
            total_images=self.total_images,
            description=f"{what} @{size_label(size)}",
            **self.engine,
        )
        study = self.study
        if size == study.native and what == "variance":
            study.n_images = summary.n_images
            study.n_unreadable = summary.n_unreadable
        study.seconds += summary.seconds
        label = f"variance@{size_label(size)}"
        study.passes.append(label if what == "variance" else f"{label} {what}")


def variance_study(
    loaded: LoadedModel,
    sizes: Sequence[Any],
    *,
    batches_at: Callable[[Any, tuple[int, int]], Iterable] | None = None,
    interpolations: Sequence[str] = ("bicubic",),
    rescales: Sequence[str | float] = ("none", "sqrt-axis", "sqrt-area", "empirical"),
    reduction: str = "per-token",
    accuracy: bool = True,
    device: Any = "cpu",
    amp: str = "off",
    channels_last: bool = False,
    seed: int = 0,
    quiet: bool = True,
    total_images: int | None = None,
    native_pass: tuple[VarianceShiftProbe, RunSummary] | None = None,
) -> VarianceStudy:
    """Measure Var P_s (always) and, given `batches_at(model_at_s, size)`, Var X_s, r, shift,
    k̂ and accuracy under each rescale, at every size plus the native size.

    `native_pass` = (probe, engine summary) of a VarianceShiftProbe that a shared pass already
    ran at the native size (`vitdiag report`): the study then reads the data at the native size
    no second time."""
    from vitdiag.engine import resolve_device

    if reduction not in REDUCTIONS:
        raise VitdiagError(f"--reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}.")
    require_abs_pos(loaded.model, "the variance-shift probe")
    study, order = _new_study(loaded, sizes, interpolations, rescales, reduction)
    passes = None
    if batches_at is not None:
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        engine = dict(amp=amp, channels_last=channels_last, seed=seed, quiet=quiet)
        passes = _Passes(study, batches_at, dev, engine, total_images)
    # One size at a time, native first (every empirical factor needs r0); a model at a size
    # lives only while its passes run, so large models are not held at every size at once.
    for size in order:
        _measure_size(study, size, passes, rescales, accuracy, native_pass)
    if batches_at is not None and accuracy and not study.labelled:
        study.notes.append("the data has no labels, so accuracy under each rescale is not shown.")
    # keep the table order the user asked for
    for rd in study.readings.values():
        rd.accuracy = {n: rd.accuracy[n] for n in study.rescales if n in rd.accuracy}
        rd.bootstrap = {n: rd.bootstrap[n] for n in study.rescales if n in rd.bootstrap}
    return study


def _new_study(
    loaded: LoadedModel,
    sizes: Sequence[Any],
    interpolations: Sequence[str],
    rescales: Sequence[str | float],
    reduction: str,
) -> tuple[VarianceStudy, list[tuple[int, int]]]:
    """An empty study at the model's native size, and the sizes in the order they are
    measured (native first), each checked before any pass so that a bad one fails fast with
    the valid ones named."""
    from vitdiag.model import at_size, valid_sizes_near

    native_loaded = native_of(loaded)
    native = as_hw(native_loaded.native_size)
    wanted = [as_hw(s) for s in sizes]
    notes: list[str] = []
    if native not in wanted:
        notes.append(
            f"the native size {size_label(native)} was added: r0 = r(s0) is the reference for "
            "every shift."
        )
    order = list(dict.fromkeys([native, *wanted]))
    for size in order:
        if size[0] == size[1] and valid_sizes_near(native_loaded, size[0]) != [size[0]]:
            at_size(native_loaded, size)  # raises the VitdiagError naming valid sizes
    study = VarianceStudy(
        native,
        list(interpolations),
        reduction,
        {},
        [rescale_name(m) for m in rescales],
        notes=notes,
    )
    study.native_loaded = native_loaded
    return study, order


def _table_reading(study: VarianceStudy, at: LoadedModel, size: tuple[int, int]) -> SizeReading:
    """Var P at `size` under each interpolation: the data-free part of a reading."""
    src = study.native_loaded.model
    layout, prefix = layout_of(src), pos_prefix_rows(src)
    grid = table_grid(at.model)
    var_p = {}
    for interp in study.interpolations:
        t = target_table(src, at.model, 1.0, interp)
        var_p[interp] = table_variance(grid_tokens(t, layout=layout, prefix_rows=prefix))
    src_grid = table_grid(src)
    if size == study.native and src_grid != grid:  # pragma: no cover - a model.py inconsistency
        raise VitdiagError(f"the native grid {src_grid} does not match {grid}; report this bug.")
    return SizeReading(size, grid, var_p)


def _measure_size(
    study: VarianceStudy,
    size: tuple[int, int],
    passes: _Passes | None,
    rescales: Sequence[str | float],
    accuracy: bool,
    native_pass: tuple[VarianceShiftProbe, RunSummary] | None,
) -> None:
    """One size's reading: the table always; with data pass A (Var X and every rescale whose
    factor is known in advance) and, off the native size, pass B (the empirical table)."""
    native, src = study.native, study.native_loaded.model
    at = build_at_size(study.native_loaded, size, c=1.0, interpolation=study.primary)
    reading = study.readings[size] = _table_reading(study, at, size)
    if passes is None:
        return
    if size == native and native_pass is not None:
        probe, summary = native_pass
        study.n_images, study.n_unreadable = summary.n_images, summary.n_unreadable
        study.seconds += summary.seconds
    else:
        # On the device before any table is swapped: the engine's own .to(device) would
        # otherwise move a swapped-in table and strand the saved one on the old device.
        at.model.to(passes.device)
        groups = (
            fixed_groups(rescales, size, native, src, at.model, study.primary) if accuracy else []
        )
        probe = VarianceShiftProbe(groups, measure_x=True, accuracy=accuracy)
        passes.run(at, size, probe, "variance")
    reading.var_x = variances_from_sums(probe.x_sums)
    if probe.accuracy and float(probe.n_labelled) > 0:
        study.labelled = True
        reading.accuracy.update(probe.accuracy_by_name())
        reading.bootstrap.update(probe.bootstrap_by_name())
    if size == native:
        if not study.r0(_KEY[study.reduction]) > 0:
            raise VitdiagError(
                "the patch embedding has zero variance on this data, so r0 is undefined; "
                "check the images and the normalisation."
            )
        return
    if accuracy and study.labelled and "empirical" in rescales:
        _empirical_pass(study, at, size, passes)


def _empirical_pass(
    study: VarianceStudy, at: LoadedModel, size: tuple[int, int], passes: _Passes
) -> None:
    """Pass B (labelled data only): accuracy with the empirical table swapped in."""
    c = study.c_empirical(size)
    table = target_table(study.native_loaded.model, at.model, c, study.primary)
    probe = VarianceShiftProbe(
        [RescaleGroup(["empirical"], c, None)], measure_x=False, accuracy=True
    )
    with swapped_table(at.model, table):
        passes.run(at, size, probe, "empirical")
    study.readings[size].accuracy.update(probe.accuracy_by_name())
    study.readings[size].bootstrap.update(probe.bootstrap_by_name())


def _ratio(sums: dict[str, Any]) -> np.ndarray:
    """Replicate-wise Σw·correct / Σw (NaN where a replicate drew no labelled image)."""
    num = np.asarray(sums["correct"], dtype=np.float64)
    den = np.asarray(sums["weight"], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
