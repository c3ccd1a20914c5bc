"""A fixed simplex-ETF classifier (Papyan, Han & Donoho 2020; Zhu et al. 2021; Yang et al. 2022;
SPEC §9): the geometry neural collapse converges to, installed at the start instead of learned.

    M = √(C/(C−1)) · U (I_C − 11ᵀ/C),   W = Mᵀ  (C × D)

with U ∈ R^{D×C} orthonormal columns. Then W Wᵀ = C/(C−1) · (I − 11ᵀ/C): every row has unit
norm and every two rows have cosine −1/(C−1), the most separated C unit vectors there are.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _orthonormal_columns(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A (rows × cols) float64 matrix with orthonormal columns: Q of a seeded Gaussian's QR.

    The signs of R's diagonal are folded into Q, which makes Q the Haar-distributed draw (and
    fixes the sign ambiguity of QR, so a seed gives the same U on every LAPACK).
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a, mode="reduced")
    sign = torch.sign(r.diagonal())
    return q * torch.where(sign == 0, torch.ones_like(sign), sign)


def _centred_basis(c: int) -> torch.Tensor:
    """A (C × (C−1)) orthonormal basis of the centred subspace {v ∈ R^C : 1ᵀv = 0}.

    The columns e_k − 1/C (k < C−1) span it; their QR orthonormalises them, deterministically.
    """
    centred = torch.eye(c, dtype=torch.float64) - 1.0 / c
    q, _ = torch.linalg.qr(centred[:, : c - 1], mode="reduced")
    return q


def simplex_etf(
    num_classes: int, dim: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The rows of a simplex ETF: W (C × D), unit-norm rows, pairwise cosine −1/(C−1).

    W = Mᵀ with M = √(C/(C−1)) · U (I_C − 11ᵀ/C) (SPEC §9) and U ∈ R^{D×C} with orthonormal
    columns from a seeded QR, which needs D ≥ C. For D = C−1 the C class vectors span only the
    centred subspace, so M = √(C/(C−1)) · R Bᵀ with B (C × (C−1)) an orthonormal basis of that
    subspace and R ((C−1) × (C−1)) a seeded orthogonal matrix: the same Gram
    MᵀM = C/(C−1) · (I − 11ᵀ/C). Built in float64, then cast to `dtype`.
    D < C−1 has no simplex ETF (C vectors with equal negative cosines span C−1 dimensions): a
    ValueError says so.
    """
    c, d = int(num_classes), int(dim)
    if c < 2:
        raise ValueError(f"a simplex ETF needs at least 2 classes, got num_classes={c}.")
    if d < c - 1:
        raise ValueError(
            f"a simplex ETF of {c} classes needs at least C−1 = {c - 1} feature dimensions, but "
            f"the features have D = {d}; put a linear projection to ≥ {c - 1} dimensions before "
            "the classifier, or keep a learned classifier for this model."
        )
    scale = math.sqrt(c / (c - 1))
    if d >= c:
        u = _orthonormal_columns(d, c, seed)
        m = scale * u @ (torch.eye(c, dtype=torch.float64) - 1.0 / c)
    else:
        rotation = _orthonormal_columns(d, d, seed)
        m = scale * rotation @ _centred_basis(c).T
    return m.T.contiguous().to(dtype)


def head_modules(model: nn.Module) -> list[nn.Linear]:
    """The model's linear classifier(s) as modules, found as `probes.classifier.classifier_heads`
    finds them (which returns copies of their weights): timm's `get_classifier()`, a tuple for
    several heads (distilled DeiT: head, head_dist), the `.fc` inside timm's ClassifierHead."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        raise ValueError(
            f"{type(model).__name__} has no get_classifier(); give a timm model (unwrap DDP or "
            "torch.compile first)."
        )
    clf = get()
    modules = list(clf) if isinstance(clf, (tuple, list)) else [clf]
    heads = []
    for module in modules:
        fc = module
        if not isinstance(fc, nn.Linear) and isinstance(getattr(fc, "fc", None), nn.Module):
            fc = fc.fc
        if isinstance(fc, nn.Identity):
            raise ValueError(
                "the model has no classifier (num_classes=0); build it with num_classes=C "
                "before installing a fixed ETF head."
            )
        if not isinstance(fc, nn.Linear):
            raise ValueError(
                f"the model's classifier is a {type(fc).__name__}, not nn.Linear; a fixed ETF "
                "head replaces a linear classifier only."
            )
        heads.append(fc)
    return heads


def _freeze(module: nn.Module, name: str, value: torch.Tensor) -> None:
    # A buffer, not a Parameter with requires_grad=False: no optimizer built from
    # model.parameters() can see it (no weight decay either), a later model.requires_grad_()
    # cannot thaw it, and the state-dict key stays `head.weight`, so the checkpoint still
    # loads into plain timm and vitdiag's probes read the head as before.
    delattr(module, name)
    module.register_buffer(name, value.detach().clone())


def install_fixed_etf_head(model: nn.Module, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Replace the classifier weights of a timm model with a frozen simplex ETF; returns W (C × D).

    Every head (both of a distilled DeiT, which are averaged at evaluation) gets the same W, so
    logits = s · W h with zero bias. weight and bias become buffers (see `_freeze`): frozen,
    saved under the same keys. The scale is folded into the weights (rows of norm s) so the
    model stays a plain timm module; the ETF geometry, and hence vitdiag's classifier and
    collapse numbers, are scale-free.

    scale s = 1 by default. Unit-norm rows bound each logit by ‖h‖, but timm's pre-logits are a
    LayerNorm output with ‖h‖ ≈ √D·rms(γ), γ learned: the effective softmax temperature of
    s = 1 is already ≈ √D (≈ 14 for ViT-Ti, 28 for ViT-B), the range of cosine classifiers'
    fixed scales, and the model can raise it through γ. At initialisation, features in general
    position give logits s·w_cᵀh ~ N(0, s²) — O(1), like a learned head's — whereas s = √D would
    start with logits of spread √D and a saturated softmax. Pass a larger s for heads whose
    input is L2-normalised. Call before wrapping the model (DDP, torch.compile) or building the
    optimizer; `reset_classifier()` brings back a learned head.
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}.")
    heads = head_modules(model)
    shapes = {tuple(fc.weight.shape) for fc in heads}
    if len(shapes) != 1:
        raise ValueError(f"the model's heads differ in shape {sorted(shapes)}; expected one C×D.")
    num_classes, dim = shapes.pop()
    etf = simplex_etf(num_classes, dim, seed=seed, dtype=torch.float64)
    for fc in heads:
        like = fc.weight
        _freeze(fc, "weight", (scale * etf).to(device=like.device, dtype=like.dtype))
        if fc.bias is not None:
            _freeze(fc, "bias", torch.zeros_like(fc.bias))
    return etf.to(dtype=heads[0].weight.dtype)
