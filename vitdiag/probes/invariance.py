"""Invariance (Linv) and diversity (Ldiv) of augmented views, definition "vitdiag-v1" (SPEC §3).

f(x) is the L2-normalised embedding (pre-logits, the final-norm class token, or the mean of the
final-norm grid tokens). For each image x and V ≥ 2 independent views t_v(x):

    Linv = mean over x, v       of cos(f(x), f(t_v(x)))
    Ldiv = 1 − mean over x, v<v' of cos(f(t_v(x)), f(t_v'(x)))

The clean embedding is the engine's shared forward; the V views of one augmentation go through
one extra forward (V·B images). Per augmentation the probe keeps four float64 sums (Σ cos
clean↔view, their count, Σ cos view↔view, their count) and a count of images skipped, so runs
on several processes add up. How views are seeded is described in `vitdiag.augmentations`;
pixel-space views are made by the loader's workers (`loader_views`), the others here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vitdiag.augmentations import (
    AUGMENTATIONS,
    DEFAULT_ALPHA,
    PIXEL,
    Augmentation,
    WorkerViews,
    build_augmentation,
    normalise_uint8,
    parse_alpha,
    parse_augmentations,
)
from vitdiag.errors import VitdiagError
from vitdiag.probes.base import FEATURES, PRELOGITS, TRAIN, Probe, Taps, global_indices
from vitdiag.results import Result, Table

DEFINITION = "vitdiag-v1"
EMBEDDINGS = ("prelogits", "cls", "gap")

# Slots of each augmentation's sum state.
_INV, _N_INV, _DIV, _N_DIV, _SKIPPED = range(5)


def embedding_layout(model: torch.nn.Module) -> tuple[str, int]:
    """(layout, number of prefix tokens) of `forward_features`' output, from the family table.

    The final-norm tap describes exactly that tensor; families without one (CNNs) fall back to
    their last tap.
    """
    from vitdiag.families import NLC, family_of, num_prefix_tokens

    try:
        taps = family_of(model).layer_taps(model)
    except VitdiagError:
        taps = []
    for tap in taps:
        if tap.name == "norm":
            return tap.layout, tap.num_prefix
    if taps:
        return taps[-1].layout, taps[-1].num_prefix
    return NLC, num_prefix_tokens(model)


def require_class_token(model: torch.nn.Module) -> None:
    """Refuse `--embedding cls` on a model without a class token: with register tokens only,
    row 0 of the sequence is a register, which is not what was asked for."""
    from vitdiag.families import class_token_row, num_prefix_tokens

    if class_token_row(model) is None:
        why = " (its prefix tokens are register tokens)" if num_prefix_tokens(model) else ""
        raise VitdiagError(
            f"--embedding cls needs a class token, and this model has none{why}; "
            "use --embedding gap or --embedding prelogits."
        )


def embed(
    kind: str, features: Any, prelogits: torch.Tensor | None, layout: str, num_prefix: int
) -> torch.Tensor:
    """The unnormalised embedding (B, D) of `kind` from a forward's outputs."""
    from vitdiag.families import NCHW, NHWC, NLC

    if kind == "prelogits":
        if prelogits is None:
            raise ValueError("prelogits were not computed")
        return prelogits.flatten(1)
    if not isinstance(features, torch.Tensor):
        raise VitdiagError(
            f"--embedding {kind} needs the token sequence, but this model's forward_features "
            "does not return one tensor; use --embedding prelogits."
        )
    if kind == "cls":
        if layout != NLC or num_prefix < 1:
            raise VitdiagError(
                "--embedding cls needs a class token, and this model has none; "
                "use --embedding gap or prelogits."
            )
        return features[:, 0]
    if kind == "gap":
        if layout == NLC:
            grid = features[:, num_prefix:]
            if grid.shape[1] == 0:
                raise VitdiagError(
                    "--embedding gap needs grid tokens after the final norm, and this model "
                    "keeps only prefix tokens there; use --embedding cls or prelogits."
                )
            return grid.mean(dim=1)
        if layout == NHWC:
            return features.mean(dim=(1, 2))
        if layout == NCHW:
            return features.mean(dim=(2, 3))
        raise ValueError(f"unknown layout {layout}")
    raise VitdiagError(f"--embedding {kind!r} is not known; use {', '.join(EMBEDDINGS)}.")


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.double(), dim=-1)


