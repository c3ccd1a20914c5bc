"""Intervals over images that stream, reduce across processes and do not depend on batching.

- Poisson bootstrap (Oza & Russell 2001; Hanley & MacGibbon 2006): image i gets the weight
  w[i, r] ~ Poisson(1) in replicate r. The weight is a pure function of (seed, global image
  index, r), drawn from a counter-based hash (splitmix64), so a probe keeps B weighted sums per
  statistic, adds them across batches and processes, and gets the same interval for any batch
  size, worker count or number of processes. Two passes over the same images draw the same
  weights, so a paired difference (with and without a rescale) is a replicate-wise difference.
- Delete-a-group jackknife for states too large to replicate B times: G groups by global index
  mod G, the statistic recomputed without each group.
- Wilson score interval for a proportion (accuracy against chance).

SPEC §8 gives the definitions; every interval here is a 95 % one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

REPLICATES = 200  # B: the bootstrap's replicates (SPEC §8 default)
GROUPS = 10  # G: the jackknife's groups
Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
BOOTSTRAP = f"poisson-bootstrap-{REPLICATES}"
JACKKNIFE = f"delete-a-group-jackknife-{GROUPS}"
WILSON = "wilson-score"

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# P(K <= k) for K ~ Poisson(1), k = 0..19: past 19 the tail is below 2^-53, a uniform's step.
_POISSON1_CDF = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(20)])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Steele, Lea & Flood (2014)'s finaliser: a bijection of uint64 with full avalanche."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def poisson_weights(
    seed: int, indices: torch.Tensor | Sequence[int], replicates: int = REPLICATES
) -> torch.Tensor:
    """(n, B) float64 Poisson(1) weights of images with these global indices (read-only: the
    last batch's weights are kept and handed to the next probe that asks for them)."""
    idx = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64)
    key = (seed, replicates, idx.tobytes())
    last = _LAST_WEIGHTS[0]
    if last is not None and last[0] == key:
        return last[1]
    weights = _poisson_weights(seed, idx.astype(np.uint64), replicates)
    _LAST_WEIGHTS[0] = (key, weights)  # one slot, replaced whole: a reader sees a matched pair
    return weights


# The last call's (key, weights): every probe of a pass draws the same batch's weights, and the
# hash costs more than the sums it feeds. A pure function's memo, so it changes no number.
_LAST_WEIGHTS: list[tuple[tuple, torch.Tensor] | None] = [None]


def _poisson_weights(seed: int, idx: np.ndarray, replicates: int) -> torch.Tensor:
    key = _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ np.uint64(0x5EED5EED5EED5EED))
    per_image = _splitmix64(key ^ _splitmix64(idx))
    r = np.arange(replicates, dtype=np.uint64)
    bits = _splitmix64(per_image[:, None] ^ _splitmix64(r + np.uint64(1))[None, :])
    uniform = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
    counts = np.searchsorted(_POISSON1_CDF, uniform, side="right")
    return torch.from_numpy(counts.astype(np.float64))


