"""Patch-wise absolute cosine similarity per layer: over-smoothing (SPEC §2, Gong et al. 2021).

For the grid tokens h_1..h_n of one image at one layer (prefix tokens excluded)

    P(h) = 1/(n(n-1)) · Σ_{i≠j} |h_iᵀh_j| / (‖h_i‖‖h_j‖)

computed as (Σ|ĤĤᵀ| − tr ĤĤᵀ)/(n(n−1)) with Ĥ the rows of H scaled to unit norm. The probe
reports, per layer, the mean and the standard deviation of P over images, with the signed mean
cosine and the effective rank of the token matrix beside it, which tell apart "all tokens point
the same way" (signed ≈ P, effective rank → 1) from "tokens lie on a few opposite axes".
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vitdiag.errors import VitdiagError
from vitdiag.probes.base import LAYERS, TRAIN, Probe, Taps
from vitdiag.results import Result, Table

DEFINITION = "gong2021-abs-cos-v1"

# A row whose norm is below this is treated as the zero vector: its unit row is 0, so its cosine
# with every other token is 0 instead of 0/0. Real activations are many orders larger.
EPS = 1e-12

# Upper bound on a Gram block held at once when there are more tokens than channels (the n × n
# Gram is then larger than the tokens themselves). The stem of a CNN or Swin at 224 px has
# 56×56 = 3136 tokens, and a full (B, n, n) float64 Gram for B = 64 would need 5 GB.
_GRAM_BLOCK_BYTES = 256 * 2**20

# The dtype of the Grams for float32 tokens (float64 tokens always stay float64). Accelerators
# use float32, where float64 is slow or missing. The CPU uses float64: float32 saved only ~10% of
# the probe's time there (eigvalsh dominates) and cannot meet the effective rank's accuracy.
_CPU_GRAM_DTYPE = torch.float64
_ACCELERATOR_GRAM_DTYPE = torch.float32


def _gram_dtype(h: torch.Tensor) -> torch.dtype:
    if h.dtype == torch.float64:
        return torch.float64
    return _CPU_GRAM_DTYPE if h.device.type == "cpu" else _ACCELERATOR_GRAM_DTYPE


def _tokens(h: torch.Tensor) -> torch.Tensor:
    if h.ndim != 3:
        raise ValueError(f"expected tokens of shape (B, n, D), got {tuple(h.shape)}")
    # MPS has neither float64 sums nor eigvalsh; the CPU is exact and fast enough there.
    if h.device.type == "mps":
        h = h.cpu()
    return h.detach().to(_gram_dtype(h))


def _unit_rows(h: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    return h / norms.clamp_min(EPS) * (norms > EPS)


def _cosine_sums_from_gram(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_{i≠j} |cos| and Σ_{i≠j} cos per image from the raw Gram G = HHᵀ.

    Σ_ij |cos_ij| = Σ_ij |G_ij| r_i r_j with r_i = 1/‖h_i‖, a bilinear form: no cosine matrix is
    materialised, and the sums run in float64 whatever the Gram's dtype.
    """
    sq = g.diagonal(dim1=-2, dim2=-1).to(torch.float64)  # ‖h_i‖²
    r = torch.where(sq > EPS * EPS, sq.clamp_min(EPS * EPS).rsqrt(), torch.zeros_like(sq))
    g64 = g.to(torch.float64)

    def bilinear(m: torch.Tensor) -> torch.Tensor:
        return (torch.bmm(m, r[..., None]).squeeze(-1) * r).sum(dim=-1)

    # The diagonal is 1 for a real token and 0 for a zero token: subtract what is there rather
    # than n, which keeps a zero token at cosine 0 with everything.
    diag = (sq * r * r).sum(dim=-1)
    return bilinear(g64.abs()) - diag, bilinear(g64) - diag


