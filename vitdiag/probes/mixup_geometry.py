"""Mixup geometry of the last layer (Fisher, Meng & Papyan, ICLR 2024).

For pairs of labelled images x_a (class i), x_b (class i'), x_λ = λx_a + (1−λ)x_b is forwarded
for every λ and h_λ (the classifier's input) is measured against the classifier:

- same class (i = i'): cos(h_λ, w_i), ‖h_λ‖, ⟨h_λ, w_i⟩/‖w_i‖ (theory: flat in λ);
- different classes: the margin m(λ) = (w_i − w_i')ᵀh_λ + b_i − b_i', the λ* where the mean
  margin crosses zero (linear interpolation between grid points), and how much of h_λ lies in
  span{w_i, w_i'}: the variance share Σ_p‖P_p(h_p − h̄)‖² / Σ_p‖h_p − h̄‖² (h̄ = mean over
  pairs at that λ, P_p = projector on pair p's span) and the uncentred energy share
  mean ‖P_p h_p‖²/‖h_p‖², which the theory's optimum (h in the span) puts at 1.

Mixing normalised images equals normalising the mixed image, because normalisation is affine.
Pairs are drawn (seeded) within each batch plus a small carry-over of earlier images, so that
class-sorted data still yields different-class pairs; each process collects `pairs` of each kind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from vitdiag.errors import VitdiagError
from vitdiag.probes.base import LABELS, TRAIN, Probe, Taps, first_position
from vitdiag.probes.classifier import Head, classifier_heads, heads_missing
from vitdiag.results import Result, Table

__all__ = [
    "DEFAULT_LAMBDAS",
    "MixupGeometryProbe",
    "mix",
    "mixed_features",
    "select_pairs",
    "train_mode_without_side_effects",
    "zero_crossing",
]

DEFINITION = "fisher2024-mixup-geometry-v1"
DEFAULT_LAMBDAS = tuple(i / 10 for i in range(11))
SAME, DIFF = 0, 1


def select_pairs(
    labels: Sequence[int], rng: np.random.Generator, need_same: int, need_diff: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[int]]:
    """(same-class pairs, different-class pairs, unused indices, in random order).

    Each index is used at most once; the order is a seeded permutation, so which pairs are
    taken does not depend on how the data was sorted within the pool.
    """
    order = rng.permutation(len(labels)).tolist()
    used: set[int] = set()
    same: list[tuple[int, int]] = []
    if need_same > 0:
        waiting: dict[int, int] = {}
        for i in order:
            c = labels[i]
            if c in waiting:
                j = waiting.pop(c)
                same.append((j, i))
                used.update((i, j))
                if len(same) == need_same:
                    break
            else:
                waiting[c] = i
    diff: list[tuple[int, int]] = []
    if need_diff > 0:
        pending: dict[int, list[int]] = {}
        for i in order:
            if i in used:
                continue
            c = labels[i]
            other = next((k for k, v in pending.items() if k != c and v), None)
            if other is None:
                pending.setdefault(c, []).append(i)
                continue
            j = pending[other].pop(0)
            diff.append((j, i))
            used.update((i, j))
            if len(diff) == need_diff:
                break
    return same, diff, [i for i in order if i not in used]


def mix(xa: torch.Tensor, xb: torch.Tensor, lambdas: Sequence[float]) -> torch.Tensor:
    """(P·L, …) images, pair-major: row p·L + l is λ_l·xa[p] + (1−λ_l)·xb[p].

    Written as two products rather than lerp so that λ = 1 and λ = 0 give x_a and x_b exactly.
    """
    lam = torch.tensor(lambdas, dtype=xa.dtype, device=xa.device).view(1, -1, *[1] * (xa.ndim - 1))
    out = lam * xa.unsqueeze(1) + (1 - lam) * xb.unsqueeze(1)
    return out.flatten(0, 1)


def zero_crossing(lambdas: Sequence[float], values: Sequence[float]) -> float:
    """First λ where the piecewise-linear curve through (λ, value) reaches 0; NaN if never."""
    lam, val = list(map(float, lambdas)), list(map(float, values))
    for k in range(len(lam)):
        if val[k] == 0:
            return lam[k]
        if k + 1 < len(lam) and val[k] * val[k + 1] < 0:
            return lam[k] + (0 - val[k]) * (lam[k + 1] - lam[k]) / (val[k + 1] - val[k])
    return float("nan")


def mixed_features(
    forward: Callable[[torch.Tensor], tuple[Any, torch.Tensor, Any]],
    head: Head,
    xa: torch.Tensor,
    xb: torch.Tensor,
    lambdas: Sequence[float],
    chunk: int = 256,
) -> torch.Tensor:
    """(P, L, D) float64 h_λ of x_λ = λ·xa + (1−λ)·xb, through `forward` (the engine's
    `RunContext.forward`: images -> (features, pre-logits, logits)) in chunks of `chunk` images.
    """
    outs = []
    for part in mix(xa, xb, lambdas).split(max(1, chunk)):
        features, prelogits, _ = forward(part)
        outs.append(prelogits if head.token_index is None else features[:, head.token_index])
    h = torch.cat(outs).detach().to("cpu", torch.float64)
    return h.view(xa.shape[0], len(lambdas), -1)


@contextlib.contextmanager
def train_mode_without_side_effects(model: nn.Module) -> Iterator[None]:
    """Put `model` in train mode, and afterwards restore every buffer and every submodule's
    training flag exactly.

    Train-mode forwards update BatchNorm running statistics and `num_batches_tracked` even
    under inference_mode; left in place they would change every later forward of the pass
    (the other probes, the calibration pass). Flags are restored per submodule because a
    model may be in eval mode with some submodule deliberately left in train mode.
    """
    flags = [(m, m.training) for m in model.modules()]
    with torch.no_grad():
        saved = [(b, b.clone()) for b in model.buffers()]
    model.train()
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
        for module, flag in flags:
            module.training = flag


def _span_bases(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(P, D, 2) orthonormal bases of span{w1[p], w2[p]}."""
    q, _ = torch.linalg.qr(torch.stack([w1, w2], dim=-1))
    return q


