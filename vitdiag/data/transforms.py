"""The model's evaluation transform at a size (timm's own), with the settings it was built from."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import timm.data
import torch
from PIL import Image

from vitdiag.errors import VitdiagError

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
_CROP_MODES = ("center", "squash", "border")


class EvalTransform:
    """timm's evaluation transform, plus the settings it was built from.

    Calling it is exactly calling ``timm.data.create_transform(is_training=False, ...)``; the
    extra attributes let loaders know the output ``size`` (synthetic data needs it) and let
    results record the preprocessing (``config``).
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], config: dict) -> None:
        self.transform = transform
        self.config = config
        self.size: tuple[int, int] = tuple(config["input_size"][1:])  # type: ignore[assignment]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transform(img)

    def _split(self) -> int:
        """Where the 8-bit PIL steps (resize, crop) end and the tensor steps begin."""
        steps = list(getattr(self.transform, "transforms", ()))
        for k, step in enumerate(steps):
            if "ToTensor" in type(step).__name__:
                return k
        raise ValueError(f"no ToTensor step in {self.transform!r}")

    def crop(self, img: Image.Image) -> Image.Image:
        """The PIL steps alone: the resized, cropped 8-bit image the model's input is made of.

        ``self.normalise(self.crop(img))`` is exactly ``self(img)``, so augmentations that work
        on 8-bit images can start from this crop instead of a denormalised tensor."""
        for step in self.transform.transforms[: self._split()]:
            img = step(img)
        return img

    def normalise(self, img: Image.Image) -> torch.Tensor:
        """The tensor steps alone (to tensor, normalise), applied to an 8-bit PIL image."""
        x: Any = img
        for step in self.transform.transforms[self._split() :]:
            x = step(x)
        return x

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, {self.transform!r})"


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    vals = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        raise VitdiagError(f"--{what} must be 1 or 3 finite numbers, got {value!r}.")
    return (vals[0], vals[1], vals[2])


def eval_transform(
    data_config: dict,
    size: int | tuple[int, int] | None = None,
    *,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
) -> EvalTransform:
    """The model's own evaluation transform (timm ``data_config``) at ``size``, each overridable.

    ``size`` is an int (square) or ``(height, width)``; None keeps ``data_config['input_size']``.
    """
    if crop_pct is not None and not (math.isfinite(crop_pct) and 0 < crop_pct <= 1):
        # Checked here, not only in the CLI: 0 used to fall through to the default silently.
        raise VitdiagError(
            f"--crop-pct must be a fraction in (0, 1], e.g. 0.875 or 1 for no crop, got {crop_pct}."
        )
    cfg = dict(data_config)
    if size is None:
        if "input_size" not in cfg:
            raise ValueError("data_config has no input_size and no size was given")
        h, w = (int(v) for v in cfg["input_size"][-2:])
    elif isinstance(size, int):
        h = w = size
    else:
        h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise VitdiagError(f"Image size must be positive, got {size!r}; pass --size N or H,W.")
    channels = int(cfg["input_size"][0]) if cfg.get("input_size") else 3
    cfg["input_size"] = (channels, h, w)
    for key, value in (
        ("mean", mean),
        ("std", std),
        ("interpolation", interpolation),
        ("crop_pct", crop_pct),
        ("crop_mode", crop_mode),
    ):
        if value is not None:
            cfg[key] = value
    cfg["mean"] = _triple(cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN), "mean")
    cfg["std"] = _triple(cfg.get("std", timm.data.IMAGENET_DEFAULT_STD), "std")
    if any(s <= 0 for s in cfg["std"]):
        raise VitdiagError(f"--std must be positive, got {cfg['std']}.")
    cfg["interpolation"] = cfg.get("interpolation") or "bicubic"
    if cfg["interpolation"] not in _INTERPOLATIONS:
        raise VitdiagError(
            f"--interpolation {cfg['interpolation']!r} is not one of {', '.join(_INTERPOLATIONS)}."
        )
    cfg["crop_pct"] = float(cfg.get("crop_pct") or timm.data.DEFAULT_CROP_PCT)
    if not cfg["crop_pct"] > 0:
        raise VitdiagError(f"--crop-pct must be positive, got {cfg['crop_pct']}.")
    cfg["crop_mode"] = cfg.get("crop_mode") or timm.data.DEFAULT_CROP_MODE
    if cfg["crop_mode"] not in _CROP_MODES:
        raise VitdiagError(
            f"--crop-mode {cfg['crop_mode']!r} is not one of {', '.join(_CROP_MODES)}."
        )
    transform = timm.data.create_transform(
        input_size=cfg["input_size"],
        is_training=False,
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg["crop_mode"],
    )
    config = {
        k: cfg[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    }
    return EvalTransform(transform, config)
