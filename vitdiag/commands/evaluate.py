"""`vitdiag eval`: top-1, NLL and mean confidence in one pass, the engine end to end."""

from __future__ import annotations

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared


@shared("data", "model", "size", "images", "interpolation", "crop_pct", "runtime")
def evaluate(ckpt: o.Checkpoint = None, opts: Shared = None) -> None:
    """Top-1 accuracy, NLL and mean confidence of a checkpoint on a dataset."""
    from vitdiag.report import emit
    from vitdiag.runner import run_all
    from vitdiag.validation import Output, check_outputs, check_ranges

    opts.validate()
    check_ranges(size=opts.size, native_size=opts.native_size)
    check_outputs([Output("--json", opts.json_out)], [ckpt, opts.data])
    loaded, source = opts.load(ckpt, opts.size, data=True)
    results = run_all(loaded, source, probes={"eval"}, settings=opts.settings(), label="eval")
    run = {"seconds": results.seconds, "world_size": results.world_size}
    emit(
        "eval", results, loaded=loaded, data=results.data["data"], json_path=opts.json_out, run=run
    )
