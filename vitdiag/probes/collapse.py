"""Neural collapse (Papyan, Han & Donoho, PNAS 2020), streamed into float64 sums.

The math is pure (functions of tensors, no I/O); `CollapseProbe` only feeds it running sums.
Conventions of this definition (`papyan2020-v1`), recorded in every Result:

- μ_G is the mean of the class means; when the classes are imbalanced the numbers that depend
  on μ_G are reported a second time with the sample-weighted mean (suffix ``_wmean``).
- Standard deviations use ddof=1, as Papyan et al.'s reference code does (``torch.std``).
  Off-diagonal cosines are taken once per unordered pair.
- Σ_B⁺ comes from ``eigh`` in float64; eigenvalues at or below ``max(D, C) · eps · λ_max`` are
  treated as zero (numpy's ``matrix_rank`` tolerance): Σ_B has rank ≤ C−1, and what eigh returns
  for its null space is rounding noise of that size, which would otherwise be inverted.
- Classes with no labelled sample are left out of every class-indexed quantity (W's rows too),
  with a note.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vitdiag import intervals
from vitdiag.errors import VitdiagError
from vitdiag.probes.base import (
    FEATURES,
    LABELS,
    LOGITS,
    PRELOGITS,
    TRAIN,
    Probe,
    Taps,
    first_position,
)
from vitdiag.probes.classifier import (
    STD_DDOF,
    Head,
    all_zero,
    angle_stats,
    classifier_heads,
    etf_distance,
    f64,
    heads_missing,
    ratio,
    sample_std,
)
from vitdiag.probes.nc4 import NC4Sample, bottom_k, nc4_stats
from vitdiag.results import Result, Table

DEFINITION = "papyan2020-v1"
DEFAULT_BUDGET = 10_000

# The μ_G-dependent metrics, reported again with the sample-weighted mean when imbalanced.
_MU_G_DEPENDENT = (
    "nc1",
    "nc1_trace",
    "nc1_trace_ratio",
    "nc2_equinorm_means",
    "nc2_equiangular_means",
    "nc2_maxangle_means",
    "nc2_mean_cos_means",
    "nc2_etf_means",
    "nc3",
    "nc3_etf",
)
# Every NC1–NC3 key nc_stats reports, whatever the data.
_NC123 = (
    *_MU_G_DEPENDENT,
    "nc2_equinorm_weights",
    "nc2_equiangular_weights",
    "nc2_maxangle_weights",
    "nc2_mean_cos_weights",
    "nc2_etf_weights",
)


# -- pure math -------------------------------------------------------------------------------


def means_coincide(mu: torch.Tensor, count: torch.Tensor) -> bool:
    """True when the class means (rows of mu) are equal up to the rounding of their sums.

    A dead model, or constant images, gives every sample the same features; the class means
    then differ by at most a few ulps (a sum of n copies divided by n need not round back),
    which Σ_B⁺ would invert into a huge, meaningless NC1. The tolerance is that rounding:
    n_max · eps per entry, relative to the largest entry.
    """
    mu = f64(mu)
    if mu.shape[0] < 2:
        return False
    eps = float(torch.finfo(torch.float64).eps)
    tol = 4 * max(float(f64(count).max()), 1.0) * eps * float(mu.abs().max())
    return float((mu - mu.mean(0)).abs().max()) <= tol


def _class_sums(h: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, D) Σ_{i∈c} h_i in h's dtype. index_put_ rather than index_add_: on a busy CPU the
    latter's thread pool made small batches ~100× slower."""
    out = torch.zeros(num_classes, h.shape[1], dtype=h.dtype, device=h.device)
    return out.index_put_((y,), h, accumulate=True)


