"""DiversePatch losses (Gong et al., "Improve Vision Transformers Training by Suppressing
Over-smoothing", arXiv 2104.12753, §4; SPEC §9), as differentiable functions of grid tokens.

All three take grid tokens only (prefix tokens removed), shaped (B, n, D), and return a scalar
that is the mean over the batch. The paper trains with α₁ L_cos + α₂ L_contrastive + α₃ L_mixing,
α₁ = α₂ = α₃ = 1, and drops Mixup (and repeated augmentation) when it uses the mixing loss.
`vitdiag.train.forward_tokens` gives the logits and both token sets from one forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# The probe's own threshold: a token whose norm is below it counts as the zero vector, which is
# orthogonal to everything, so the loss and the probe agree on which tokens are zero.
from vitdiag.probes.similarity import EPS


def _grid_tokens(tokens: torch.Tensor, what: str) -> torch.Tensor:
    if tokens.ndim != 3:
        raise ValueError(
            f"{what} must be grid tokens of shape (B, n, D), got {tuple(tokens.shape)}; "
            "drop the prefix tokens and give one row per patch."
        )
    if tokens.shape[1] < 2:
        raise ValueError(
            f"{what} has {tokens.shape[1]} grid token(s) per image; a patch-wise loss compares "
            "distinct patches and needs at least 2: use larger images or a smaller patch size."
        )
    # Half-precision cosines lose ~3 digits; the loss is cheap next to the forward, so it runs in
    # float32 (float64 stays float64, for gradcheck).
    if tokens.dtype in (torch.float16, torch.bfloat16):
        tokens = tokens.float()
    return tokens


def _unit_rows(h: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm, rows with norm ≤ EPS set to 0 (the probe's convention).

    The norm comes from rsqrt of the squared norm rather than `vector_norm`, so that a zero row
    gets gradient 0 rather than 0·∞: the squared norm's gradient 2h vanishes there.
    """
    sq = (h * h).sum(dim=-1, keepdim=True)
    real = sq > EPS * EPS
    r = torch.where(real, sq.clamp_min(EPS * EPS).rsqrt(), torch.zeros_like(sq))
    return h * r


def patchwise_abs_cosine_per_image(tokens: torch.Tensor) -> torch.Tensor:
    """P(h) per image, differentiable: the definition of `probes.similarity.patchwise_abs_cosine`.

    P(h) = 1/(n(n−1)) · Σ_{i≠j} |h_iᵀh_j| / (‖h_i‖‖h_j‖) (Gong et al. 2021, Eq. 1; SPEC §2).
    The probe detaches its input and computes its Gram in float32 with float64 sums; this one
    keeps the graph and computes in the tokens' dtype (half precision is raised to float32). A
    zero token has cosine 0 with every token and still counts in the n(n−1) pairs. The n × n
    Gram is held per image: B · n² floats.
    """
    with torch.autocast(tokens.device.type, enabled=False):
        u = _unit_rows(_grid_tokens(tokens, "tokens"))
        n = u.shape[1]
        gram = u @ u.mT
        # Only i ≠ j: the diagonal is 1 for a real token and 0 for a zero token.
        off = gram.abs().sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).abs().sum(dim=1)
        return off / (n * (n - 1))


def patch_cosine_loss(tokens: torch.Tensor) -> torch.Tensor:
    """L_cos = P(h^[L]): the patch-wise absolute cosine of the last layer's grid tokens.

    Gong et al. 2021, §4: L_cos(x) = 1/(n(n−1)) Σ_{i≠j} |h_iᵀh_j| / (‖h_i‖‖h_j‖), here averaged
    over the batch. tokens: (B, n, D) grid tokens, n ≥ 2. It is the number vitdiag's similarity
    probe reports (`patchwise_abs_cosine`, averaged over images): identical tokens give 1,
    pairwise orthogonal ones 0. |·| is not differentiable at 0; autograd uses the subgradient 0.
    """
    return patchwise_abs_cosine_per_image(tokens).mean()


def patch_contrastive_loss(
    first: torch.Tensor,
    last: torch.Tensor,
    detach_first: bool = True,
    normalize: bool = False,
) -> torch.Tensor:
    """Patch-wise contrastive loss (Gong et al. 2021, §4; SPEC §9).

    With h^[1] the first layer's grid tokens (the input of block 1: patch embedding + position,
    vitdiag's `embed` layer) and h^[L] the last layer's, for each patch i

        a_i = h_i^[1]ᵀ h_i^[L],   b_i = h_i^[1]ᵀ (1/(n−1)) Σ_{j≠i} h_j^[L],
        L = (1/n) Σ_i −log(e^{a_i} / (e^{a_i} + e^{b_i})) = (1/n) Σ_i softplus(b_i − a_i),

    then the mean over the batch; softplus is the stable form of the log-ratio. Equal last-layer
    tokens give a_i = b_i and L = log 2.

    normalize: the paper's formula uses raw inner products and says nothing of normalising, so
    the default follows it (False). True uses unit rows (cosines), which bounds a_i, b_i by 1 and
    makes the loss independent of token scale (not the paper's loss).
    detach_first: the paper does not say whether h^[1] gets gradient. The aim is to pull deep
    layers towards the more diverse early ones, so by default h^[1] is a fixed target (SPEC §9).
    """
    first = _grid_tokens(first, "first")
    last = _grid_tokens(last, "last")
    if first.shape != last.shape:
        raise ValueError(
            f"first {tuple(first.shape)} and last {tuple(last.shape)} must be the same grid "
            "tokens of the same images; the contrastive loss pairs patch i with patch i."
        )
    if detach_first:
        first = first.detach()
    with torch.autocast(last.device.type, enabled=False):
        if normalize:
            first, last = _unit_rows(first), _unit_rows(last)
        n = last.shape[1]
        a = (first * last).sum(dim=-1)
        # mean_{j≠i} h_j = (Σ_j h_j − h_i)/(n−1): O(nD) rather than an n × n mask.
        others = (last.sum(dim=1, keepdim=True) - last) / (n - 1)
        b = (first * others).sum(dim=-1)
        return F.softplus(b - a).mean()


