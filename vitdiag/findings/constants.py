"""Practical sizes: how large an effect must be before a finding may be `fail` (SPEC §8).

Each has its provenance. None is copied from a paper as a verdict: where a paper is named, it
is the scale the paper reports, which vitdiag then adopts as a default and says so. Override
any of them in `vitdiag.toml` under `[findings.practical]` (see vitdiag check).
"""

from __future__ import annotations

PRACTICAL: dict[str, tuple[float, str]] = {
    "eval.not_above_chance": (
        0.05,
        "vitdiag default: the model cannot be more than 5 points of top-1 above chance "
        "(the upper end of its Wilson interval is within 0.05 of the majority-class rate).",
    ),
    "calibration.ece_excess": (
        0.05,
        "vitdiag default: ECE 5 points above the perfect-calibration null's mean. Guo et al. "
        "2017 (ICML) report miscalibration of modern networks of the order of several to ten "
        "points of ECE, which temperature scaling mostly removes; the number is ours, not theirs.",
    ),
    "variance.rescale_gain": (
        0.02,
        "vitdiag default: a paired top-1 gain of 2 points; below that a rewritten checkpoint is "
        "rarely worth a second artefact at the sample sizes vitdiag is run on (N ≤ 10k).",
    ),
    "similarity.over_smoothed": (
        0.10,
        "vitdiag default: last-block P(h) 0.10 above the same architecture at random init. "
        "Gong et al. 2021 (arXiv 2104.12753, Fig. 1b) report P(h) above 0.7 after the last "
        "layer of a 24-layer DeiT-Base, with ResNet-50 showing no such rise; they give no "
        "threshold, and random-init networks are already high (SPEC §8), hence a paired gap.",
    ),
    "collapse.nc1_vs_random": (
        0.5,
        "vitdiag default: trained NC1 below half of the random-init network's NC1. Papyan et "
        "al. 2020 (PNAS) show NC1 falling by orders of magnitude over training; the factor is "
        "ours.",
    ),
    "collapse.nc4": (
        0.05,
        "vitdiag default: the head and the nearest-class-mean rule disagree on more than 5 % of "
        "the images (the fixtures' trained heads: 0 to 1.5 %).",
    ),
}


def practical(rule: str, overrides: dict[str, float] | None = None) -> float:
    if overrides and rule in overrides:
        return float(overrides[rule])
    return PRACTICAL[rule][0]
