"""`vitdiag similarity`: patch-wise absolute cosine similarity per layer (over-smoothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import (
    DataOptions,
    ModelOptions,
    Output,
    check_outputs,
    check_ranges,
    emit,
    load_at,
    open_data,
)

_RANDOM = object()  # marks the --random-baseline entry in the list of checkpoints


def similarity(
    ckpts: Annotated[
        list[str] | None,
        typer.Argument(
            help="One or more checkpoints (compared in one table and one plot). Leave out and "
            "give --arch for random weights.",
            show_default=False,
        ),
    ] = None,
    data: o.Data = None,
    layers: Annotated[
        str | None, typer.Option("--layers", help="Comma-separated layer names to measure.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write similarity against depth to this PNG.")
    ] = None,
    random_baseline: Annotated[
        bool,
        typer.Option(
            "--random-baseline",
            help="Add the first checkpoint's architecture with random weights as another curve.",
        ),
    ] = False,
    arch: o.Arch = None,
    ema: o.Ema = False,
    unsafe_pickle: o.UnsafePickle = False,
    model_arg: o.ModelArg = None,
    native_size: o.NativeSize = None,
    size: o.Size = None,
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
    """Patch-wise cosine similarity per layer: how far tokens collapse onto each other."""
    from vitdiag.model import at_size, describe, load
    from vitdiag.plots import plot_similarity
    from vitdiag.results import Result, Table
    from vitdiag.runner import require, run_all

    opts = DataOptions(
        data, limit, batch_size, workers, seed, strict, mean, std, interpolation, crop_pct
    )
    names = [s.strip() for s in layers.split(",")] if layers else None
    opts.validate()
    check_ranges(size=size, native_size=native_size)
    check_outputs([Output("--json", json_out), Output("--plot", plot)], [*(ckpts or []), data])
    source = open_data(opts)
    # Similarity never reads labels, so any data will do, whatever its classes.
    settings = opts.settings(
        layers=names,
        label_check=False,
        label="similarity",
        device=device,
        amp=amp,
        channels_last=channels_last,
        quiet=quiet,
    )
    model = ModelOptions(arch, ema, unsafe_pickle, model_arg, native_size)
    labelled_results: list[tuple[str, Result]] = []
    models = []
    data_desc = None
    todo: list = list(ckpts or [None])
    if random_baseline:
        todo.append(_RANDOM)
    for ckpt in todo:
        if ckpt is _RANDOM:
            # Same architecture and build arguments, untrained: how much smoothing training adds.
            first = models[0]
            loaded = load(
                None,
                arch=first.arch,
                model_args=dict(first.build_kwargs),
                img_size=first.native_size,
                native_size=first.native_size,
            )
            loaded = at_size(loaded, size) if size is not None else loaded
        else:
            loaded, _ = load_at(ckpt, model, size)
        require(loaded, ["similarity"])
        found = run_all(loaded, source, probes={"similarity"}, settings=settings)
        result = found[0]
        label = f"{loaded.arch} (random)" if ckpt in (None, _RANDOM) else Path(ckpt).name
        result.extra["label"] = label
        result.extra["model"] = describe(loaded)
        for t in result.tables:
            t.title = f"{t.title} — {label}"
        labelled_results.append((label, result))
        models.append(loaded)
        data_desc = found.data["data"]

    results = [r for _, r in labelled_results]
    if len(results) > 1:
        depth = max(len(r.extra["layers"]) for r in results)
        rows = []
        for i in range(depth):
            row: list = [i]
            for r in results:
                lay, vals = r.extra["layers"], r.extra["mean"]
                row += [lay[i], vals[i]] if i < len(lay) else [None, None]
            rows.append(row)
        cols = ["index"] + [c for label, _ in labelled_results for c in (label, "P")]
        results.append(
            Result(
                "similarity.compare",
                results[0].definition,
                tables=[Table("Comparison", cols, rows)],
            )
        )
    if plot is not None:
        plot_similarity(labelled_results, plot)
    emit(
        "similarity",
        results,
        loaded=models[0] if len(models) == 1 else None,
        data=data_desc,
        json_path=json_out,
    )
