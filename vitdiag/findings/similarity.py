"""similarity.over_smoothed: last-block P(h) against the same architecture at random init."""

from __future__ import annotations

from vitdiag.findings.base import (
    Context,
    Finding,
    finite,
    graded,
    interval_of,
    overlaps,
    reference_of,
    short,
    span,
)
from vitdiag.findings.constants import practical

PROBE = "similarity"
REMEDY = (
    "vitdiag.train.patch_cosine_loss / patch_contrastive_loss / patch_mixing_loss "
    "(the DiversePatch losses of Gong et al. 2021)"
)


def rules(result: dict, ctx: Context, overrides: dict | None = None) -> list[Finding]:
    value = result.get("metrics", {}).get("last_block")
    ref = reference_of(result, "random_init")
    interval, method = interval_of(result, "last_block")
    if not finite(value) or not ref or not finite(ref.get("value")) or interval is None:
        return []
    # A random-init ViT's deep tokens are already alike (rank collapse at initialisation):
    # only P(h) above that reference says training made the patches more alike.
    if overlaps(interval, ref) or interval[0] < float(ref["value"]):
        return []
    effect = value - float(ref["value"])
    severity = graded(True, effect, practical("similarity.over_smoothed", overrides))
    why = (
        f"last-block P(h) {short(value)} {span(interval)} is above the same architecture at "
        f"random initialisation ({short(ref['value'])} {span(ref.get('interval'))}): the "
        "patches became more alike in training; add a patch-diversity loss."
    )
    return [
        Finding("similarity.over_smoothed", severity, value, interval, method, ref, why, REMEDY)
    ]
