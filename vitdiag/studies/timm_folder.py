"""Writing a folder that plain timm loads (config.json + weights) and checking it by reloading
it through timm before it takes its final name: the output half of `vitdiag fix-posembed`."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitdiag.errors import VitdiagError
from vitdiag.families import family_of
from vitdiag.posembed import as_hw
from vitdiag.results import writing

if TYPE_CHECKING:
    from vitdiag.model import LoadedModel

FORMATS = ("safetensors", "pth")


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


def unwritable_args(loaded: LoadedModel) -> list[str]:
    """Build arguments that timm's config.json cannot hold (a LayerNorm with a converted
    model's eps, a layer class): plain timm builds its own default for each of these."""
    out = []
    for k, v in dict(loaded.build_kwargs or {}).items():
        try:
            json.dumps(v)
        except TypeError:
            out.append(f"{k}={v!r}")
    return out


def unwritable_note(loaded: LoadedModel) -> list[str]:
    dropped = unwritable_args(loaded)
    if not dropped:
        return []
    return [
        f"config.json cannot hold {', '.join(dropped)}, so plain timm builds the architecture's "
        "default there; the logit difference above is what that costs."
    ]


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


def _save_safetensors(save_file: Callable, state: dict, path: Path, metadata: dict) -> None:
    # safetensors wraps a full disk or a size limit in its own error type; give it back as the
    # OSError it is, so `writing` names it in one line
    try:
        save_file(state, str(path), metadata=metadata)
    except Exception as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code)) from None


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
    with writing(out):
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
        umask = os.umask(0)
        os.umask(umask)
        old: Path | None = None
        try:
            state = _state_dict(model)
            if fmt == "safetensors":
                from safetensors.torch import save_file

                _save_safetensors(save_file, state, tmp / "model.safetensors", metadata)
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
def metadata_str(values: dict[str, Any]) -> dict[str, str]:
    # safetensors metadata is str -> str; repr keeps floats exact
    return {k: (repr(v) if isinstance(v, float) else str(v)) for k, v in values.items()}


def verifier(model: Any, hw: tuple[int, int], seed: int, diffs: list[float]):
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
