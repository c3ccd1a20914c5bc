"""`vitdiag eval`: top-1, NLL and mean confidence in one pass, the engine end to end."""

from __future__ import annotations

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


def evaluate(
    ckpt: o.Checkpoint = None,
    data: o.Data = None,
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
    """Top-1 accuracy, NLL and mean confidence of a checkpoint on a dataset."""
    from vitdiag.engine import run_probes
    from vitdiag.model import at_size
    from vitdiag.probes.accuracy import AccuracyProbe

    opts = DataOptions(
        data, limit, batch_size, workers, seed, strict, mean, std, interpolation, crop_pct
    )
    opts.validate()
    check_ranges(size=size, native_size=native_size)
    check_outputs([Output("--json", json_out)], [ckpt, data])
    loaded = load_model(
        ckpt,
        arch,
        ema=ema,
        unsafe_pickle=unsafe_pickle,
        model_arg=model_arg,
        native_size=native_size,
    )
    source = open_data(opts)
    notes = label_check(loaded, source)
    if size is not None:
        loaded = at_size(loaded, size)
    loader = loader_for(source, transform_for(loaded, opts, loaded.img_size), opts)
    probe = AccuracyProbe()
    summary = run_probes(
        loaded.model,
        loader,
        [probe],
        device=device,
        amp=amp,
        channels_last=channels_last,
        seed=seed,
        loaded=loaded,
        total_images=min(len(source), limit or len(source)),
        quiet=quiet,
        description="eval",
    )
    result = summary.results[0]
    result.notes.extend(notes)
    if summary.n_unreadable:
        result.notes.append(
            f"{summary.n_unreadable} unreadable image(s) were skipped (--strict fails instead)."
        )
    data_desc = dict(
        source.describe(), n_images=summary.n_images, n_unreadable=summary.n_unreadable
    )
    emit(
        "eval",
        [result],
        loaded=loaded,
        data=data_desc,
        json_path=json_out,
        run={"seconds": summary.seconds, "world_size": summary.world_size},
    )
