"""`vitdiag fix-posembed` as a workflow: measure c (the variance study), build the model at the
new size with its table resampled and rescaled, write a folder plain timm loads, and verify it by
reloading it through timm before it takes its final name (SPEC §5)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitdiag.errors import VitdiagError
from vitdiag.families import family_of, has_abs_pos_table, pos_prefix_rows
from vitdiag.posembed import (
    INTERPOLATIONS,
    antialias_for,
    as_hw,
    grid_tokens,
    layout_of,
    parse_rescale,
    require_rescalable,
    rescale_factor,
    resize_only_rescale,
    size_label,
    table_grid,
    table_of,
    table_variance,
    target_table,
)
from vitdiag.size_sweep import build_at_size, native_of, variance_study
from vitdiag.studies.timm_folder import (
    FORMATS,
    check_output_path,
    checkpoint_config,
    metadata_str,
    unwritable_note,
    verifier,
    write_checkpoint,
)

if TYPE_CHECKING:
    from vitdiag.model import LoadedModel

# the whole of `vitdiag fix-posembed`


@dataclasses.dataclass
class FixOutcome:
    out: Path
    c: float
    method: str
    loaded: Any  # the rescaled LoadedModel at the new size, as written
    result: Any  # vitdiag.results.Result
    max_abs_diff: float


@dataclasses.dataclass
class _Record:
    """What a rescale reports: provenance (also written into the checkpoint), metrics, the
    before/after table rows and notes, in the order they are shown."""

    prov: dict[str, Any]
    metrics: dict[str, float]
    rows: list[list[Any]]
    notes: list[str] = dataclasses.field(default_factory=list)


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
    from vitdiag.probes.variance import rescale_name

    method = _checked_method(rescale, resize_only, interpolation, fmt)
    if resize_only and not has_abs_pos_table(loaded.model):
        if batches_at is not None:
            raise VitdiagError(
                f"--data measures the position table's variance, which this "
                f"{family_of(loaded.model).label} model does not have; drop --data."
            )
        return resize_without_table(loaded, size, out, fmt=fmt, force=force, seed=seed)
    require_rescalable(loaded.model)
    check_output_path(out, (loaded.provenance or {}).get("path"), force)
    if method == "empirical" and batches_at is None:
        rescale_factor("empirical", size=size, native=loaded.native_size)  # raises: needs data
    native = native_of(loaded)
    hw = as_hw(size)

    study, c = _measure(
        native,
        hw,
        method,
        batches_at,
        interpolation=interpolation,
        reduction=reduction,
        accuracy=accuracy,
        device=device,
        amp=amp,
        channels_last=channels_last,
        seed=seed,
        quiet=quiet,
        total_images=total_images,
    )
    return _write_rescaled(
        loaded,
        native,
        hw,
        c,
        rescale_name(method),
        study,
        out,
        interpolation=interpolation,
        resize_only=resize_only,
        reduction=reduction,
        accuracy=accuracy,
        fmt=fmt,
        force=force,
        seed=seed,
    )


def _write_rescaled(
    loaded: LoadedModel,
    native: LoadedModel,
    hw: tuple[int, int],
    c: float,
    name: str,
    study: Any,
    out: Path,
    *,
    interpolation: str,
    resize_only: bool,
    reduction: str,
    accuracy: bool,
    fmt: str,
    force: bool,
    seed: int,
) -> FixOutcome:
    """Build the model at `hw` with its table resampled and × c, record what changed (and r and
    accuracy from `study` when there were images), write the folder and verify it."""
    final = build_at_size(native, hw, c=c, interpolation=interpolation)
    record = _table_record(loaded, native, final, hw, c, name, interpolation, resize_only)
    if study is not None:
        _add_study_readings(record, study, hw, c, reduction, name, accuracy)
    else:
        record.notes.append("r before and after needs images (Var X): give --data DIR.")
    source_path = (loaded.provenance or {}).get("path")
    written, diff = _write_verified(
        final.model,
        out,
        native,
        hw,
        record.prov,
        fmt=fmt,
        source=source_path,
        force=force,
        seed=seed,
    )
    record.metrics["reload_max_abs_diff"] = diff
    title = (
        f"Position table {size_label(native.native_size)} → {size_label(hw)} "
        f"({interpolation}, rescale {name})"
    )
    result = _result(
        definition="posembed-rescale-v1",
        metrics=record.metrics,
        title=title,
        header=["", "before (timm resample)", "after (× c)"],
        rows=record.rows,
        notes=[_written_note(written, fmt, diff), *unwritable_note(native), *record.notes],
        prov=record.prov,
        written=written,
        fmt=fmt,
    )
    return FixOutcome(Path(written), float(c), name, final, result, diff)


def _checked_method(
    rescale: str | float | None, resize_only: bool, interpolation: str, fmt: str
) -> str | float:
    """The rescale to apply (`none` for --resize-only, `empirical` by default), once the
    options are known to be valid."""
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
    _check_format(fmt)
    return method


def _measure(
    native: LoadedModel,
    hw: tuple[int, int],
    method: str | float,
    batches_at: Callable[[Any, tuple[int, int]], Iterable] | None,
    *,
    interpolation: str,
    **study_options: Any,
) -> tuple[Any, float]:
    """The variance study at `hw` when there are images (None without), and c for `method`."""
    study = None
    if batches_at is not None:
        study = variance_study(
            native,
            [hw],
            batches_at=batches_at,
            interpolations=[interpolation],
            rescales=["none", method],
            **study_options,
        )
    if method == "empirical":
        return study, study.c_empirical(hw)
    return study, rescale_factor(method, size=hw, native=native.native_size)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise VitdiagError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")


def _source_provenance(loaded: LoadedModel) -> dict[str, Any]:
    """The versions and the source checkpoint, first in every written checkpoint's provenance."""
    import timm

    from vitdiag import __version__

    source_path = (loaded.provenance or {}).get("path")
    return {
        "vitdiag_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "source_path": str(Path(source_path).resolve()) if source_path else "(random weights)",
        "source_sha256": str((loaded.provenance or {}).get("sha256") or ""),
        "source_arch": loaded.arch,
    }


