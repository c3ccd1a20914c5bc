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

import torch

from vitdiag.errors import VitdiagError
from vitdiag.probes.base import LAYERS, Probe, Taps
from vitdiag.results import Result, Table

DEFINITION = "gong2021-abs-cos-v1"

# A row whose norm is below this is treated as the zero vector: its unit row is 0, so its cosine
# with every other token is 0 instead of 0/0. Real activations are many orders larger.
EPS = 1e-12

# Upper bound on the float64 Gram block held at once. The stem of a CNN or Swin at 224 px has
# 56×56 = 3136 tokens, and a full (B, n, n) float64 Gram for B = 64 would need 5 GB.
_GRAM_BLOCK_BYTES = 256 * 2**20


def _as_float64(h: torch.Tensor) -> torch.Tensor:
    if h.ndim != 3:
        raise ValueError(f"expected tokens of shape (B, n, D), got {tuple(h.shape)}")
    # MPS has no float64; exactness matters more here than staying on the accelerator.
    if h.device.type == "mps":
        h = h.cpu()
    return h.to(torch.float64)


def _unit_rows(h: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    return h / norms.clamp_min(EPS) * (norms > EPS)


def _pairwise_cosine_sums(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_{i≠j} |cos| and Σ_{i≠j} cos per image, float64, Gram built block by block of rows."""
    u = _unit_rows(_as_float64(h))
    b, n, _ = u.shape
    abs_sum = torch.zeros(b, dtype=torch.float64, device=u.device)
    rows = max(1, min(n, _GRAM_BLOCK_BYTES // max(1, 8 * b * n)))
    for start in range(0, n, rows):
        block = torch.bmm(u[:, start : start + rows], u.transpose(1, 2))
        abs_sum += block.abs().sum(dim=(1, 2))
    # The diagonal is ‖û_i‖² — 1 for a real token, 0 for a zero token — so subtract what is
    # there rather than n, which keeps a zero token at cosine 0 with everything.
    diag = (u * u).sum(dim=(1, 2))
    # Σ_ij cos_ij = ‖Σ_i û_i‖²: the signed sum needs no Gram at all.
    signed_sum = u.sum(dim=1).pow(2).sum(dim=1)
    return abs_sum - diag, signed_sum - diag


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
    """
    # Same singular values either way, but LAPACK on CPU was ~8x faster on the transposed view
    # of a wide token matrix (ViT-B: 197 × 768) in our measurements, and no slower on tall ones.
    s = torch.linalg.svdvals(_as_float64(h).mT)
    total = s.sum(dim=-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


_STATS = ("count", "p_sum", "p_sq", "signed_sum", "signed_sq", "erank_sum", "erank_sq", "tokens")


class SimilarityProbe(Probe):
    """Mean and std over images of P(h) at every tapped layer, streamed as float64 sums.

    layers: a subset of the family's layer names to measure (None: all of them). The names come
    from the model's family taps, so they are checked against the first batch.
    """

    name = "similarity"
    needs = frozenset({LAYERS})

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
            abs_sum, signed_sum = _pairwise_cosine_sums(h)  # one Gram for both cosines
            p = abs_sum / _pair_count(n)
            s = signed_sum / _pair_count(n)
            r = effective_rank(h)
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
