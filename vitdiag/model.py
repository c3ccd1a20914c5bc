"""Loading a model: the facade over `vitdiag.loading`.

A state dict does not fix the architecture: head count and LayerNorm eps leave no trace in the
shapes, and mean/std are not in the weights at all. So the loader prefers recorded facts
(``--arch``, config.json, training args saved with the weights) and only then matches the
tensors against timm's registered architectures, recording every hidden choice as an
`Assumption` together with the option that overrides it.

Nothing here touches the network: models are always built with ``pretrained=False`` and the
weights are loaded strictly by us, after the position table has been resampled as timm does.
The steps live in `vitdiag.loading` (checkpoint → resolve/match → build); this module puts
their results together as a `LoadedModel`.
"""

from __future__ import annotations

import dataclasses
import sys
from copy import deepcopy as copy_module
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from vitdiag.errors import VitdiagError
from vitdiag.families import Family, family_of
from vitdiag.loading.build import (
    SOURCE_FIELDS,
    build,
    check_size_with,
    default_size,
    fixed_input_size,
    near,
    overlay_of,
    size_rule,
)
from vitdiag.loading.checkpoint import Checkpoint, read_source, sha256_file
from vitdiag.loading.common import plain
from vitdiag.loading.match import shapes_and_print
from vitdiag.loading.resolve import check_arch, resolve
from vitdiag.loading.spec import Assumption, Spec
from vitdiag.posembed import as_hw

_RANDOM_SEED = 0


@dataclass
class LoadedModel:
    model: torch.nn.Module
    arch: str
    family: Family
    num_classes: int
    img_size: tuple[int, int]
    native_size: tuple[int, int]
    data_config: dict
    provenance: dict
    assumptions: list[Assumption]
    build_kwargs: dict
    state_dict: dict | None
    # The pretrained_cfg describing the source weights (timm's default for the architecture
    # overlaid with config.json / training args); the model's own copy says the same.
    pretrained_cfg: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- public API


def load(
    source: str | Path | None,
    *,
    arch: str | None = None,
    ema: bool = False,
    unsafe_pickle: bool = False,
    img_size: int | tuple[int, int] | None = None,
    model_args: dict | None = None,
    native_size: int | tuple | None = None,
) -> LoadedModel:
    """Load a checkpoint (or build `arch` with random weights when `source` is None)."""
    model_args = dict(model_args or {})
    req_size = as_hw(img_size, "--size") if img_size is not None else None
    native = as_hw(native_size, "--native-size") if native_size is not None else None
    if source is None:
        if not arch:
            raise VitdiagError(
                "give a checkpoint path, or --arch NAME for a model with random weights."
            )
        return _load_random(arch, model_args, req_size, native)
    hub = _hub_snapshot(source)
    path = hub.weights if hub is not None else Path(source).expanduser()
    ckpt = read_source(path, ema=ema, unsafe_pickle=unsafe_pickle)
    spec = resolve(ckpt, arch=arch, model_args=model_args, native=native)
    loaded = _assemble(ckpt, spec, req_size)
    if hub is not None:
        loaded.provenance["path"] = str(source)
        loaded.provenance["hub"] = {
            "repo_id": hub.repo_id,
            "revision": hub.revision,
            "kind": hub.kind,
            "folder": str(hub.folder),
        }
    return loaded


def _hub_snapshot(source: str | Path):
    """A local snapshot for a hub name (`hf-hub:ORG/NAME[@REV]` or a timm pretrained tag),
    None for a path. The network is used only here, and only for a hub name not cached."""
    from vitdiag.loading.hub import fetch, is_hub_name

    text = str(source)
    return fetch(text) if is_hub_name(text) else None


def at_size(loaded: LoadedModel, size: int | tuple[int, int]) -> LoadedModel:
    """The same weights rebuilt at another image size, position table resampled as timm does.

    Prefix rows (class, distillation, register tokens) are kept as they are; only the grid is
    interpolated. A size the patch grid cannot take raises a VitdiagError naming the nearest
    valid sizes.
    """
    hw = as_hw(size, "--size")
    check_size_with(size_rule(loaded.model), loaded.arch, hw)
    if hw == loaded.img_size:
        return loaded
    if fixed_input_size(loaded.arch):
        if loaded.state_dict is not None:
            sd, old = loaded.state_dict, loaded.native_size
        else:  # random weights: carry the current ones over so the model stays the same one
            sd, old = _detach(loaded.model.state_dict()), loaded.img_size
        model, _ = build(
            loaded.arch,
            loaded.build_kwargs,
            hw,
            overlay=overlay_of(loaded.pretrained_cfg),
            state_dict=sd,
            old_size=old,
            where=_where(loaded.provenance),
        )
    else:  # CNNs take any input size; nothing in them depends on it
        model = loaded.model
    data_config = dict(loaded.data_config)
    data_config["input_size"] = (data_config["input_size"][0], *hw)
    return dataclasses.replace(loaded, model=model, img_size=hw, data_config=data_config)


