"""Checkpoint formats, architecture resolution, and building a model at an image size.

A state dict does not fix the architecture: head count and LayerNorm eps leave no trace in the
shapes, and mean/std are not in the weights at all. So the loader prefers recorded facts
(``--arch``, config.json, training args saved with the weights) and only then matches the
tensors against timm's registered architectures, recording every hidden choice as an
`Assumption` together with the option that overrides it.

Nothing here touches the network: models are always built with ``pretrained=False`` and the
weights are loaded strictly by us, after the position table has been resampled as timm does.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import pickle
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch.overrides import TorchFunctionMode

from vitdiag.errors import VitdiagError
from vitdiag.families import (
    FAMILIES,
    NCHW,
    Family,
    families_for_keys,
    family_of,
    pos_prefix_rows,
)

log = logging.getLogger(__name__)

# Preferred weight files inside a model directory, in timm's order of preference.
_DIR_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_WEIGHT_EXTS = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict")
_MAIN_KEYS = ("state_dict", "model", "model_state_dict", "module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# pretrained_cfg fields that describe where weights come from; never passed on, so that
# nothing we build can reach for a file or the network.
_SOURCE_FIELDS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source")
# Builder arguments captured from an entrypoint that are not model arguments.
_BUILDER_ARGS = (
    "pretrained_filter_fn",
    "pretrained_strict",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "feature_cfg",
    "kwargs_filter",
    "cache_dir",
    "model_cfg",
    "pretrained_model_args",
)
# Arguments a plain VisionTransformer is fully described by once shapes fix the rest.
_PLAIN_VIT_ARGS = {"patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias"}
_VIT_BASE = "vit_base_patch16_224"
_RANDOM_SEED = 0


@dataclass
class Assumption:
    """A choice the weights do not show, how it was made, and the option that overrides it."""

    name: str
    value: str
    source: str
    override: str


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
    req_size = _size2(img_size, "--size") if img_size is not None else None
    native = _size2(native_size, "--native-size") if native_size is not None else None
    if source is None:
        if not arch:
            raise VitdiagError(
                "give a checkpoint path, or --arch NAME for a model with random weights."
            )
        return _load_random(arch, model_args, req_size, native)
    ckpt = _read_source(Path(source).expanduser(), ema=ema, unsafe_pickle=unsafe_pickle)
    spec = _resolve(ckpt, arch=arch, model_args=model_args, native=native)
    return _assemble(ckpt, spec, req_size)


def at_size(loaded: LoadedModel, size: int | tuple[int, int]) -> LoadedModel:
    """The same weights rebuilt at another image size, position table resampled as timm does.

    Prefix rows (class, distillation, register tokens) are kept as they are; only the grid is
    interpolated. A size the patch grid cannot take raises a VitdiagError naming the nearest
    valid sizes.
    """
    hw = _size2(size, "--size")
    _check_size(loaded, hw)
    if hw == loaded.img_size:
        return loaded
    if _fixed_input_size(loaded.arch):
        if loaded.state_dict is not None:
            sd, old = loaded.state_dict, loaded.native_size
        else:  # random weights: carry the current ones over so the model stays the same one
            sd, old = _detach(loaded.model.state_dict()), loaded.img_size
        model, _ = _build(
            loaded.arch,
            loaded.build_kwargs,
            hw,
            overlay=_overlay_of(loaded.pretrained_cfg),
            state_dict=sd,
            old_size=old,
            where=_where(loaded.provenance),
        )
    else:  # CNNs take any input size; nothing in them depends on it
        model = loaded.model
    data_config = dict(loaded.data_config)
    data_config["input_size"] = (data_config["input_size"][0], *hw)
    return dataclasses.replace(loaded, model=model, img_size=hw, data_config=data_config)


def valid_sizes_near(loaded: LoadedModel, size: int) -> list[int]:
    """Square sizes the model can be built at nearest to `size`: `[size]` if it is valid,
    otherwise the nearest valid size below (if any) and above."""
    return _near(_size_rule(loaded.model), int(size))


def _near(ok: Callable[[int], bool], size: int) -> list[int]:
    if ok(size):
        return [size]
    below = next((s for s in range(size - 1, 0, -1) if ok(s)), None)
    above = next(s for s in range(size + 1, size + 100_000) if ok(s))
    return [s for s in (below, above) if s is not None]


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
        "build_kwargs": _jsonable(loaded.build_kwargs),
        "data_config": {
            "mean": list(dc["mean"]),
            "std": list(dc["std"]),
            "interpolation": dc["interpolation"],
            "crop_pct": dc["crop_pct"],
            "crop_mode": dc["crop_mode"],
            "input_size": list(dc["input_size"]),
        },
        "assumptions": [dataclasses.asdict(a) for a in loaded.assumptions],
    }


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- reading files


@dataclass
class _Checkpoint:
    """What a checkpoint path holds, before any architecture is decided."""

    path: Path
    weights: Path
    fmt: str
    state_dict: dict[str, torch.Tensor]
    ema: bool = False
    ema_note: str = ""
    config: dict | None = None
    config_path: Path | None = None
    train_args: dict | None = None
    train_args_source: str = ""
    module_hints: dict | None = None


def _read_source(path: Path, *, ema: bool, unsafe_pickle: bool) -> _Checkpoint:
    if not path.exists():
        raise VitdiagError(f"{path}: no such file or directory; check the checkpoint path.")
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        weights = _weights_in_dir(path)
        config_path = path / "config.json"
    else:
        weights = path
        config_path = path.parent / "config.json"
    config = _read_config(config_path) if config_path.is_file() else None
    obj, fmt = _read_weights(weights, unsafe_pickle=unsafe_pickle)
    ck = _unpack(obj, weights, ema=ema)
    ck.path, ck.fmt = path, fmt if not isinstance(obj, torch.nn.Module) else "pickled-module"
    if config is not None:
        ck.config, ck.config_path = config, config_path
    if ck.train_args is None:
        args_yaml = weights.parent / "args.yaml"
        if args_yaml.is_file():
            ck.train_args = _read_args_yaml(args_yaml)
            ck.train_args_source = f"training args in {args_yaml.name} beside the weights"
    return ck


def _weights_in_dir(path: Path) -> Path:
    for name in _DIR_WEIGHTS:
        if (path / name).is_file():
            return path / name
    for ext in _WEIGHT_EXTS:
        files = sorted(path.glob(f"*{ext}"))
        if files:
            return files[0]
    raise VitdiagError(
        f"{path} holds no weights file (model.safetensors, pytorch_model.bin or another "
        f"{'/'.join(_WEIGHT_EXTS)} file); put the weights there or point at the weights file."
    )


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VitdiagError(
            f"{path} is not valid JSON ({_one_line(e)}); fix or remove it, or pass --arch."
        ) from None
    if not isinstance(cfg, dict):
        raise VitdiagError(f"{path} must hold a JSON object; fix or remove it, or pass --arch.")
    # timm's legacy single-dict form keeps everything at the top level.
    if "pretrained_cfg" not in cfg:
        pc = {k: v for k, v in cfg.items() if k not in ("architecture", "model_args")}
        if "labels" in pc:
            pc["label_names"] = pc.pop("labels")
        cfg = {
            "architecture": cfg.get("architecture"),
            "model_args": cfg.get("model_args", {}),
            "pretrained_cfg": pc,
            "num_classes": cfg.get("num_classes"),
            "label_names": pc.get("label_names"),
        }
    cfg.setdefault("model_args", {})
    if not isinstance(cfg["model_args"], dict) or not isinstance(cfg["pretrained_cfg"], dict):
        raise VitdiagError(
            f"{path}: model_args and pretrained_cfg must be JSON objects; fix the file."
        )
    return cfg


def _read_args_yaml(path: Path) -> dict | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except Exception:  # an unreadable args.yaml is not worth failing over; it is a hint
        log.warning("ignoring %s: not readable YAML", path)
        return None
    return data if isinstance(data, dict) else None


def _read_weights(path: Path, *, unsafe_pickle: bool) -> tuple[Any, str]:
    if path.stat().st_size == 0:
        raise VitdiagError(f"{path} is empty; the download or copy probably failed.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu"), "safetensors"
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise VitdiagError(
                f"{path} is not a readable safetensors file ({_one_line(e)}); "
                "it may be truncated or corrupt, so copy it again."
            ) from None
    if unsafe_pickle:
        warnings.warn(
            f"loading {path} with full pickle (--unsafe-pickle): this can run code hidden in "
            "the file; do it only for files you trust.",
            stacklevel=3,
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False), "torch-pickle"
        except Exception as e:
            raise VitdiagError(
                f"{path} is not a readable PyTorch checkpoint ({_one_line(e)}); "
                "check that the file is complete."
            ) from None
    try:
        # timm train.py and DeiT save their argparse.Namespace of training args; it is inert.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True), "torch-pickle"
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path, e)
        if unsafe:
            raise VitdiagError(
                f"{path} holds pickled Python objects ({', '.join(unsafe[:3])}) that can run "
                "code when loaded; if you trust the file, rerun with --unsafe-pickle."
            ) from None
        raise VitdiagError(
            f"{path} is not a readable PyTorch checkpoint ({_one_line(e)}); "
            "check that the file is complete and really holds weights."
        ) from None
    except Exception as e:
        raise VitdiagError(
            f"{path} is not a readable PyTorch checkpoint ({_one_line(e)}); "
            "check that the file is complete and really holds weights."
        ) from None


def _unsafe_globals(path: Path, err: Exception) -> list[str]:
    """The globals a pickle would import, when the refusal was about them (not garbage).

    Read without unpickling: torch lists them for its zip format; for anything else the
    opcodes are walked with pickletools, which parses but never executes.
    """
    found: list[str] = []
    with contextlib.suppress(Exception):
        found = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    if not found:
        found = _scan_pickle_globals(path)
    if not found:
        found = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return list(dict.fromkeys(found))


def _scan_pickle_globals(path: Path, max_pickles: int = 5) -> list[str]:
    import pickletools

    found: list[str] = []
    with open(path, "rb") as fh:
        # torch's legacy format is several pickles in a row; the weights come after them.
        for _ in range(max_pickles):
            strings: list[str] = []
            try:
                for op, arg, _pos in pickletools.genops(fh):
                    if op.name == "GLOBAL" and isinstance(arg, str):
                        found.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # not (or no longer) a pickle stream
                break
    return found


def _unpack(obj: Any, path: Path, *, ema: bool) -> _Checkpoint:
    """Find the state dict (EMA or not), training args and module hints inside a loaded file."""
    hints = None
    args = None
    if isinstance(obj, torch.nn.Module):
        hints = _module_hints(obj)
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise VitdiagError(
            f"{path} holds a {type(obj).__name__}, not a state dict; "
            "save model.state_dict() or pass a timm checkpoint."
        )
    note = ""
    used_ema = False
    if _is_state_dict(obj):
        if ema:
            raise VitdiagError(
                f"{path} holds one plain state dict and no EMA weights "
                f"({'/'.join(_EMA_KEYS)}); drop --ema."
            )
        sd = obj
    else:
        args = _train_args(obj.get("args"))
        ema_key = next((k for k in _EMA_KEYS if k in obj and obj[k] is not None), None)
        main_key = next((k for k in _MAIN_KEYS if k in obj and obj[k] is not None), None)
        if ema and ema_key is None:
            raise VitdiagError(
                f"{path} has no EMA weights ({'/'.join(_EMA_KEYS)}); drop --ema to use "
                f"the {main_key or 'plain'} weights."
            )
        if ema_key is not None and (ema or main_key is None):
            key, used_ema = ema_key, True
            if not ema:
                note = f"the file holds only EMA weights ({ema_key}), so those were used"
        elif main_key is not None:
            key = main_key
        else:
            shown = ", ".join(sorted(map(str, obj))[:6])
            raise VitdiagError(
                f"{path} holds a dict ({shown}) with no state dict under "
                f"{'/'.join(_MAIN_KEYS + _EMA_KEYS)}; save model.state_dict() instead."
            )
        sd = obj[key]
        if isinstance(sd, torch.nn.Module):
            hints = hints or _module_hints(sd)
            sd = sd.state_dict()
        if not isinstance(sd, dict) or not _is_state_dict(sd):
            raise VitdiagError(
                f"{path}: the entry {key!r} is not a state dict of tensors; "
                "save model.state_dict() instead."
            )
    sd = _clean(sd)
    if not sd:
        raise VitdiagError(f"{path} holds an empty state dict; save the model's weights.")
    _check_finite(sd, path)
    ck = _Checkpoint(path=path, weights=path, fmt="", state_dict=sd, ema=used_ema, ema_note=note)
    if args:
        ck.train_args, ck.train_args_source = args, "training args saved in the checkpoint"
    ck.module_hints = hints
    return ck


def _check_finite(sd: dict[str, torch.Tensor], path: Path) -> None:
    """NaN or inf weights make every number vitdiag reports NaN or meaningless: refuse them,
    naming the tensor. Attention-mask buffers may hold -inf by design and are left alone."""
    for name, t in sd.items():
        if not (t.is_floating_point() or t.is_complex()) or "mask" in name.lower():
            continue
        bad = t.numel() - int(torch.isfinite(t).sum())
        if bad:
            what = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise VitdiagError(
                f"{path}: tensor {name!r} holds {bad} {what} value(s) of {t.numel()}; the "
                "training diverged or the file is damaged, so use an earlier checkpoint."
            )


def _is_state_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _clean(sd: dict) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k = str(k)
        while k.startswith(_WRAPPER_PREFIXES):
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k = k[len(p) :]
        out[k] = v
    return out


def _train_args(args: Any) -> dict | None:
    if args is None:
        return None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return dict(args) if isinstance(args, dict) else None


def _module_hints(m: torch.nn.Module) -> dict:
    cfg = getattr(m, "pretrained_cfg", None) or {}
    hints: dict[str, Any] = {"arch": cfg.get("architecture")}
    margs = dict(getattr(m, "_model_args", {}) or {})
    margs.pop("pretrained", None)
    hints["model_args"] = {k: v for k, v in margs.items() if _plain(v)}
    pe = getattr(m, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        hints["img_size"] = tuple(pe.img_size)
    return hints


# --------------------------------------------------------------------------- deciding


@dataclass
class _Spec:
    arch: str
    build_kwargs: dict  # model args incl. num_classes, excl. img_size
    native: tuple[int, int]
    native_source: str
    decided_by: str
    overlay: dict  # pretrained_cfg fields recorded with the checkpoint
    overlay_source: dict  # field -> where it came from
    assumptions: list[Assumption]  # architecture-level ones (matching, heads)
    label_names: list | None = None
    heads_source: str = ""


def _resolve(
    ck: _Checkpoint, *, arch: str | None, model_args: dict, native: tuple[int, int] | None
) -> _Spec:
    sd = ck.state_dict
    cfg = ck.config
    cfg_name = f"{ck.config_path.parent.name}/config.json" if ck.config_path else "config.json"
    extra_assumptions: list[Assumption] = []
    overlay: dict = {}
    overlay_source: dict = {}
    size_hint: tuple[int, int] | None = None
    size_hint_source = ""
    hidden_source = ""
    label_names = None
    if cfg is not None:
        pc = cfg.get("pretrained_cfg") or {}
        for k in ("mean", "std", "interpolation", "crop_pct", "crop_mode", "input_size"):
            if pc.get(k) is not None:
                overlay[k] = tuple(pc[k]) if isinstance(pc[k], list) else pc[k]
                overlay_source[k] = cfg_name
        label_names = cfg.get("label_names") or pc.get("label_names")
        if cfg["model_args"].get("img_size") is not None:
            size_hint = _size2(cfg["model_args"]["img_size"], f"{cfg_name} model_args.img_size")
            size_hint_source = f"{cfg_name} (model_args.img_size)"
        elif pc.get("input_size"):
            size_hint = _size2(tuple(pc["input_size"])[-2:], f"{cfg_name} input_size")
            size_hint_source = f"{cfg_name} (pretrained_cfg.input_size)"
    targs = ck.train_args or {}
    if targs:
        for k in ("mean", "std", "interpolation", "crop_pct"):
            if targs.get(k) and k not in overlay:
                v = targs[k]
                overlay[k] = tuple(v) if isinstance(v, (list, tuple)) else v
                overlay_source[k] = ck.train_args_source
        if size_hint is None:
            s = targs.get("img_size") or targs.get("input_size")
            if isinstance(s, (list, tuple)) and len(s) == 3:
                s = tuple(s[-2:])
            if s:
                size_hint = _size2(s, "training args img_size")
                size_hint_source = ck.train_args_source
    if ck.module_hints and size_hint is None and ck.module_hints.get("img_size"):
        size_hint = tuple(ck.module_hints["img_size"])
        size_hint_source = "the pickled model's patch_embed.img_size"
    if model_args.get("img_size") is not None and native is None:
        native = _size2(model_args.pop("img_size"), "--model-arg img_size")
        native_given = "--model-arg img_size"
    else:
        model_args.pop("img_size", None)
        native_given = "--native-size"

    # 1-4: recorded facts, in order of trust.
    decided_by = ""
    kwargs: dict = {}
    name = None
    if arch:
        name = _check_arch(arch, "--arch")
        decided_by = f"--arch {name}"
        hidden_source = f"timm default for {name}"
        if cfg is not None and cfg.get("architecture") == name:
            kwargs = dict(cfg["model_args"])
            decided_by += f", with model_args from {cfg_name}"
            if kwargs.get("num_heads"):
                hidden_source = cfg_name
    elif cfg is not None and cfg.get("architecture"):
        name = _check_arch(cfg["architecture"], f"{ck.config_path} 'architecture'")
        kwargs = dict(cfg["model_args"])
        decided_by = f"'architecture' in {ck.config_path}"
        hidden_source = f"{cfg_name}" if kwargs.get("num_heads") else f"timm default for {name}"
    elif targs and isinstance(targs.get("model") or targs.get("arch"), str):
        name = _check_arch(targs.get("model") or targs.get("arch"), f"{ck.weights} (training args)")
        if isinstance(targs.get("model_kwargs"), dict):
            kwargs.update(targs["model_kwargs"])
        if targs.get("gp"):
            kwargs["global_pool"] = targs["gp"]
        decided_by = f"the model name in the {ck.train_args_source} ({name})"
        hidden_source = f"timm default for {name}"
    elif ck.module_hints and ck.module_hints.get("arch") and timm.is_model(ck.module_hints["arch"]):
        name = ck.module_hints["arch"]
        kwargs = dict(ck.module_hints.get("model_args") or {})
        decided_by = f"the pickled model's own pretrained_cfg ({name})"
        hidden_source = f"timm default for {name}"
    kwargs.pop("img_size", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.update(model_args)
    user_heads = "num_heads" in model_args

    if name is not None:
        num_classes = _num_classes(name, sd, kwargs, cfg)
        kwargs["num_classes"] = num_classes
        native, native_source = _decide_native(
            name, kwargs, sd, native, native_given, size_hint, size_hint_source, ck
        )
    else:
        m = _match(sd, kwargs, native or size_hint, where=str(ck.path))
        name, kwargs, decided_by = m.arch, m.kwargs, m.decided_by
        extra_assumptions += m.assumptions
        hidden_source = m.hidden_source
        native, native_source = _decide_native(
            name, kwargs, sd, native, native_given, size_hint, size_hint_source, ck
        )
    if user_heads:
        hidden_source = "--model-arg num_heads"
    if ck.ema_note:
        decided_by += f"; {ck.ema_note}"
    return _Spec(
        arch=name,
        build_kwargs=kwargs,
        native=native,
        native_source=native_source,
        decided_by=decided_by,
        overlay=overlay,
        overlay_source=overlay_source,
        assumptions=extra_assumptions,
        label_names=list(label_names) if label_names else None,
        heads_source=hidden_source,
    )


def _check_arch(name: str, where: str) -> str:
    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()`."
        raise VitdiagError(f"{where}: {name!r} is not a timm architecture; {hint}")
    return name


def _classifier_keys(arch: str) -> tuple[str, ...]:
    cfg = timm.models.get_pretrained_cfg(arch)
    names = (cfg.classifier if cfg is not None else None) or "head"
    return (names,) if isinstance(names, str) else tuple(names)


def _num_classes(arch: str, sd: dict, kwargs: dict, cfg: dict | None) -> int:
    """The class count the weights were trained for: the head's rows when the head is in the
    file (so the trained head is kept), else what config/model args say, else no head."""
    if kwargs.get("num_classes") is not None:
        return int(kwargs["num_classes"])
    for c in _classifier_keys(arch):
        w = sd.get(f"{c}.weight")
        if w is not None and w.ndim >= 1:
            return int(w.shape[0])
    if cfg is not None and cfg.get("num_classes") is not None:
        return int(cfg["num_classes"])
    return 0


def _decide_native(
    arch: str,
    kwargs: dict,
    sd: dict,
    given: tuple[int, int] | None,
    given_name: str,
    hint: tuple[int, int] | None,
    hint_source: str,
    ck: _Checkpoint,
) -> tuple[tuple[int, int], str]:
    meta = _shapes_and_print(arch, kwargs, None)[2]
    seen = _native_from_weights(sd, meta)
    if seen is not None and seen[0] is not None:
        for size in (given, hint):
            if size is not None and not _agrees(seen[0], size, sd, meta):
                # A wrong architecture also reads the table wrongly: name that first.
                shapes = _shapes_and_print(arch, kwargs, seen[0])[0]
                _check_fit(shapes, sd, arch, str(ck.path))
    if given is not None:
        if seen is not None and seen[0] is not None and not _agrees(seen[0], given, sd, meta):
            raise VitdiagError(
                f"{given_name} {given[0]}x{given[1]} does not fit the position table of "
                f"{ck.weights}, which fits {seen[0][0]}x{seen[0][1]}; fix {given_name}."
            )
        return given, given_name
    if hint is not None:
        if seen is not None and seen[0] is not None and not _agrees(seen[0], hint, sd, meta):
            raise VitdiagError(
                f"{hint_source} says the weights are {hint[0]}x{hint[1]} but the position "
                f"table of {ck.weights} fits {seen[0][0]}x{seen[0][1]}; fix the file or pass "
                "--native-size."
            )
        return hint, hint_source
    if seen is not None and seen[0] is not None:
        return seen[0], seen[1]
    if seen is not None:  # a table that no square grid fits
        raise VitdiagError(f"{ck.weights}: {seen[1]}; give the size with --native-size H,W.")
    return _default_size(arch), f"timm default for {arch} (the weights do not record it)"


def _agrees(seen: tuple[int, int], hint: tuple[int, int], sd: dict, meta: Any) -> bool:
    """Whether a recorded size fits the weights: same size, or a non-square one with the same
    number of grid tokens (which the table alone cannot tell apart from square)."""
    if seen == hint:
        return True
    pe = getattr(meta, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is None:
        return False
    return (seen[0] // ps[0]) * (seen[1] // ps[1]) == (hint[0] // ps[0]) * (hint[1] // ps[1])


def _native_from_weights(sd: dict, meta: Any) -> tuple[tuple[int, int] | None, str] | None:
    """The size the weights were trained at, where the tensors show it.

    Returns (size, how) when they do, (None, why not) when a table exists but fits no square
    grid, and None when nothing in the weights depends on the size.
    """
    fam = family_of(meta)
    pe = getattr(meta, "patch_embed", None)
    if fam.pos_embed and fam.pos_embed in sd and getattr(meta, fam.pos_embed, None) is not None:
        v = sd[fam.pos_embed]
        if fam.pos_layout == NCHW and v.ndim == 4:
            conv = pe.conv
            k, s, p = conv.kernel_size, conv.stride, conv.padding
            hw = tuple((n - 1) * s[i] + k[i] - 2 * p[i] for i, n in enumerate(v.shape[-2:]))
            return hw, f"inferred from pos_embed shape {tuple(v.shape)} (channels-first grid)"
        if v.ndim == 3 and pe is not None:
            n = int(v.shape[1]) - pos_prefix_rows(meta)
            g = math.isqrt(max(n, 0))
            if n > 0 and g * g == n:
                ps = pe.patch_size
                return (g * ps[0], g * ps[1]), (
                    f"inferred from pos_embed shape {tuple(v.shape)} ({g}x{g} grid of "
                    f"{ps[0]}-pixel patches)"
                )
            return None, f"its pos_embed has {n} grid rows, which no square grid fits"
    # Relative-bias models: the bias table spans the attention window.
    key = next(
        (
            k
            for k in (
                "blocks.0.attn.relative_position_bias_table",
                "rel_pos_bias.relative_position_bias_table",
            )
            if k in sd
        ),
        None,
    )
    if key is not None and pe is not None and fam.name == "beit":
        n = int(sd[key].shape[0]) - 3
        w = math.isqrt(n)
        if w * w == n and w % 2 == 1:
            g = (w + 1) // 2
            ps = pe.patch_size
            return (g * ps[0], g * ps[1]), (
                f"inferred from the relative position bias table ({g}x{g} window)"
            )
    if fam.name == "swin" and pe is not None:
        return _swin_native(sd, meta)
    return None


def _swin_native(sd: dict, meta: Any) -> tuple[tuple[int, int], str] | None:
    # timm clips a stage's window to its feature map, so a clipped window gives the size away.
    ps = meta.patch_embed.patch_size
    # The meta model is built at the default size, where the first stage is never clipped.
    target = max(max(st.blocks[0].window_size) for st in meta.layers)
    for i in range(len(meta.layers)):
        t = sd.get(f"layers.{i}.blocks.0.attn.relative_position_bias_table")
        if t is None:
            return None
        w = (math.isqrt(int(t.shape[0])) + 1) // 2
        if w < target:
            scale = 2**i
            hw = (w * ps[0] * scale, w * ps[1] * scale)
            return hw, f"inferred from the clipped {w}x{w} attention window of stage {i + 1}"
    return None


def _default_size(arch: str) -> tuple[int, int]:
    cfg = timm.models.get_pretrained_cfg(arch)
    size = cfg.input_size if cfg is not None and cfg.input_size else (3, 224, 224)
    return int(size[-2]), int(size[-1])


def _fixed_input_size(arch: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(arch)
    return bool(cfg is not None and cfg.fixed_input_size)


# --------------------------------------------------------------------------- matching


def _is_inplace_on(func: Any, args: tuple, test: Callable[[Any], bool]) -> bool:
    name = getattr(func, "__name__", "")
    return name.endswith("_") and not name.endswith("__") and bool(args) and test(args[0])


def _skip_on_meta(func: Any, args: tuple) -> bool:
    return _is_inplace_on(func, args, lambda t: isinstance(t, torch.Tensor) and t.is_meta)


class _SkipMetaInit(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if _skip_on_meta(func, args):
            return args[0]
        return func(*args, **(kwargs or {}))


try:
    from torch.utils._device import DeviceContext as _DeviceContext
    from torch.utils._device import _device_constructors

    class _MetaBuild(_DeviceContext):
        """The meta device and the init skip in one torch-function mode: one Python hop per
        op instead of two, which is most of what a meta build costs."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if _skip_on_meta(func, args):
                return args[0]
            kwargs = kwargs or {}
            if func in _device_constructors() and kwargs.get("device") is None:
                kwargs["device"] = self.device
            return func(*args, **kwargs)