class PatchMix(NamedTuple):
    """What `patch_cutmix` returns.

    images: (B, C, H, W) the mixed images. mask: (B, n) bool, True where grid token i (in timm's
    row-major patch order) came from images_b. lam: (B,) the share of patches from images_a, the
    weight of labels_a in the class token's CutMix target.
    """

    images: torch.Tensor
    mask: torch.Tensor
    lam: torch.Tensor


def _pair(patch_size: int | tuple[int, int]) -> tuple[int, int]:
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    if ph < 1 or pw < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size}.")
    return int(ph), int(pw)


def patch_cutmix(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    patch_size: int | tuple[int, int],
    generator: torch.Generator | None = None,
) -> PatchMix:
    """Patch-level CutMix (Yun et al. 2019) for the patch-wise mixing loss (Gong et al. 2021, §4).

    Per image, λ ~ U(0, 1) (Beta(1, 1), DeiT's CutMix setting) and a box of
    round(g_h√(1−λ)) × round(g_w√(1−λ)) cells of the patch grid, at a uniform position inside
    it, is pasted from images_b into images_a. The box follows patch borders, so every grid token
    comes from exactly one image: `mask` says which, and `lam` is the exact share from images_a.
    generator: a torch.Generator for the draws (None: torch's global generator).
    """
    if images_a.shape != images_b.shape or images_a.ndim != 4:
        raise ValueError(
            f"images_a {tuple(images_a.shape)} and images_b {tuple(images_b.shape)} must be "
            "batches of the same shape (B, C, H, W)."
        )
    ph, pw = _pair(patch_size)
    bsz, _, height, width = images_a.shape
    if height % ph or width % pw:
        raise ValueError(
            f"images of {height}x{width} px do not split into {ph}x{pw} patches; resize or crop "
            f"them to a multiple of the patch size."
        )
    gh, gw = height // ph, width // pw
    where = generator.device if generator is not None else torch.device("cpu")
    lam = torch.rand(bsz, generator=generator, device=where)
    # Box sides round(g·√(1−λ)) placed uniformly inside the grid, rather than CutMix's clipped
    # box around a centre: on a grid of a few cells clipping would shrink most boxes.
    ratio = (1.0 - lam).sqrt()
    side_h, side_w = (gh * ratio).round().long(), (gw * ratio).round().long()
    u = torch.rand(2, bsz, generator=generator, device=where)
    y0 = (u[0] * (gh - side_h + 1)).floor().long().clamp_max(gh - side_h)
    x0 = (u[1] * (gw - side_w + 1)).floor().long().clamp_max(gw - side_w)
    y1, x1 = y0 + side_h, x0 + side_w
    rows = torch.arange(gh, device=where)[None, :]
    cols = torch.arange(gw, device=where)[None, :]
    in_rows = (rows >= y0[:, None]) & (rows < y1[:, None])
    in_cols = (cols >= x0[:, None]) & (cols < x1[:, None])
    grid = (in_rows[:, :, None] & in_cols[:, None, :]).to(images_a.device)  # (B, gh, gw)
    pixels = grid.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2)[:, None]
    mixed = torch.where(pixels, images_b, images_a)
    mask = grid.reshape(bsz, gh * gw)
    share_a = 1.0 - mask.to(torch.float32).mean(dim=1)
    return PatchMix(mixed, mask, share_a)


def patch_mixing_loss(
    token_logits: torch.Tensor,
    labels_a: torch.Tensor,
    labels_b: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Patch-wise mixing loss (Gong et al. 2021, §4; SPEC §9).

    L_mix = (1/n) Σ_i CE(g(h_i^[L]), y_i), averaged over the batch, where y_i is the label of the
    image patch i came from (labels_b where `mask`, else labels_a). The caller applies the
    paper's extra shared linear head g (an `nn.Linear(D, C)` trained with the model, not the
    classifier) to every last-layer grid token: token_logits = g(last), shape (B, n, C).
    mask: (B, n) bool from `patch_cutmix`; labels: (B,) class indices.
    """
    if token_logits.ndim != 3 or token_logits.shape[:2] != mask.shape:
        raise ValueError(
            f"token_logits {tuple(token_logits.shape)} must be (B, n, C) for a mask of shape "
            f"{tuple(mask.shape)}: apply the shared head to every grid token."
        )
    bsz, n, classes = token_logits.shape
    if labels_a.shape != (bsz,) or labels_b.shape != (bsz,):
        raise ValueError(
            f"labels_a {tuple(labels_a.shape)} and labels_b {tuple(labels_b.shape)} must hold "
            f"one class index per image ({bsz},)."
        )
    targets = torch.where(mask.bool(), labels_b[:, None], labels_a[:, None])
    # Every image has n tokens, so the mean over all B·n tokens is the mean over images of the
    # per-image mean over tokens.
    return F.cross_entropy(token_logits.reshape(bsz * n, classes), targets.reshape(bsz * n))