def random_init_like(loaded: LoadedModel, seed: int = 0) -> LoadedModel:
    """The same architecture, build arguments and size with timm's random initialisation
    (torch seeded with `seed`, the caller's RNG state left as it was): the reference a trained
    network's P(h) and NC1 are compared with (docs/FINDINGS.md)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if loaded.provenance.get("format") == "live module":
            # A live module's build arguments are not recorded (depth, patch size, widths): the
            # named architecture at its defaults would be another network, so re-initialise a copy.
            model = _reinitialised_copy(loaded.model)
        else:
            model, _ = build(loaded.arch, dict(loaded.build_kwargs), loaded.img_size, overlay={})
    provenance = {**loaded.provenance, "format": "random", "seed": seed, "sha256": None}
    return dataclasses.replace(loaded, model=model, state_dict=None, provenance=provenance)


def _reinitialised_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` with its own initialisation drawn again (timm's `init_weights` where
    the model has one, else every submodule's `reset_parameters`), on the CPU."""
    copy = copy_module(module).to("cpu")
    for p in copy.parameters():
        p.grad = None
    init = getattr(copy, "init_weights", None)
    if callable(init):
        init()
    else:
        for sub in copy.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
    return copy.eval()


def valid_sizes_near(loaded: LoadedModel, size: int) -> list[int]:
    """Square sizes the model can be built at nearest to `size`: `[size]` if it is valid,
    otherwise the nearest valid size below (if any) and above."""
    return near(size_rule(loaded.model), int(size))


def describe(loaded: LoadedModel) -> dict:
    """JSON-able provenance and assumptions, for `vitdiag info` and every --json output."""
    p = loaded.provenance
    dc = loaded.data_config
    return {
        "path": p.get("path"),
        "weights_file": p.get("weights_file"),
        "config": p.get("config"),
        "sha256": p.get("sha256"),
        "format": p.get("format"),
        "source_kind": p.get("source_kind", "timm"),
        "hub": p.get("hub"),
        "arch": loaded.arch,
        "family": loaded.family.name,
        "decided_by": p.get("decided_by"),
        "ema": p.get("ema", False),
        "ema_note": p.get("ema_note"),
        "seed": p.get("seed"),
        "num_classes": loaded.num_classes,
        "label_names": list(p["label_names"]) if p.get("label_names") else None,
        "native_size": list(loaded.native_size),
        "img_size": list(loaded.img_size),
        "build_kwargs": _args_json(loaded.build_kwargs),
        "data_config": {
            "mean": list(dc["mean"]),
            "std": list(dc["std"]),
            "interpolation": dc["interpolation"],
            "crop_pct": dc["crop_pct"],
            "crop_mode": dc["crop_mode"],
            "input_size": list(dc["input_size"]),
        },
        "assumptions": [dataclasses.asdict(a) for a in loaded.assumptions],
        # Only where the files left a choice open, so a plain checkpoint's JSON is unchanged.
        **({"stored_dtype": p["stored_dtype"]} if p.get("stored_dtype") else {}),
        **({"notes": list(p["notes"])} if p.get("notes") else {}),
    }


def from_module(model: torch.nn.Module, data_config: dict | None = None) -> LoadedModel:
    """A `LoadedModel` around a live module (e.g. one being trained), weights left where they are.

    data_config: timm's data-config keys (input_size, mean, std, crop_pct, interpolation,
    crop_mode) for when the module's own pretrained_cfg is not how it is fed; each key given
    wins over the module's. The image size is the module's own patch grid when it has a fixed
    one. Nothing is copied or rebuilt, so other sizes (`at_size`) are out of reach.
    """
    import timm.data

    fam = family_of(model)
    pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
    given = dict(data_config or {})
    dc = timm.data.resolve_model_data_config(model)
    grid = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if "input_size" in given:
        size = as_hw(tuple(given["input_size"])[-2:], "data_config input_size")
    elif grid is not None:
        size = as_hw(grid, "the module's patch_embed.img_size")
    else:
        size = as_hw(tuple(dc["input_size"])[-2:], "the module's input_size")
    merged = {**dc, **{k: v for k, v in given.items() if v is not None}}
    arch = str(pcfg.get("architecture") or type(model).__name__)
    data_config_out = {
        "mean": tuple(float(x) for x in merged["mean"]),
        "std": tuple(float(x) for x in merged["std"]),
        "interpolation": merged.get("interpolation") or "bicubic",
        "crop_pct": float(merged.get("crop_pct") or timm.data.DEFAULT_CROP_PCT),
        "crop_mode": merged.get("crop_mode") or timm.data.DEFAULT_CROP_MODE,
        "input_size": (int(tuple(merged["input_size"])[0]), *size),
    }
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    provenance = {
        "path": None,
        "weights_file": None,
        "config": None,
        "sha256": None,
        "format": "live module",
        "arch": arch,
        "decided_by": "live module",
        "ema": False,
        "label_names": None,
    }
    return LoadedModel(
        model=model,
        arch=arch,
        family=fam,
        num_classes=num_classes,
        img_size=tuple(size),
        native_size=tuple(size),
        data_config=data_config_out,
        provenance=provenance,
        assumptions=[],
        build_kwargs={"num_classes": num_classes},
        state_dict=None,
        pretrained_cfg={k: v for k, v in pcfg.items() if k not in SOURCE_FIELDS},
    )


