"""The classifier's geometry from its weights alone (Fisher et al.): how close W is to a simplex
ETF, with no data read. Also where every linear head of a model is found (`classifier_heads`),
which neural collapse and mixup geometry measure against.

Conventions shared with neural collapse: standard deviations use ddof=1 (`STD_DDOF`), cosines
between distinct rows are taken once per unordered pair, and everything is float64 on the CPU
(the weights are read once; this costs nothing next to a forward pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vitdiag.errors import VitdiagError
from vitdiag.intervals import reference_record
from vitdiag.probes.base import NO_DATA, Probe
from vitdiag.results import Result, Table

CLASSIFIER_DEFINITION = "classifier-geometry-v1"
STD_DDOF = 1

# The random-head reference (SPEC §8): GAUSSIAN_DRAWS heads of iid N(0, 1) entries, fewer when
# C·C·D exceeds GAUSSIAN_BUDGET (the cost of one draw's Gram and ETF distance grows as C²D),
# never fewer than GAUSSIAN_MIN_DRAWS; 2,000 draws at C = 10, D = 64 take ~0.15 s.
GAUSSIAN_DRAWS = 2000
GAUSSIAN_BUDGET = 4e6
GAUSSIAN_MIN_DRAWS = 100
_GAUSSIAN_STREAM = 0x6A055  # names the draws' random stream, apart from other uses of the seed


# -- classifier heads ------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """One linear classifier: logits = h Wᵀ + b, with h read from `token_index` of the
    forward_features tokens, or (None) from the model's pre-logits."""

    name: str
    weight: torch.Tensor  # (C, D) float64, CPU
    bias: torch.Tensor | None  # (C,) float64, CPU
    token_index: int | None = None

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])


def _linear_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    fc = module
    if not isinstance(fc, (nn.Linear, nn.Conv2d)) and isinstance(
        getattr(fc, "fc", None), nn.Module
    ):
        fc = fc.fc  # timm ClassifierHead / NormMlpClassifierHead keep their Linear as .fc
    if isinstance(fc, nn.Identity):
        raise VitdiagError(
            "the model has no classifier (num_classes=0); neural collapse needs the classifier "
            "weights: load the checkpoint with its head."
        )
    if isinstance(fc, nn.Linear):
        weight = fc.weight
    elif isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.groups == 1:
        weight = fc.weight.flatten(1)
    else:
        raise VitdiagError(
            f"the model's classifier is a {type(fc).__name__}, not a linear layer; "
            "neural collapse is defined for a linear classifier only."
        )
    bias = None if fc.bias is None else fc.bias.detach().to("cpu", torch.float64)
    return weight.detach().to("cpu", torch.float64), bias


def classifier_heads(model: nn.Module) -> list[Head]:
    """The model's linear classifier(s), from timm's `get_classifier()`.

    A tuple means several heads (distilled DeiT / PiT / LeViT). On a token-pooled model
    (`global_pool == "token"`) head i reads token i of forward_features (class, distillation);
    otherwise every head reads the shared pre-logits (LeViT averages its tokens first).
    """
    clf = model.get_classifier()
    modules = list(clf) if isinstance(clf, (tuple, list)) else [clf]
    by_token = len(modules) > 1 and getattr(model, "global_pool", None) == "token"
    heads = []
    for i, module in enumerate(modules):
        weight, bias = _linear_params(module)
        name = "head" if i == 0 else ("dist" if i == 1 else f"head{i}")
        heads.append(Head(name, weight, bias, i if by_token else None))
    return heads


# -- pure math ----------------------------------------------------------------


def f64(x: Any) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


def sample_std(x: torch.Tensor) -> float:
    return float(x.std(correction=STD_DDOF)) if x.numel() > STD_DDOF else float("nan")


def ratio(num: float, den: float) -> float:
    """num/den, NaN when den is 0 (a zero classifier, coinciding class means)."""
    return num / den if den != 0 else float("nan")


def all_zero(W: torch.Tensor) -> bool:
    """True when every classifier weight is 0: its norms, angles and ETF distance are undefined."""
    return not bool(f64(W).any())


def pair_cosines(rows: torch.Tensor) -> torch.Tensor:
    """Cosines between distinct rows, once per unordered pair (upper triangle)."""
    rows = f64(rows)
    unit = rows / rows.norm(dim=1, keepdim=True)
    i, j = torch.triu_indices(rows.shape[0], rows.shape[0], offset=1)
    return (unit @ unit.T)[i, j]


def etf_distance(gram: torch.Tensor) -> float:
    """‖G/‖G‖_F − (I − 11ᵀ/C)/√(C−1)‖_F: 0 exactly for the Gram matrix of a simplex ETF."""
    gram = f64(gram)
    c = gram.shape[0]
    if c < 2 or not bool(gram.any()):
        return float("nan")
    target = (torch.eye(c, dtype=torch.float64) - 1.0 / c) / math.sqrt(c - 1)
    return float((gram / gram.norm() - target).norm())


def angle_stats(rows: torch.Tensor) -> tuple[float, float, float]:
    """(Std cos, Avg |cos + 1/(C−1)|, mean cos) over distinct pairs of rows."""
    c = rows.shape[0]
    if c < 2:
        return float("nan"), float("nan"), float("nan")
    cos = pair_cosines(rows)
    return sample_std(cos), float((cos + 1.0 / (c - 1)).abs().mean()), float(cos.mean())


