"""`vitdiag augment`: does a training recipe's augmentation shift the input variance?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared

Ckpt = Annotated[
    str | None,
    typer.Option("--ckpt", help="Checkpoint whose patch embedding X is measured as well."),
]
TrainArgs = Annotated[
    Path | None,
    typer.Option(
        "--train-args",
        help="timm train.py args.yaml to read mixup, cutmix, reprob, remode, mean, std from "
        "(default: an args.yaml beside --ckpt).",
    ),
]
Mixup = Annotated[float | None, typer.Option("--mixup", help="Mixup α (overrides args.yaml).")]
Cutmix = Annotated[float | None, typer.Option("--cutmix", help="CutMix α (overrides args.yaml).")]
Reprob = Annotated[
    float | None, typer.Option("--reprob", help="Random-erasing probability (overrides args.yaml).")
]
Remode = Annotated[
    str | None,
    typer.Option("--remode", help="Random-erasing mode: const, rand or pixel."),
]
Suggest = Annotated[
    bool,
    typer.Option(
        "--suggest",
        help="Print the train.py argument changes that remove each flag, each audited again "
        "with its measured effect on the variance ratio.",
    ),
]
AuditSize = Annotated[
    int | None,
    typer.Option("--size", help="Image size without --ckpt (default 224; with it: the model's)."),
]


OPTIONS = ("model", "limit", "batch_size", "workers", "seed", "strict", "interpolation")


@shared(*OPTIONS, "mean", "std", "crop_pct", "device", "json_out", "quiet")
def augment(
    data: o.Data = None,
    ckpt: Ckpt = None,
    train_args: TrainArgs = None,
    mixup: Mixup = None,
    cutmix: Cutmix = None,
    reprob: Reprob = None,
    remode: Remode = None,
    size: AuditSize = None,
    suggest: Suggest = False,
    opts: Shared = None,
) -> None:
    """Variance of Mixup / CutMix / random-erasing batches against clean ones, the data's
    mean/std after normalisation, and the paper's guideline flags (arXiv 2405.14115)."""
    from vitdiag.probes.augment import read_train_args, resolve_config
    from vitdiag.report import emit
    from vitdiag.studies.augment import audit, train_args_beside
    from vitdiag.validation import Output, check_outputs, check_ranges, parse_floats

    check_ranges(mixup=mixup, cutmix=cutmix, reprob=reprob, size=size, native_size=opts.native_size)
    opts.validate()
    check_outputs([Output("--json", opts.json_out)], [ckpt, data, train_args])
    beside = train_args_beside(ckpt) if train_args is None else None
    recipe = train_args or beside
    cfg = resolve_config(
        read_train_args(recipe) if recipe is not None else None,
        mixup=mixup,
        cutmix=cutmix,
        reprob=reprob,
        remode=remode,
        mean=parse_floats(opts.mean, "--mean"),
        std=parse_floats(opts.std, "--std"),
    )
    loaded = opts.load(ckpt)[0] if ckpt is not None or opts.arch is not None else None
    # The recipe's normalisation (args.yaml, --mean/--std), not the checkpoint's.
    settings = opts.settings(mean=cfg.mean, std=cfg.std)
    result, done = audit(
        loaded, opts.open(), cfg, settings, size=size, recipe=recipe, beside=beside
    )
    run = {"seconds": done.summary.seconds}
    then = None
    if suggest:
        from vitdiag.studies.augment import measured_suggestions

        rows = measured_suggestions(loaded, opts.open(), cfg, settings, result, size=size)
        result.extra["suggestions"] = rows

        def then(con) -> None:
            _print_suggestions(con, rows)

    emit(
        "augment",
        [result],
        loaded=loaded,
        data=done.data,
        json_path=opts.json_out,
        run=run,
        then=then,
    )


def _print_suggestions(con, rows: list[dict]) -> None:
    from rich.table import Table

    from vitdiag.report import fmt

    if not rows:
        con.print("suggestions: none (no guideline flag was raised).")
        return
    table = Table(title="Suggested train.py changes (measured)", title_justify="left")
    for col in ("flag", "change", "variance ratio", "before", "after", "flag after"):
        table.add_column(col)
    for r in rows:
        after = "cleared" if r["flag_after"] == 0.0 else "still raised"
        table.add_row(
            r["flag"], r["change"], r["ratio"] or "–", fmt(r["before"]), fmt(r["after"]), after
        )
    con.print(table)