def shifted_moments(h: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ(h−s), Σ(h−s)(h−s)ᵀ) for a batch: the shift keeps ‖μ_G‖² out of the second moment."""
    x = f64(h) - f64(shift)
    return x.sum(dim=0), x.T @ x


# The dtype of the per-batch products (class sums and Σ(h−s)(h−s)ᵀ of a batch); what they are
# added into is float64 whatever it is. Accelerators use float32: consumer GPUs run float64
# matrix products at 1/32–1/64 of float32, and MPS has no float64 at all. Each product is a sum
# over one batch of centred features (h − s, s a batch mean), so its float32 rounding is
# relative to the spread of h, not to ‖μ_G‖; NC1 on the fixtures moves by < 1e-6 relative
# (tests/test_collapse.py). The CPU keeps float64: there the products cost ~1 % of a forward
# pass (benchmarks/README.md), and the golden report pins CPU numbers to 1e-12.
_CPU_COMPUTE_DTYPE = torch.float64
_ACCELERATOR_COMPUTE_DTYPE = torch.float32


def compute_dtype_for(device: torch.device) -> torch.dtype:
    """The per-batch product dtype on `device` (see `_CPU_COMPUTE_DTYPE`)."""
    return _CPU_COMPUTE_DTYPE if device.type == "cpu" else _ACCELERATOR_COMPUTE_DTYPE


def pool_moments(
    n: torch.Tensor, shift: torch.Tensor, lin: torch.Tensor, scatter: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-process moments, each about its own shift s_k, into (t, Σ_i (h_i−t)(h_i−t)ᵀ).

    Inputs are stacked over processes: n (k,), shift (k, D), lin (k, D) = Σ(h−s_k),
    scatter (k, D, D). Moving a sum from s_k to t adds exact cross terms in d_k = s_k − t, which
    are small because every shift is a batch mean; adding raw moments instead would bring the
    ‖μ_G‖² cancellation back.
    """
    n, shift, lin, scatter = f64(n), f64(shift), f64(lin), f64(scatter)
    total = float(n.sum())
    if total == 0:
        d = shift.shape[-1]
        return torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    t = (n[:, None] * shift).sum(0) / total
    d = shift - t
    out = scatter.sum(0)
    cross = lin.T @ d  # Σ_k lin_k d_kᵀ
    out = out + cross + cross.T + (n[:, None] * d).T @ d
    return t, out


@dataclass
class ClassSums:
    """Everything NC1–NC3 need: per-class counts and sums of h, and Σ_W."""

    count: torch.Tensor  # (C,)
    total: torch.Tensor  # (C, D) Σ_{i∈c} h_i
    sigma_w: torch.Tensor  # (D, D)

    @property
    def n(self) -> float:
        return float(self.count.sum())

    @classmethod
    def from_moments(
        cls, count: torch.Tensor, total: torch.Tensor, t: torch.Tensor, scatter_t: torch.Tensor
    ) -> ClassSums:
        """Σ_W = (1/N)[Σ_i (h_i−t)(h_i−t)ᵀ − Σ_c n_c (μ_c−t)(μ_c−t)ᵀ], one pass."""
        count, total = f64(count), f64(total)
        n = float(count.sum())
        present = count > 0
        mu = total[present] / count[present, None]
        d = mu - f64(t)
        sw = (f64(scatter_t) - (count[present, None] * d).T @ d) / max(n, 1.0)
        return cls(count, total, (sw + sw.T) / 2)

    @classmethod
    def from_features(cls, h: torch.Tensor, y: torch.Tensor, num_classes: int) -> ClassSums:
        """The same one-pass sums for features held in memory (tests, library use)."""
        h, y = f64(h), torch.as_tensor(y).to("cpu", torch.int64)
        count = torch.bincount(y, minlength=num_classes).to(torch.float64)
        total = _class_sums(h, y, num_classes)
        shift = h.mean(0) if len(h) else torch.zeros(h.shape[1], dtype=torch.float64)
        _, scatter = shifted_moments(h, shift)
        return cls.from_moments(count, total, shift, scatter)


def pinv_cutoff(dim: int, num_classes: int) -> float:
    """The relative eigenvalue cutoff for Σ_B⁺ (see the module docstring)."""
    return max(dim, num_classes) * float(torch.finfo(torch.float64).eps)


