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
from vitdiag.studies.sizes import build_at_size, native_of
from vitdiag.studies.timm_folder import (
    FORMATS,
    check_output_path,
    checkpoint_config,
    metadata_str,
    unwritable_note,
    verifier,
    write_checkpoint,
)
from vitdiag.studies.variance import variance_study

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
    from vitdiag.probes.variance import rescale_name
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

    config = checkpoint_config(native, hw, metadata_str(prov))
    diffs: list[float] = []
    written = write_checkpoint(
        final.model,
        out,
        config=config,
        metadata=metadata_str({"format": "pt", **prov}),
        fmt=fmt,
        source=source_path,
        force=force,
        verify=verifier(final.model, hw, seed, diffs),
    )
    metrics["reload_max_abs_diff"] = diffs[0]
    weights = "model.safetensors" if fmt == "safetensors" else "model.pth"
    notes.insert(
        0,
        f"wrote {written}/ (config.json + {weights}); plain timm loads it with "
        f"timm.create_model('local-dir:{written}', pretrained=True); checked: its logits differ "
        f"from vitdiag's model by at most {diffs[0]:.2g}.",
    )
    notes[1:1] = unwritable_note(native)
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
        config=checkpoint_config(native, hw, metadata_str(prov)),
        metadata=metadata_str({"format": "pt", **prov}),
        fmt=fmt,
        source=source_path,
        force=force,
        verify=verifier(target.model, hw, seed, diffs),
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
        *unwritable_note(native),
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
