"""Patch-wise absolute cosine similarity per layer: over-smoothing (SPEC §2, Gong et al. 2021).

For the grid tokens h_1..h_n of one image at one layer (prefix tokens excluded)

    P(h) = 1/(n(n-1)) · Σ_{i≠j} |h_iᵀh_j| / (‖h_i‖‖h_j‖)

computed as (Σ|ĤĤᵀ| − tr ĤĤᵀ)/(n(n−1)) with Ĥ the rows of H scaled to unit norm. The probe
reports, per layer, the mean and the standard deviation of P over images, with the signed mean
cosine and the effective rank of the token matrix beside it, which tell apart "all tokens point
the same way" (signed ≈ P, effective rank → 1) from "tokens lie on a few opposite axes".

P(h) and the signed cosine are measured on every image from a float32 Gram (sums in float64,
within 4e-8 absolute of the float64 definition on real tokens). The effective rank, whose
eigen-decomposition costs several times that Gram, is exact (float64 Gram) but measured on the
images whose global index is a multiple of `erank_every` (default 16), a sample that does not
depend on batch size, workers or process count.

Each layer's mean P(h) carries a Poisson-bootstrap interval (docs/FINDINGS.md): B replicate
sums Σw·P and Σw with weights keyed by the image's global index, so they stream and add
across processes like the other sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from vitdiag.errors import VitdiagError
from vitdiag.intervals import BOOTSTRAP, REPLICATES, bootstrap_sums, interval_record, ratio_interval
from vitdiag.probes.base import LAYERS, TRAIN, Probe, Taps, global_indices, stream_positions
from vitdiag.results import Result, Table

DEFINITION = "gong2021-abs-cos-v1"

# A row whose norm is below this is treated as the zero vector: its unit row is 0, so its cosine
# with every other token is 0 instead of 0/0. Real activations are many orders larger.
EPS = 1e-12

# Upper bound on a Gram block held at once when there are more tokens than channels (the n × n
# Gram is then larger than the tokens themselves). The stem of a CNN or Swin at 224 px has
# 56×56 = 3136 tokens, and a full (B, n, n) float64 Gram for B = 64 would need 5 GB.
_GRAM_BLOCK_BYTES = 256 * 2**20

# Effective rank is measured on the images whose global index is a multiple of this (SPEC §2):
# its eigen-decomposition costs ~4× the float32 Gram that P(h) needs, so measuring it on every
# image made similarity cost 1.3× a bare ViT-S forward on the CPU.
DEFAULT_ERANK_EVERY = 16


# The cosine Grams' dtype for float32 tokens, float32 on every device: within 4e-8 of the
# float64 definition, and float64 costs 2× on the CPU and 32–64× on consumer GPUs. Two names so
# that benchmarks/bench_amp_agreement.py can force a float64 reference per device kind.
_CPU_GRAM_DTYPE = torch.float32
_ACCELERATOR_GRAM_DTYPE = torch.float32


def _tokens(h: torch.Tensor) -> torch.Tensor:
    """Tokens for the cosine Gram (float64 tokens stay float64)."""
    if h.ndim != 3:
        raise ValueError(f"expected tokens of shape (B, n, D), got {tuple(h.shape)}")
    # MPS has no float64 sums; the CPU is fast enough there.
    if h.device.type == "mps":
        h = h.cpu()
    h = h.detach()
    if h.dtype == torch.float64:
        return h
    return h.to(_CPU_GRAM_DTYPE if h.device.type == "cpu" else _ACCELERATOR_GRAM_DTYPE)


def _unit_rows(h: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    return h / norms.clamp_min(EPS) * (norms > EPS)


def _cosine_sums_from_gram(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_{i≠j} |cos| and Σ_{i≠j} cos per image from the raw Gram G = HHᵀ.

    Σ_ij |cos_ij| = Σ_ij |G_ij| r_i r_j with r_i = 1/‖h_i‖, a bilinear form: no cosine matrix is
    materialised. The row sums Σ_j |G_ij| r_j run in the Gram's dtype (n terms each), the sums
    over rows and images in float64.
    """
    sq = g.diagonal(dim1=-2, dim2=-1).to(torch.float64)  # ‖h_i‖²
    r = torch.where(sq > EPS * EPS, sq.clamp_min(EPS * EPS).rsqrt(), torch.zeros_like(sq))
    r_g = r.to(g.dtype)[..., None]

    def bilinear(m: torch.Tensor) -> torch.Tensor:
        return (torch.bmm(m, r_g).squeeze(-1).to(torch.float64) * r).sum(dim=-1)

    # The diagonal is 1 for a real token and 0 for a zero token: subtract what is there rather
    # than n, which keeps a zero token at cosine 0 with everything.
    diag = (sq * r * r).sum(dim=-1)
    return bilinear(g.abs()) - diag, bilinear(g) - diag


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
    """Effective rank from the eigenvalues σ_i² of the float64 HHᵀ or HᵀH (ascending).

    Eigenvalues at or below max(n, D) · eps · λ_max (numpy's matrix_rank tolerance) are zero:
    the Gram's rounding puts noise of about eps · λ_max on a null space, whose square root
    would otherwise count as singular values of relative size √eps (a rank-1 matrix would get
    1.02–1.1, not 1).
    """
    eps = torch.finfo(torch.float64).eps
    lam = lam.to(torch.float64)
    cutoff = max(n, d) * eps * lam[..., -1:].clamp_min(0)
    s = torch.where(lam > cutoff, lam, torch.zeros_like(lam)).sqrt()
    total = s.sum(dim=-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


@contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread for a while. The batched eigvalsh of small Grams gains nothing from
    more, and on a loaded machine 2 threads took 0.8–8.7 s where one took 0.04 s."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _erank_exact(h: torch.Tensor) -> torch.Tensor:
    """Effective rank per image from the float64 Gram (the smaller of HHᵀ and HᵀH)."""
    if h.ndim != 3:
        raise ValueError(f"expected tokens of shape (B, n, D), got {tuple(h.shape)}")
    if h.device.type == "mps":
        h = h.cpu()
    h = h.detach().to(torch.float64)
    _, n, d = h.shape
    g = torch.bmm(h, h.mT) if n <= d else torch.bmm(h.mT, h)
    with _one_thread():
        lam = torch.linalg.eigvalsh(g)
    return _effective_rank_from_eigenvalues(lam, n, d)


def _pairwise_cosine_sums(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_{i≠j} |cos| and Σ_{i≠j} cos per image: the Gram in float32 (float64 for float64
    tokens), the sums in float64."""
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

    Precision (SPEC §2): the Gram is float32 on every device for float32 tokens (float64 tokens
    stay float64); the per-image sums over pairs are float64. Against the float64 definition on
    the fixture model's hooked tokens (n = 64, D = 64) P(h) and the signed cosine are within
    4e-8 absolute; the tests hold them to 1e-6.
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

    The σ_i are square roots of the eigenvalues of the smaller float64 Gram (HHᵀ or HᵀH), on
    every device, not an SVD: eigenvalues below max(n, D) · eps64 · λ_max are zero. Against a
    float64 SVD on the fixture model's tokens: ≤ 1.1e-10 relative on every layer but the final
    norm's, whose σ_min/σ_max ≈ 1e-8 fall under that cutoff: 2.7e-7 relative there.
    """
    return _erank_exact(h)


_STATS = (
    "count",
    "p_sum",
    "p_sq",
    "signed_sum",
    "signed_sq",
    "erank_n",  # images whose effective rank was measured (the sample)
    "erank_sum",
    "erank_sq",
    "first_n",  # 1 once the stream's first image (position 0) was seen, else 0
    "erank_first",  # its effective rank: the fallback when the sample is empty
    "tokens",
)

ERANK_DEFINITION = (
    "roy-vetterli-2007-erank-v2: mean over the images whose global index is a multiple of "
    "erank_every (the stream's first image when none is), float64 Gram eigenvalues"
)


class SimilarityProbe(Probe):
    """Mean and std over images of P(h) at every tapped layer, streamed as float64 sums.

    layers: a subset of the family's layer names to measure (None: all of them). The names come
    from the model's family taps, so they are checked against the first batch.
    erank_every: the effective rank is measured on the images whose global index (the source
    index the loader gives, else the position in the single-process stream) is a multiple of
    this, so the sample does not depend on batch size, workers or process count; 1 measures it
    on every image.
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
        every = getattr(settings, "erank_every", DEFAULT_ERANK_EVERY)
        return cls(settings.layers, erank_every=every, seed=settings.seed)

    def __init__(
        self,
        layers: list[str] | None = None,
        erank_every: int = DEFAULT_ERANK_EVERY,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if layers is not None and len(layers) == 0:
            raise VitdiagError("--layers was given without a layer name; name at least one.")
        if isinstance(erank_every, bool) or not isinstance(erank_every, int) or erank_every < 1:
            raise VitdiagError(
                f"--erank-every must be at least 1 (1 measures every image), got {erank_every}."
            )
        self.requested = None if layers is None else list(layers)
        self.erank_every = erank_every
        self.seed = int(seed)
        self.layer_names: list[str] | None = None
        self._seen = 0  # images seen: the next position, for batches without the engine's

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
            # The bootstrap of P(h): per replicate, Σw and Σw·P for every layer.
            self.add_sum_state("boot_p", (REPLICATES, 1 + len(self.layer_names)))
        b = taps.images.shape[0]
        # The sample follows each image's global index (its source index when the loader gives
        # it); the fallback is the stream's first image, position 0, which only one process has.
        index = global_indices(taps, self._seen)
        first = stream_positions(taps, self._seen) == 0
        self._seen += b
        sampled = index % self.erank_every == 0
        # One eigen-decomposition per image of the sample and of the fallback (the first image).
        rows = torch.nonzero(sampled | first).squeeze(-1)
        weights = torch.stack([sampled[rows], first[rows]]).to(torch.float64)  # (2, k)
        out, per_image = [], []
        for name in self.layer_names:
            if name not in taps.layers:
                raise VitdiagError(f"layer {name} is missing from a batch's taps.")
            h = taps.layers[name]
            n = h.shape[1]
            abs_sum, signed_sum = _pairwise_cosine_sums(h)
            p = abs_sum / _pair_count(n)
            s = signed_sum / _pair_count(n)
            r = _erank_exact(h[rows.to(h.device)]) if len(rows) else p.new_zeros(0)
            w = weights.to(p.device)
            sample_n, first_n = w.sum(dim=1)
            (sample_sum, first_sum), sample_sq = w @ r, w[0] @ r.square()
            one = p.new_ones(())
            per_image.append(p)
            out.append(
                torch.stack(
                    [
                        one * b,
                        p.sum(),
                        p.square().sum(),
                        s.sum(),
                        s.square().sum(),
                        sample_n,
                        sample_sum,
                        sample_sq,
                        first_n,
                        first_sum,
                        one * (b * n),
                    ]
                )
            )
        # One device-to-host copy per batch rather than one per statistic and layer.
        stacked = torch.stack(out)
        host = torch.cat([stacked.flatten(), torch.stack(per_image, 1).flatten()]).cpu()
        sums = host[: stacked.numel()].reshape(stacked.shape)
        for k, stat in enumerate(_STATS):
            getattr(self, stat).add_(sums[:, k])
        p_host = host[stacked.numel() :].reshape(b, len(self.layer_names))
        self.boot_p.add_(bootstrap_sums(self.seed, index, p_host))

    def compute(self) -> Result:
        if self.layer_names is None:
            raise VitdiagError("the similarity probe saw no images; check the data source.")
        count = self.count
        tokens = (self.tokens / count).tolist()
        mean = (self.p_sum / count).tolist()
        std = _std(self.p_sum, self.p_sq, count).tolist()
        signed = (self.signed_sum / count).tolist()
        erank, erank_std, erank_images = self._erank()
        names = self.layer_names

        metrics: dict[str, float] = {}
        for name, m, s in zip(names, mean, std, strict=True):
            metrics[f"{name}.mean"] = m
            metrics[f"{name}.std"] = s
        has_norm = len(names) > 1 and names[-1] == "norm"
        last = len(names) - 2 if has_norm else len(names) - 1
        metrics["last_block"] = mean[last]
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
        notes.append(self._erank_note(erank_images, int(count[0].item()) if len(names) else 0))
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
                "erank_every": self.erank_every,
                "erank_images": erank_images,
                "erank_definition": ERANK_DEFINITION,
                "intervals": self._intervals(last),
            },
        )

    def _intervals(self, last: int) -> dict[str, dict]:
        """The bootstrap of the mean P(h) over images, per layer, and for last_block."""
        boot = self.boot_p
        out = {
            f"{name}.mean": interval_record(*ratio_interval(boot[:, 1 + i], boot[:, 0]), BOOTSTRAP)
            for i, name in enumerate(self.layer_names or [])
        }
        if self.layer_names:
            out["last_block"] = dict(out[f"{self.layer_names[last]}.mean"])
        return out

    def _erank(self) -> tuple[list[float], list[float], int]:
        """Mean and std of the effective rank over the sample, per layer, and the sample size;
        the first image alone (std 0) when the sample is empty."""
        n = self.erank_n
        if len(n) and n[0] > 0:
            return (
                (self.erank_sum / n).tolist(),
                _std(self.erank_sum, self.erank_sq, n).tolist(),
                int(n[0]),
            )
        if len(n) and self.first_n[0] > 0:
            return (self.erank_first / self.first_n).tolist(), [0.0] * len(n), 1
        return [math.nan] * len(n), [math.nan] * len(n), 0

    def _erank_note(self, images: int, total: int) -> str:
        sampled = self.erank_n[0] > 0 if len(self.erank_n) else False
        if self.erank_every == 1:
            which = "measured on every image"
        elif sampled:
            which = (
                f"measured on the {images} of {total} images whose global index is a multiple "
                f"of {self.erank_every} (--erank-every)"
            )
        else:
            which = (
                f"measured on the first image only: none of the {total} images has a global "
                f"index that is a multiple of {self.erank_every} (--erank-every)"
            )
        return f"eff. rank (mean and std) {which}; P(h) and signed cos use every image."


def _std(total: torch.Tensor, sq: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    # ddof=0; rounding can leave E[x²] − E[x]² a hair below zero when every image agrees.
    mean = total / count
    return (sq / count - mean.square()).clamp_min(0.0).sqrt()
