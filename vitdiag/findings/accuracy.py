"""eval.not_above_chance: top-1 against the majority-class rate of the evaluated labels."""

from __future__ import annotations

from vitdiag.findings.base import (
    FAIL,
    WARN,
    Context,
    Finding,
    finite,
    interval_of,
    reference_of,
    short,
    span,
)
from vitdiag.findings.constants import practical

PROBE = "eval"


def _chance(result: dict, ctx: Context) -> dict | None:
    ref = reference_of(result, "chance")
    if ref and finite(ref.get("value")):
        return ref
    classes = ctx.extra.get("num_classes")
    if not classes:
        return None
    return {
        "value": 1.0 / classes,
        "interval": None,
        "how": f"1/C with C = {classes} outputs (this report has no class counts; the "
        "majority-class rate is exact when the labels are balanced)",
    }


def rules(result: dict, ctx: Context, overrides: dict | None = None) -> list[Finding]:
    m = result.get("metrics", {})
    top1, n = m.get("top1"), m.get("n_labelled")
    ref = _chance(result, ctx)
    if not finite(top1) or not finite(n) or not n or ref is None:
        return []
    interval, method = interval_of(result, "top1")
    if interval is None:
        # Imported here: reading a config (vitdiag check) must not import torch.
        from vitdiag.intervals import WILSON, wilson_interval

        interval, method = list(wilson_interval(top1 * n, n)), WILSON
    chance = float(ref["value"])
    # Here the interval reaching chance is the evidence: the model cannot be shown to beat it.
    if interval[0] > chance:
        return []
    room = interval[1] - chance
    severity = FAIL if room <= practical("eval.not_above_chance", overrides) else WARN
    why = (
        f"top-1 {short(top1)} {span(interval)} over {int(n)} images does not exceed chance "
        f"({short(chance)}): check that the data's classes are the model's, in its order "
        "(vitdiag info shows the label names), and that the weights are the trained ones."
    )
    remedy = ctx.command("vitdiag", "info", ctx.checkpoint) if ctx.checkpoint else None
    return [Finding("eval.not_above_chance", severity, top1, interval, method, ref, why, remedy)]