# --------------------------------------------------------------------------- assembling


def _load_random(
    arch: str, model_args: dict, req: tuple[int, int] | None, native: tuple[int, int] | None
) -> LoadedModel:
    name = check_arch(arch, "--arch")
    kwargs = dict(model_args)
    if kwargs.get("img_size") is not None:
        src = "--model-arg img_size"
        native = native or as_hw(kwargs.pop("img_size"), src)
    kwargs.pop("img_size", None)
    native_source = "--native-size" if native is not None else f"timm default for {name}"
    native = native or default_size(name)
    if kwargs.get("num_classes") is None:
        cfg = timm.models.get_pretrained_cfg(name)
        kwargs["num_classes"] = int(cfg.num_classes) if cfg and cfg.num_classes else 1000
    size = req or native
    if size != native:
        _check_size_for(name, kwargs, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_SEED)
        model, _ = build(name, kwargs, size, overlay={})
    spec = Spec(
        arch=name,
        build_kwargs=kwargs,
        native=native,
        native_source=native_source,
        decided_by=f"--arch {name} (random weights, seed {_RANDOM_SEED}; no checkpoint)",
        overlay={},
        overlay_source={},
        assumptions=[],
        heads_source="--model-arg num_heads"
        if "num_heads" in model_args
        else (f"timm default for {name}"),
    )
    provenance = {
        "path": None,
        "weights_file": None,
        "config": None,
        "sha256": None,
        "format": "random",
        "arch": name,
        "decided_by": spec.decided_by,
        "ema": False,
        "seed": _RANDOM_SEED,
        "label_names": None,
    }
    return _finish(model, spec, provenance, size, state_dict=None)


def _assemble(ck: Checkpoint, spec: Spec, req: tuple[int, int] | None) -> LoadedModel:
    size = req or spec.native
    fixed = fixed_input_size(spec.arch)
    where = str(ck.path)
    if req is not None and req != spec.native:
        _check_size_for(spec.arch, spec.build_kwargs, req)
    # Load once at the native size so the weights are checked exactly as they are, then
    # resample for another size; the native state dict is what at_size() starts from.
    model, native_sd = build(
        spec.arch,
        spec.build_kwargs,
        spec.native if fixed else None,
        overlay=spec.overlay,
        state_dict=ck.state_dict,
        old_size=spec.native,
        where=where,
    )
    if fixed and size != spec.native:
        model, _ = build(
            spec.arch,
            spec.build_kwargs,
            size,
            overlay=spec.overlay,
            state_dict=native_sd,
            old_size=spec.native,
            where=where,
        )
    _check_label_names(spec, model, ck)
    provenance = {
        "path": str(ck.path),
        "weights_file": str(ck.weights),
        "config": str(ck.config_path) if ck.config_path else None,
        "sha256": sha256_file(ck.weights),
        "format": ck.fmt,
        "arch": spec.arch,
        "decided_by": spec.decided_by,
        "ema": ck.ema,
        "label_names": spec.label_names,
        "source_kind": spec.source_kind,
    }
    if ck.ema_note:
        provenance["ema_note"] = ck.ema_note
    if ck.stored_dtype != "float32":
        provenance["stored_dtype"] = ck.stored_dtype
    # The report and console show decided_by; resolve already added the EMA note there.
    extra = [n for n in ck.notes if n != ck.ema_note]
    if extra:
        provenance["decided_by"] = "; ".join([spec.decided_by, *extra])
    notes = list(ck.notes)
    if getattr(model, "num_classes", None) == 0:
        notes.append(
            f"{ck.weights.name} holds no classifier head, so {spec.arch} is built without one "
            "(num_classes=0) and only feature measurements are possible"
        )
    if notes:
        provenance["notes"] = notes
        for note in notes:
            print(f"note: {note}.", file=sys.stderr)
    return _finish(model, spec, provenance, size, state_dict=native_sd)