def nc_stats(
    sums: ClassSums,
    W: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    sample: NC4Sample | None = None,
    global_mean: str = "classes",
    rtol: float | None = None,
) -> dict[str, float]:
    """NC1–NC4 of SPEC §4 from class sums and the classifier (W: C×D, b: C).

    global_mean: "classes" (μ_G = mean of class means) or "samples" (sample-weighted).
    """
    if global_mean not in ("classes", "samples"):
        raise ValueError(f"global_mean must be 'classes' or 'samples', not {global_mean!r}")
    count, total, sigma_w, W = f64(sums.count), f64(sums.total), f64(sums.sigma_w), f64(W)
    present = count > 0
    classes = present.nonzero().flatten()
    c, d = int(present.sum()), W.shape[1]
    out: dict[str, float] = {"n": float(count.sum()), "classes": float(c), "dim": float(d)}
    mu = total[present] / count[present, None]
    if c < 2:
        # NC1–NC3 compare classes; NC4 is still defined with one (its mean is always nearest).
        out |= dict.fromkeys(_NC123, float("nan"))
        if sample is not None:
            out.update(nc4_stats(sample, mu, classes, W, b))
        return out
    weights = count[present] / count.sum()
    mu_g = mu.mean(0) if global_mean == "classes" else (weights[:, None] * mu).sum(0)
    M = (mu - mu_g).T  # D × C', the columns of M̃
    Wp = W[present]
    if means_coincide(mu, count[present]):
        M = torch.zeros_like(M)  # what is left is rounding noise; it would be inverted below

    # NC1: Tr(Σ_W Σ_B⁺) = Σ_k v_kᵀ Σ_W v_k / λ_k over the eigenpairs kept by the cutoff.
    sigma_b = M @ M.T / c
    evals, evecs = torch.linalg.eigh(sigma_b)
    cutoff = (pinv_cutoff(d, c) if rtol is None else rtol) * float(evals.max())
    keep = evals > cutoff
    if not bool(M.any()):
        trace = float("nan")  # Σ_B = 0: all class means coincide
    elif keep.any():
        v = evecs[:, keep]
        trace = float(((v.T @ sigma_w @ v).diagonal() / evals[keep]).sum())
    else:
        trace = float("nan")
    out["nc1"] = trace / c
    out["nc1_trace"] = trace
    out["nc1_trace_ratio"] = ratio(float(sigma_w.trace()), float(sigma_b.trace()))

    mean_norms, w_norms = M.norm(dim=0), Wp.norm(dim=1)
    out["nc2_equinorm_means"] = ratio(sample_std(mean_norms), float(mean_norms.mean()))
    out["nc2_equinorm_weights"] = ratio(sample_std(w_norms), float(w_norms.mean()))
    for tag, rows in (("means", M.T), ("weights", Wp)):
        # 0/0 cosines of zero rows come out NaN, which is what they are
        std, maxangle, mean = angle_stats(rows)
        out[f"nc2_equiangular_{tag}"] = std
        out[f"nc2_maxangle_{tag}"] = maxangle
        out[f"nc2_mean_cos_{tag}"] = mean
    out["nc2_etf_means"] = etf_distance(M.T @ M)
    out["nc2_etf_weights"] = etf_distance(Wp @ Wp.T)

    wn, mn = float(Wp.norm()), float(M.norm())
    out["nc3"] = float((Wp.T / wn - M / mn).norm() ** 2) if wn > 0 and mn > 0 else float("nan")
    out["nc3_etf"] = etf_distance(Wp @ M)

    if sample is not None:
        out.update(nc4_stats(sample, mu, classes, W, b))
    return out


def imbalanced(count: torch.Tensor) -> bool:
    present = f64(count)[f64(count) > 0]
    return bool(present.numel() > 1 and (present != present[0]).any())


