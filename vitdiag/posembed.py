"""Absolute position tables as pure table math: resample, rescale, measure, swap in.

SPEC §1 and §5. The grid part of a table is resampled with timm's own
``resample_abs_pos_embed`` (so a model resized here matches a model timm resized on load), then
multiplied by a factor c; prefix rows (class, distillation, register tokens) are never touched.
Two layouts exist: ``nlc`` tables (1, prefix + H·W, D) and PiT's channels-first (1, D, H, W),
which is turned into (1, H·W, D), resampled with no prefix rows, and turned back.

Nothing here builds, runs or writes a model: the workflows that do (the variance study,
fix-posembed) are `vitdiag.studies`, above the probes and the engine.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from vitdiag.errors import VitdiagError
from vitdiag.families import NCHW, Family, family_of, pos_prefix_rows

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
RESCALES = ("empirical", "sqrt-axis", "sqrt-area", "none")
REDUCTIONS = ("per-token", "global")


# ---------------------------------------------------------------------------------------------
# the table of a model


def require_abs_pos(model: Any, what: str = "this command") -> Family:
    """The model's family, or a one-sentence VitdiagError when it has no absolute table."""
    fam = family_of(model)
    if fam.pos_embed is None:
        raise VitdiagError(
            f"{what} does not apply to {fam.label} models: {fam.why_no_abs_pos}, "
            "so there is no table whose variance could shift."
        )
    if getattr(model, fam.pos_embed, None) is None:
        raise VitdiagError(
            f"{what} does not apply to this {fam.label} model: it was built without an "
            "absolute position table (pos_embed is None; positions come from elsewhere, e.g. RoPE)."
        )
    return fam


def require_rescalable(model: Any) -> Family:
    """require_abs_pos for fix-posembed: the same reason, plus the way out (--resize-only)."""
    try:
        return require_abs_pos(model, "vitdiag fix-posembed")
    except VitdiagError as e:
        raise VitdiagError(
            f"{str(e).rstrip('.')}; pass --resize-only to write it at the new size with nothing "
            "rescaled."
        ) from None


def resize_only_rescale(rescale: str | float | None) -> str:
    """The rescale method of --resize-only: `none`; any other --rescale contradicts it."""
    if rescale is None:
        return "none"
    method = parse_rescale(rescale) if isinstance(rescale, str) else float(rescale)
    if method not in ("none", 1.0):
        raise VitdiagError(
            f"--resize-only writes the table resampled with no rescale, so it cannot be "
            f"combined with --rescale {rescale}; drop one of the two."
        )
    return "none"


def table_of(model: Any) -> torch.Tensor:
    """The absolute position table as stored in the model (a Parameter)."""
    fam = require_abs_pos(model)
    return getattr(model, fam.pos_embed)


def layout_of(model: Any) -> str:
    return family_of(model).pos_layout


def table_grid(model: Any) -> tuple[int, int]:
    """(H, W) of the table's grid part, read from the table itself where its layout says it."""
    table = table_of(model)
    if layout_of(model) == NCHW:
        return int(table.shape[-2]), int(table.shape[-1])
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    n = table.shape[1] - pos_prefix_rows(model)
    if grid is not None and int(grid[0]) * int(grid[1]) == n:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(n)
    if side * side != n:
        raise VitdiagError(
            f"the position table has {n} grid rows, which is not a square grid, and the model "
            "does not say its grid size; give the checkpoint's img_size in config.json."
        )
    return side, side


def grid_tokens(table: torch.Tensor, *, layout: str, prefix_rows: int) -> torch.Tensor:
    """The grid rows of a table as (H·W, D), prefix rows left out."""
    if layout == NCHW:
        return table[0].flatten(1).transpose(0, 1)
    return table[0, prefix_rows:]


def antialias_for(interpolation: str) -> bool:
    # timm's default is antialias=True; torch only accepts it for bilinear/bicubic, and nearest
    # has nothing to anti-alias, so nearest runs without it.
    return interpolation in ("bilinear", "bicubic")


def resample_table(
    table: torch.Tensor,
    *,
    layout: str,
    prefix_rows: int,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    interpolation: str = "bicubic",
    antialias: bool | None = None,
) -> torch.Tensor:
    """The table with its grid resampled as timm does; prefix rows are the input's own rows.

    `antialias` None follows `antialias_for`; the loader passes what the architecture's own
    checkpoint filter uses (FlexiViT's, for one, is bilinear without antialias).
    """
    from timm.layers import resample_abs_pos_embed

    if interpolation not in INTERPOLATIONS:
        raise VitdiagError(
            f"--interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}."
        )
    if antialias is None:
        antialias = antialias_for(interpolation)
    table = table.detach()
    if layout == NCHW:
        d = table.shape[1]
        flat = table.flatten(2).transpose(1, 2)
        out = resample_abs_pos_embed(
            flat,
            new_size=list(new_grid),
            old_size=list(old_grid),
            num_prefix_tokens=0,
            interpolation=interpolation,
            antialias=antialias,
        )
        return out.transpose(1, 2).reshape(1, d, *new_grid).clone()
    out = resample_abs_pos_embed(
        table,
        new_size=list(new_grid),
        old_size=list(old_grid),
        num_prefix_tokens=prefix_rows,
        interpolation=interpolation,
        antialias=antialias,
    )
    # timm returns its input unchanged when the grid already fits; never hand out an alias.
    return out.clone()


