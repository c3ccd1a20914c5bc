"""variance.rescale_helps@SIZE: the paired top-1 gain of a rescaled position table."""

from __future__ import annotations

import re
from pathlib import Path

from vitdiag.findings.base import Context, Finding, graded, interval_of, reference_of, short, span
from vitdiag.findings.constants import practical

PROBE = "variance"
_GAIN = re.compile(r"^gain@(?P<size>[^/]+)/(?P<rescale>.+)$")


def _remedy(ctx: Context, size: str, rescale: str) -> str | None:
    if not ctx.checkpoint or "x" in size:
        return None  # fix-posembed writes square sizes
    out = f"{Path(ctx.checkpoint.rstrip('/')).name}-posembed{size}"
    words = ["vitdiag", "fix-posembed", ctx.checkpoint, "--size", size, "--rescale", rescale]
    if rescale == "empirical":
        if not ctx.data:
            return None
        words += ["--data", ctx.val or ctx.data]
    return ctx.command(*words, "--out", out)


def rules(result: dict, ctx: Context, overrides: dict | None = None) -> list[Finding]:
    best: dict[str, tuple[float, str, float, list[float], str | None]] = {}
    for key, gain in result.get("metrics", {}).items():
        match = _GAIN.match(key)
        interval, method = interval_of(result, key)
        if not match or interval is None or interval[0] <= 0:
            continue
        size, rescale = match["size"], match["rescale"]
        if size not in best or interval[0] > best[size][0]:
            best[size] = (interval[0], rescale, gain, interval, method)
    out = []
    for size, (_, rescale, gain, interval, method) in sorted(best.items()):
        ref = reference_of(result, f"none@{size}") or {
            "value": result["metrics"].get(f"top1@{size}/none"),
            "interval": None,
            "how": f"the same model at {size} px without the rescale, on the same images",
        }
        why = (
            f"at {size} px the {rescale} rescale of the position table raises top-1 by "
            f"{short(gain)} {span(interval)} over no rescale (top-1 {short(ref.get('value'))}) "
            f"on the same images: write a checkpoint for {size} px with it."
        )
        severity = graded(True, gain, practical("variance.rescale_gain", overrides))
        remedy = _remedy(ctx, size, rescale)
        rule = f"variance.rescale_helps@{size}"
        out.append(Finding(rule, severity, gain, interval, method, ref, why, remedy))
    return out