def collapse_notes(count: torch.Tensor, dim: int, label: str = "") -> list[str]:
    """What a reader must know next to the numbers: missing classes, no ETF, imbalance."""
    count = f64(count)
    who = f"{label}: " if label else ""
    notes = []
    missing = (count == 0).nonzero().flatten().tolist()
    c = int((count > 0).sum())
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (", …" if len(missing) > 20 else "")
        notes.append(
            f"{who}{len(missing)} of {len(count)} classes have no labelled sample and are left out "
            f"(class means and W rows): {shown}."
        )
    if c < 2:
        notes.append(f"{who}fewer than 2 classes have labelled samples; NC1–NC3 are undefined.")
    elif dim < c - 1:
        notes.append(
            f"{who}D={dim} < C−1={c - 1}: an exact simplex ETF does not exist in {dim} dimensions, "
            "so the NC2/NC3 ETF distances cannot reach 0."
        )
    if imbalanced(count):
        present = count[count > 0]
        notes.append(
            f"{who}classes are imbalanced ({int(present.min())}–{int(present.max())} samples per "
            "class): μ_G is the mean of class means; metrics ending in _wmean use the "
            "sample-weighted mean instead."
        )
    return notes


def degenerate_notes(sums: ClassSums, W: torch.Tensor, label: str = "") -> list[str]:
    """Why metrics came out NaN when the geometry has nothing to measure."""
    who = f"{label}: " if label else ""
    count, total = f64(sums.count), f64(sums.total)
    present = count > 0
    notes = []
    if int(present.sum()) >= 2 and means_coincide(
        total[present] / count[present, None], count[present]
    ):
        notes.append(
            f"{who}all class means coincide, so the between-class scatter is zero and the "
            "metrics built on it (nc1*, nc2_*_means, nc3, nc3_etf) are undefined (NaN); "
            "a dead model or constant images give this."
        )
    if bool(present.any()) and all_zero(f64(W)[present]):
        notes.append(
            f"{who}the classifier weights (rows of the classes present) are all zero, so the "
            "metrics built on W (nc2_*_weights, nc3, nc3_etf) are undefined (NaN)."
        )
    return notes


# -- the streaming probe ---------------------------------------------------------------------