except ImportError:  # the private API moved: same effect with two modes
    _MetaBuild = None


def _meta_device() -> Any:
    """Build on the meta device, skipping in-place initialisers there: there is nothing to
    fill, and timm's truncated-normal init otherwise dominates the cost of a meta build."""
    if _MetaBuild is not None:
        return _MetaBuild("meta")
    stack = contextlib.ExitStack()
    stack.enter_context(torch.device("meta"))
    stack.enter_context(_SkipMetaInit())
    return stack


class _SkipParamInit(TorchFunctionMode):
    """Skips in-place initialisers on parameters of a model whose every parameter is about to
    be overwritten by a strict load; buffers computed at construction are left alone, and
    copy_ (how load_state_dict fills parameters) always runs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") != "copy_" and _is_inplace_on(
            func, args, lambda t: isinstance(t, torch.nn.Parameter)
        ):
            return args[0]
        return func(*args, **(kwargs or {}))


class _Captured(Exception):
    def __init__(self, model_cls: type, kwargs: dict):
        super().__init__(model_cls.__name__)
        self.model_cls, self.kwargs = model_cls, kwargs


_RECIPES: dict[str, tuple[str, dict, Any] | None] = {}
_META_CACHE: dict[tuple, tuple[dict, dict, Any]] = {}
_META_CACHE_MAX = 512


def _recipes(archs: list[str]) -> dict[str, tuple[str, dict, Any] | None]:
    """(model class name, constructor kwargs, checkpoint filter) of each architecture.

    Read by letting each timm entrypoint run up to `build_model_with_cfg` and stopping it
    there, which costs milliseconds instead of a build; the kwargs let matching skip
    architectures whose depth or width cannot fit before building any of them.
    """
    import timm.models._builder as builder

    todo = [a for a in archs if a not in _RECIPES]
    if todo:
        real = builder.build_model_with_cfg

        def fake(model_cls, variant, pretrained, **kwargs):
            raise _Captured(model_cls, kwargs)

        mods = [
            m
            for n, m in list(sys.modules.items())
            if n.startswith("timm.models") and getattr(m, "build_model_with_cfg", None) is real
        ]
        for m in mods:
            m.build_model_with_cfg = fake
        try:
            with _meta_device():
                for a in todo:
                    try:
                        timm.models.model_entrypoint(a)(pretrained=False)
                        _RECIPES[a] = None  # built without passing the hook: no shortcut
                    except _Captured as c:
                        kw = {k: v for k, v in c.kwargs.items() if k not in _BUILDER_ARGS}
                        flt = c.kwargs.get("pretrained_filter_fn")
                        _RECIPES[a] = (c.model_cls.__name__, kw, flt)
                    except Exception:
                        _RECIPES[a] = None
        finally:
            for m in mods:
                m.build_model_with_cfg = real
    return {a: _RECIPES[a] for a in archs}


def _meta_model(arch: str, kwargs: dict, size: tuple[int, int] | None) -> Any:
    kw = dict(kwargs)
    if size is not None and _fixed_input_size(arch):
        kw["img_size"] = size
    with _meta_device():
        try:
            return timm.create_model(arch, pretrained=False, **kw)
        except Exception as e:
            raise VitdiagError(
                f"timm cannot build {arch} with {_fmt_kwargs(kw)} ({_one_line(e)}); "
                "check --arch and --model-arg."
            ) from None


def _shapes_and_print(arch: str, kwargs: dict, size: tuple[int, int] | None):
    """Key -> shape, a fingerprint of everything shapes do not show, and the meta model."""
    key = (arch, _freeze(kwargs), size)
    if key not in _META_CACHE:
        if len(_META_CACHE) >= _META_CACHE_MAX:  # meta models are small, but not free
            _META_CACHE.clear()
        m = _meta_model(arch, kwargs, size)
        shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        _META_CACHE[key] = (shapes, _fingerprint(m), m)
    return _META_CACHE[key]


# Attributes that follow the build size, initialisation or runtime switches: two models that
# differ only in these compute the same function of the same weights.
_NOT_COMPUTE = {
    "training",
    "fused_attn",
    "grad_checkpointing",
    "img_size",
    "num_patches",
    "grid_size",
    "feat_size",
    "init_values",
    "init_scale",
    "head_init_scale",
    "weight_init",
    "fix_init",
}


def _fingerprint(model: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, m in model.named_modules():
        tname = type(m).__name__
        if "Drop" in tname or tname == "Identity":
            continue
        out[f"{name}:type"] = tname
        for k, v in vars(m).items():
            if k.startswith("_") or k in _NOT_COMPUTE or "drop" in k:
                continue
            if _plain(v) and not isinstance(v, dict):
                out[f"{name}.{k}"] = v
    return out


def _mismatches(shapes: dict, sd: dict) -> list[str]:
    out = []
    for k, s in shapes.items():
        if k not in sd:
            out.append(f"{k} missing")
        elif tuple(sd[k].shape) != s:
            out.append(f"{k} {tuple(sd[k].shape)} vs {s}")
    out += [f"{k} unexpected" for k in sd if k not in shapes]
    return out


@dataclass
class _Match:
    arch: str
    kwargs: dict
    decided_by: str
    assumptions: list[Assumption]
    hidden_source: str


def _sd_facts(sd: dict) -> dict[str, Any]:
    """Size-independent numbers a state dict shows, to rule candidates out cheaply."""

    def counts(rx: str) -> tuple[int, ...]:
        found: dict[int, set] = {}
        for k in sd:
            mm = re.match(rx, k)
            if mm:
                g = mm.groups()
                found.setdefault(int(g[0]) if len(g) > 1 else 0, set()).add(int(g[-1]))
        return tuple(len(found[i]) for i in sorted(found))

    facts: dict[str, Any] = {}
    blocks = counts(r"^blocks\.(\d+)\.")
    if blocks:
        facts["depth"] = blocks[0]
    stages = counts(r"^transformers\.(\d+)\.blocks\.(\d+)\.")
    if stages:
        facts["depth"] = stages
    swin = counts(r"^layers\.(\d+)\.blocks\.(\d+)\.")
    if swin:
        facts["depths"] = swin
    res = counts(r"^layer(\d)\.(\d+)\.")
    if res:
        facts["layers"] = res
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 4:
        facts["embed_dim"] = int(w.shape[0])
        facts["patch_size"] = int(w.shape[-1])
    return facts


def _could_fit(kw: dict, facts: dict) -> bool:
    for k, v in facts.items():
        c = kw.get(k)
        if c is None:
            continue
        if isinstance(v, tuple) and isinstance(c, (list, tuple)):
            if tuple(c) != v:
                return False
        elif isinstance(v, int) and isinstance(c, int) and not isinstance(c, bool) and c != v:
            return False
    return True


def _candidates(fam: Family) -> list[str]:
    names: set[str] = set()
    for p in fam.arch_prefixes:
        names.update(timm.list_models(f"{p}*"))
    return sorted(names)


def _match(sd: dict, extra: dict, size: tuple[int, int] | None, where: str) -> _Match:
    fams = families_for_keys(sd)
    if not fams:
        labels = ", ".join(f.label for f in FAMILIES)
        raise VitdiagError(
            f"{where}: the tensor names fit none of the families vitdiag knows ({labels}); "
            "pass --arch NAME if timm can build it."
        )
    facts = _sd_facts(sd)
    closest: list[tuple[int, str]] = []
    for fam in fams:
        names = _candidates(fam)
        recipes = _recipes(names)
        tried = 0
        fits: list[tuple[str, dict, dict]] = []
        for name in names:
            r = recipes.get(name)
            # What the user passes as model args replaces the entrypoint's own value.
            if r is not None and (
                r[0] not in fam.classes or not _could_fit({**r[1], **extra}, facts)
            ):
                continue
            tried += 1
            kw = dict(extra)
            kw["num_classes"] = _num_classes(name, sd, kw, None)
            try:
                shapes, fp, meta = _shapes_and_print(name, kw, None)
                seen = _native_from_weights(sd, meta)
                # What the table shows wins here; a contradicting --native-size is reported
                # once the architecture is known.
                native = (seen[0] if seen and seen[0] else None) or size
                if native is not None and _fixed_input_size(name):
                    shapes, fp, meta = _shapes_and_print(name, kw, native)
            except VitdiagError:
                continue
            bad = _mismatches(shapes, sd)
            if not bad:
                fits.append((name, kw, fp))
            else:
                closest.append((len(bad), name))
        if fits:
            return _pick(fits, fam, tried, size or _first_native(sd, fits), where)
        if fam.name == "vit":
            inferred = _infer_vit(sd, extra, size)
            if inferred is not None:
                return inferred
    if not closest:
        # Nothing survived the cheap filter: rank a few by how far their numbers are off.
        closest = _rank_by_facts(fams[0], facts, sd, extra, size)
    closest.sort()
    shown = ", ".join(f"{n} ({k} tensors differ)" for k, n in closest[:3])
    raise VitdiagError(
        f"{where}: the weights fit no timm {fams[0].label} architecture (closest: {shown}); "
        "pass --arch NAME and --model-arg KEY=VALUE for the settings that differ."
    )


def _first_native(sd: dict, fits: list) -> tuple[int, int] | None:
    name, kw, _ = fits[0]
    seen = _native_from_weights(sd, _shapes_and_print(name, kw, None)[2])
    return seen[0] if seen and seen[0] else None


def _rank_by_facts(fam, facts, sd, extra, size) -> list[tuple[int, str]]:
    names = _candidates(fam)
    recipes = _recipes(names)

    def off(name: str) -> int:
        r = recipes.get(name)
        if r is None or r[0] not in fam.classes:
            return 99
        return sum(1 for k in facts if r[1].get(k) is not None and r[1].get(k) != facts[k])

    ranked = sorted(names, key=lambda n: (off(n), len(n), n))[:5]
    out = []
    for name in ranked:
        kw = dict(extra)
        kw["num_classes"] = _num_classes(name, sd, kw, None)
        try:
            shapes, _, _ = _shapes_and_print(name, kw, size)
        except VitdiagError:
            continue
        out.append((len(_mismatches(shapes, sd)), name))
    return out


_HEADS = {"num_heads", "head_dim", "scale"}


def _pick(
    fits: list[tuple[str, dict, dict]], fam: Family, tried: int, native_hint: Any, where: str
) -> _Match:
    """One architecture among those whose shapes all fit: the canonical one when they differ
    only in what shapes cannot show (head count, LayerNorm eps), else an error."""

    def canon(item):
        name = item[0]
        same_size = native_hint is not None and _default_size(name) == tuple(native_hint)
        return (not same_size, len(name), name)

    fits = sorted(fits, key=canon)
    name, kw, fp = fits[0]
    others = [f[0] for f in fits[1:]]
    if not others:
        return _Match(
            name,
            kw,
            f"matched the tensor shapes against {tried} timm {fam.label} architectures; "
            f"only {name} fits",
            [],
            f"timm default for {name}",
        )
    heads_differ: list[str] = []
    eps_differ: list[str] = []
    other_differ: list[str] = []
    for oname, _, ofp in fits[1:]:
        for k in set(fp) | set(ofp):
            if fp.get(k) == ofp.get(k):
                continue
            attr = k.rsplit(".", 1)[-1]
            if attr in _HEADS:
                heads_differ.append(oname)
            elif attr == "eps":
                eps_differ.append(oname)
            else:
                other_differ.append(oname)
                break
    if other_differ:
        shown = ", ".join([name, *dict.fromkeys(other_differ)][:4])
        raise VitdiagError(
            f"{where}: the weights fit several timm architectures that compute differently "
            f"({shown}); pass --arch NAME to say which."
        )
    shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
    assumptions = [
        Assumption(
            "architecture",
            name,
            f"{len(fits)} architectures fit the tensor shapes exactly ({name}, {shown}); "
            "picked the canonical one",
            "--arch",
        )
    ]
    hidden = f"timm default for {name}"
    if heads_differ:
        hidden += f" (fitting alternatives differ: {', '.join(dict.fromkeys(heads_differ))})"
    decided = (
        f"matched the tensor shapes against {tried} timm {fam.label} architectures; "
        f"{len(fits)} fit with identical shapes and {name} was picked as the canonical one"
    )
    if eps_differ:
        assumptions.append(
            Assumption(
                "layer_norm_eps alternatives",
                ", ".join(dict.fromkeys(eps_differ)),
                "these fitting architectures use another LayerNorm eps",
                "--arch",
            )
        )
    return _Match(name, kw, decided, assumptions, hidden)


def _infer_vit(sd: dict, extra: dict, size: tuple[int, int] | None) -> _Match | None:
    """A plain VisionTransformer whose arguments are read off the tensor shapes."""
    w = sd.get("patch_embed.proj.weight")
    pos = sd.get("pos_embed")
    if w is None or w.ndim != 4 or "dist_token" in sd:
        return None
    embed, in_chans, ph, pw = (int(x) for x in w.shape)
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))}
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if not blocks or fc1 is None:
        return None
    kw: dict[str, Any] = {
        "patch_size": ph if ph == pw else (ph, pw),
        "embed_dim": embed,
        "depth": max(blocks) + 1,
        "mlp_ratio": fc1.shape[0] / embed,
        "in_chans": in_chans,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "class_token": "cls_token" in sd,
        "reg_tokens": int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0,
    }
    if "head.weight" in sd:
        kw["num_classes"] = int(sd["head.weight"].shape[0])
    else:
        kw["num_classes"] = 0
    if "blocks.0.ls1.gamma" in sd:
        kw["init_values"] = 1e-5  # any value: the trained scales are loaded over it
    if "norm_pre.weight" in sd:
        kw["pre_norm"] = True
    if "blocks.0.attn.q_norm.weight" in sd:
        kw["qk_norm"] = True
    if "fc_norm.weight" in sd:
        kw["global_pool"], kw["fc_norm"] = "avg", True
    elif not kw["class_token"]:
        kw["global_pool"], kw["fc_norm"] = "avg", False
    prefix = int(kw["class_token"]) + kw["reg_tokens"]
    grid = None
    if pos is not None and pos.ndim == 3:
        n = int(pos.shape[1])
        if size is not None:
            g = (size[0] // ph) * (size[1] // pw)
            kw["no_embed_class"] = n == g
            grid = size
        else:
            for no_embed, rows in ((False, n - prefix), (True, n)):
                g = math.isqrt(max(rows, 0))
                if rows > 0 and g * g == rows:
                    kw["no_embed_class"] = no_embed
                    grid = (g * ph, g * pw)
                    break
    elif pos is None:
        kw["pos_embed"] = "none"
    if grid is None and pos is not None:
        return None
    base, base_heads = _vit_base(embed, ph)
    heads = base_heads or _heads_for(embed)
    kw["num_heads"] = heads
    kw.update(extra)
    try:
        shapes, _, _ = _shapes_and_print(base, kw, grid)
    except VitdiagError:
        return None
    if _mismatches(shapes, sd):
        return None
    how = (
        f"head count of timm's {base}, which has the same width (heads are invisible in "
        "the weights)"
        if base_heads
        else "assumed embed_dim // 64 (heads are invisible in the weights)"
    )
    if "num_heads" in extra:
        how = "--model-arg num_heads"
    return _Match(
        base,
        kw,
        "no registered timm architecture fits; inferred a VisionTransformer from the tensor "
        f"shapes and built it as {base} with model_args {_fmt_kwargs(kw)}",
        [],
        how,
    )


def _vit_base(embed: int, patch: int) -> tuple[str, int | None]:
    """A registered plain ViT to carry inferred arguments: one of the same width when there is
    one (its head count is then the best guess), else vit_base_patch16_224."""
    names = timm.list_models("vit_*")
    recipes = _recipes(names)
    same = []
    for n in names:
        r = recipes.get(n)
        if r is None or r[0] != "VisionTransformer" or not set(r[1]) <= _PLAIN_VIT_ARGS:
            continue
        if r[1].get("embed_dim") == embed and "num_heads" in r[1]:
            same.append((r[1].get("patch_size") != patch, len(n), n, r[1]["num_heads"]))
    if same:
        same.sort()
        return same[0][2], int(same[0][3])
    return _VIT_BASE, None


def _heads_for(embed: int) -> int:
    h = max(1, embed // 64)
    while embed % h:
        h -= 1
    return h


# --------------------------------------------------------------------------- building


def _load_random(
    arch: str, model_args: dict, req: tuple[int, int] | None, native: tuple[int, int] | None
) -> LoadedModel:
    name = _check_arch(arch, "--arch")
    kwargs = dict(model_args)
    if kwargs.get("img_size") is not None:
        src = "--model-arg img_size"
        native = native or _size2(kwargs.pop("img_size"), src)
    kwargs.pop("img_size", None)
    native_source = "--native-size" if native is not None else f"timm default for {name}"
    native = native or _default_size(name)
    if kwargs.get("num_classes") is None:
        cfg = timm.models.get_pretrained_cfg(name)
        kwargs["num_classes"] = int(cfg.num_classes) if cfg and cfg.num_classes else 1000
    size = req or native
    if size != native:
        _check_size_for(name, kwargs, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_SEED)
        model, _ = _build(name, kwargs, size, overlay={})
    spec = _Spec(
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


def _assemble(ck: _Checkpoint, spec: _Spec, req: tuple[int, int] | None) -> LoadedModel:
    size = req or spec.native
    fixed = _fixed_input_size(spec.arch)
    where = str(ck.path)
    if req is not None and req != spec.native:
        _check_size_for(spec.arch, spec.build_kwargs, req)
    # Load once at the native size so the weights are checked exactly as they are, then
    # resample for another size; the native state dict is what at_size() starts from.
    model, native_sd = _build(
        spec.arch,
        spec.build_kwargs,
        spec.native if fixed else None,
        overlay=spec.overlay,
        state_dict=ck.state_dict,
        old_size=spec.native,
        where=where,
    )
    if fixed and size != spec.native:
        model, _ = _build(
            spec.arch,
            spec.build_kwargs,
            size,
            overlay=spec.overlay,
            state_dict=native_sd,
            old_size=spec.native,
            where=where,
        )
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
    }
    if ck.ema_note:
        provenance["ema_note"] = ck.ema_note
    return _finish(model, spec, provenance, size, state_dict=native_sd)


def _finish(
    model: torch.nn.Module,
    spec: _Spec,
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
        pretrained_cfg={k: v for k, v in pcfg.items() if k not in _SOURCE_FIELDS},
    )


def _assumptions(model: torch.nn.Module, spec: _Spec) -> list[Assumption]:
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
                f"timm default for {spec.arch}",
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


def _create(
    arch: str, kwargs: dict, size: tuple[int, int] | None, overlay: dict
) -> torch.nn.Module:
    kw = dict(kwargs)
    if size is not None and _fixed_input_size(arch):
        kw["img_size"] = size
    ov = _overlay_of(overlay)
    ov["num_classes"] = kw.get("num_classes", ov.get("num_classes"))
    if ov["num_classes"] is None:
        ov.pop("num_classes")
    try:
        return timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=ov, **kw)
    except Exception as e:
        raise VitdiagError(
            f"timm cannot build {arch} with {_fmt_kwargs(kw)} ({_one_line(e)}); "
            "check --arch and --model-arg."
        ) from None


def _overlay_of(cfg: dict) -> dict:
    from timm.models._pretrained import PretrainedCfg

    allowed = {f.name for f in dataclasses.fields(PretrainedCfg)} - set(_SOURCE_FIELDS)
    allowed.discard("architecture")
    return {k: v for k, v in cfg.items() if k in allowed and v is not None}


def _build(
    arch: str,
    kwargs: dict,
    size: tuple[int, int] | None,
    *,
    overlay: dict,
    state_dict: dict | None = None,
    old_size: tuple[int, int] | None = None,
    where: str = "the weights",
) -> tuple[torch.nn.Module, dict | None]:
    """The model built at `size` with `state_dict` (trained at `old_size`) loaded strictly,
    and the state dict as loaded (separate tensors from the model's own)."""
    if state_dict is None:
        return _create(arch, kwargs, size, overlay).float().eval(), None
    with _SkipParamInit():
        model = _create(arch, kwargs, size, overlay)
    sd = _adapt(dict(state_dict), model, arch, old_size)
    _load_strict(model, sd, arch, where)
    return model.float().eval(), sd


def _adapt(sd: dict, model: torch.nn.Module, arch: str, old_size) -> dict:
    """Fit a native-size state dict to a model built at another size."""
    fam = family_of(model)
    pos_key = fam.pos_embed
    target = getattr(model, pos_key, None) if pos_key else None
    if pos_key in sd and isinstance(target, torch.Tensor):
        sd[pos_key] = _resample_pos(sd[pos_key], model, arch, old_size)
    own = model.state_dict()
    if any(k in own and tuple(v.shape) != tuple(own[k].shape) for k, v in sd.items()):
        # Size-dependent tensors beyond the position table (relative bias tables of BEiT and
        # Swin): timm's own checkpoint filter for the architecture resizes them.
        flt = _filter_fn(arch)
        if flt is not None:
            pos = sd.pop(pos_key, None) if pos_key else None
            try:
                sd = flt(sd, model)
            except TypeError:
                sd = flt(sd)
            if pos is not None:
                sd[pos_key] = pos
    return sd


def _resample_pos(v: torch.Tensor, model: torch.nn.Module, arch: str, old_size) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    fam = family_of(model)
    target = getattr(model, fam.pos_embed)
    if fam.pos_layout == NCHW:
        # PiT keeps its table channels-first (1, D, H, W) and timm does not resample it on
        # load: go through timm's NLC resampler so the arithmetic is the same.
        if tuple(v.shape) == tuple(target.shape):
            return v
        d, (h, w) = v.shape[1], v.shape[-2:]
        nh, nw = target.shape[-2:]
        flat = v.flatten(2).transpose(1, 2)
        out = resample_abs_pos_embed(flat, [nh, nw], [h, w], num_prefix_tokens=0)
        return out.transpose(1, 2).reshape(1, d, nh, nw)
    prefix = pos_prefix_rows(model)
    ps = model.patch_embed.patch_size
    new_grid = tuple(model.patch_embed.grid_size)
    if old_size is not None:
        old_grid = (old_size[0] // ps[0], old_size[1] // ps[1])
    else:
        g = math.isqrt(v.shape[1] - prefix)
        old_grid = (g, g)
    if old_grid[0] * old_grid[1] + prefix != v.shape[1]:
        return v  # let the strict load name the mismatch
    if old_grid == new_grid:
        return v
    interp, antialias = _pos_interp(arch)
    return resample_abs_pos_embed(
        v,
        list(new_grid),
        list(old_grid),
        num_prefix_tokens=prefix,
        interpolation=interp,
        antialias=antialias,
    )


def _pos_interp(arch: str) -> tuple[str, bool]:
    """The interpolation timm's own loader uses for this architecture's table (FlexiViT's
    filter, for one, is bilinear without antialias)."""
    flt = _filter_fn(arch)
    kw = getattr(flt, "keywords", None) or {}
    return kw.get("interpolation", "bicubic"), kw.get("antialias", True)


def _filter_fn(arch: str) -> Callable | None:
    r = _recipes([arch]).get(arch)
    return r[2] if r is not None else None


def _load_strict(model: torch.nn.Module, sd: dict, arch: str, where: str) -> None:
    _check_fit({k: tuple(v.shape) for k, v in model.state_dict().items()}, sd, arch, where)
    model.load_state_dict(sd, strict=True)


def _check_fit(shapes: dict, sd: dict, arch: str, where: str) -> None:
    """Raise, naming the first tensor that differs and both shapes, unless `sd` fits."""
    for k, s in shapes.items():
        if k not in sd:
            raise VitdiagError(
                f"{where} does not fit {arch}: tensor {k} {s} is missing from the weights; "
                "check --arch and --model-arg."
            )
        if tuple(sd[k].shape) != tuple(s):
            raise VitdiagError(
                f"{where} does not fit {arch}: tensor {k} is {tuple(sd[k].shape)} in the "
                f"weights but {tuple(s)} in the model; check --arch and --model-arg."
            )
    extra = [k for k in sd if k not in shapes]
    if extra:
        raise VitdiagError(
            f"{where} does not fit {arch}: the weights have tensor {extra[0]} "
            f"{tuple(sd[extra[0]].shape)} that the model lacks; check --arch and --model-arg."
        )


# --------------------------------------------------------------------------- sizes


def _size_rule(model: Any) -> Callable[[int], bool]:
    """Which side lengths a model's token grid can take."""
    fam = family_of(model)
    pe = getattr(model, "patch_embed", None)
    if fam.pos_layout == NCHW and pe is not None and hasattr(pe, "conv"):
        k, s, p = pe.conv.kernel_size[0], pe.conv.stride[0], pe.conv.padding[0]
        return lambda n: n >= k - 2 * p and (n + 2 * p - k) % s == 0
    ps = getattr(pe, "patch_size", None)
    if ps is None:
        return lambda n: n >= 32  # CNNs: anything that survives the stride-32 stem
    step = ps[0] if isinstance(ps, (tuple, list)) else int(ps)
    layers = getattr(model, "layers", None)
    if layers is not None and fam.name == "swin":
        downs = sum(
            1
            for st in layers
            if not isinstance(getattr(st, "downsample", None), (type(None), torch.nn.Identity))
        )
        step *= 2**downs
    return lambda n: n >= step and n % step == 0


def _check_size(loaded: LoadedModel, hw: tuple[int, int]) -> None:
    _check_size_with(_size_rule(loaded.model), loaded.arch, hw)


def _check_size_for(arch: str, kwargs: dict, hw: tuple[int, int]) -> None:
    _check_size_with(_size_rule(_shapes_and_print(arch, kwargs, None)[2]), arch, hw)


def _check_size_with(ok: Callable[[int], bool], arch: str, hw: tuple[int, int]) -> None:
    for n in hw:
        if not ok(n):
            raise VitdiagError(
                f"size {n} does not fit the token grid of {arch}; nearest valid sizes: "
                f"{', '.join(map(str, _near(ok, n)))}."
            )


def _size2(size: Any, what: str) -> tuple[int, int]:
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


# --------------------------------------------------------------------------- small helpers


def _detach(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


def _where(provenance: dict) -> str:
    return provenance.get("path") or f"random {provenance.get('arch')}"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _plain(v: Any) -> bool:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return True
    if isinstance(v, (tuple, list)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return False


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v if _plain(v) else repr(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v if _plain(v) else repr(v)


def _fmt_kwargs(kw: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kw.items()) or "no arguments"


def _fmt_vec(v: Any) -> str:
    if v is None:
        return "?"
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"


__all__ = [
    "Assumption",
    "LoadedModel",
    "at_size",
    "describe",
    "load",
    "sha256_file",
    "valid_sizes_near",
]