class InvarianceProbe(Probe):
    """Linv and Ldiv of each augmentation (SPEC §3, definition "vitdiag-v1").

    ``augmentations``: names from `vitdiag.augmentations.AUGMENTATIONS` (or a comma list), or
    `Augmentation` objects. ``mean``/``std``/``size``/``interpolation`` describe the batch the
    engine hands over (the eval transform); when left out they come from the loaded model's
    ``data_config`` at the first batch.
    """

    name = "invariance"
    title = "Invariance and diversity of augmented views"
    order = 7
    split = TRAIN
    headlines = (r".+\.linv",)
    headline_rank = 6
    check_metrics = ("<aug>.linv", "<aug>.ldiv")

    @classmethod
    def build(cls, loaded: Any, settings: Any, transform: Any) -> InvarianceProbe:
        cfg = transform.config  # the batches' own normalisation and size
        return cls(
            parse_augmentations(settings.aug),
            views=settings.views,
            embedding=settings.embedding,
            alpha=parse_alpha(settings.alpha),
            mean=cfg["mean"],
            std=cfg["std"],
            size=tuple(cfg["input_size"][1:]),
            interpolation=cfg["interpolation"],
            seed=settings.seed,
        )

    def __init__(
        self,
        augmentations: str | Sequence[str | Augmentation] = AUGMENTATIONS,
        *,
        views: int = 4,
        embedding: str = "prelogits",
        alpha: dict[str, float] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        size: int | tuple[int, int] | None = None,
        interpolation: str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(views, int) or views < 2:
            raise VitdiagError(
                f"--views must be at least 2 (Ldiv compares views with each other), got {views}."
            )
        if embedding not in EMBEDDINGS:
            raise VitdiagError(
                f"--embedding {embedding!r} is not known; use {', '.join(EMBEDDINGS)}."
            )
        if isinstance(augmentations, str):
            augmentations = parse_augmentations(augmentations)
        specs = list(augmentations)
        names = [parse_augmentations([a])[0] if isinstance(a, str) else a.name for a in specs]
        if not specs:
            raise VitdiagError("give at least one augmentation.")
        if len(set(names)) != len(names):
            raise VitdiagError(f"augmentations must have distinct names, got {names}.")
        self.specs = specs
        self.aug_names = names
        self.views = views
        self.embedding = embedding
        self.alpha = {**DEFAULT_ALPHA, **(alpha or {})}
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.size = size
        self.interpolation = interpolation
        self.seed = seed
        self.needs = frozenset({PRELOGITS} | ({FEATURES} if embedding != "prelogits" else set()))
        self._augs: list[Augmentation] | None = None
        self._layout: tuple[str, int] | None = None
        self._in_workers = False  # whether views came from the loader's workers
        self._seen = 0  # images seen: the next position, for batches without the engine's
        for i in range(len(specs)):
            self.add_sum_state(f"sums{i}", (5,))

    # -- setup at the first batch, when the device and model are known -------------------------
    def _setup(self, taps: Taps) -> None:
        ctx = taps.context
        cfg = dict(getattr(getattr(ctx, "loaded", None), "data_config", None) or {})
        mean = self.mean or tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        std = self.std or tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        size = self.size or tuple(int(v) for v in taps.images.shape[-2:])
        interpolation = self.interpolation or cfg.get("interpolation") or "bicubic"
        self.mean, self.std, self.size, self.interpolation = mean, std, size, interpolation
        self._augs = [
            spec
            if isinstance(spec, Augmentation)
            else build_augmentation(
                name,
                size=size,
                mean=mean,
                std=std,
                interpolation=interpolation,
                device=ctx.device,
                alpha=self.alpha,
            )
            for spec, name in zip(self.specs, self.aug_names, strict=True)
        ]
        self._layout = embedding_layout(ctx.model)
        if self.embedding == "cls":
            require_class_token(ctx.model)

    def loader_views(self) -> WorkerViews | None:
        """The maker of this probe's pixel-space views for the loader's workers (None when the
        batches' size and normalisation are not known up front). Per-image tensor augmentations
        (erasing, cutout) and the mixing ones stay here: they run on the device, as timm applies
        random erasing, and mixing needs a partner from the batch."""
        if self.size is None or self.mean is None or self.std is None or self.seed is None:
            return None
        names = [
            name
            for spec, name in zip(self.specs, self.aug_names, strict=True)
            if isinstance(spec, str) and name in PIXEL
        ]
        if not names:
            return None
        return WorkerViews(
            names,
            views=self.views,
            seed=self.seed,
            size=self.size,
            mean=self.mean,
            std=self.std,
            interpolation=self.interpolation or "bicubic",
            prefix="invariance/",
        )

    def update(self, taps: Taps) -> None:
        if self._augs is None:
            self._setup(taps)
        assert self._augs is not None and self._layout is not None
        ctx = taps.context
        images = taps.images
        b, v = images.shape[0], self.views
        # Seeds follow the image's index in its source when the loader says it (so views match
        # the workers' ones), else its place in the stream: the same whatever the process count.
        positions = global_indices(taps, self._seen).tolist()
        made = getattr(taps, "views", None) or {}
        seed = ctx.seed if self.seed is None else self.seed
        self._seen += b
        with torch.inference_mode():
            clean = _normalise(embed(self.embedding, taps.features, taps.prelogits, *self._layout))
            for i, aug in enumerate(self._augs):
                sums = getattr(self, f"sums{i}")
                if aug.mixing and b < 2:
                    sums[_SKIPPED] += b
                    continue
                key = f"invariance/{aug.name}"
                if key in made:
                    batch = self._worker_views(made[key], images)
                    self._in_workers = True
                else:
                    batch = torch.cat(
                        [aug(images, seed=seed, positions=positions, view=k) for k in range(v)]
                    )
                feats, pre, _ = ctx.forward(batch)
                f = _normalise(embed(self.embedding, feats, pre, *self._layout))
                f = f.view(v, b, -1)
                sums[_INV] += (f * clean.unsqueeze(0)).sum().cpu()
                sums[_N_INV] += v * b
                # Σ_{v<v'} f_v·f_v' = (‖Σ_v f_v‖² − Σ_v ‖f_v‖²) / 2, per image. ‖f_v‖ is 1
                # except for an all-zero embedding, so the squares are summed, not assumed.
                total = f.sum(dim=0)
                pair = ((total * total).sum() - (f * f).sum()) / 2
                sums[_DIV] += pair.cpu()
                sums[_N_DIV] += b * v * (v - 1) // 2

    def _worker_views(self, views: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """(B, V, C, H, W) from the loader → (V·B, C, H, W) view-major, normalised, on the
        device of the clean batch."""
        b, v = views.shape[:2]
        views = views.to(images.device, non_blocking=True).transpose(0, 1)
        views = views.reshape(v * b, *views.shape[2:])
        if views.dtype == torch.uint8:
            assert self.mean is not None and self.std is not None
            views = normalise_uint8(views, self.mean, self.std)
        return views.to(images.dtype)

    def compute(self) -> Result:
        metrics: dict[str, float] = {}
        rows: list[list[Any]] = []
        per_aug: dict[str, dict[str, Any]] = {}
        notes: list[str] = []
        for i, name in enumerate(self.aug_names):
            s = getattr(self, f"sums{i}")
            n_inv, n_div = float(s[_N_INV]), float(s[_N_DIV])
            linv = float(s[_INV]) / n_inv if n_inv else float("nan")
            ldiv = 1.0 - float(s[_DIV]) / n_div if n_div else float("nan")
            images = int(round(n_inv / self.views))
            skipped = int(s[_SKIPPED])
            metrics[f"{name}.linv"] = linv
            metrics[f"{name}.ldiv"] = ldiv
            rows.append([name, linv, ldiv, images, self.views])
            desc = self._augs[i].describe() if self._augs is not None else {"name": name}
            per_aug[name] = {
                "linv": linv,
                "ldiv": ldiv,
                "images": images,
                "views": self.views,
                "skipped_images": skipped,
                **{k: v for k, v in desc.items() if k != "name"},
            }
            if skipped:
                notes.append(
                    f"{name}: {skipped} image(s) were alone in their batch, so had no mixing "
                    "partner, and were left out; use a --batch-size that does not leave a single "
                    "image in the last batch."
                )
        if self._in_workers:
            notes.append(
                "pixel-space augmentations run on the eval transform's 8-bit crop (resized and "
                "centre-cropped), in the data loader's worker processes."
            )
        else:
            notes.append(
                "pixel-space augmentations run on 8-bit images (denormalise, clamp to [0, 1], "
                "round to uint8, augment, renormalise) of the eval-preprocessed crop."
            )
        return Result(
            probe="invariance",
            definition=DEFINITION,
            metrics=metrics,
            tables=[
                Table(
                    f"Invariance and diversity ({DEFINITION}, embedding={self.embedding})",
                    ["augmentation", "Linv", "Ldiv", "images", "views"],
                    rows,
                )
            ],
            notes=notes,
            extra={
                "augmentations": per_aug,
                "embedding": self.embedding,
                "alpha": {k: self.alpha[k] for k in DEFAULT_ALPHA},
                "views": self.views,
                "mean": list(self.mean) if self.mean else None,
                "std": list(self.std) if self.std else None,
                "size": list(self.size) if isinstance(self.size, tuple) else self.size,
                "interpolation": self.interpolation,
                "seeding": "view v of the image with index p in its source (its stream position "
                "for batches without indices): Python, NumPy and torch seeded with "
                "vitdiag.augmentations.view_seed(seed, augmentation, p, v)",
            },
        )