def _check_label_names(spec: Spec, model: torch.nn.Module, ck: Checkpoint) -> None:
    """Label names are shown next to every class; a list of the wrong length would misname
    them all. Checked after the strict load, so the head's size is the weights' own."""
    names, classes = spec.label_names, getattr(model, "num_classes", None)
    if names and isinstance(classes, int) and classes and len(names) != classes:
        where = ck.config_path or ck.weights
        raise VitdiagError(
            f"{where} lists {len(names)} label names but the weights' head has {classes} "
            "outputs; fix the label names in the file (one per output, in order)."
        )


def _finish(
    model: torch.nn.Module,
    spec: Spec,
    provenance: dict,
    size: tuple[int, int],
    state_dict: dict | None,
) -> LoadedModel:
    import timm.data

    fam = family_of(model)
    pcfg = dict(model.pretrained_cfg)
    dc = timm.data.resolve_model_data_config(model)
    in_chans = int(spec.build_kwargs.get("in_chans") or dc["input_size"][0])
    data_config = {
        "mean": tuple(float(x) for x in dc["mean"]),
        "std": tuple(float(x) for x in dc["std"]),
        "interpolation": dc["interpolation"],
        "crop_pct": float(dc["crop_pct"]),
        "crop_mode": dc["crop_mode"],
        "input_size": (in_chans, *size),
    }
    assumptions = list(spec.assumptions) + _assumptions(model, spec)
    return LoadedModel(
        model=model,
        arch=spec.arch,
        family=fam,
        num_classes=int(spec.build_kwargs.get("num_classes", getattr(model, "num_classes", 0))),
        img_size=tuple(size),
        native_size=tuple(spec.native),
        data_config=data_config,
        provenance=provenance,
        assumptions=assumptions,
        build_kwargs=dict(spec.build_kwargs),
        state_dict=state_dict,
        pretrained_cfg={k: v for k, v in pcfg.items() if k not in SOURCE_FIELDS},
    )


def _assumptions(model: torch.nn.Module, spec: Spec) -> list[Assumption]:
    out = []
    heads = []
    for m in model.modules():
        h = getattr(m, "num_heads", None)
        if isinstance(h, int) and not isinstance(h, bool) and (not heads or heads[-1] != h):
            heads.append(h)
    if heads:
        out.append(
            Assumption(
                "num_heads",
                ", ".join(map(str, heads)),
                spec.heads_source or f"timm default for {spec.arch}",
                "--model-arg num_heads=N (or --arch)",
            )
        )
    eps = next((m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)), None)
    if eps is not None:
        out.append(
            Assumption(
                "layer_norm_eps",
                f"{eps:g}",
                spec.eps_source or f"timm default for {spec.arch}",
                "--arch (an architecture with the eps the weights were trained with)",
            )
        )
    cfg = model.pretrained_cfg
    src = spec.overlay_source
    default = f"timm default for {spec.arch}"
    out.append(
        Assumption(
            "mean/std",
            f"{_fmt_vec(cfg.get('mean'))} / {_fmt_vec(cfg.get('std'))}",
            src.get("mean") or src.get("std") or default,
            "--mean/--std",
        )
    )
    out.append(
        Assumption(
            "native size",
            f"{spec.native[0]}x{spec.native[1]}",
            spec.native_source,
            "--native-size",
        )
    )
    out.append(
        Assumption(
            "interpolation/crop_pct",
            f"{cfg.get('interpolation')} / {cfg.get('crop_pct')}",
            src.get("interpolation") or src.get("crop_pct") or default,
            "--interpolation/--crop-pct",
        )
    )
    return out


def _check_size_for(arch: str, kwargs: dict, hw: tuple[int, int]) -> None:
    check_size_with(size_rule(shapes_and_print(arch, kwargs, None)[2]), arch, hw)


def _detach(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


def _where(provenance: dict) -> str:
    return provenance.get("path") or f"random {provenance.get('arch')}"


def _args_json(v: Any) -> Any:
    """Model arguments as JSON: plain values as they are, anything else by its repr."""
    if isinstance(v, dict):
        return {str(k): _args_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_args_json(x) for x in v]
    return v if plain(v) else repr(v)


def _fmt_vec(v: Any) -> str:
    if v is None:
        return "?"
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"


__all__ = [
    "Assumption",
    "LoadedModel",
    "at_size",
    "describe",
    "from_module",
    "load",
    "sha256_file",
    "valid_sizes_near",
]