def _table_record(
    loaded: LoadedModel,
    native: LoadedModel,
    final: LoadedModel,
    hw: tuple[int, int],
    c: float,
    name: str,
    interpolation: str,
    resize_only: bool,
) -> _Record:
    """The position table's variance after timm's resample alone and after × c, with the
    provenance of the rescale."""
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
        **_source_provenance(loaded),
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
    return _Record(prov, metrics, rows)


def _add_study_readings(
    record: _Record,
    study: Any,
    hw: tuple[int, int],
    c: float,
    reduction: str,
    name: str,
    accuracy: bool,
) -> None:
    """r before and after the rescale (r scales as 1/c²), and accuracy when the data has labels."""
    key = "per_token" if reduction == "per-token" else "global"
    r0, r_before = study.r0(key), study.r(hw, key)
    r_after = r_before / (c * c)
    record.prov.update(
        empirical_reduction=reduction,
        r0=r0,
        r_before=r_before,
        r_after=r_after,
        n_images=study.n_images,
    )
    record.metrics.update(
        r0=r0,
        r_before=r_before,
        r_after=r_after,
        shift_before=r_before / r0,
        shift_after=r_after / r0,
    )
    record.rows += [
        [f"r ({reduction}; r0 = {r0:.4g})", r_before, r_after],
        ["shift r/r0", r_before / r0, r_after / r0],
    ]
    acc = study.readings[hw].accuracy
    if "none" in acc and name in acc:
        for what in ("top1", "nll"):
            record.metrics[f"{what}_before"] = acc["none"][what]
            record.metrics[f"{what}_after"] = acc[name][what]
        record.rows += [
            [f"top-1 at {size_label(hw)}", acc["none"]["top1"], acc[name]["top1"]],
            [f"NLL at {size_label(hw)}", acc["none"]["nll"], acc[name]["nll"]],
        ]
    elif accuracy:
        record.notes.append("the data has no labels, so accuracy before and after is not shown.")


