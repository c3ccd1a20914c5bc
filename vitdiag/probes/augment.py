"""Augmentation audit for variance shift (SPEC §1, second half; arXiv 2405.14115 guidelines).

On real, normalised batches: how much each training augmentation changes the variance of the
input (and of X = patch_embed(input) when a model is given), the data's per-channel mean/std
after normalisation, and the paper's guideline flags.

Variances, each the augmented batch over the same clean images (so the ratio compares like with
like, image for image):

- image, global: over all entries (ddof=0);
- image, per-patch: across the C·p·p values of each non-overlapping p×p patch, averaged —
  the pixel-space view of what one token carries (p = the model's patch size, else 16);
- X, global and per-token (across D, averaged), as in the variance-shift probe.

Why per-patch as well as global: `rand` erasing fills a box with one N(0, 1) value per channel,
which keeps the global variance of N(0, 1) data (the fill is N(0, 1) across images) but leaves
no variance inside a patch; only the local reduction sees it, as LayerNorm does.

The augmentations are the implementations in ``vitdiag.augmentations`` (shared with
`vitdiag invariance`): Mixup/CutMix with λ ~ Beta(α, α) drawn per image and the partner from a
seeded cyclic permutation of the batch; random erasing is timm's ``RandomErasing`` with the
configured probability and mode, made on the real device, seeded per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vitdiag.errors import VitdiagError
from vitdiag.probes.base import Probe, Taps, global_indices
from vitdiag.probes.variance import patch_tokens, variance_sums, variances_from_sums
from vitdiag.results import Result, Table

DEFINITION = "augment-variance-v1"
ERASE_MODES = ("const", "rand", "pixel")
# A normalisation "fits" the data when every channel has |mean| ≤ 0.2 and std within 20% of 1
# after it; only then does pixel-mode erasing (fresh N(0, 1) per pixel) keep the variance.
FIT_MEAN = 0.2
FIT_STD = 0.2
DEFAULT_PATCH = 16


def mixup_expected(alpha: float) -> float:
    """E[λ² + (1−λ)²] for λ ~ Beta(α, α): the variance factor of Mixup on independent inputs."""
    return (alpha + 1.0) / (2.0 * alpha + 1.0)


@dataclass(frozen=True)
class AugSpec:
    """One augmentation to measure: name, settings, whether the user configured it."""

    kind: str  # mixup | cutmix | erasing
    alpha: float = 0.0
    prob: float = 1.0
    mode: str = ""
    configured: bool = True

    @property
    def name(self) -> str:
        return f"erasing-{self.mode}" if self.kind == "erasing" else self.kind

    @property
    def setting(self) -> str:
        if self.kind == "erasing":
            return f"p={self.prob:g}"
        return f"α={self.alpha:g}"

    @property
    def mixing(self) -> bool:
        return self.kind in ("mixup", "cutmix")

    def expected(self) -> float:
        """The factor on independent, unit-variance, zero-mean inputs (NaN where it depends)."""
        if self.kind == "mixup":
            return mixup_expected(self.alpha)
        if self.kind == "cutmix" or (self.kind == "erasing" and self.mode == "pixel"):
            return 1.0
        return math.nan


@dataclass
class AugmentConfig:
    """What was asked for, from args.yaml and the command line (the latter wins)."""

    mixup: float = 0.0
    cutmix: float = 0.0
    reprob: float = 0.0
    remode: str = "pixel"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def anything(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.reprob > 0


def read_train_args(path: Any) -> dict[str, Any]:
    """The augmentation keys of a timm train.py args.yaml (mixup, cutmix, reprob, remode,
    mean, std); missing keys are left out."""
    from pathlib import Path

    from vitdiag.loading.checkpoint import read_args_yaml

    data = read_args_yaml(Path(path).expanduser(), option=f"--train-args {path}")
    return {k: data[k] for k in ("mixup", "cutmix", "reprob", "remode", "mean", "std") if k in data}


def resolve_config(
    train_args: dict[str, Any] | None = None,
    *,
    mixup: float | None = None,
    cutmix: float | None = None,
    reprob: float | None = None,
    remode: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> AugmentConfig:
    """Merge args.yaml values with command-line ones (command line wins), validated."""
    cfg = AugmentConfig()
    ta = dict(train_args or {})

    def pick(key: str, cli: Any) -> Any:
        if cli is not None:
            cfg.sources[key] = "command line"
            return cli
        if ta.get(key) is not None:
            cfg.sources[key] = "args.yaml"
            return ta[key]
        return None

    for key, cli in (("mixup", mixup), ("cutmix", cutmix), ("reprob", reprob)):
        v = pick(key, cli)
        if v is None:
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise VitdiagError(f"{key} must be a number, got {v!r}.") from None
        if not (math.isfinite(v) and v >= 0):
            raise VitdiagError(f"{key} must be 0 or more, got {v}.")
        if key == "reprob" and v > 1:
            raise VitdiagError(f"reprob is a probability (0 to 1), got {v}.")
        setattr(cfg, key, v)
    mode = pick("remode", remode)
    if mode is not None:
        mode = str(mode).lower()
        if mode not in ERASE_MODES:
            raise VitdiagError(f"remode {mode!r} is not one of {', '.join(ERASE_MODES)}.")
        cfg.remode = mode
    for key, cli in (("mean", mean), ("std", std)):
        v = pick(key, cli)
        if v is None:
            continue
        vals = [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]
        if len(vals) == 1:
            vals *= 3
        if len(vals) != 3:
            raise VitdiagError(f"{key} needs 1 or 3 numbers, got {v!r}.")
        setattr(cfg, key, tuple(vals))
    return cfg


def specs_for(cfg: AugmentConfig) -> tuple[list[AugSpec], bool]:
    """The rows to measure and whether they are a reference set (nothing configured).

    Erasing is measured in all three modes at the configured probability, the configured mode
    marked, so the other two stand beside it for comparison.
    """
    if not cfg.anything:
        ref = [
            AugSpec("mixup", alpha=0.8, configured=False),
            AugSpec("cutmix", alpha=1.0, configured=False),
        ]
        ref += [AugSpec("erasing", prob=0.25, mode=m, configured=False) for m in ERASE_MODES]
        return ref, True
    specs: list[AugSpec] = []
    if cfg.mixup > 0:
        specs.append(AugSpec("mixup", alpha=cfg.mixup))
    if cfg.cutmix > 0:
        specs.append(AugSpec("cutmix", alpha=cfg.cutmix))
    if cfg.reprob > 0:
        modes = [cfg.remode, *[m for m in ERASE_MODES if m != cfg.remode]]
        for m in modes:
            specs.append(AugSpec("erasing", prob=cfg.reprob, mode=m, configured=m == cfg.remode))
    return specs, False


def patch_view(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) → (B, n, C·p·p): non-overlapping p×p patches (a remainder is dropped,
    as a stride-p convolution drops it)."""
    b, c, h, w = images.shape
    p = max(1, min(patch, h, w))
    x = images[:, :, : h - h % p, : w - w % p]
    x = x.unfold(2, p, p).unfold(3, p, p)  # (B, C, H/p, W/p, p, p)
    return x.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * p * p)