def rescale_grid(table: torch.Tensor, c: float, *, layout: str, prefix_rows: int) -> torch.Tensor:
    """The table with its grid part multiplied by c (in float32, like timm's resampling)."""
    if c == 1.0:
        return table.clone()
    if layout == NCHW or prefix_rows == 0:
        return (table.float() * c).to(table.dtype)
    grid = (table[:, prefix_rows:].float() * c).to(table.dtype)
    return torch.cat([table[:, :prefix_rows], grid], dim=1)


def table_variance(tokens: torch.Tensor) -> dict[str, float]:
    """Variance of (n, D) tokens: over all entries, and across D per token then averaged."""
    t = tokens.detach().to(torch.float64)
    return {
        "global": float(t.var(unbiased=False)),
        "per_token": float(t.var(dim=-1, unbiased=False).mean()),
    }


def target_table(
    source_model: Any,
    target_model: Any,
    c: float = 1.0,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """source_model's table resampled to target_model's grid and its grid part scaled by c."""
    layout = layout_of(source_model)
    prefix = pos_prefix_rows(source_model)
    resampled = resample_table(
        table_of(source_model),
        layout=layout,
        prefix_rows=prefix,
        old_grid=table_grid(source_model),
        new_grid=table_grid(target_model),
        interpolation=interpolation,
    )
    return rescale_grid(resampled, c, layout=layout, prefix_rows=prefix)


def set_table(model: Any, table: torch.Tensor) -> None:
    """Copy `table` into the model's table in place (shapes must already agree)."""
    param = table_of(model)
    if tuple(param.shape) != tuple(table.shape):
        raise ValueError(f"table shape {tuple(table.shape)} does not fit {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(table.to(param.device, param.dtype))


@contextlib.contextmanager
def swapped_table(model: Any, table: torch.Tensor) -> Iterator[None]:
    """Run the model with another table of the same shape, then put the original back."""
    param = table_of(model)
    saved = param.data
    param.data = table.to(param.device, param.dtype)
    try:
        yield
    finally:
        param.data = saved


# ---------------------------------------------------------------------------------------------
# sizes and factors


def as_hw(size: Any, what: str = "size") -> tuple[int, int]:
    """(height, width) of 224, (224, 320), [224] or text such as '224', '224,320', '224x320';
    anything else, or a side below 1, is a VitdiagError naming `what` (an option or a file)."""
    import re

    try:
        if isinstance(size, str):
            parts = [p for p in re.split(r"[x,\s]+", size.strip()) if p]
            size = [int(p) for p in parts]
        if isinstance(size, (int, float)) and not isinstance(size, bool):
            size = (int(size), int(size))
        size = tuple(int(s) for s in size)
        if len(size) == 1:
            size = (size[0], size[0])
        if len(size) != 2 or min(size) <= 0:
            raise ValueError
        return size
    except (TypeError, ValueError):
        raise VitdiagError(
            f"{what} must be a positive size like 224 or 224,320, got {size!r}."
        ) from None


def size_label(size: Any) -> str:
    h, w = as_hw(size)
    return str(h) if h == w else f"{h}x{w}"


def k_readings(size: Any, native: Any) -> tuple[float, float]:
    """The textbook readings of k: per-axis s/s0 and area (s/s0)².

    For non-square sizes the area ratio is (h·w)/(h0·w0) and the per-axis ratio its square root.
    """
    h, w = as_hw(size)
    h0, w0 = as_hw(native)
    area = (h * w) / (h0 * w0)
    return math.sqrt(area), area


def rescale_factor(
    method: str | float,
    *,
    size: Any,
    native: Any,
    r: float | None = None,
    r0: float | None = None,
) -> float:
    """c for a rescale method: `none` 1, `sqrt-axis` 1/√(s/s0), `sqrt-area` s0/s,
    `empirical` √(r/r0) = 1/√k̂ (restores r0), or a number given as is."""
    if isinstance(method, (int, float)) and not isinstance(method, bool):
        return float(method)
    axis, area = k_readings(size, native)
    if method == "none":
        return 1.0
    if method == "sqrt-axis":
        return 1.0 / math.sqrt(axis)
    if method == "sqrt-area":
        return 1.0 / math.sqrt(area)
    if method == "empirical":
        if r is None or r0 is None:
            raise VitdiagError(
                "--rescale empirical measures c on images: give --data DIR, or choose "
                "sqrt-axis, sqrt-area, none or a number."
            )
        return math.sqrt(r / r0)
    raise VitdiagError(
        f"--rescale {method!r} is not known; use empirical, sqrt-axis, sqrt-area, none or a "
        "positive number."
    )


def parse_rescale(text: str) -> str | float:
    """A rescale method name or a positive finite number."""
    t = text.strip().lower()
    if t in RESCALES:
        return t
    try:
        value = float(t)
    except ValueError:
        raise VitdiagError(
            f"--rescale {text!r} is not known; use empirical, sqrt-axis, sqrt-area, none or a "
            "positive number."
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise VitdiagError(f"--rescale must be a positive finite number, got {text!r}.")
    return value


def parse_interpolations(text: str | None) -> list[str]:
    """A comma list of table interpolations; the first is the one models are built with."""
    if text is None:
        return ["bicubic"]
    items = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [v for v in items if v not in INTERPOLATIONS]
    if not items or bad:
        raise VitdiagError(
            f"--interpolation {text!r}: use one or more of {', '.join(INTERPOLATIONS)}, "
            "comma-separated."
        )
    return list(dict.fromkeys(items))
