"""Absolute position tables: resample, rescale, measure, write a checkpoint plain timm can load.

SPEC §1 and §5. The grid part of a table is resampled with timm's own
``resample_abs_pos_embed`` (so a model resized here matches a model timm resized on load), then
multiplied by a factor c; prefix rows (class, distillation, register tokens) are never touched.
Two layouts exist: ``nlc`` tables (1, prefix + H·W, D) and PiT's channels-first (1, D, H, W),
which is turned into (1, H·W, D), resampled with no prefix rows, and turned back.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitdiag.errors import VitdiagError
from vitdiag.families import NCHW, Family, family_of, has_abs_pos_table, pos_prefix_rows

if TYPE_CHECKING:
    from vitdiag.model import LoadedModel

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
RESCALES = ("empirical", "sqrt-axis", "sqrt-area", "none")
REDUCTIONS = ("per-token", "global")
FORMATS = ("safetensors", "pth")


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
) -> torch.Tensor:
    """The table with its grid resampled as timm does; prefix rows are the input's own rows."""
    from timm.layers import resample_abs_pos_embed

    if interpolation not in INTERPOLATIONS:
        raise VitdiagError(
            f"--interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}."
        )
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
            antialias=antialias_for(interpolation),
        )
        return out.transpose(1, 2).reshape(1, d, *new_grid).clone()
    out = resample_abs_pos_embed(
        table,
        new_size=list(new_grid),
        old_size=list(old_grid),
        num_prefix_tokens=prefix_rows,
        interpolation=interpolation,
        antialias=antialias_for(interpolation),
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


def as_hw(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(v) for v in size)
    return h, w


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


# ---------------------------------------------------------------------------------------------
# models at a size


def native_of(loaded: LoadedModel) -> LoadedModel:
    """The model built at the size its table was trained for."""
    from vitdiag.model import at_size

    if as_hw(loaded.img_size) == as_hw(loaded.native_size):
        return loaded
    return at_size(loaded, as_hw(loaded.native_size))


def build_at_size(
    native: LoadedModel, size: Any, *, c: float = 1.0, interpolation: str = "bicubic"
) -> LoadedModel:
    """`native` rebuilt at `size`, its table = native table resampled (timm's way) × c.

    The architecture comes from `model.at_size` (which also rejects sizes the patch grid cannot
    take, naming valid ones); the table is then set here from the native table, so the model
    that runs is exactly the one `write_checkpoint` saves, whatever at_size did to the table.
    """
    from vitdiag.model import at_size

    require_abs_pos(native.model)
    same = as_hw(size) == as_hw(native.img_size)
    if same and c == 1.0:
        return native
    target = at_size(native, as_hw(size))
    if target is native or target.model is native.model:
        # a rescaled table must never reach the caller's own model
        target = dataclasses.replace(target, model=copy.deepcopy(native.model))
    set_table(target.model, target_table(native.model, target.model, c, interpolation))
    return target


# ---------------------------------------------------------------------------------------------
# writing a checkpoint


def _resolved(p: Any) -> Path:
    return Path(p).expanduser().resolve()


def check_output_path(out: Path, source: Path | None, force: bool) -> None:
    """Refuse an --out that is, contains or lies inside the input, or exists without --force."""
    out_r = _resolved(out)
    if source is not None:
        src = _resolved(source)
        if out_r == src or out_r in src.parents:
            raise VitdiagError(
                f"--out {out} would overwrite the input checkpoint {source}; choose another "
                "folder (--force never overwrites the input)."
            )
        if src.is_dir() and src in out_r.parents:
            raise VitdiagError(
                f"--out {out} lies inside the input checkpoint folder {source}; choose a folder "
                "outside it (--force never writes into the input)."
            )
    if (out_r.exists() or out_r.is_symlink()) and not force:
        raise VitdiagError(f"--out {out} already exists; choose a new folder or pass --force.")


def _model_args(loaded: LoadedModel, size: Any) -> dict[str, Any]:
    """create_model kwargs that rebuild the architecture at `size`, JSON-able ones only."""
    skip = {
        "num_classes",
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_model_args",
        "checkpoint_path",
        "model_name",
        "device",
        "dtype",
    }
    args: dict[str, Any] = {}
    for k, v in dict(loaded.build_kwargs or {}).items():
        if k in skip:
            continue
        try:
            json.dumps(v)
        except TypeError:
            continue
        args[k] = list(v) if isinstance(v, tuple) else v
    if family_of(loaded.model).is_transformer:  # CNNs take any size and no img_size argument
        h, w = as_hw(size)
        args["img_size"] = h if h == w else [h, w]
    return args


def checkpoint_config(loaded: LoadedModel, size: Any, provenance: dict[str, str]) -> dict:
    """config.json for timm's ``local-dir:`` loader, describing the model at `size`."""
    h, w = as_hw(size)
    dc = dict(loaded.data_config or {})
    pcfg: dict[str, Any] = {
        "input_size": [3, h, w],
        "num_classes": int(loaded.num_classes),
    }
    for key in ("mean", "std", "interpolation", "crop_pct", "crop_mode"):
        if dc.get(key) is not None:
            value = dc[key]
            pcfg[key] = list(value) if isinstance(value, (tuple, list)) else value
    config: dict[str, Any] = {
        "architecture": loaded.arch,
        "num_classes": int(loaded.num_classes),
        "model_args": _model_args(loaded, size),
        "pretrained_cfg": pcfg,
    }
    names = (loaded.provenance or {}).get("label_names")
    if names:
        config["label_names"] = list(names)
    config["vitdiag"] = provenance
    return config


def _state_dict(model: Any) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage, and a later in-place change to the
    # model must not reach what is being written.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def write_checkpoint(
    model: Any,
    out: Path,
    *,
    config: dict,
    metadata: dict[str, str],
    fmt: str = "safetensors",
    source: Path | None = None,
    force: bool = False,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Write OUT/config.json + OUT/model.safetensors (or model.pth) through a temporary folder.

    The new folder is complete (and, given `verify`, checked) before it takes OUT's name, so a
    crash or a failed check leaves either the old OUT or the new one, never a mixture; with
    --force the old OUT is moved aside first and removed only after the new one is in place.
    """
    if fmt not in FORMATS:
        raise VitdiagError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    check_output_path(out, source, force)
    out = Path(out).expanduser()
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    old: Path | None = None
    try:
        state = _state_dict(model)
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp / "model.safetensors"), metadata=metadata)
        else:
            torch.save(state, tmp / "model.pth")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        # mkdtemp makes a private (0700) folder; the result should look like any other output
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if verify is not None:
            verify(tmp)
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / "previous")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "previous").exists() and not out.exists():
            os.replace(old / "previous", out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def reload_max_diff(out: Path, model: Any, size: Any, seed: int = 0) -> tuple[float, float]:
    """Build OUT through plain timm (`local-dir:`) and compare its logits with `model`'s on a
    seeded random batch: (max |Δ logit|, max |logit|)."""
    import timm

    h, w = as_hw(size)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, h, w, generator=gen)
    reloaded = timm.create_model(f"local-dir:{Path(out).resolve()}", pretrained=True).eval()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            a = model(x.to(device)).float().cpu()
            b = reloaded(x).float()
    finally:
        model.train(was_training)
    if a.shape != b.shape:
        raise VitdiagError(
            f"the written checkpoint in {out} rebuilds with outputs {tuple(b.shape)}, expected "
            f"{tuple(a.shape)}; please report this as a vitdiag bug."
        )
    return float((a - b).abs().max()), float(a.abs().max())


# ---------------------------------------------------------------------------------------------
# the whole of `vitdiag fix-posembed`


@dataclasses.dataclass
class FixOutcome:
    out: Path
    c: float
    method: str
    loaded: Any  # the rescaled LoadedModel at the new size, as written
    result: Any  # vitdiag.results.Result
    max_abs_diff: float


def _metadata_str(values: dict[str, Any]) -> dict[str, str]:
    # safetensors metadata is str -> str; repr keeps floats exact
    return {k: (repr(v) if isinstance(v, float) else str(v)) for k, v in values.items()}


def _verifier(model: Any, hw: tuple[int, int], seed: int, diffs: list[float]):
    """The check write_checkpoint runs on the finished folder before it takes OUT's name."""

    def verify(folder: Path) -> None:
        diff, scale = reload_max_diff(folder, model, hw, seed)
        diffs.append(diff)
        # same weights, same float32 ops: only device/kernel rounding may differ
        if not diff <= 1e-4 * max(1.0, scale):
            raise VitdiagError(
                f"the checkpoint rebuilt through plain timm gives logits {diff:.3g} away from "
                "vitdiag's model; nothing was written to --out. Please report this vitdiag bug."
            )

    return verify


def fix_posembed(
    loaded: LoadedModel,
    size: Any,
    out: Path,
    *,
    rescale: str | float | None = None,
    resize_only: bool = False,
    interpolation: str = "bicubic",
    reduction: str = "per-token",
    batches_at: Callable[[Any, tuple[int, int]], Iterable] | None = None,
    accuracy: bool = False,
    fmt: str = "safetensors",
    force: bool = False,
    device: Any = "cpu",
    amp: str = "off",
    channels_last: bool = False,
    seed: int = 0,
    quiet: bool = True,
    total_images: int | None = None,
) -> FixOutcome:
    """Resample the table to `size`, multiply its grid by c, write a timm ``local-dir:`` folder.

    c comes from `rescale` (SPEC §5; None means `empirical`). With `batches_at` the images give
    r before and after (and accuracy before and after when `accuracy`); `empirical` needs them.
    `resize_only` means rescale `none`, and also writes families with no absolute table at the
    new size (`resize_without_table`). The written folder is rebuilt through plain timm and its
    logits compared with the in-memory model's before it takes OUT's name.
    """
    import timm

    from vitdiag import __version__
    from vitdiag.probes.variance import rescale_name, variance_study
    from vitdiag.results import Result, Table

    if resize_only:
        method: str | float = resize_only_rescale(rescale)
    elif rescale is None:
        method = "empirical"
    else:
        method = parse_rescale(rescale) if isinstance(rescale, str) else float(rescale)
    if interpolation not in INTERPOLATIONS:
        raise VitdiagError(
            f"--interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}."
        )
    if fmt not in FORMATS:
        raise VitdiagError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    if resize_only and not has_abs_pos_table(loaded.model):
        if batches_at is not None:
            raise VitdiagError(
                f"--data measures the position table's variance, which this "
                f"{family_of(loaded.model).label} model does not have; drop --data."
            )
        return resize_without_table(loaded, size, out, fmt=fmt, force=force, seed=seed)
    require_rescalable(loaded.model)
    source_path = (loaded.provenance or {}).get("path")
    check_output_path(out, source_path, force)
    if method == "empirical" and batches_at is None:
        rescale_factor("empirical", size=size, native=loaded.native_size)  # raises: needs data
    native = native_of(loaded)
    hw = as_hw(size)
    name = rescale_name(method)
    key = "per_token" if reduction == "per-token" else "global"

    study = None
    if batches_at is not None:
        study = variance_study(
            native,
            [hw],
            batches_at=batches_at,
            interpolations=[interpolation],
            rescales=["none", method],
            reduction=reduction,
            accuracy=accuracy,
            device=device,
            amp=amp,
            channels_last=channels_last,
            seed=seed,
            quiet=quiet,
            total_images=total_images,
        )
    if method == "empirical":
        c = study.c_empirical(hw)
    else:
        c = rescale_factor(method, size=hw, native=native.native_size)

    final = build_at_size(native, hw, c=c, interpolation=interpolation)
    layout, prefix = layout_of(final.model), pos_prefix_rows(final.model)
    before = table_variance(
        grid_tokens(
            target_table(native.model, final.model, 1.0, interpolation),
            layout=layout,
            prefix_rows=prefix,
        )
    )
    after = table_variance(grid_tokens(table_of(final.model), layout=layout, prefix_rows=prefix))

    prov: dict[str, Any] = {
        "vitdiag_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "source_path": str(Path(source_path).resolve()) if source_path else "(random weights)",
        "source_sha256": str((loaded.provenance or {}).get("sha256") or ""),
        "source_arch": loaded.arch,
        "rescale_method": name,
        "rescale_factor": float(c),
        "interpolation": interpolation,
        "antialias": antialias_for(interpolation),
        "source_size": "x".join(map(str, as_hw(native.native_size))),
        "target_size": "x".join(map(str, hw)),
        "source_grid": "x".join(map(str, table_grid(native.model))),
        "target_grid": "x".join(map(str, table_grid(final.model))),
        "prefix_rows": prefix,
        "table_layout": layout,
        "resize_only": resize_only,
    }
    metrics: dict[str, float] = {
        "c": float(c),
        "var_p_before": before["per_token"],
        "var_p_after": after["per_token"],
        "var_p_global_before": before["global"],
        "var_p_global_after": after["global"],
    }
    rows: list[list[Any]] = [
        ["c (grid rows × c)", 1.0, c],
        ["Var P per-token", before["per_token"], after["per_token"]],
        ["Var P global", before["global"], after["global"]],
    ]
    notes: list[str] = []
    if study is not None:
        r0, r_before = study.r0(key), study.r(hw, key)
        r_after = r_before / (c * c)
        prov.update(
            empirical_reduction=reduction,
            r0=r0,
            r_before=r_before,
            r_after=r_after,
            n_images=study.n_images,
        )
        metrics.update(
            r0=r0,
            r_before=r_before,
            r_after=r_after,
            shift_before=r_before / r0,
            shift_after=r_after / r0,
        )
        rows += [
            [f"r ({reduction}; r0 = {r0:.4g})", r_before, r_after],
            ["shift r/r0", r_before / r0, r_after / r0],
        ]
        acc = study.readings[hw].accuracy
        if "none" in acc and name in acc:
            for what in ("top1", "nll"):
                metrics[f"{what}_before"] = acc["none"][what]
                metrics[f"{what}_after"] = acc[name][what]
            rows += [
                [f"top-1 at {size_label(hw)}", acc["none"]["top1"], acc[name]["top1"]],
                [f"NLL at {size_label(hw)}", acc["none"]["nll"], acc[name]["nll"]],
            ]
        elif accuracy:
            notes.append("the data has no labels, so accuracy before and after is not shown.")
    else:
        notes.append("r before and after needs images (Var X): give --data DIR.")

    config = checkpoint_config(native, hw, _metadata_str(prov))
    diffs: list[float] = []
    written = write_checkpoint(
        final.model,
        out,
        config=config,
        metadata=_metadata_str({"format": "pt", **prov}),
        fmt=fmt,
        source=source_path,
        force=force,
        verify=_verifier(final.model, hw, seed, diffs),
    )
    metrics["reload_max_abs_diff"] = diffs[0]
    weights = "model.safetensors" if fmt == "safetensors" else "model.pth"
    notes.insert(
        0,
        f"wrote {written}/ (config.json + {weights}); plain timm loads it with "
        f"timm.create_model('local-dir:{written}', pretrained=True); checked: its logits differ "
        f"from vitdiag's model by at most {diffs[0]:.2g}.",
    )
    result = Result(
        probe="fix-posembed",
        definition="posembed-rescale-v1",
        metrics=metrics,
        tables=[
            Table(
                f"Position table {size_label(native.native_size)} → {size_label(hw)} "
                f"({interpolation}, rescale {name})",
                ["", "before (timm resample)", "after (× c)"],
                rows,
            )
        ],
        notes=notes,
        extra={"provenance": prov, "out": str(written), "format": fmt},
    )
    return FixOutcome(Path(written), float(c), name, final, result, diffs[0])


def _resized_rows(before: Any, after: Any) -> list[list[Any]]:
    """[name, old shape, new shape] for every learned tensor whose shape the new size changed."""
    old = {k: tuple(v.shape) for k, v in before.named_parameters()}
    return [
        [k, str(old[k]), str(tuple(v.shape))]
        for k, v in after.named_parameters()
        if k in old and old[k] != tuple(v.shape)
    ]


def resize_without_table(
    loaded: LoadedModel,
    size: Any,
    out: Path,
    *,
    fmt: str = "safetensors",
    force: bool = False,
    seed: int = 0,
) -> FixOutcome:
    """`fix-posembed --resize-only` for a model with no absolute table: the model timm builds at
    `size`, with the size-dependent tensors (Swin's and BEiT's relative-position bias tables)
    resized by timm's own checkpoint filter for the architecture, written and checked as
    fix_posembed does. Nothing is rescaled; a size the token grid cannot take is refused."""
    import timm

    from vitdiag import __version__
    from vitdiag.model import at_size
    from vitdiag.results import Result, Table

    if fmt not in FORMATS:
        raise VitdiagError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    fam = family_of(loaded.model)
    source_path = (loaded.provenance or {}).get("path")
    check_output_path(out, source_path, force)
    native = native_of(loaded)
    hw = as_hw(size)
    target = at_size(native, hw)  # names the nearest valid sizes when the grid cannot take hw
    resized = _resized_rows(native.model, target.model)
    prov: dict[str, Any] = {
        "vitdiag_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "source_path": str(Path(source_path).resolve()) if source_path else "(random weights)",
        "source_sha256": str((loaded.provenance or {}).get("sha256") or ""),
        "source_arch": loaded.arch,
        "rescale_method": "none",
        "rescale_factor": 1.0,
        "resize_only": True,
        "resized_by": "timm checkpoint_filter_fn" if resized else "nothing size-dependent",
        "resized_tensors": len(resized),
        "source_size": "x".join(map(str, as_hw(native.native_size))),
        "target_size": "x".join(map(str, hw)),
    }
    diffs: list[float] = []
    written = write_checkpoint(
        target.model,
        out,
        config=checkpoint_config(native, hw, _metadata_str(prov)),
        metadata=_metadata_str({"format": "pt", **prov}),
        fmt=fmt,
        source=source_path,
        force=force,
        verify=_verifier(target.model, hw, seed, diffs),
    )
    weights = "model.safetensors" if fmt == "safetensors" else "model.pth"
    notes = [
        f"wrote {written}/ (config.json + {weights}); plain timm loads it with "
        f"timm.create_model('local-dir:{written}', pretrained=True); checked: its logits differ "
        f"from vitdiag's model by at most {diffs[0]:.2g}.",
        f"this {fam.label} model has nothing to rescale, as "
        f"{fam.why_no_abs_pos or 'it was built without an absolute position table'}; nothing "
        + (
            f"was rescaled; the {len(resized)} tensors below were resized as timm resizes them "
            "when it builds the model at the new size."
            if resized
            else "was rescaled, and no weight depends on the input size."
        ),
    ]
    rows = resized or [["(no tensor changes shape)", "", ""]]
    result = Result(
        probe="fix-posembed",
        definition="posembed-resize-only-v1",
        metrics={
            "c": 1.0,
            "resized_tensors": float(len(resized)),
            "reload_max_abs_diff": diffs[0],
        },
        tables=[
            Table(
                f"Resize only {size_label(native.native_size)} → {size_label(hw)} (no rescale)",
                ["tensor", "shape before", "shape after"],
                rows,
            )
        ],
        notes=notes,
        extra={"provenance": prov, "out": str(written), "format": fmt},
    )
    return FixOutcome(Path(written), 1.0, "none", target, result, diffs[0])