class CollapseProbe(Probe):
    """Neural collapse of one or more linear heads over a pass of labelled data.

    Sum states: per-class counts and sums of h. Cat states, one entry per process: the second
    moment about that process's own shift (merged exactly in `compute`), and a bottom-k
    reservoir of (key, h, prediction) for NC4, merged by keeping the `budget` smallest keys.
    """

    name = "collapse"
    title = "Neural collapse"
    order = 4
    split = TRAIN
    needs_labels = True
    needs = frozenset({PRELOGITS, LOGITS, LABELS, FEATURES})
    headlines = ("nc1", "nc2_etf_means", "nc3", "nc4")
    headline_rank = 3
    # Literal, so `check` reads it without importing torch; the [_wmean] ones are exactly
    # _MU_G_DEPENDENT (tests/test_probe_declarations.py holds them together).
    check_metrics = (
        "<head>.nc1[_wmean]",
        "<head>.nc1_trace[_wmean]",
        "<head>.nc1_trace_ratio[_wmean]",
        "<head>.nc2_equinorm_means[_wmean]",
        "<head>.nc2_equiangular_means[_wmean]",
        "<head>.nc2_maxangle_means[_wmean]",
        "<head>.nc2_mean_cos_means[_wmean]",
        "<head>.nc2_etf_means[_wmean]",
        "<head>.nc3[_wmean]",
        "<head>.nc3_etf[_wmean]",
        "<head>.nc2_equinorm_weights",
        "<head>.nc2_equiangular_weights",
        "<head>.nc2_maxangle_weights",
        "<head>.nc2_mean_cos_weights",
        "<head>.nc2_etf_weights",
        "<head>.nc4",
        "<head>.nc4_nobias",
        "<head>.nc4_ci_low",
        "<head>.nc4_ci_high",
        "<head>.nc4_nobias_ci_low",
        "<head>.nc4_nobias_ci_high",
        "<head>.nc4_sample_size",
        "<head>.nc4_population",
        "<head>.n",
        "<head>.classes",
        "<head>.dim",
    )

    @classmethod
    def applies(cls, loaded: Any) -> str | None:
        return heads_missing(loaded.model)

    @classmethod
    def build(cls, loaded: Any, settings: Any, transform: Any) -> CollapseProbe:
        return cls.for_model(loaded.model, budget=settings.nc4_budget, seed=settings.seed)

    def __init__(
        self,
        heads: Sequence[Head],
        *,
        budget: int = DEFAULT_BUDGET,
        seed: int | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        """compute_dtype: the per-batch products' dtype; None: `compute_dtype_for` the
        features' device (float64 features always stay float64)."""
        super().__init__()
        if not heads:
            raise VitdiagError("neural collapse needs at least one classifier head.")
        if budget < 1:
            raise VitdiagError(f"--budget must be at least 1, not {budget}.")
        self.heads = list(heads)
        self.budget = int(budget)
        self.seed = seed
        self.compute_dtype = compute_dtype
        self._rng: np.random.Generator | None = None
        self._first_position: int | None = None  # names the key stream (see `_generator`)
        self._threshold = [math.inf] * len(self.heads)
        self._started = [False] * len(self.heads)
        self._device_params: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for k, head in enumerate(self.heads):
            c, d = head.num_classes, head.dim
            self.add_sum_state(f"h{k}_count", (c,))
            self.add_sum_state(f"h{k}_total", (c, d))
            for name, shape in (
                ("n", (1,)),
                ("shift", (1, d)),
                ("lin", (1, d)),
                ("scatter", (1, d, d)),
            ):
                self.add_cat_state(f"h{k}_mom_{name}").append(
                    torch.zeros(shape, dtype=torch.float64)
                )
            for name in ("key", "h", "pred"):
                self.add_cat_state(f"h{k}_res_{name}")
            # The jackknife's copies, one per group of global index mod G (moments per process).
            self.add_sum_state(f"h{k}_grp_count", (intervals.GROUPS, c))
            self.add_sum_state(f"h{k}_grp_total", (intervals.GROUPS, c, d))
            for name, shape in (("n", ()), ("lin", (d,)), ("scatter", (d, d))):
                zeros = torch.zeros(1, intervals.GROUPS, *shape, dtype=torch.float64)
                self.add_cat_state(f"h{k}_grp_{name}").append(zeros)
        self._seen = 0  # rows seen: the next position, for batches without the engine's

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs: Any) -> CollapseProbe:
        return cls(classifier_heads(model), **kwargs)

    def _generator(self, taps: Taps) -> np.random.Generator:
        """The NC4 keys' stream, named by (seed, global position of the first image this probe
        was handed). That position is 0 for one process and different for every shard (under
        the engine's stride rule the k-th process starts at image k), so each shard draws its
        own keys, and one process draws those of [seed, 0], as it always has.

        Not a key per global index: one process draws a key per labelled image in order, so its
        j-th labelled image gets draw j whatever unlabelled or unreadable images came before;
        a key that is a function of the image's global index alone could not keep that."""
        if self._rng is None:
            seed = self.seed
            if seed is None:
                seed = int(getattr(taps.context, "seed", 0) or 0)
            self.seed = seed
            # numpy draws doubles one after another, so keys do not depend on batch sizes.
            self._rng = np.random.default_rng([seed, self._first_position or 0])
        return self._rng

    def _head_input(self, head: Head, taps: Taps) -> torch.Tensor:
        if head.token_index is None:
            h = taps.prelogits
        else:
            feats = taps.features
            if feats is None or feats.ndim != 3:
                raise VitdiagError(
                    f"classifier head {head.name!r} reads token {head.token_index}, but the "
                    "model's forward_features did not return a token sequence."
                )
            h = feats[:, head.token_index]
        if h is None or h.shape[-1] != head.dim:
            got = None if h is None else tuple(h.shape)
            raise VitdiagError(
                f"classifier head {head.name!r} expects {head.dim}-dim inputs, "
                f"the model gave {got}."
            )
        return h

    def update(self, taps: Taps) -> None:
        if self._first_position is None:
            self._first_position = first_position(taps)
        index = intervals.row_indices(taps, self._seen)
        self._seen += int(index.numel())
        mask = taps.labelled
        if not bool(mask.any()):
            return
        y = taps.targets[mask].to("cpu", torch.int64)
        groups = index[mask.cpu()] % intervals.GROUPS
        c = self.heads[0].num_classes
        if int(y.max()) >= c:
            raise VitdiagError(
                f"the data has class index {int(y.max())} but the classifier has {c} outputs; "
                "point --data at a dataset with the model's classes."
            )
        keys = torch.from_numpy(self._generator(taps).random(int(y.numel())))
        counts = torch.bincount(y, minlength=c).to(torch.float64)
        for k, head in enumerate(self.heads):
            h = self._head_input(head, taps)
            dtype = self._dtype(h)
            # The products run where the features are; MPS has no float64 to run them in.
            dev = (
                torch.device("cpu")
                if h.device.type == "mps" and dtype == torch.float64
                else h.device
            )
            h = h[mask.to(h.device)].detach().to(dev, dtype)
            self._accumulate(k, h, y.to(dev), counts)
            self._accumulate_groups(k, h, y.to(dev), groups)
            if len(self.heads) == 1 and taps.logits is not None:
                pred = taps.logits[mask.to(taps.logits.device)].argmax(dim=1)
            else:  # each head's own decision; the model's output averages the heads
                weight, bias = self._params(k, dev, dtype)
                pred = (h @ weight.T + bias).argmax(dim=1)
            self._update_reservoir(k, keys, h, pred)

    def _dtype(self, h: torch.Tensor) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.float64 if h.dtype == torch.float64 else compute_dtype_for(h.device)

    def _params(
        self, k: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (k, str(device), dtype)
        if key not in self._device_params:
            head = self.heads[k]
            bias = torch.zeros(head.num_classes) if head.bias is None else head.bias
            self._device_params[key] = (head.weight.to(device, dtype), bias.to(device, dtype))
        return self._device_params[key]

    def _accumulate(self, k: int, h: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> None:
        """Add one batch to head k's float64 sums, which live where the batch does (MPS: on the
        CPU), so that no per-batch copy waits for the accelerator.

        The batch is centred on the shift s (the first batch's mean, rounded to h's dtype so
        that h − s rounds once): class sums are Σ(h−s) + n_c s, and Σ(h−s), Σ(h−s)(h−s)ᵀ feed
        the one-pass Σ_W."""
        acc = torch.device("cpu") if h.device.type == "mps" else h.device
        names = [f"h{k}_count", f"h{k}_total"]
        pieces = [f"h{k}_mom_{n}" for n in ("n", "shift", "lin", "scatter")]
        if not self._started[k]:
            for name in (*names, f"h{k}_grp_count", f"h{k}_grp_total"):
                self.set_state(name, getattr(self, name).to(acc))
            for name in (*pieces, *(f"h{k}_grp_{n}" for n in ("n", "lin", "scatter"))):
                getattr(self, name)[0] = getattr(self, name)[0].to(acc)
            getattr(self, pieces[1])[0].copy_(h.mean(0, keepdim=True))
            self._started[k] = True
        n, shift, lin, scatter = (getattr(self, name)[0] for name in pieces)
        x = h - shift[0].to(h.device, h.dtype)
        counts = counts.to(acc)
        getattr(self, names[0]).add_(counts)
        total = _class_sums(x, y, self.heads[k].num_classes).to(acc, torch.float64)
        getattr(self, names[1]).add_(total + counts[:, None] * shift)
        n.add_(h.shape[0])
        lin.add_(x.sum(dim=0).to(acc, torch.float64))
        scatter.add_((x.T @ x).to(acc, torch.float64))

    def _accumulate_groups(self, k: int, h: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> None:
        """Head k's per-group sums (g: each row's group), about `_accumulate`'s shift: one shift
        for all groups of a process, so that they add with no cross terms (exact sums)."""
        shift = getattr(self, f"h{k}_mom_shift")[0]  # (1, D), where the sums live
        x = h - shift[0].to(h.device, h.dtype)
        count, total, n, lin, scatter = intervals.group_sums(x, y, g, self.heads[k].num_classes)
        count = count.to(shift)
        getattr(self, f"h{k}_grp_count").add_(count)
        getattr(self, f"h{k}_grp_total").add_(total.to(shift) + count[..., None] * shift)
        for name, value in (("n", n), ("lin", lin), ("scatter", scatter)):
            getattr(self, f"h{k}_grp_{name}")[0][0].add_(value.to(shift))

    def nc1_leave_one_out(self, k: int = 0) -> list[float]:
        """NC1 of head k without each group in turn (the jackknife's θ_(g)), from the sums of
        the other groups, pooled over processes."""
        grp = {n: getattr(self, f"h{k}_grp_{n}") for n in ("count", "total", "n", "lin", "scatter")}
        shift, out = torch.cat(getattr(self, f"h{k}_mom_shift")), []
        for g in range(intervals.GROUPS):
            count, total, n, lin, scatter = (intervals.without_group(v, g) for v in grp.values())
            sums = ClassSums.from_moments(count, total, *pool_moments(n, shift, lin, scatter))
            out.append(nc_stats(sums, self.heads[k].weight, self.heads[k].bias)["nc1"])
        return out

    def _update_reservoir(
        self, k: int, keys: torch.Tensor, h: torch.Tensor, pred: torch.Tensor
    ) -> None:
        # Once `budget` keys are kept, a key above the largest of them can never be among the
        # final `budget` smallest: drop it here, and compact only when the kept rows double.
        accept = (keys < self._threshold[k]).nonzero().flatten()
        if accept.numel() == 0:
            return
        rows = accept.to(h.device)
        getattr(self, f"h{k}_res_key").append(keys[accept])
        getattr(self, f"h{k}_res_h").append(h[rows].cpu())
        getattr(self, f"h{k}_res_pred").append(pred[rows.to(pred.device)].to("cpu", torch.int64))
        if sum(t.numel() for t in getattr(self, f"h{k}_res_key")) > 2 * self.budget:
            self._compact(k)

    def _compact(self, k: int) -> None:
        """Keep the `budget` smallest keys of head k's reservoir chunks, as one chunk."""
        parts = {n: getattr(self, f"h{k}_res_{n}") for n in ("key", "h", "pred")}
        if not parts["key"]:
            return
        merged = {n: torch.cat(v) for n, v in parts.items()}
        keep = bottom_k(merged["key"], self.budget)
        for n, v in merged.items():
            self.set_state(f"h{k}_res_{n}", [v[keep]])
        if keep.numel() == self.budget:
            self._threshold[k] = float(merged["key"][keep].max())

    def merge_cat_states(self, gathered: dict[str, list[torch.Tensor]]) -> None:
        """Moment pieces stay one per process (pooled in compute); reservoirs keep the
        `budget` smallest keys over all processes."""
        for name, value in gathered.items():
            self.set_state(name, list(value))
        for k in range(len(self.heads)):
            self._compact(k)

    def class_sums(self, k: int = 0) -> ClassSums:
        """Head k's pooled sums (after any cross-process merge)."""
        pieces = [
            torch.cat([p.reshape(-1, *p.shape[1:]) for p in getattr(self, f"h{k}_mom_{n}")])
            for n in ("n", "shift", "lin", "scatter")
        ]
        t, scatter = pool_moments(pieces[0].flatten(), *pieces[1:])
        return ClassSums.from_moments(
            getattr(self, f"h{k}_count"), getattr(self, f"h{k}_total"), t, scatter
        )

    def nc4_sample(self, k: int = 0) -> NC4Sample:
        self._compact(k)
        d = self.heads[k].dim
        h = getattr(self, f"h{k}_res_h")
        pred = getattr(self, f"h{k}_res_pred")
        return NC4Sample(
            h=torch.cat(h) if h else torch.zeros(0, d, dtype=torch.float64),
            pred=torch.cat(pred) if pred else torch.zeros(0, dtype=torch.int64),
            population=int(float(getattr(self, f"h{k}_count").sum())),
        )

    def compute(self) -> Result:
        metrics: dict[str, float] = {}
        notes: list[str] = []
        tables: list[Table] = []
        heads_extra = []
        evidence: dict[str, dict] = {}  # the intervals
        many = len(self.heads) > 1
        for k, head in enumerate(self.heads):
            prefix = "" if k == 0 else f"{head.name}."
            sums = self.class_sums(k)
            sample = self.nc4_sample(k)
            m = nc_stats(sums, head.weight, head.bias, sample=sample)
            jackknife = intervals.jackknife_interval(m["nc1"], self.nc1_leave_one_out(k))
            evidence[prefix + "nc1"] = intervals.interval_record(*jackknife, intervals.JACKKNIFE)
            weighted = imbalanced(sums.count)
            if weighted:
                mw = nc_stats(sums, head.weight, head.bias, global_mean="samples")
                m.update({f"{key}_wmean": mw[key] for key in _MU_G_DEPENDENT})
            metrics.update({prefix + key: v for key, v in m.items()})
            label = head.name if many else ""
            notes += collapse_notes(sums.count, head.dim, label)
            notes += degenerate_notes(sums, head.weight, label)
            if sample.population > sample.h.shape[0]:
                notes.append(
                    f"{label + ': ' if label else ''}NC4 comes from a uniform sample of "
                    f"{sample.h.shape[0]} of {sample.population} images (95% Wilson interval "
                    f"[{m['nc4_ci_low']:.4f}, {m['nc4_ci_high']:.4f}])."
                )
            tables.append(_nc_table(head, m))
            heads_extra.append(
                {
                    "name": head.name,
                    "metric_prefix": prefix,
                    "token_index": head.token_index,
                    "num_classes": head.num_classes,
                    "dim": head.dim,
                    "class_counts": sums.count.tolist(),
                    "nc4_exact": sample.population <= sample.h.shape[0],
                }
            )
        extra = {
            "heads": heads_extra,
            "global_mean": "mean of class means (_wmean: sample-weighted)",
            "std_ddof": STD_DDOF,
            "pinv_cutoff": "eigenvalues <= max(D, C) * eps64 * lambda_max are zero",
            "nc4_budget": self.budget,
            "seed": self.seed,
            "nc4_sampling": "bottom-k of uniform random keys (seeded), merged across processes",
            "intervals": evidence,
        }
        return Result(self.name, DEFINITION, metrics, tables, notes, extra)


_DESCRIPTIONS = {
    "nc1": "Tr(Σ_W Σ_B⁺)/C",
    "nc1_trace_ratio": "Tr Σ_W / Tr Σ_B",
    "nc2_equinorm_means": "Std/Avg ‖μ_c−μ_G‖",
    "nc2_equinorm_weights": "Std/Avg ‖w_c‖",
    "nc2_equiangular_means": "Std cos(μ_c, μ_c')",
    "nc2_equiangular_weights": "Std cos(w_c, w_c')",
    "nc2_maxangle_means": "Avg |cos + 1/(C−1)|, means",
    "nc2_maxangle_weights": "Avg |cos + 1/(C−1)|, W",
    "nc2_etf_means": "ETF distance of M̃ᵀM̃",
    "nc2_etf_weights": "ETF distance of WWᵀ",
    "nc3": "‖Wᵀ/‖W‖ − M̃/‖M̃‖‖²_F",
    "nc3_etf": "ETF distance of WM̃",
    "nc4": "nearest mean ≠ prediction",
    "nc4_nobias": "nearest mean ≠ argmax Wh",
}


def _nc_table(head: Head, m: dict[str, float]) -> Table:
    rows = [[key, m[key], desc] for key, desc in _DESCRIPTIONS.items() if key in m]
    return Table(f"Neural collapse — {head.name}", ["metric", "value", "definition"], rows)