class MixupGeometryProbe(Probe):
    """Extra forwards of mixed pairs through `taps.context.forward`, streamed per λ."""

    name = "mixup_geometry"
    title = "Mixup geometry"
    order = 5
    split = TRAIN
    needs_labels = True
    needs = frozenset({LABELS})
    headlines = ("lambda_star",)
    headline_rank = 4
    check_metrics = (
        "lambda_star",
        "margin@<lambda>",
        "same_cos_mean",
        "same_cos_range",
        "same_norm_range_rel",
        "diff_span_share_mean",
        "diff_span_energy_mean",
        "pairs_same",
        "pairs_diff",
    )

    @classmethod
    def applies(cls, loaded: Any) -> str | None:
        return heads_missing(loaded.model)

    @classmethod
    def build(cls, loaded: Any, settings: Any, transform: Any) -> MixupGeometryProbe:
        return cls.for_model(
            loaded.model, pairs=settings.pairs, seed=settings.seed, train_mode=settings.train_mode
        )

    def __init__(
        self,
        head: Head,
        *,
        pairs: int = 64,
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        seed: int | None = None,
        train_mode: bool = False,
        plot_pairs: int = 6,
        plot_classes: Sequence[int] | None = None,
        carry: int = 64,
    ) -> None:
        super().__init__()
        lam = sorted({float(v) for v in lambdas})
        if pairs < 1 or not lam or lam[0] < 0 or lam[-1] > 1:
            raise VitdiagError("mixup geometry needs --pairs >= 1 and λ values within [0, 1].")
        if plot_classes is not None and len(set(plot_classes)) != 3:
            raise VitdiagError("--plot-classes takes exactly three different class indices.")
        self.head = head
        self.pairs, self.lambdas, self.seed = int(pairs), lam, seed
        self.train_mode, self.plot_pairs, self.carry = train_mode, int(plot_pairs), int(carry)
        self._fixed_triple = None if plot_classes is None else [int(c) for c in plot_classes]
        L, D = len(lam), head.dim
        for name in ("same_cos", "same_norm", "same_proj", "diff_margin", "diff_margin_sq"):
            self.add_sum_state(name, (L,))
        self.add_sum_state("diff_energy", (L,))
        # Second moments about this process's own shift (its first h_λ), one entry per process,
        # pooled in `_span_parts`: raw Σ‖h‖² − n‖h̄‖² loses every digit to a large common offset.
        for name, shape in (
            ("n", (1,)),
            ("shift", (1, L, D)),
            ("lin", (1, L, D)),  # Σ (h − r)
            ("sq", (1, L)),  # Σ ‖h − r‖²
            ("plin", (1, L, D)),  # Σ P_p (h_p − r)
            ("psq", (1, L)),  # Σ (h_p − r)ᵀ P_p (h_p − r)
            ("proj", (1, D, D)),  # Σ P_p
        ):
            self.add_cat_state(f"diff_mom_{name}").append(torch.zeros(shape, dtype=torch.float64))
        self.add_sum_state("same_pairs")
        self.add_sum_state("diff_pairs")
        self.add_cat_state("plot_h")  # (n, L, D) h_λ of pairs among the plot classes
        self.add_cat_state("plot_meta")  # (n, 3): kind, class a, class b
        self.add_cat_state("plot_triple")  # (1, 3) this process's plot classes, -1 if unknown
        self._rng: np.random.Generator | None = None
        self._first_position: int | None = None  # names the pair stream (see `_generator`)
        self._carry_x: torch.Tensor | None = None
        self._carry_y: list[int] = []
        self._plot_pool: dict[int, list[torch.Tensor]] = {}
        self._triple: list[int] = list(self._fixed_triple or [])
        self._done = {"same": 0, "diff": 0, "plot_same": 0, "plot_diff": 0}
        self._record_triple()

    def _record_triple(self) -> None:
        triple = self._triple + [-1] * (3 - len(self._triple))
        self.set_state("plot_triple", [torch.tensor([triple], dtype=torch.int64)])

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs: Any) -> MixupGeometryProbe:
        """The probe on the model's first head (the class-token head of a distilled DeiT)."""
        return cls(classifier_heads(model)[0], **kwargs)

    # -- collection ---------------------------------------------------------------------------
    def _generator(self, taps: Taps) -> np.random.Generator:
        if self._rng is None:
            seed = self.seed
            if seed is None:
                seed = int(getattr(taps.context, "seed", 0) or 0)
            self.seed = seed
            # Named by the global position of the first image this probe was handed: 0 for one
            # process (whose pairs are those of [seed, 0]), another for each shard, so shards
            # draw different pairs (pairs come from within a shard's batches anyway).
            self._rng = np.random.default_rng([seed, self._first_position or 0])
        return self._rng

    def _stats_done(self) -> bool:
        return self._done["same"] >= self.pairs and self._done["diff"] >= self.pairs

    def _plot_done(self) -> bool:
        return (
            self._done["plot_same"] >= self.plot_pairs
            and self._done["plot_diff"] >= self.plot_pairs
        )

    def update(self, taps: Taps) -> None:
        if self._first_position is None:
            self._first_position = first_position(taps)
        if self._stats_done() and self._plot_done():
            return
        if taps.context is None:
            raise VitdiagError("mixup geometry runs extra forwards and needs the engine's context.")
        mask = taps.labelled
        if not bool(mask.any()):
            return
        x = taps.images[mask.to(taps.images.device)]
        y = taps.targets[mask].to("cpu", torch.int64).tolist()
        if max(y) >= self.head.num_classes:
            raise VitdiagError(
                f"the data has class index {max(y)} but the classifier has "
                f"{self.head.num_classes} outputs; point --data at a dataset with the model's "
                "classes."
            )
        rng = self._generator(taps)
        chunk = max(1, int(taps.images.shape[0]))
        if not self._stats_done():
            self._collect_stats(taps, x, y, rng, chunk)
        if not self._plot_done():
            self._collect_plot(taps, x, y, rng, chunk)

    def _collect_stats(self, taps: Taps, x: torch.Tensor, y: list[int], rng, chunk: int) -> None:
        pool_x = x if self._carry_x is None else torch.cat([self._carry_x, x])
        pool_y = self._carry_y + y
        need_same = self.pairs - self._done["same"]
        need_diff = self.pairs - self._done["diff"]
        same, diff, unused = select_pairs(pool_y, rng, max(0, need_same), max(0, need_diff))
        keep = unused[: self.carry]
        self._carry_x, self._carry_y = pool_x[keep], [pool_y[i] for i in keep]
        if same:
            h = self._forward_pairs(taps, pool_x, same, chunk)
            self._add_same(h, torch.tensor([pool_y[a] for a, _ in same]))
            self._done["same"] += len(same)
        if diff:
            h = self._forward_pairs(taps, pool_x, diff, chunk)
            ia = torch.tensor([pool_y[a] for a, _ in diff])
            ib = torch.tensor([pool_y[b] for _, b in diff])
            self._add_diff(h, ia, ib)
            self._done["diff"] += len(diff)

    def _collect_plot(self, taps: Taps, x: torch.Tensor, y: list[int], rng, chunk: int) -> None:
        if len(self._triple) < 3:
            for c in y:  # the first three classes this process meets, in order
                if len(self._triple) < 3 and c not in self._triple:
                    self._triple.append(c)
            self._record_triple()
        for i, c in enumerate(y):
            if c in self._triple:  # a clone, so the pool does not keep the whole batch alive
                self._plot_pool.setdefault(c, []).append(x[i].clone())
        labels = [c for c, imgs in self._plot_pool.items() for _ in imgs]
        if not labels:
            return
        images = torch.stack([img for imgs in self._plot_pool.values() for img in imgs])
        same, diff, unused = select_pairs(
            labels,
            rng,
            max(0, self.plot_pairs - self._done["plot_same"]),
            max(0, self.plot_pairs - self._done["plot_diff"]),
        )
        self._plot_pool = {}
        for i in unused:  # two per class are enough to make any pair later
            pool = self._plot_pool.setdefault(labels[i], [])
            if len(pool) < 2:
                pool.append(images[i].clone())
        for kind, chosen in ((SAME, same), (DIFF, diff)):
            if not chosen:
                continue
            h = self._forward_pairs(taps, images, chosen, chunk)
            meta = torch.tensor(
                [[kind, labels[a], labels[b]] for a, b in chosen], dtype=torch.int64
            )
            self.plot_h.append(h)
            self.plot_meta.append(meta)
            self._done["plot_same" if kind == SAME else "plot_diff"] += len(chosen)

    def _forward_pairs(
        self, taps: Taps, images: torch.Tensor, pairs: list[tuple[int, int]], chunk: int
    ) -> torch.Tensor:
        ia = torch.tensor([a for a, _ in pairs], device=images.device)
        ib = torch.tensor([b for _, b in pairs], device=images.device)
        ctx = taps.context
        model = getattr(ctx, "model", None)
        if not self.train_mode or model is None:
            return mixed_features(
                ctx.forward, self.head, images[ia], images[ib], self.lambdas, chunk
            )
        with train_mode_without_side_effects(model):
            # the paper's figures were made in train mode (dropout, drop-path, batch statistics)
            return mixed_features(
                ctx.forward, self.head, images[ia], images[ib], self.lambdas, chunk
            )

    # -- sums ---------------------------------------------------------------------------------
    def _add_same(self, h: torch.Tensor, cls: torch.Tensor) -> None:
        w = self.head.weight[cls]  # (P, D)
        dot = torch.einsum("pld,pd->pl", h, w)
        hn, wn = h.norm(dim=-1), w.norm(dim=-1)[:, None]
        self.same_cos.add_((dot / (hn * wn)).sum(0))
        self.same_norm.add_(hn.sum(0))
        self.same_proj.add_((dot / wn).sum(0))
        self.same_pairs.add_(h.shape[0])

    def _add_diff(self, h: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor) -> None:
        W, b = self.head.weight, self.head.bias
        margin = torch.einsum("pld,pd->pl", h, W[ia] - W[ib])
        if b is not None:
            margin = margin + (b[ia] - b[ib])[:, None]
        q = _span_bases(W[ia], W[ib])  # (P, D, 2)
        in_span = (torch.einsum("pdk,pld->plk", q, h) ** 2).sum(-1)  # ‖P h‖² = ‖Qᵀh‖²
        self.diff_margin.add_(margin.sum(0))
        self.diff_margin_sq.add_((margin**2).sum(0))
        self.diff_energy.add_((in_span / (h**2).sum(-1)).sum(0))
        self.diff_pairs.add_(h.shape[0])
        n, shift = self.diff_mom_n[0], self.diff_mom_shift[0]
        if float(n) == 0:
            shift.copy_(h[0])  # identical features then give exactly zero moments
        x = h - shift
        coords = torch.einsum("pdk,pld->plk", q, x)
        n.add_(h.shape[0])
        self.diff_mom_lin[0].add_(x.sum(0))
        self.diff_mom_sq[0].add_((x**2).sum((0, 2)))
        self.diff_mom_plin[0].add_(torch.einsum("pdk,plk->ld", q, coords))
        self.diff_mom_psq[0].add_((coords**2).sum((0, 2)))
        self.diff_mom_proj[0].add_(torch.einsum("pdk,pek->de", q, q))

    # -- result -------------------------------------------------------------------------------
    def _span_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(span, total, zero) per λ: Σ_p‖P_p(h_p − h̄)‖², Σ_p‖h_p − h̄‖², and where the total
        is zero up to rounding (all h_λ coincide), pooled exactly over processes.

        Process k's sums are about its shift r_k; moving them to h̄ adds cross terms in
        δ_k = h̄ − r_k = Σ_j (n_j/N) r_j − r_k + Σ_j lin_j/N, which is small because every r_k
        is one of the h_λ, and exactly 0 for one process whose features are all equal.
        Only these per-process pieces are ever added, never the raw Σ‖h‖² and n‖h̄‖².
        """
        n, r, lin, sq, plin, psq, proj = (
            torch.cat([t.reshape(-1, *t.shape[1:]) for t in getattr(self, f"diff_mom_{k}")])
            for k in ("n", "shift", "lin", "sq", "plin", "psq", "proj")
        )
        total_n = float(n.sum())
        w = n / total_n  # (K,)
        delta = torch.einsum("j,jld->ld", w, r)[None] - r + lin.sum(0) / total_n  # (K, L, D)
        total = (sq - 2 * (delta * lin).sum(-1) + n[:, None] * (delta**2).sum(-1)).sum(0)
        span = (
            psq - 2 * (delta * plin).sum(-1) + torch.einsum("kld,kde,kle->kl", delta, proj, delta)
        ).sum(0)
        eps = torch.finfo(torch.float64).eps
        scale = r.abs().amax(dim=(0, 2))  # (L,) largest entry of any shift
        tol = total_n * r.shape[-1] * (8 * eps * scale) ** 2
        return span, total, total <= tol

    def per_lambda(self) -> dict[str, list[float]]:
        """Means over pairs at each λ (NaN where no pair of that kind was found)."""
        ns, nd = float(self.same_pairs), float(self.diff_pairs)
        nan = torch.full((len(self.lambdas),), float("nan"), dtype=torch.float64)
        out = {"lambda": list(self.lambdas)}
        for key, s in (
            ("same_cos", self.same_cos),
            ("same_norm", self.same_norm),
            ("same_proj", self.same_proj),
        ):
            out[key] = (s / ns if ns else nan).tolist()
        if nd:
            mean_m = self.diff_margin / nd
            var_m = (self.diff_margin_sq / nd - mean_m**2).clamp_min(0)
            span, total, zero = self._span_parts()
            out["diff_margin"] = mean_m.tolist()
            out["diff_margin_std"] = var_m.sqrt().tolist()
            out["diff_span_share"] = torch.where(zero, float("nan"), span / total).tolist()
            out["diff_span_energy"] = (self.diff_energy / nd).tolist()
        else:
            for key in ("diff_margin", "diff_margin_std", "diff_span_share", "diff_span_energy"):
                out[key] = nan.tolist()
        return out

    def projection(self) -> dict[str, Any] | None:
        """2-D coordinates of the plot pairs on span{w_a−w̄, w_b−w̄} of the plot classes."""
        triple = None
        for t in self.plot_triple:
            t = [int(v) for v in t.flatten().tolist()]
            if min(t) >= 0:
                triple = t
                break
        if triple is None:
            return None
        W = self.head.weight
        wbar = W[triple].mean(0)
        q, _ = torch.linalg.qr(torch.stack([W[triple[0]] - wbar, W[triple[1]] - wbar], dim=1))
        pairs = []
        for h, meta in zip(self.plot_h, self.plot_meta, strict=True):
            for hp, (kind, a, b) in zip(h, meta.tolist(), strict=True):
                if a in triple and b in triple:
                    xy = (hp.to(torch.float64) @ q).tolist()
                    pairs.append(
                        {"kind": "same" if kind == SAME else "diff", "a": a, "b": b, "xy": xy}
                    )
        return {
            "classes": triple,
            "classifiers": ((W[triple] - wbar) @ q).tolist(),
            "lambda": list(self.lambdas),
            "pairs": pairs,
        }

    def compute(self) -> Result:
        stats = self.per_lambda()
        lam = self.lambdas
        ns, nd = float(self.same_pairs), float(self.diff_pairs)
        lambda_star = zero_crossing(lam, stats["diff_margin"]) if nd else float("nan")
        cos = torch.tensor(stats["same_cos"])
        norm = torch.tensor(stats["same_norm"])
        metrics = {
            "pairs_same": ns,
            "pairs_diff": nd,
            "lambda_star": lambda_star,
            "same_cos_mean": float(cos.mean()),
            "same_cos_range": float(cos.max() - cos.min()),
            "same_norm_range_rel": float((norm.max() - norm.min()) / norm.mean()),
            "diff_span_share_mean": float(torch.tensor(stats["diff_span_share"]).mean()),
            "diff_span_energy_mean": float(torch.tensor(stats["diff_span_energy"]).mean()),
        }
        metrics.update({f"margin@{v:g}": m for v, m in zip(lam, stats["diff_margin"], strict=True)})
        notes = []
        for kind, n in (("same-class", ns), ("different-class", nd)):
            if n < self.pairs:
                notes.append(f"only {int(n)} {kind} pairs were found (asked for {self.pairs}).")
        zero = self._span_parts()[2].tolist() if nd else []
        if any(zero):
            at = ", ".join(f"{v:g}" for v, z in zip(lam, zero, strict=True) if z)
            notes.append(
                f"at λ = {at} the different-class features h_λ all coincide (zero variance over "
                "pairs), so the span share is undefined (NaN) there."
            )
        if nd and lambda_star != lambda_star:
            notes.append(
                "the mean margin does not change sign over the λ grid, so λ* is undefined."
            )
        proj = self.projection()
        if proj is None:
            notes.append(
                "fewer than three classes were seen, so there is no 2-D projection to plot."
            )
        cols = [
            "λ",
            "same cos(h,w)",
            "same ‖h‖",
            "same ⟨h,w⟩/‖w‖",
            "margin",
            "margin std",
            "span share",
            "span energy",
        ]
        keys = [
            "same_cos",
            "same_norm",
            "same_proj",
            "diff_margin",
            "diff_margin_std",
            "diff_span_share",
            "diff_span_energy",
        ]
        rows = [[v, *(stats[k][i] for k in keys)] for i, v in enumerate(lam)]
        extra = {
            "head": self.head.name,
            "token_index": self.head.token_index,
            "pairs_requested": self.pairs,
            "train_mode": self.train_mode,
            "seed": self.seed,
            "per_lambda": stats,
            "projection": proj,
            "mixing": "x_λ = λ·x_a + (1−λ)·x_b on normalised images; a has class i, b class i'",
        }
        return Result(
            self.name, DEFINITION, metrics, [Table("Mixup geometry", cols, rows)], notes, extra
        )