def _write_verified(
    model: Any,
    out: Path,
    native: LoadedModel,
    hw: tuple[int, int],
    prov: dict[str, Any],
    *,
    fmt: str,
    source: Any,
    force: bool,
    seed: int,
) -> tuple[Path, float]:
    """Write the timm folder, reloaded through plain timm before it takes OUT's name; the folder
    written and the largest logit difference of the reload."""
    diffs: list[float] = []
    written = write_checkpoint(
        model,
        out,
        config=checkpoint_config(native, hw, metadata_str(prov)),
        metadata=metadata_str({"format": "pt", **prov}),
        fmt=fmt,
        source=source,
        force=force,
        verify=verifier(model, hw, seed, diffs),
    )
    return written, diffs[0]


def _written_note(written: Path, fmt: str, diff: float) -> str:
    weights = "model.safetensors" if fmt == "safetensors" else "model.pth"
    return (
        f"wrote {written}/ (config.json + {weights}); plain timm loads it with "
        f"timm.create_model('local-dir:{written}', pretrained=True); checked: its logits differ "
        f"from vitdiag's model by at most {diff:.2g}."
    )


def _result(
    *,
    definition: str,
    metrics: dict[str, float],
    title: str,
    header: list[str],
    rows: list[list[Any]],
    notes: list[str],
    prov: dict[str, Any],
    written: Path,
    fmt: str,
) -> Any:
    """The fix-posembed Result: one table, the provenance and where the folder was written."""
    from vitdiag.results import Result, Table

    return Result(
        probe="fix-posembed",
        definition=definition,
        metrics=metrics,
        tables=[Table(title, header, rows)],
        notes=notes,
        extra={"provenance": prov, "out": str(written), "format": fmt},
    )


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
    from vitdiag.model import at_size

    _check_format(fmt)
    fam = family_of(loaded.model)
    source_path = (loaded.provenance or {}).get("path")
    check_output_path(out, source_path, force)
    native = native_of(loaded)
    hw = as_hw(size)
    target = at_size(native, hw)  # names the nearest valid sizes when the grid cannot take hw
    resized = _resized_rows(native.model, target.model)
    prov: dict[str, Any] = {
        **_source_provenance(loaded),
        "rescale_method": "none",
        "rescale_factor": 1.0,
        "resize_only": True,
        "resized_by": "timm checkpoint_filter_fn" if resized else "nothing size-dependent",
        "resized_tensors": len(resized),
        "source_size": "x".join(map(str, as_hw(native.native_size))),
        "target_size": "x".join(map(str, hw)),
    }
    written, diff = _write_verified(
        target.model, out, native, hw, prov, fmt=fmt, source=source_path, force=force, seed=seed
    )
    notes = [
        _written_note(written, fmt, diff),
        f"this {fam.label} model has nothing to rescale, as "
        f"{fam.why_no_abs_pos or 'it was built without an absolute position table'}; nothing "
        + (
            f"was rescaled; the {len(resized)} tensors below were resized as timm resizes them "
            "when it builds the model at the new size."
            if resized
            else "was rescaled, and no weight depends on the input size."
        ),
        *unwritable_note(native),
    ]
    metrics = {"c": 1.0, "resized_tensors": float(len(resized)), "reload_max_abs_diff": diff}
    result = _result(
        definition="posembed-resize-only-v1",
        metrics=metrics,
        title=f"Resize only {size_label(native.native_size)} → {size_label(hw)} (no rescale)",
        header=["tensor", "shape before", "shape after"],
        rows=resized or [["(no tensor changes shape)", "", ""]],
        notes=notes,
        prov=prov,
        written=written,
        fmt=fmt,
    )
    return FixOutcome(Path(written), 1.0, "none", target, result, diff)
