"""Which architecture a checkpoint is, in two steps.

1. What the file records (`read_records`): pretrained_cfg fields, label names and the size
   the weights were trained at, from config.json, training args or a pickled model, plus
   what the command line gives.
2. What the records decide (`resolve`): the architecture named by, in order of trust,
   ``--arch``, config.json's 'architecture', the model name in the training args, a pickled
   model's own pretrained_cfg; only when none names one are the tensors matched against
   timm's registered architectures. The native size is then decided against the weights.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import timm

from vitdiag.errors import VitdiagError
from vitdiag.loading.build import check_fit, default_size
from vitdiag.loading.checkpoint import Checkpoint
from vitdiag.loading.match import (
    Choice,
    match,
    native_from_weights,
    num_classes,
    shapes_and_print,
)
from vitdiag.loading.spec import Assumption, Spec
from vitdiag.posembed import as_hw

_CFG_OVERLAY = ("mean", "std", "interpolation", "crop_pct", "crop_mode", "input_size")
_TRAIN_ARGS_OVERLAY = ("mean", "std", "interpolation", "crop_pct")


@dataclass
class Records:
    """What the checkpoint and the command line record, before anything is decided."""

    cfg_name: str  # how config.json is named in messages
    overlay: dict = field(default_factory=dict)  # pretrained_cfg fields recorded
    overlay_source: dict = field(default_factory=dict)  # field -> where it came from
    label_names: Any = None
    size_hint: tuple[int, int] | None = None  # the training size the files record
    size_hint_source: str = ""
    native: tuple[int, int] | None = None  # the training size the user gives
    native_given: str = "--native-size"


# --------------------------------------------------------------------------- what is recorded


def read_records(ck: Checkpoint, model_args: dict, native: tuple[int, int] | None) -> Records:
    """Everything recorded, config.json first. Takes img_size out of `model_args`: it is the
    native size, not a model argument."""
    cfg_name = f"{ck.config_path.parent.name}/config.json" if ck.config_path else "config.json"
    rec = Records(cfg_name=cfg_name)
    if ck.config is not None:
        _config_records(rec, ck.config)
    if ck.train_args:
        _train_args_records(rec, ck.train_args, ck.train_args_source)
    hints = ck.module_hints
    if hints and rec.size_hint is None and hints.get("img_size"):
        rec.size_hint = tuple(hints["img_size"])
        rec.size_hint_source = "the pickled model's patch_embed.img_size"
    if model_args.get("img_size") is not None and native is None:
        rec.native = as_hw(model_args.pop("img_size"), "--model-arg img_size")
        rec.native_given = "--model-arg img_size"
    else:
        model_args.pop("img_size", None)
        rec.native = native
    return rec


def _config_records(rec: Records, cfg: dict) -> None:
    pc = cfg.get("pretrained_cfg") or {}
    for k in _CFG_OVERLAY:
        if pc.get(k) is not None:
            rec.overlay[k] = tuple(pc[k]) if isinstance(pc[k], list) else pc[k]
            rec.overlay_source[k] = rec.cfg_name
    rec.label_names = cfg.get("label_names") or pc.get("label_names")
    if cfg["model_args"].get("img_size") is not None:
        what = f"{rec.cfg_name} model_args.img_size"
        rec.size_hint = as_hw(cfg["model_args"]["img_size"], what)
        rec.size_hint_source = f"{rec.cfg_name} (model_args.img_size)"
    elif pc.get("input_size"):
        rec.size_hint = as_hw(tuple(pc["input_size"])[-2:], f"{rec.cfg_name} input_size")
        rec.size_hint_source = f"{rec.cfg_name} (pretrained_cfg.input_size)"


def _train_args_records(rec: Records, targs: dict, source: str) -> None:
    """timm's train.py args: what config.json did not already record."""
    for k in _TRAIN_ARGS_OVERLAY:
        if targs.get(k) and k not in rec.overlay:
            v = targs[k]
            rec.overlay[k] = tuple(v) if isinstance(v, (list, tuple)) else v
            rec.overlay_source[k] = source
    if rec.size_hint is None:
        s = targs.get("img_size") or targs.get("input_size")
        if isinstance(s, (list, tuple)) and len(s) == 3:
            s = tuple(s[-2:])
        if s:
            rec.size_hint = as_hw(s, "training args img_size")
            rec.size_hint_source = source


# --------------------------------------------------------------------------- what they decide