def _cosine_sums_blocked(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sums when n > D, from unit rows, with the n × n Gram built block by block."""
    u = _unit_rows(h)
    b, n, _ = u.shape
    abs_sum = torch.zeros(b, dtype=torch.float64, device=u.device)
    rows = max(1, min(n, _GRAM_BLOCK_BYTES // max(1, u.element_size() * b * n)))
    for start in range(0, n, rows):
        block = torch.bmm(u[:, start : start + rows], u.transpose(1, 2))
        abs_sum += block.abs().sum(dim=(1, 2), dtype=torch.float64)
    diag = (u * u).sum(dim=(1, 2), dtype=torch.float64)
    # Σ_ij cos_ij = ‖Σ_i û_i‖²: the signed sum needs no Gram at all.
    signed_sum = u.sum(dim=1, dtype=torch.float64).pow(2).sum(dim=1)
    return abs_sum - diag, signed_sum - diag


def _effective_rank_from_eigenvalues(lam: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """Effective rank from the eigenvalues σ_i² of HHᵀ or HᵀH (ascending, as eigvalsh gives).

    Eigenvalues at or below a cutoff are zero: the Gram's rounding puts noise of about
    eps · λ_max on a null space, whose square root would otherwise count as singular values of
    relative size √eps (a rank-1 matrix would get 1.02–1.1, not 1). The cutoff is
    max(n, D) · eps · λ_max for a float64 Gram (numpy's matrix_rank tolerance) but only
    eps · λ_max for a float32 one: real tokens carry many singular values between 1e-3 and 1e-2
    of the largest, and the larger float32 cutoff dropped enough of them to move the effective
    rank by 15% on the fixture model's tokens.
    """
    eps = torch.finfo(lam.dtype).eps
    scale = max(n, d) if lam.dtype == torch.float64 else 1
    lam = lam.to(torch.float64)
    cutoff = scale * eps * lam[..., -1:].clamp_min(0)
    s = torch.where(lam > cutoff, lam, torch.zeros_like(lam)).sqrt()
    total = s.sum(dim=-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


def _layer_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ_{i≠j} |cos|, Σ_{i≠j} cos, effective rank) per image, all (B,) float64.

    One matmul feeds all three when n ≤ D: the Gram HHᵀ gives the cosines once scaled by the
    row norms (its diagonal), and its eigenvalues are the squared singular values of H.
    When n > D the effective rank comes from the smaller HᵀH instead.
    """
    h = _tokens(h)
    b, n, d = h.shape
    if n <= d:
        g = torch.bmm(h, h.mT)
        abs_sum, signed_sum = _cosine_sums_from_gram(g)
    else:
        abs_sum, signed_sum = _cosine_sums_blocked(h)
        g = torch.bmm(h.mT, h)
    lam = torch.linalg.eigvalsh(g)
    return abs_sum, signed_sum, _effective_rank_from_eigenvalues(lam, n, d)


def _pairwise_cosine_sums(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_{i≠j} |cos| and Σ_{i≠j} cos per image, summed in float64."""
    h = _tokens(h)
    if h.shape[1] <= h.shape[2]:
        return _cosine_sums_from_gram(torch.bmm(h, h.mT))
    return _cosine_sums_blocked(h)


def _pair_count(n: int) -> float:
    # One token has no pairs: P is undefined, and NaN says so without hiding other layers.
    return float(n * (n - 1)) if n > 1 else math.nan


def patchwise_abs_cosine(h: torch.Tensor) -> torch.Tensor:
    """P(h) of Gong et al. (2021) for each image: the mean |cosine| over ordered pairs i ≠ j.

    h: (B, n, D) grid tokens, prefix tokens already removed. Returns (B,) float64 on h's device.
    An all-zero token counts as orthogonal to every other token (cosine 0, not NaN) and still
    counts in the n(n−1) pairs. With n == 1 there are no pairs and the result is NaN.
    """
    abs_sum, _ = _pairwise_cosine_sums(h)
    return abs_sum / _pair_count(h.shape[1])


def mean_signed_cosine(h: torch.Tensor) -> torch.Tensor:
    """The mean cosine over ordered pairs i ≠ j, without the absolute value; (B,) float64.

    Same conventions as `patchwise_abs_cosine` (zero tokens at cosine 0, NaN when n == 1).
    """
    _, signed_sum = _pairwise_cosine_sums(h)
    return signed_sum / _pair_count(h.shape[1])


def effective_rank(h: torch.Tensor) -> torch.Tensor:
    """Effective rank (Roy & Vetterli, 2007) of each image's n × D token matrix; (B,) float64.

    exp(−Σ p_i log p_i) with p_i = σ_i / Σσ the normalised singular values (0·log 0 = 0). It is
    1 for a rank-1 matrix and k for k orthonormal rows. An all-zero matrix gets 0, its rank,
    since its singular values cannot be normalised.

    The σ_i are square roots of the eigenvalues of the smaller Gram (HHᵀ or HᵀH), not an SVD;
    squaring loses the smallest singular values to rounding. Error against a float64 SVD on
    the fixture model's tokens (σ_min/σ_max down to 1e-8): ≤ 3e-7 relative with the float64
    Gram (CPU, float64 tokens), ≤ 4e-3 relative with the float32 Gram of accelerators; P(h)
    and the signed cosine stay within 1e-15 and 3e-8 absolute respectively.
    """
    return _layer_stats(h)[2]


_STATS = ("count", "p_sum", "p_sq", "signed_sum", "signed_sq", "erank_sum", "erank_sq", "tokens")


class SimilarityProbe(Probe):
    """Mean and std over images of P(h) at every tapped layer, streamed as float64 sums.

    layers: a subset of the family's layer names to measure (None: all of them). The names come
    from the model's family taps, so they are checked against the first batch.
    """

    name = "similarity"
    title = "Patch-wise cosine similarity (over-smoothing)"
    order = 6
    split = TRAIN
    needs = frozenset({LAYERS})
    headlines = ("last_block", "max")
    headline_rank = 5
    check_metrics = ("last_block", "final_norm", "max", "<layer>.mean", "<layer>.std")

    @classmethod
    def applies(cls, loaded: Any) -> str | None:
        from vitdiag.families import family_of

        try:
            family_of(loaded.model).layer_taps(loaded.model)
        except VitdiagError as e:
            return str(e)
        return None

    @classmethod
    def build(cls, loaded: Any, settings: Any, transform: Any) -> SimilarityProbe:
        return cls(settings.layers)

    def __init__(self, layers: list[str] | None = None) -> None:
        super().__init__()
        if layers is not None and len(layers) == 0:
            raise VitdiagError("--layers was given without a layer name; name at least one.")
        self.requested = None if layers is None else list(layers)
        self.layer_names: list[str] | None = None

    def _resolve_layers(self, available: list[str]) -> list[str]:
        if self.requested is None:
            return available
        unknown = [name for name in self.requested if name not in available]
        if unknown:
            raise VitdiagError(
                f"unknown layer(s) {', '.join(unknown)} for this model; "
                f"valid layers: {', '.join(available)}."
            )
        wanted = set(self.requested)
        return [name for name in available if name in wanted]  # depth order, not request order

    def update(self, taps: Taps) -> None:
        if self.layer_names is None:
            self.layer_names = self._resolve_layers(list(taps.layers))
            # States are created once the layer count is known, all of shape (L,).
            for stat in _STATS:
                self.add_sum_state(stat, (len(self.layer_names),))
        rows = []
        for name in self.layer_names:
            if name not in taps.layers:
                raise VitdiagError(f"layer {name} is missing from a batch's taps.")
            h = taps.layers[name]
            b, n = h.shape[0], h.shape[1]
            abs_sum, signed_sum, r = _layer_stats(h)  # one Gram for all three
            p = abs_sum / _pair_count(n)
            s = signed_sum / _pair_count(n)
            rows.append(
                torch.stack(
                    [
                        torch.tensor(float(b), dtype=torch.float64, device=p.device),
                        p.sum(),
                        p.square().sum(),
                        s.sum(),
                        s.square().sum(),
                        r.sum(),
                        r.square().sum(),
                        torch.tensor(float(b * n), dtype=torch.float64, device=p.device),
                    ]
                )
            )
        # One device-to-host copy per batch rather than one per statistic and layer.
        sums = torch.stack(rows).cpu()
        for k, stat in enumerate(_STATS):
            getattr(self, stat).add_(sums[:, k])

    def compute(self) -> Result:
        if self.layer_names is None:
            raise VitdiagError("the similarity probe saw no images; check the data source.")
        count = self.count
        tokens = (self.tokens / count).tolist()
        mean = (self.p_sum / count).tolist()
        std = _std(self.p_sum, self.p_sq, count).tolist()
        signed = (self.signed_sum / count).tolist()
        erank = (self.erank_sum / count).tolist()
        erank_std = _std(self.erank_sum, self.erank_sq, count).tolist()
        names = self.layer_names

        metrics: dict[str, float] = {}
        for name, m, s in zip(names, mean, std, strict=True):
            metrics[f"{name}.mean"] = m
            metrics[f"{name}.std"] = s
        has_norm = len(names) > 1 and names[-1] == "norm"
        metrics["last_block"] = mean[-2] if has_norm else mean[-1]
        if has_norm:
            metrics["final_norm"] = mean[-1]
        finite = [m for m in mean if math.isfinite(m)]
        metrics["max"] = max(finite) if finite else math.nan

        table = Table(
            title="Patch-wise absolute cosine similarity P(h) per layer",
            columns=["layer", "index", "P mean", "P std", "signed cos", "eff. rank", "tokens n"],
            rows=[
                [name, i, mean[i], std[i], signed[i], erank[i], int(round(tokens[i]))]
                for i, name in enumerate(names)
            ],
        )
        notes = [
            "P(h): mean |cosine| over ordered pairs of distinct grid tokens of one image "
            "(prefix tokens excluded), then mean and std over images (std with ddof=0).",
            "signed cos: the same mean without |·|; eff. rank: exp of the entropy of the "
            "normalised singular values of the n × D token matrix (Roy & Vetterli 2007).",
        ]
        single = [name for name, n in zip(names, tokens, strict=True) if n < 2]
        if single:
            notes.append(
                f"layer(s) {', '.join(single)} have a single grid token, so P is undefined "
                "there (NaN); use larger images to measure them."
            )
        if has_norm:
            notes.append("last_block is the last block's output; final_norm the final norm's.")
        return Result(
            probe=self.name,
            definition=DEFINITION,
            metrics=metrics,
            tables=[table],
            notes=notes,
            extra={
                "layers": list(names),
                "mean": mean,
                "std": std,
                "signed": signed,
                "erank": erank,
                "erank_std": erank_std,
                "n_tokens": [int(round(t)) for t in tokens],
                "n_images": int(count[0].item()) if len(names) else 0,
            },
        )


def _std(total: torch.Tensor, sq: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    # ddof=0; rounding can leave E[x²] − E[x]² a hair below zero when every image agrees.
    mean = total / count
    return (sq / count - mean.square()).clamp_min(0.0).sqrt()
