"""`vitdiag collapse`: neural collapse, classifier geometry, mixup geometry, calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import (
    DataOptions,
    Output,
    check_outputs,
    check_ranges,
    emit,
    label_check,
    load_model,
    loader_for,
    open_data,
    transform_for,
)
from vitdiag.errors import VitdiagError


def collapse(
    ckpt: o.Checkpoint = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Training split: NC1-NC4 and mixup geometry.")
    ] = None,
    val: Annotated[
        str | None, typer.Option("--val", help="Validation split: ECE, MCE, NLL, accuracy.")
    ] = None,
    per_class: Annotated[
        int | None, typer.Option("--per-class", help="Use at most N training images per class.")
    ] = None,
    mixup_geometry: Annotated[
        bool, typer.Option("--mixup-geometry", help="Also measure mixup geometry on --data.")
    ] = False,
    pairs: Annotated[int, typer.Option("--pairs", help="Image pairs of each kind.")] = 64,
    train_mode: Annotated[
        bool, typer.Option("--train-mode", help="Mixup geometry in train mode (as the paper).")
    ] = False,
    budget: Annotated[
        int, typer.Option("--nc4-budget", help="Images kept for NC4 (exact up to this many).")
    ] = 10000,
    plots: Annotated[
        Path | None, typer.Option("--plots", help="Folder for reliability/mixup PNGs.")
    ] = None,
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
    """Neural collapse (NC1-NC4), classifier ETF geometry, mixup geometry and calibration."""
    from vitdiag.engine import run_probes
    from vitdiag.probes.calibration import CalibrationProbe
    from vitdiag.probes.collapse import CollapseProbe, classifier_result
    from vitdiag.probes.collapse_plots import plot_mixup_geometry, plot_reliability
    from vitdiag.probes.mixup_geometry import MixupGeometryProbe

    if mixup_geometry and data is None:
        raise VitdiagError("--mixup-geometry needs training images: add --data TRAIN_DIR.")
    check_ranges(pairs=pairs, nc4_budget=budget, per_class=per_class, native_size=native_size)
    DataOptions(
        data, limit, batch_size, workers, seed, strict, mean, std, interpolation, crop_pct
    ).validate()
    check_outputs(
        [Output("--json", json_out), Output("--plots", plots, folder=True)], [ckpt, data, val]
    )
    loaded = load_model(
        ckpt,
        arch,
        ema=ema,
        unsafe_pickle=unsafe_pickle,
        model_arg=model_arg,
        native_size=native_size,
    )
    results = [classifier_result(loaded.model)]
    data_desc: dict = {}
    run = dict(device=device, amp=amp, channels_last=channels_last, seed=seed, loaded=loaded)

    def one_pass(path: str, probes: list, name: str, per: int | None = None):
        opts = DataOptions(
            path, limit, batch_size, workers, seed, strict, mean, std, interpolation, crop_pct
        )
        source = open_data(opts)
        if not source.labelled:
            raise VitdiagError(f"{path} has no labels; {name} needs class sub-folders.")
        notes = label_check(loaded, source)
        loader = loader_for(source, transform_for(loaded, opts, loaded.img_size), opts, per)
        summary = run_probes(
            loaded.model,
            loader,
            probes,
            total_images=loader.n_images,
            quiet=quiet,
            description=name,
            **run,
        )
        for r in summary.results:
            r.notes.extend(notes)
        desc = dict(source.describe(), n_images=summary.n_images, n_unreadable=summary.n_unreadable)
        return summary.results, desc

    if data is not None:
        probes = [CollapseProbe.for_model(loaded.model, budget=budget, seed=seed)]
        if mixup_geometry:
            probes.append(
                MixupGeometryProbe.for_model(
                    loaded.model, pairs=pairs, seed=seed, train_mode=train_mode
                )
            )
        found, data_desc["train"] = one_pass(data, probes, "collapse", per_class)
        results += found
    if val is not None:
        found, data_desc["val"] = one_pass(val, [CalibrationProbe()], "calibration")
        results += found
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        for r in results:
            if r.probe == "calibration":
                plot_reliability(r, plots / "reliability.png")
            elif r.probe == "mixup_geometry":
                plot_mixup_geometry(r, plots / "mixup_geometry.png")
    emit("collapse", results, loaded=loaded, data=data_desc or None, json_path=json_out)