def percentile_interval(replicates: torch.Tensor | np.ndarray) -> tuple[float, float]:
    """The 2.5 % and 97.5 % percentiles of the finite replicate statistics (NaN when none)."""
    values = np.asarray(replicates, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def ratio_interval(numerators: torch.Tensor, denominators: torch.Tensor) -> tuple[float, float]:
    """The bootstrap interval of Σw·x / Σw from the B replicate sums of each."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return percentile_interval(np.where(den > 0, num / np.where(den > 0, den, 1), np.nan))


def wilson_interval(successes: float, n: float) -> tuple[float, float]:
    """Wilson's score interval for a proportion (NaN when n is 0)."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def jackknife_interval(full: float, leave_one_out: Sequence[float]) -> tuple[float, float]:
    """θ ± 1.96·se with se² = (G−1)/G · Σ_g (θ_(g) − θ̄)², from the G delete-a-group values."""
    values = np.asarray(leave_one_out, dtype=np.float64)
    values = values[np.isfinite(values)]
    g = values.size
    if g < 2 or not math.isfinite(full):
        return math.nan, math.nan
    se = math.sqrt((g - 1) / g * float(((values - values.mean()) ** 2).sum()))
    return full - Z95 * se, full + Z95 * se


def interval_record(lo: float, hi: float, method: str) -> dict:
    """The JSON form of an interval, as findings read it."""
    return {"lo": lo, "hi": hi, "method": method, "level": 0.95}


def row_indices(taps: object, seen: int) -> torch.Tensor:
    """(B,) int64 global indices of a batch's rows: `Taps.indices`, else `Taps.positions`, else
    `seen` + 0, 1, … (`probes.base.global_indices`, duck-typed here, a layer below it). The rows
    are counted by the targets, not the images: batches handed over directly may carry a
    placeholder image tensor, and a weight per row is what the sums need."""
    for name in ("indices", "positions"):
        given = getattr(taps, name, None)
        if given is not None:
            return given.detach().cpu().to(torch.int64)
    n = int(taps.targets.shape[0])  # type: ignore[attr-defined]
    return seen + torch.arange(n, dtype=torch.int64)


def bootstrap_sums(
    seed: int, indices: torch.Tensor, values: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, 1 + k) float64: per replicate, Σw and Σw·x for each of the k columns of values (n, k),
    with the Poisson weights of the batch's images (indices), or of its `rows` (a mask) that
    values hold. One product per batch, added into a sum state."""
    w = poisson_weights(seed, indices)
    w = w if rows is None else w[rows.cpu()]
    x = values.detach().to("cpu", torch.float64)
    x = x[:, None] if x.ndim == 1 else x
    return w.T @ torch.cat([torch.ones(w.shape[0], 1, dtype=torch.float64), x], dim=1)


def reference_record(metric: str, value: float, interval: Sequence[float], how: str) -> dict:
    """The JSON form of a reference a metric is compared with (docs/FINDINGS.md)."""
    return {"metric": metric, "value": value, "interval": [float(v) for v in interval], "how": how}


def group_sums(
    x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, ...]:
    """For a delete-a-group jackknife: per group of rows (groups: (n,) in 0..GROUPS−1), the
    class counts (G, C) and sums Σ_{i∈g, y_i=c} x_i (G, C, D), the row counts (G,),
    Σ_{i∈g} x_i (G, D) and Σ_{i∈g} x_i x_iᵀ (G, D, D), in x's dtype on its device.

    All G second moments come from one product Zᵀx, Z (n, G·D) holding row i in its group's
    block: G× the flops of xᵀx (a few per mille of a forward pass), but one kernel instead of
    a small product per group, which on a CPU shared with other work cost ~30× more."""
    n, d = x.shape
    at = groups.to(x.device)
    one_hot = torch.nn.functional.one_hot(at, GROUPS).to(x.dtype)  # (n, G)
    count = x.new_zeros(GROUPS, num_classes).index_put_((at, y), x.new_ones(n), True)
    total = x.new_zeros(GROUPS, num_classes, d).index_put_((at, y), x, accumulate=True)
    z = (one_hot[:, :, None] * x[:, None, :]).reshape(n, GROUPS * d)
    scatter = (z.T @ x).reshape(GROUPS, d, d)
    return count, total, count.sum(1), one_hot.T @ x, scatter


def without_group(t: torch.Tensor | list[torch.Tensor], group: int) -> torch.Tensor:
    """The sum over the groups (axis 0) but `group`: a sum of the others, not a difference, so
    nothing cancels. A list (one (1, G, …) entry per process) gives one such sum per process."""
    if isinstance(t, list):
        return torch.stack([without_group(part[0], group) for part in t])
    keep = (torch.arange(t.shape[0]) != group).nonzero().flatten()
    return t.index_select(0, keep.to(t.device)).sum(0)
