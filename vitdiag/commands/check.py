"""`vitdiag check`: thresholds from vitdiag.toml / [tool.vitdiag] → pass/fail table, exit code.

Exit 0 when every threshold holds, 1 when any fails, 2 when the config is wrong (before any
model is loaded where possible). Only the probes the thresholds name are run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared


@shared("model", "runtime")
def check(
    ckpt: o.Checkpoint = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="vitdiag.toml, or a pyproject.toml with [tool.vitdiag] (default: look for "
            "either in the current folder).",
        ),
    ] = None,
    junit: Annotated[
        Path | None,
        typer.Option("--junit", help="Also write the outcome as JUnit XML (one testcase each)."),
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Override the config's data (evaluation images).")
    ] = None,
    train: Annotated[
        str | None, typer.Option("--train", help="Override the config's train (training images).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Override the config's limit.")
    ] = None,
    c: Shared = None,
) -> None:
    """Check a checkpoint against thresholds such as "collapse.nc1 < 0.5" (exit 1 on failure)."""
    from vitdiag.check import find_config, judge, junit_xml, load_config, render_outcomes
    from vitdiag.errors import CheckFailed, VitdiagError
    from vitdiag.validation import Output, check_invariance_options, check_outputs, check_ranges

    cfg = load_config(config if config is not None else find_config())
    data = data or cfg.data
    train = train or cfg.train
    check_ranges(limit=limit, native_size=c.native_size)
    if "invariance" in cfg.probes:
        try:
            check_invariance_options(cfg.aug, cfg.views, cfg.embedding)
        except VitdiagError as e:
            raise VitdiagError(f"{cfg.path}: {e}") from None
    check_outputs(
        [Output("--json", c.json_out), Output("--junit", junit)], [ckpt, cfg.path, data, train]
    )
    needs_data = cfg.probes - {"classifier"}
    if needs_data and data is None and train is None:
        raise VitdiagError(
            f"{cfg.path}: the checks on {', '.join(sorted(needs_data))} need images; add "
            'data = "path/to/val" (and optionally train = "path/to/train") or pass --data.'
        )

    from vitdiag.engine import is_main_process
    from vitdiag.model import describe
    from vitdiag.report import console
    from vitdiag.results import (
        document,
        dumps,
        json_to_stdout,
        jsonable,
        write_atomic,
        write_json_text,
    )
    from vitdiag.runner import Settings, run_all

    settings = Settings(
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        limit=limit or cfg.limit,
        seed=cfg.seed,
        per_class=cfg.per_class,
        device=c.device,
        amp=c.amp,
        channels_last=c.channels_last,
        quiet=c.quiet,
        aug=cfg.aug,
        views=cfg.views,
        embedding=cfg.embedding,
        pairs=cfg.pairs,
        nc4_budget=cfg.nc4_budget,
    )
    loaded, _ = c.load(ckpt)
    # `train` feeds the training-split probes; `data` is then the held-out split.
    source, val_source = (train, data) if train is not None else (data, None)
    results = run_all(
        loaded,
        source,
        probes=cfg.probes,
        val_source=val_source,
        sizes=cfg.all_sizes,
        settings=settings,
    )
    outcomes = judge(cfg.checks, results)
    failed = [x for x in outcomes if not x.passed]
    if is_main_process():
        json_out = c.json_out
        to_stdout = json_to_stdout(json_out)
        label = Path(ckpt).name if ckpt else f"{c.arch} (random)"
        render_outcomes(outcomes, console(stderr=to_stdout), title=f"vitdiag check — {label}")
        if junit is not None:
            model = describe(loaded)
            xml = junit_xml(
                outcomes,
                suite=f"vitdiag check {label}",
                seconds=results.seconds,
                properties={
                    "checkpoint": model.get("path"),
                    "sha256": model.get("sha256"),
                    "arch": model.get("arch"),
                    "config": str(cfg.path),
                },
            )
            write_atomic(junit, xml)
        if json_out is not None:
            doc = document("check", list(results), describe(loaded), results.data or None)
            doc["checks"] = [
                {
                    "check": x.threshold.text,
                    "metric": x.threshold.metric,
                    "expected": x.threshold.expected(),
                    "measured": x.measured,
                    "passed": x.passed,
                }
                for x in outcomes
            ]
            write_json_text(dumps(jsonable(doc)), json_out)
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(outcomes)} checks failed")
