"""collapse.* and classifier.*: NC1 against random init, head geometry against random heads.

Both are descriptive (`info`): collapse is what training does, not a fault. The one fault is
within-class variability no smaller than an untrained network's, which is a `warn` once the
interval excludes the reference.
"""

from __future__ import annotations

from vitdiag.findings.base import (
    FAIL,
    INFO,
    WARN,
    Context,
    Finding,
    finite,
    interval_of,
    overlaps,
    reference_of,
    short,
    span,
)
from vitdiag.findings.constants import practical

PROBES = ("collapse", "classifier")


def nc1_rules(result: dict, ctx: Context, overrides: dict | None = None) -> list[Finding]:
    value = result.get("metrics", {}).get("nc1")
    ref = reference_of(result, "random_init")
    interval, method = interval_of(result, "nc1")
    if not finite(value) or not ref or not finite(ref.get("value")) or interval is None:
        return []
    ref_text = f"{short(ref['value'])} {span(ref.get('interval'))}"
    if not overlaps(interval, ref) and interval[1] < ref["value"]:
        rule, severity = "collapse.nc1_below_random_init", INFO
        why = (
            f"NC1 {short(value)} {span(interval)} is below the same architecture at random "
            f"initialisation ({ref_text}): training collapsed the within-class variability."
        )
    elif not overlaps(interval, ref):
        rule, severity = "collapse.nc1_above_random_init", WARN
        why = (
            f"NC1 {short(value)} {span(interval)} is above an untrained network's ({ref_text}): "
            "the features separate the classes less than random ones; check the labels and "
            "the training."
        )
    else:
        rule, severity = "collapse.nc1_like_random_init", INFO
        why = (
            f"NC1 {short(value)} {span(interval)} cannot be told from an untrained network's "
            f"({ref_text}) on these images: no evidence of collapse."
        )
    return [Finding(rule, severity, value, interval, method, ref, why, None)]


def head_rules(result: dict, ctx: Context, overrides: dict | None = None) -> list[Finding]:
    value = result.get("metrics", {}).get("w_etf")
    ref = reference_of(result, "gaussian_heads")
    if not finite(value) or not ref or not ref.get("interval"):
        return []
    lo, hi = ref["interval"]
    ref_text = f"{short(ref['value'])} {span(ref['interval'])}"
    if value < lo:
        rule = "classifier.closer_to_etf_than_random"
        why = f"the head's ETF distance {short(value)} is below random Gaussian heads' ({ref_text})"
        why += ": its rows lean towards a simplex ETF."
    elif value > hi:
        rule = "classifier.farther_from_etf_than_random"
        why = f"the head's ETF distance {short(value)} is above random Gaussian heads' ({ref_text})"
        why += ": its rows are less ETF-like than random ones (unequal norms or angles)."
    else:
        rule = "classifier.etf_like_random"
        why = (
            f"the head's ETF distance {short(value)} lies within random Gaussian heads' "
            f"({ref_text}): no evidence that it moved towards a simplex ETF."
        )
    # The head's weights are the whole population: its value has no sampling interval.
    return [Finding(rule, INFO, value, None, "exact (weights)", ref, why, None)]


def nc4_rules(result: dict, ctx: Context, overrides: dict | None = None) -> list[Finding]:
    """collapse.head_disagrees_with_class_means: the classifier decides otherwise than the
    nearest class mean on more images than the practical size (an untrained or re-initialised
    head on trained features does so on most)."""
    m = result.get("metrics", {})
    share, n = m.get("nc4"), m.get("nc4_sample_size")
    if not finite(share) or not finite(n) or not n:
        return []
    from vitdiag.intervals import WILSON, wilson_interval  # not at import: check stays light

    size = practical("collapse.nc4", overrides)
    if share <= size:
        return []
    lo, hi = (m["nc4_ci_low"], m["nc4_ci_high"]) if finite(m.get("nc4_ci_low")) else (None, None)
    if lo is None:
        lo, hi = wilson_interval(share * n, n)
    ref = {
        "value": 0.0,
        "interval": None,
        "how": "closed form: a head collapsed onto its class means (NC3 → 0) decides as the "
        "nearest class mean does on every image, NC4 = 0 (Papyan et al. 2020)",
    }
    why = (
        f"the head decides otherwise than the nearest class mean on {short(share)} "
        f"{span([lo, hi])} of {int(n)} images, while the features separate the classes "
        f"(NC1 {short(m.get('nc1'))}): the classifier is not trained on these features (an "
        "untrained, re-initialised or mismatched head); retrain or reload the head."
    )
    severity = FAIL if lo > size else WARN
    rule = "collapse.head_disagrees_with_class_means"
    return [Finding(rule, severity, share, [lo, hi], WILSON, ref, why, None)]