def classifier_stats(W: torch.Tensor, b: torch.Tensor | None = None) -> dict[str, float]:
    """The classifier-only quantities Fisher et al. track: how close W is to a simplex ETF."""
    W = f64(W)
    norms = W.norm(dim=1)
    cos_std, maxangle, cos_mean = angle_stats(W)
    out = {
        "norm_cov": ratio(sample_std(norms), float(norms.mean())),
        "cos_std": cos_std,
        "cos_mean": cos_mean,
        "maxangle": maxangle,
        "etf": etf_distance(W @ W.T),
    }
    if b is not None:
        b = f64(b)
        out["bias_mean"] = float(b.mean())
        out["bias_std"] = sample_std(b)
    return out


def heads_missing(model: nn.Module) -> str | None:
    """None when the model has a linear classifier head to measure, else why not."""
    try:
        classifier_heads(model)
    except VitdiagError as e:
        return str(e)
    return None


class ClassifierProbe(Probe):
    """The classifier's geometry from its weights alone: a probe that reads no data."""

    name = "classifier"
    title = "Classifier geometry (no data)"
    order = 0
    split = NO_DATA
    headlines = ("w_etf",)
    headline_rank = 2
    check_metrics = (
        "<head>.w_norm_cov",
        "<head>.w_cos_std",
        "<head>.w_cos_mean",
        "<head>.w_maxangle",
        "<head>.w_etf",
        "<head>.w_bias_mean",
        "<head>.w_bias_std",
    )

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.seed = int(seed)

    @classmethod
    def applies(cls, loaded: Any) -> str | None:
        return heads_missing(loaded.model)

    @classmethod
    def build(cls, loaded: Any, settings: Any, transform: Any) -> ClassifierProbe:
        return cls(loaded.model, seed=settings.seed)

    def compute(self) -> Result:
        return classifier_result(self.model, seed=self.seed)


def gaussian_draws(c: int, d: int) -> int:
    """R: how many random heads of shape C × D the reference draws."""
    if c * c * d <= GAUSSIAN_BUDGET:
        return GAUSSIAN_DRAWS
    return max(GAUSSIAN_MIN_DRAWS, math.floor(GAUSSIAN_DRAWS * GAUSSIAN_BUDGET / (c * c * d)))


def gaussian_etf_distances(c: int, d: int, seed: int = 0) -> torch.Tensor:
    """(R,) float64: `etf_distance` of WWᵀ for R seeded heads W (C × D) of iid N(0, 1) entries.

    numpy draws its normals one after another, so drawing in chunks (which bounds the memory
    at ~32 MB) gives the heads one draw at a time would."""
    r = gaussian_draws(c, d)
    rng = np.random.default_rng([seed, _GAUSSIAN_STREAM])
    chunk = max(1, 2**22 // (c * d))
    out = torch.empty(r, dtype=torch.float64)
    for start in range(0, r, chunk):
        w = torch.from_numpy(rng.standard_normal((min(chunk, r - start), c, d)))
        for j, gram in enumerate(w @ w.mT):
            out[start + j] = etf_distance(gram)
    return out


def gaussian_heads_reference(c: int, d: int, metric: str, seed: int = 0) -> dict:
    """The reference for a head's ETF distance: random Gaussian heads of the same shape."""
    values = gaussian_etf_distances(c, d, seed).numpy()
    lo, q05, q95, hi = np.percentile(values, [2.5, 5.0, 95.0, 97.5])
    how = (
        f"etf_distance of WWᵀ for {len(values)} seeded draws of a {c} × {d} head W with iid "
        "N(0, 1) entries: mean, and 2.5–97.5 % (q05, q95: 5 and 95 %) of the draws"
    )
    record = reference_record(metric, float(values.mean()), [lo, hi], how)
    return record | {"q05": float(q05), "q95": float(q95)}


def classifier_result(model: nn.Module, seed: int = 0) -> Result:
    """The classifier-only statistics (no data): CoV of ‖w_c‖, cosines, ETF distance of WWᵀ."""
    metrics: dict[str, float] = {}
    tables = []
    notes = []
    heads = classifier_heads(model)
    for k, head in enumerate(heads):
        prefix = "" if k == 0 else f"{head.name}."
        stats = classifier_stats(head.weight, head.bias)
        metrics.update({f"{prefix}w_{key}": v for key, v in stats.items()})
        tables.append(
            Table(
                f"Classifier — {head.name}",
                ["metric", "value"],
                [[f"w_{k_}", v] for k_, v in stats.items()],
            )
        )
        if all_zero(head.weight):
            notes.append(
                f"{head.name}: the classifier weights are all zero, so their norms, angles and "
                "ETF distance are undefined (NaN)."
            )
        if head.dim < head.num_classes - 1:
            notes.append(
                f"{head.name}: D={head.dim} < C−1={head.num_classes - 1}: an exact simplex ETF "
                "does not exist, so the ETF distance cannot reach 0."
            )
    extra = {"heads": [{"name": h.name, "num_classes": h.num_classes, "dim": h.dim} for h in heads]}
    extra["references"] = _gaussian_references(heads, seed)
    return Result("classifier", CLASSIFIER_DEFINITION, metrics, tables, notes, extra)


def _gaussian_references(heads: list[Head], seed: int) -> dict[str, dict]:
    """`gaussian_heads` on each head's w_etf (heads of one shape share the draws)."""
    out: dict[str, dict] = {}
    drawn: dict[tuple[int, int], dict] = {}
    for k, head in enumerate(heads):
        if head.num_classes < 2:
            continue  # no ETF distance to compare
        prefix = "" if k == 0 else f"{head.name}."
        shape = (head.num_classes, head.dim)
        if shape not in drawn:
            drawn[shape] = gaussian_heads_reference(*shape, "w_etf", seed)
        out[f"{prefix}gaussian_heads"] = drawn[shape] | {"metric": f"{prefix}w_etf"}
    return out
