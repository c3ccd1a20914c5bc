"""calibration.over_confident / under_confident: ECE against a perfectly calibrated model's."""

from __future__ import annotations

from pathlib import Path

from vitdiag.findings.base import (
    Context,
    Finding,
    finite,
    graded,
    interval_of,
    reference_of,
    short,
    span,
)
from vitdiag.findings.constants import practical

PROBE = "calibration"


def _remedy(ctx: Context) -> str | None:
    """`vitdiag calibrate` needs two splits: one to fit the temperature, one to judge it."""
    if not ctx.checkpoint or not ctx.data or not ctx.val or ctx.data == ctx.val:
        return None
    out = f"{Path(ctx.checkpoint.rstrip('/')).name}-calibrated"  # beside the user, not the input
    return ctx.command(
        "vitdiag", "calibrate", ctx.checkpoint, "--fit", ctx.data, "--val", ctx.val, "--out", out
    )


def rules(result: dict, ctx: Context, overrides: dict | None = None) -> list[Finding]:
    m = result.get("metrics", {})
    ece, gap = m.get("ece"), m.get("confidence_minus_accuracy")
    ref = reference_of(result, "perfect_calibration")
    if not finite(ece) or not finite(gap) or not ref or not finite(ref.get("q95")):
        return []
    if ece <= ref["q95"]:
        return []
    ece_interval, method = interval_of(result, "ece")
    gap_interval, _ = interval_of(result, "confidence_minus_accuracy")
    over = gap > 0
    direction_sure = gap_interval is not None and (gap_interval[0] > 0 or gap_interval[1] < 0)
    severity = graded(
        direction_sure, ece - float(ref["value"]), practical("calibration.ece_excess", overrides)
    )
    word = "over" if over else "under"
    remedy = _remedy(ctx)
    fit = (
        "fit a temperature on one split and check it on another"
        if remedy
        else "give a held-out --val and fit a temperature with vitdiag calibrate "
        "(--fit one split, --val another)"
    )
    why = (
        f"ECE {short(ece)} {span(ece_interval)} is above what a perfectly calibrated model "
        f"shows on the same images (95th percentile {short(ref['q95'])}), and confidence − "
        f"accuracy is {short(gap)} {span(gap_interval)}: the model is {word}-confident; {fit}."
    )
    return [
        Finding(
            f"calibration.{word}_confident", severity, ece, ece_interval, method, ref, why, remedy
        )
    ]
