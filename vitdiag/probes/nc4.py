"""NC4 of neural collapse from a uniform sample: the nearest-class-mean classifier against the
network's decision, with a Wilson interval when the sample is smaller than the data.

The sample is a bottom-k reservoir: every labelled image gets a seeded uniform key, and the
`budget` smallest keys are kept, per process and then over processes (`bottom_k`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vitdiag.probes.classifier import f64

WILSON_Z = 1.959963984540054  # two-sided 95%


@dataclass
class NC4Sample:
    """Features (and the network's predictions) of a uniform sample of the N labelled images."""

    h: torch.Tensor  # (m, D)
    pred: torch.Tensor | None  # (m,) argmax of the network's logits; None: argmax(W h + b)
    population: int  # N


def wilson_interval(k: float, n: float, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (conservative for sampling without
    replacement, which has a smaller variance)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def nearest_class_mean(h: torch.Tensor, means: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Class id of the nearest mean (Euclidean) for each row of h."""
    h, means = f64(h), f64(means)
    centre = means.mean(0)  # centring shrinks the ‖h‖² that the expansion below cancels
    x, m = h - centre, means - centre
    d2 = (x * x).sum(1, keepdim=True) - 2 * x @ m.T + (m * m).sum(1)[None, :]
    return classes[d2.argmin(dim=1)]


def nc4_stats(
    sample: NC4Sample,
    means: torch.Tensor,
    classes: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None = None,
) -> dict[str, float]:
    """NC4: share of samples whose nearest class mean disagrees with the classifier, with
    bias (the network's prediction) and without (argmax W h)."""
    h, W = f64(sample.h), f64(W)
    m = h.shape[0]
    out: dict[str, float] = {
        "nc4_sample_size": float(m),
        "nc4_population": float(sample.population),
    }
    if m == 0:
        return out | {"nc4": float("nan"), "nc4_nobias": float("nan")}
    ncc = nearest_class_mean(h, means, classes)
    scores = h @ W.T
    if sample.pred is not None:
        pred = torch.as_tensor(sample.pred).to("cpu", torch.int64)
    else:
        pred = (scores + (0 if b is None else f64(b))).argmax(dim=1)
    for key, p in (("nc4", pred), ("nc4_nobias", scores.argmax(dim=1))):
        k = float((ncc != p).sum())
        out[key] = k / m
        if m < sample.population:
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = wilson_interval(k, m)
    return out


def bottom_k(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest keys. Keeping the k smallest of i.i.d. uniform keys is a
    uniform sample without replacement, and the k smallest of a union are the k smallest of
    each part's k smallest: so per-process samples merge exactly."""
    order = torch.argsort(keys, stable=True)
    return order[:k]
