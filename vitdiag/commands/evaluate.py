"""`vitdiag eval`: top-1, NLL and mean confidence in one pass, the engine end to end."""

from __future__ import annotations

from vitdiag import options as o
from vitdiag.commands.common import (
    DataOptions,
    ModelOptions,
    Output,
    check_outputs,
    check_ranges,
    emit,
    load_at,
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
    from vitdiag.runner import run_all

    opts = DataOptions(
        data, limit, batch_size, workers, seed, strict, mean, std, interpolation, crop_pct
    )
    opts.validate()
    check_ranges(size=size, native_size=native_size)
    check_outputs([Output("--json", json_out)], [ckpt, data])
    model = ModelOptions(arch, ema, unsafe_pickle, model_arg, native_size)
    loaded, source = load_at(ckpt, model, size, data=opts)
    settings = opts.settings(device=device, amp=amp, channels_last=channels_last, quiet=quiet)
    results = run_all(loaded, source, probes={"eval"}, settings=settings, label="eval")
    run = {"seconds": results.seconds, "world_size": results.world_size}
    emit("eval", results, loaded=loaded, data=results.data["data"], json_path=json_out, run=run)
