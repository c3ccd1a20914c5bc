"""The variance-shift study over test sizes (SPEC §1, 2405.14115): r(s) = Var X_s / Var P_s at
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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vitdiag.errors import VitdiagError
from vitdiag.families import pos_prefix_rows
from vitdiag.posembed import (
    REDUCTIONS,
    as_hw,
    grid_tokens,
    k_readings,
    layout_of,
    require_abs_pos,
    rescale_factor,
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
from vitdiag.studies.sizes import build_at_size, native_of

_KEY = {"per-token": "per_token", "global": "global"}


@dataclass
class SizeReading:
    size: tuple[int, int]
    grid: tuple[int, int]
    var_p: dict[str, dict[str, float]]  # interpolation -> {global, per_token}
    var_x: dict[str, float] | None = None
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # rescale -> numbers


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
    native_loaded: Any = None  # the LoadedModel at the native size

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

    # -- the Result -----------------------------------------------------------------------
    def result(self) -> Result:
        metrics: dict[str, float] = {}
        tables: list[Table] = []
        extra: dict[str, Any] = {
            "native_size": list(self.native),
            "interpolation": self.primary,
            "interpolations": self.interpolations,
            "empirical_reduction": self.reduction,
            "definition_detail": DEFINITION_DETAIL,
            "sizes": [],
        }
        sizes = list(self.readings)
        data = self.has_data
        if data:
            for key, suffix in (("per_token", ""), ("global", "_global")):
                metrics[f"r0{suffix}"] = self.r0(key)
            for key, suffix, title in (
                ("per_token", "", "per-token reduction (what LayerNorm sees)"),
                ("global", "_global", "global reduction (all entries)"),
            ):
                rows = []
                for size in sizes:
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
                    rows.append(
                        [
                            s,
                            rd.var_x[key],
                            rd.var_p[self.primary][key],
                            r,
                            r / r0,
                            khat,
                            axis,
                            area,
                            c,
                        ]
                    )
                tables.append(
                    Table(
                        f"Variance shift, {title}; table resampled {self.primary}. "
                        "r = Var X / Var P, shift = r/r0, k̂ = r0/r, c = 1/√k̂ restores r0; "
                        "k readings: s/s0 and (s/s0)²",
                        [
                            "size",
                            "Var X",
                            "Var P",
                            "r",
                            "shift",
                            "k̂",
                            "s/s0",
                            "(s/s0)²",
                            "c",
                        ],
                        rows,
                    )
                )
        rows = []
        native_vp = self.readings[self.native].var_p[self.primary]
        for size in sizes:
            rd = self.readings[size]
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
        tables.append(
            Table(
                "Position table variance by interpolation (per-token unless said; "
                "/ Var P0 = factor the resampling applied)",
                cols,
                rows,
            )
        )
        acc_rows = []
        for size in sizes:
            rd = self.readings[size]
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
        if acc_rows:
            tables.append(
                Table(
                    f"Accuracy by position-table rescale (empirical c from the {self.reduction} "
                    "reduction)",
                    ["size", "rescale", "c", "top-1", "NLL"],
                    acc_rows,
                )
            )
        for size in sizes:
            rd = self.readings[size]
            extra["sizes"].append(
                {
                    "size": list(size),
                    "grid": list(rd.grid),
                    "var_x": rd.var_x,
                    "var_p": rd.var_p,
                    "accuracy": rd.accuracy,
                }
            )
        return Result(
            probe="variance",
            definition=DEFINITION,
            metrics=metrics,
            tables=tables,
            notes=list(self.notes),
            extra=extra,
        )


def variance_study(
    loaded: Any,
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
    native_pass: tuple[VarianceShiftProbe, Any] | None = None,
) -> VarianceStudy:
    """Measure Var P_s (always) and, given `batches_at(model_at_s, size)`, Var X_s, r, shift,
    k̂ and accuracy under each rescale, at every size plus the native size.

    `native_pass` = (probe, engine summary) of a VarianceShiftProbe that a shared pass already
    ran at the native size (`vitdiag report`): the study then reads the data at the native size
    no second time."""
    from vitdiag.engine import resolve_device, run_probes
    from vitdiag.model import at_size, valid_sizes_near

    if reduction not in REDUCTIONS:
        raise VitdiagError(f"--reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}.")
    require_abs_pos(loaded.model, "the variance-shift probe")
    native_loaded = native_of(loaded)
    native = as_hw(native_loaded.native_size)
    wanted = [as_hw(s) for s in sizes]
    notes: list[str] = []
    order = list(dict.fromkeys([native, *wanted]))
    if native not in wanted:
        notes.append(
            f"the native size {size_label(native)} was added: r0 = r(s0) is the reference for "
            "every shift."
        )
    interps = list(interpolations)
    primary = interps[0]
    src = native_loaded.model
    layout, prefix = layout_of(src), pos_prefix_rows(src)
    src_grid = table_grid(src)

    # Every size is checked before any pass, so a bad one fails fast with the valid ones named.
    for size in order:
        if size[0] == size[1] and valid_sizes_near(native_loaded, size[0]) != [size[0]]:
            at_size(native_loaded, size)  # raises the VitdiagError naming valid sizes

    study = VarianceStudy(
        native, interps, reduction, {}, [rescale_name(m) for m in rescales], notes=notes
    )
    study.native_loaded = native_loaded
    readings = study.readings
    dev = None
    if batches_at is not None:
        dev = device if isinstance(device, torch.device) else resolve_device(device)

    def run(at: Any, size: tuple[int, int], probe: VarianceShiftProbe, what: str) -> None:
        summary = run_probes(
            at.model,
            batches_at(at, size),
            [probe],
            device=dev,
            amp=amp,
            channels_last=channels_last,
            seed=seed,
            loaded=at,
            total_images=total_images,
            quiet=quiet,
            description=f"{what} @{size_label(size)}",
        )
        if size == native and what == "variance":
            study.n_images = summary.n_images
            study.n_unreadable = summary.n_unreadable
        study.seconds += summary.seconds
        label = f"variance@{size_label(size)}"
        study.passes.append(label if what == "variance" else f"{label} {what}")

    # One size at a time, native first (every empirical factor needs r0); a model at a size
    # lives only while its passes run, so large models are not held at every size at once.
    for size in order:
        at = build_at_size(native_loaded, size, c=1.0, interpolation=primary)
        grid = table_grid(at.model)
        var_p = {}
        for interp in interps:
            t = target_table(src, at.model, 1.0, interp)
            var_p[interp] = table_variance(grid_tokens(t, layout=layout, prefix_rows=prefix))
        readings[size] = SizeReading(size, grid, var_p)
        if size == native and src_grid != grid:  # pragma: no cover - a model.py inconsistency
            raise VitdiagError(
                f"the native grid {src_grid} does not match {grid}; report this bug."
            )
        if batches_at is None:
            continue
        if size == native and native_pass is not None:
            probe, summary = native_pass
            study.n_images, study.n_unreadable = summary.n_images, summary.n_unreadable
            study.seconds += summary.seconds
        else:
            # On the device before any table is swapped: the engine's own .to(device) would
            # otherwise move a swapped-in table and strand the saved one on the old device.
            at.model.to(dev)
            # pass A: Var X and every rescale whose factor is known in advance
            groups = (
                fixed_groups(rescales, size, native, src, at.model, primary) if accuracy else []
            )
            probe = VarianceShiftProbe(groups, measure_x=True, accuracy=accuracy)
            run(at, size, probe, "variance")
        readings[size].var_x = variances_from_sums(probe.x_sums)
        if probe.accuracy and float(probe.n_labelled) > 0:
            study.labelled = True
            readings[size].accuracy.update(probe.accuracy_by_name())
        if size == native:
            if not study.r0(_KEY[reduction]) > 0:
                raise VitdiagError(
                    "the patch embedding has zero variance on this data, so r0 is undefined; "
                    "check the images and the normalisation."
                )
            continue
        # pass B: the empirical table (labelled data only)
        if accuracy and study.labelled and "empirical" in rescales:
            c = study.c_empirical(size)
            table = target_table(src, at.model, c, primary)
            probe = VarianceShiftProbe(
                [RescaleGroup(["empirical"], c, None)], measure_x=False, accuracy=True
            )
            with swapped_table(at.model, table):
                run(at, size, probe, "empirical")
            readings[size].accuracy.update(probe.accuracy_by_name())
        del at
    if batches_at is not None and accuracy and not study.labelled:
        study.notes.append("the data has no labels, so accuracy under each rescale is not shown.")
    # keep the table order the user asked for
    for rd in readings.values():
        rd.accuracy = {n: rd.accuracy[n] for n in study.rescales if n in rd.accuracy}
    return study


def data_notes(study: VarianceStudy, source: Any) -> list[str]:
    """What a study on `source` (None: no images) could not measure, and the images it skipped."""
    if source is None:
        return [
            "Var[X_s], r, shift, k̂, the empirical c and accuracy under each rescale need "
            "images: give --data DIR (labelled folders for accuracy)."
        ]
    notes = []
    if not source.labelled:
        notes.append("the data has no labels, so accuracy under each rescale is not shown.")
    if study.n_unreadable:
        notes.append(
            f"{study.n_unreadable} unreadable image(s) were skipped (--strict fails instead)."
        )
    return notes