def resolve(
    ck: Checkpoint, *, arch: str | None, model_args: dict, native: tuple[int, int] | None
) -> Spec:
    converted = _converted(ck)
    if converted is not None:
        return _from_conversion(ck, converted, model_args, native)
    rec = read_records(ck, model_args, native)
    named = _named_arch(ck, arch, rec.cfg_name)
    kwargs = dict(named.kwargs) if named is not None else {}
    kwargs.pop("img_size", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.update(model_args)
    if named is not None:
        kwargs["num_classes"] = num_classes(named.arch, ck.state_dict, kwargs, ck.config)
        choice = Choice(named.arch, kwargs, named.decided_by, [], named.hidden_source)
    else:
        choice = match(ck.state_dict, kwargs, rec.native or rec.size_hint, where=str(ck.path))
    native_size, native_source = decide_native(choice.arch, choice.kwargs, ck, rec)
    decided_by = choice.decided_by + (f"; {ck.ema_note}" if ck.ema_note else "")
    heads = "--model-arg num_heads" if "num_heads" in model_args else choice.hidden_source
    return Spec(
        arch=choice.arch,
        build_kwargs=choice.kwargs,
        native=native_size,
        native_source=native_source,
        decided_by=decided_by,
        overlay=rec.overlay,
        overlay_source=rec.overlay_source,
        assumptions=choice.assumptions,
        label_names=list(rec.label_names) if rec.label_names else None,
        heads_source=heads,
    )


def _converted(ck: Checkpoint) -> tuple[str, Any] | None:
    """(source kind, conversion) for weights saved by transformers, open_clip or the original
    DINOv2 code; None for timm weights. The checkpoint's state dict becomes timm's."""
    from vitdiag.loading.convert import convert, detect

    kind = detect(ck.source_config, ck.state_dict.keys())
    if kind is None:
        return None
    out = convert(kind, ck.source_config, ck.state_dict, ck.preprocessor)
    ck.state_dict = out.state_dict
    return kind, out


def _from_conversion(
    ck: Checkpoint, converted: tuple[str, Any], model_args: dict, native: tuple[int, int] | None
) -> Spec:
    """The timm architecture a converted checkpoint maps to. The conversion fixes every
    argument the weights depend on; --model-arg still overrides any of them."""
    kind, out = converted
    where = ck.config_path.name if ck.config_path else "the tensor names"
    _check_declared_head(ck, out.model_args)
    rec = read_records(ck, model_args, native)
    kwargs = dict(out.model_args)
    size = kwargs.pop("img_size", None)
    if size is not None and rec.size_hint is None:
        rec.size_hint, rec.size_hint_source = as_hw(size), f"{kind} config ({where})"
    kwargs.update(model_args)
    for key, value in out.data_config.items():
        if value is not None and key not in rec.overlay:
            rec.overlay[key] = tuple(value) if isinstance(value, list) else value
            rec.overlay_source[key] = f"{kind} preprocessing ({where})"
    native_size, native_source = decide_native(out.arch, kwargs, ck, rec)
    # The loader states heads and eps for every model; the conversion says where they came from.
    stated = {a.what: a for a in out.assumptions}
    heads, eps = stated.pop("num_heads", None), stated.pop("LayerNorm eps", None)
    return Spec(
        arch=out.arch,
        build_kwargs=kwargs,
        native=native_size,
        native_source=native_source,
        decided_by=f"converted from {kind} ({where}) to timm {out.arch}",
        overlay=rec.overlay,
        overlay_source=rec.overlay_source,
        assumptions=[
            Assumption(
                "source format",
                f"{kind}, converted to timm {out.arch} by a key map",
                where,
                "--model-arg KEY=VALUE changes one argument of the converted model",
            ),
            *(Assumption(a.what, a.value, a.source, a.override) for a in stated.values()),
        ],
        label_names=_label_names(ck.source_config),
        heads_source="--model-arg num_heads"
        if "num_heads" in model_args
        else f"{kind} {heads.source if heads else where}",
        source_kind=kind,
        eps_source=f"{kind} {eps.source if eps else where}",
    )


def _check_declared_head(ck: Checkpoint, model_args: dict) -> None:
    """A transformers config that declares an image classifier promises its head; weights
    without one would be evaluated as a headless backbone, so they are refused."""
    declared = (ck.source_config or {}).get("architectures")
    if not isinstance(declared, list) or model_args.get("num_classes", 0):
        return
    heads = [a for a in declared if isinstance(a, str) and a.endswith("ForImageClassification")]
    if heads:
        raise VitdiagError(
            f"{ck.config_path} declares {heads[0]} but {ck.weights.name} holds no classifier "
            "tensors (classifier.weight); the weights are incomplete, so copy them again."
        )


def _label_names(config: dict | None) -> list[str] | None:
    """transformers' id2label, in output order, when it names real classes."""
    id2label = (config or {}).get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        return None
    return None if all(n.startswith("LABEL_") for n in names) else names


def _named_arch(ck: Checkpoint, arch: str | None, cfg_name: str) -> Choice | None:
    """The architecture a record names, in order of trust; None when none names one."""
    if arch:
        return _from_flag(arch, ck.config, cfg_name)
    return _from_config(ck, cfg_name) or _from_train_args(ck) or _from_pickled_model(ck)


def _from_flag(arch: str, cfg: dict | None, cfg_name: str) -> Choice:
    name = check_arch(arch, "--arch")
    if cfg is not None and cfg.get("architecture") == name:
        kwargs = dict(cfg["model_args"])
        heads = cfg_name if kwargs.get("num_heads") else f"timm default for {name}"
        return Choice(name, kwargs, f"--arch {name}, with model_args from {cfg_name}", [], heads)
    return Choice(name, {}, f"--arch {name}", [], f"timm default for {name}")


def _from_config(ck: Checkpoint, cfg_name: str) -> Choice | None:
    cfg = ck.config
    if cfg is None or not cfg.get("architecture"):
        return None
    name = check_arch(cfg["architecture"], f"{ck.config_path} 'architecture'")
    kwargs = dict(cfg["model_args"])
    heads = f"{cfg_name}" if kwargs.get("num_heads") else f"timm default for {name}"
    return Choice(name, kwargs, f"'architecture' in {ck.config_path}", [], heads)


def _from_train_args(ck: Checkpoint) -> Choice | None:
    targs = ck.train_args or {}
    if not (targs and isinstance(targs.get("model") or targs.get("arch"), str)):
        return None
    name = check_arch(targs.get("model") or targs.get("arch"), f"{ck.weights} (training args)")
    kwargs: dict = {}
    if isinstance(targs.get("model_kwargs"), dict):
        kwargs.update(targs["model_kwargs"])
    if targs.get("gp"):
        kwargs["global_pool"] = targs["gp"]
    decided_by = f"the model name in the {ck.train_args_source} ({name})"
    return Choice(name, kwargs, decided_by, [], f"timm default for {name}")


def _from_pickled_model(ck: Checkpoint) -> Choice | None:
    hints = ck.module_hints
    if not (hints and hints.get("arch") and timm.is_model(hints["arch"])):
        return None
    name = hints["arch"]
    kwargs = dict(hints.get("model_args") or {})
    decided_by = f"the pickled model's own pretrained_cfg ({name})"
    return Choice(name, kwargs, decided_by, [], f"timm default for {name}")


def check_arch(name: str, where: str) -> str:
    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()`."
        raise VitdiagError(f"{where}: {name!r} is not a timm architecture; {hint}")
    return name


# --------------------------------------------------------------------------- native size


def decide_native(
    arch: str, kwargs: dict, ck: Checkpoint, rec: Records
) -> tuple[tuple[int, int], str]:
    """The size the weights were trained at and how that is known: the user's size, else the
    recorded one, else what the tensors show, else timm's default; a recorded or given size
    that contradicts the tensors is an error."""
    sd = ck.state_dict
    meta = shapes_and_print(arch, kwargs, None)[2]
    seen = native_from_weights(sd, meta)
    shown = seen[0] if seen is not None else None
    given, hint = rec.native, rec.size_hint
    if shown is not None:
        for size in (given, hint):
            if size is not None and not _agrees(shown, size, meta):
                # A wrong architecture also reads the table wrongly: name that first.
                check_fit(shapes_and_print(arch, kwargs, shown)[0], sd, arch, str(ck.path))
    if given is not None:
        if shown is not None and not _agrees(shown, given, meta):
            raise VitdiagError(
                f"{rec.native_given} {given[0]}x{given[1]} does not fit the position table of "
                f"{ck.weights}, which fits {shown[0]}x{shown[1]}; fix {rec.native_given}."
            )
        return given, rec.native_given
    if hint is not None:
        if shown is not None and not _agrees(shown, hint, meta):
            raise VitdiagError(
                f"{rec.size_hint_source} says the weights are {hint[0]}x{hint[1]} but the "
                f"position table of {ck.weights} fits {shown[0]}x{shown[1]}; fix the file or "
                "pass --native-size."
            )
        return hint, rec.size_hint_source
    if shown is not None:
        return shown, seen[1]
    if seen is not None:  # a table that no square grid fits
        raise VitdiagError(f"{ck.weights}: {seen[1]}; give the size with --native-size H,W.")
    return default_size(arch), f"timm default for {arch} (the weights do not record it)"


def _agrees(seen: tuple[int, int], hint: tuple[int, int], meta: Any) -> bool:
    """Whether a recorded size fits the weights: same size, or a non-square one with the same
    number of grid tokens (which the table alone cannot tell apart from square)."""
    if seen == hint:
        return True
    pe = getattr(meta, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is None:
        return False
    return (seen[0] // ps[0]) * (seen[1] // ps[1]) == (hint[0] // ps[0]) * (hint[1] // ps[1])
