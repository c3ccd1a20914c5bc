"""`vitdiag info`: what model is this, and how did vitdiag decide?"""

from __future__ import annotations

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared


@shared("model", "json_out")
def info(ckpt: o.Checkpoint = None, opts: Shared = None) -> None:
    """Show the architecture, how it was decided, and every assumption with its override."""
    from vitdiag.model import describe
    from vitdiag.report import console, render_model
    from vitdiag.results import document, dumps, json_to_stdout, write_json_text
    from vitdiag.validation import Output, check_outputs, check_ranges

    check_ranges(native_size=opts.native_size)
    check_outputs([Output("--json", opts.json_out)], [ckpt])
    loaded, _ = opts.load(ckpt)
    desc = describe(loaded)
    render_model(loaded, console(stderr=json_to_stdout(opts.json_out)))
    if opts.json_out is not None:
        write_json_text(dumps(document("info", [], desc, None)), opts.json_out)