class _Erasing:
    """timm RandomErasing with probability `prob`, one seeded draw per image."""

    def __init__(self, spec: AugSpec, device: torch.device) -> None:
        from timm.data.random_erasing import RandomErasing

        from vitdiag.augmentations import PerImageAugmentation

        # timm's default device is 'cuda': the fill must be made where the images are.
        erase = RandomErasing(probability=spec.prob, mode=spec.mode, device=device)
        self.aug = PerImageAugmentation(
            spec.name, lambda img: erase(img.clone()), repr(erase), device
        )

    def __call__(self, images: torch.Tensor, *, seed: int, positions: Sequence[int]) -> Any:
        return self.aug(images, seed=seed, positions=positions, view=0)


class _Mixing:
    def __init__(self, spec: AugSpec) -> None:
        from vitdiag.augmentations import MixAugmentation

        self.aug = MixAugmentation(spec.kind, spec.alpha)

    def __call__(self, images: torch.Tensor, *, seed: int, positions: Sequence[int]) -> Any:
        return self.aug(images, seed=seed, positions=positions, view=0)


class AugmentAuditProbe(Probe):
    """Variance of each augmented batch against the same clean images; per-channel data stats."""

    name = "augment"
    needs: frozenset[str] = frozenset()

    def __init__(
        self,
        specs: Sequence[AugSpec],
        *,
        device: torch.device | str = "cpu",
        patch_model: Any = None,
        patch: int = DEFAULT_PATCH,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.specs = list(specs)
        self.device = torch.device(device)
        self.model = patch_model
        self.patch = int(patch)
        self.seed = int(seed)
        self.position = 0  # images seen: the next position, for batches without the engine's
        self.augs = [
            _Erasing(s, self.device) if s.kind == "erasing" else _Mixing(s) for s in self.specs
        ]
        k = len(self.specs)
        # per augmentation: [image clean, image augmented, X clean, X augmented] × 5 sums
        self.add_sum_state("sums", (max(1, k), 4, 5))
        self.add_sum_state("n_images", (max(1, k),))
        self.add_sum_state("skipped", (max(1, k),))
        self.add_sum_state("channel", (3, 3))  # per channel: Σx, Σx², n

    def _sums(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        img = variance_sums(patch_view(images, self.patch))
        if self.model is None:
            return img, None
        with torch.inference_mode():
            x = patch_tokens(self.model, images)
        return img, variance_sums(x)

    def update(self, taps: Taps) -> None:
        images = taps.images.float()
        b, c = images.shape[:2]
        # The image's index in its source when the loader gives it (the same whatever the
        # --limit sample, shard or batch), else its place in the stream: each image gets the
        # same erasing draw whatever the number of processes.
        positions = global_indices(taps, self.position).tolist()
        self.position += b
        if c == 3:
            flat = images.transpose(0, 1).reshape(3, -1)
            flat = (flat.cpu() if flat.device.type == "mps" else flat).double()
            n = torch.full((3,), float(flat.shape[1]), dtype=torch.float64)
            self.channel += torch.stack([flat.sum(1).cpu(), flat.pow(2).sum(1).cpu(), n], 1)
        clean_img, clean_x = self._sums(images)
        for i, (spec, aug) in enumerate(zip(self.specs, self.augs, strict=True)):
            if spec.mixing and b < 2:
                self.skipped[i] += b  # a lone image has no partner to mix with
                continue
            out = aug(images, seed=self.seed, positions=positions)
            img, x = self._sums(out)
            self.sums[i, 0] += clean_img
            self.sums[i, 1] += img
            if x is not None:
                self.sums[i, 2] += clean_x
                self.sums[i, 3] += x
            self.n_images[i] += b

    # -- results --------------------------------------------------------------------------
    def ratios(self, i: int) -> dict[str, float]:
        v = [variances_from_sums(self.sums[i, j]) for j in range(4)]
        out = {
            "image_global": _ratio(v[1]["global"], v[0]["global"]),
            "image_patch": _ratio(v[1]["per_token"], v[0]["per_token"]),
        }
        if self.model is not None:
            out["x_global"] = _ratio(v[3]["global"], v[2]["global"])
            out["x_token"] = _ratio(v[3]["per_token"], v[2]["per_token"])
        return out

    def channel_stats(self) -> tuple[list[float], list[float]]:
        s, sq, n = self.channel[:, 0], self.channel[:, 1], self.channel[:, 2]
        if float(n.min()) == 0:
            return [math.nan] * 3, [math.nan] * 3
        mean = s / n
        std = (sq / n - mean**2).clamp_min(0).sqrt()
        return [float(v) for v in mean], [float(v) for v in std]

    def compute(self) -> Result:
        return audit_result(self, AugmentConfig(), reference=False)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def normalisation_fits(mean: Sequence[float], std: Sequence[float]) -> bool:
    return all(abs(m) <= FIT_MEAN for m in mean) and all(abs(s - 1) <= FIT_STD for s in std)


def audit_result(
    probe: AugmentAuditProbe,
    cfg: AugmentConfig,
    *,
    reference: bool,
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Result:
    """The audit's Result: the ratio table, the data table, the guideline flags."""
    metrics: dict[str, float] = {}
    notes: list[str] = []
    tables = [_ratio_table(probe, reference, metrics, notes)]
    mean, std = probe.channel_stats()
    tables.append(_data_table(mean, std, normalisation, metrics))
    fits = normalisation_fits(mean, std)
    flags = _guideline_flags(cfg, mean, std, fits)
    if not fits and not any(f[0] == "pixel-normalisation" for f in flags):
        notes.append(
            f"after this normalisation the data has mean {_fmt3(mean)} and std {_fmt3(std)}, "
            "not ≈0 and ≈1: pixel-mode erasing would change its variance."
        )
    for name in ("mixup", "erasing-mode", "pixel-normalisation"):
        metrics[f"flag/{name}"] = float(any(f[0] == name for f in flags))
    if flags:
        tables.append(Table("Guideline flags (arXiv 2405.14115)", ["flag", "why"], flags))
    elif not reference:
        notes.append("no guideline flag: the configured augmentations keep the variance.")
    notes += _scope_notes(probe, reference)
    return Result(
        probe="augment",
        definition=DEFINITION,
        metrics=metrics,
        tables=tables,
        notes=notes,
        extra=_audit_extra(probe, cfg),
    )


def _ratio_table(
    probe: AugmentAuditProbe, reference: bool, metrics: dict[str, float], notes: list[str]
) -> Table:
    """The variance ratio of each augmentation (its metrics and notes added to the given ones)."""
    has_x = probe.model is not None
    cols = ["augmentation", "setting", "expected", "image", "patch"]
    if has_x:
        cols += ["X", "X token"]
    rows = []
    for i, spec in enumerate(probe.specs):
        r = probe.ratios(i)
        exp = spec.expected()
        for k, v in r.items():
            metrics[f"ratio_{k}/{spec.name}"] = v
        metrics[f"expected/{spec.name}"] = exp
        row = [
            spec.name if spec.configured else f"({spec.name})",
            spec.setting,
            exp,
            r["image_global"],
            r["image_patch"],
        ]
        if has_x:
            row += [r["x_global"], r["x_token"]]
        rows.append(row)
        if float(probe.skipped[i]):
            notes.append(
                f"{spec.name}: {int(probe.skipped[i])} image(s) in one-image batches had no "
                "partner and were left out of its ratio."
            )
    title = (
        "Variance ratio, augmented / clean batch (same images). image: all entries; patch: "
        f"within each {probe.patch}px patch"
        + ("; X: patch_embed output, all entries; X token: within each token" if has_x else "")
        + "; expected: on independent unit-variance images; (name): not configured, "
        + ("a reference set" if reference else "measured for comparison")
    )
    return Table(title, cols, rows)


def _data_table(
    mean: list[float],
    std: list[float],
    normalisation: tuple[Sequence[float], Sequence[float]] | None,
    metrics: dict[str, float],
) -> Table:
    """The data's per-channel mean and std after normalisation, beside the normalisation used
    (its metrics added to the given ones)."""
    norm_mean, norm_std = normalisation or ([math.nan] * 3, [math.nan] * 3)
    data_rows = []
    for ch in range(3):
        metrics[f"data_mean/{ch}"] = mean[ch]
        metrics[f"data_std/{ch}"] = std[ch]
        data_rows.append([ch, mean[ch], std[ch], norm_mean[ch], norm_std[ch]])
    return Table(
        "The data after normalisation (pixel erasing needs mean≈0, std≈1)",
        ["channel", "mean", "std", "normalised with mean", "std"],
        data_rows,
    )


def _guideline_flags(
    cfg: AugmentConfig, mean: list[float], std: list[float], fits: bool
) -> list[list[str]]:
    """[flag, why] for each of the paper's guidelines the configuration breaks."""
    flags: list[list[str]] = []
    if cfg.mixup > 0:
        flags.append(
            [
                "mixup",
                f"Mixup α={cfg.mixup:g} scales the input variance by about "
                f"{mixup_expected(cfg.mixup):.2f} on independent images, so the position "
                "table's share at the first LayerNorm differs between training and test; the "
                "paper recommends CutMix instead.",
            ]
        )
    if cfg.reprob > 0 and cfg.remode in ("const", "rand"):
        flags.append(
            [
                "erasing-mode",
                f"random erasing mode {cfg.remode!r} fills boxes with "
                + ("zeros" if cfg.remode == "const" else "one value per channel")
                + ", which removes variance inside them; use --remode pixel with a "
                "normalisation that fits the data.",
            ]
        )
    if cfg.reprob > 0 and cfg.remode == "pixel" and not fits:
        flags.append(
            [
                "pixel-normalisation",
                "pixel-mode erasing fills N(0, 1), but after this normalisation the data has "
                f"mean {_fmt3(mean)} and std {_fmt3(std)}; normalise with the data's own "
                "mean/std so the fill matches it.",
            ]
        )
    return flags


def _scope_notes(probe: AugmentAuditProbe, reference: bool) -> list[str]:
    """What the measurement covers and leaves out."""
    notes = []
    if reference:
        notes.append(
            "no augmentation was configured (--train-args, --mixup, --cutmix, --reprob): a "
            "reference set was measured and no flags apply."
        )
    if any(s.kind == "mixup" for s in probe.specs):
        notes.append(
            "Mixup is measured on every image; timm's mixup_prob and switch_prob (with CutMix) "
            "dilute its effect in proportion."
        )
    if probe.model is None:
        notes.append("give --ckpt to measure X = patch_embed(image) as well.")
    return notes


def _audit_extra(probe: AugmentAuditProbe, cfg: AugmentConfig) -> dict[str, Any]:
    return {
        "augmentations": [
            {
                "name": s.name,
                "kind": s.kind,
                "alpha": s.alpha,
                "prob": s.prob,
                "mode": s.mode,
                "configured": s.configured,
                "n_images": float(probe.n_images[i]),
            }
            for i, s in enumerate(probe.specs)
        ],
        "config": {
            "mixup": cfg.mixup,
            "cutmix": cfg.cutmix,
            "reprob": cfg.reprob,
            "remode": cfg.remode,
            "sources": cfg.sources,
        },
        "patch": probe.patch,
        "fit_rule": f"|mean| <= {FIT_MEAN} and |std - 1| <= {FIT_STD} in every channel",
    }


def _fmt3(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in values) + ")"


class NoNetwork(torch.nn.Module):
    """The engine's model for the audit: the audit needs no network forward (it runs the patch
    embedding itself, on clean and augmented batches), yet the engine gives it devices,
    progress and cross-process sums for free."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def patch_size_of(model: Any) -> int:
    p = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if p is None:
        return DEFAULT_PATCH
    return int(p[0]) if isinstance(p, (tuple, list)) else int(p)
