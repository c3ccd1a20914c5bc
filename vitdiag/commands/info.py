"""`vitdiag info`: what model is this, and how did vitdiag decide?"""

from __future__ import annotations

from vitdiag import options as o
from vitdiag.commands.common import (
    Output,
    check_outputs,
    check_ranges,
    console,
    json_to_stdout,
    load_model,
    write_json_text,
)


def info(
    ckpt: o.Checkpoint = None,
    arch: o.Arch = None,
    ema: o.Ema = False,
    unsafe_pickle: o.UnsafePickle = False,
    model_arg: o.ModelArg = None,
    native_size: o.NativeSize = None,
    json_out: o.JsonOut = None,
) -> None:
    """Show the architecture, how it was decided, and every assumption with its override."""
    from rich.table import Table

    from vitdiag.families import has_abs_pos_table
    from vitdiag.model import describe
    from vitdiag.results import document, dumps

    check_ranges(native_size=native_size)
    check_outputs([Output("--json", json_out)], [ckpt])
    loaded = load_model(
        ckpt,
        arch,
        ema=ema,
        unsafe_pickle=unsafe_pickle,
        model_arg=model_arg,
        native_size=native_size,
    )
    desc = describe(loaded)
    out = console(stderr=json_to_stdout(json_out))
    t = Table(title="Model", show_header=False, title_justify="left")
    t.add_column("field")
    t.add_column("value")
    prov = loaded.provenance
    n_params = sum(p.numel() for p in loaded.model.parameters())
    rows = [
        ("source", str(prov.get("path") or "(random weights)")),
        ("format", str(prov.get("format", "–"))),
        ("sha256", str(prov.get("sha256") or "–")),
        ("architecture", loaded.arch),
        ("family", loaded.family.label),
        ("decided by", str(prov.get("decided_by", "–"))),
        ("classes", str(loaded.num_classes)),
        ("parameters", f"{n_params:,}"),
        ("native size", "x".join(map(str, loaded.native_size))),
        ("built at", "x".join(map(str, loaded.img_size))),
        ("absolute position table", "yes" if has_abs_pos_table(loaded.model) else "no"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)
    a = Table(title="Assumptions", title_justify="left")
    for col in ("what", "value", "decided from", "override with"):
        a.add_column(col)
    for item in loaded.assumptions:
        a.add_row(item.name, str(item.value), item.source, item.override)
    out.print(a)
    if json_out is not None:
        write_json_text(dumps(document("info", [], desc, None)), json_out)
