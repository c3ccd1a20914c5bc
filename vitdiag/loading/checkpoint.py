"""Reading a checkpoint: file formats, safe unpickling, training args, hashing.

Pickles are read with ``weights_only=True``; when a file holds Python objects beyond tensors
the refusal names them, found by walking the pickle's opcodes without running them.
Nothing here decides an architecture: that is `vitdiag.loading.resolve`'s job.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitdiag.errors import VitdiagError
from vitdiag.loading.common import one_line, plain
from vitdiag.loading.timm_internals import model_args_of

log = logging.getLogger(__name__)

# Preferred weight files inside a model directory, in timm's order of preference.
_DIR_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
# Weights split over several files (transformers' save_pretrained for large models).
_SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Files other libraries keep beside their weights: read as records, never as timm configs.
_SIDE_CONFIGS = ("preprocessor_config.json", "open_clip_config.json")
_WEIGHT_EXTS = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict")
_MAIN_KEYS = ("state_dict", "model", "model_state_dict", "module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Checkpoint:
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
    # Another library's own config (transformers config.json, open_clip_config.json) and
    # preprocessing, for `vitdiag.loading.convert`; None for timm checkpoints.
    source_config: dict | None = None
    preprocessor: dict | None = None


def read_source(path: Path, *, ema: bool, unsafe_pickle: bool) -> Checkpoint:
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
    raw = _read_json(config_path, "or remove it, or pass --arch") if config_path.is_file() else None
    foreign = raw is not None and _is_foreign_config(raw)
    config = _timm_config(raw, config_path) if raw is not None and not foreign else None
    obj, fmt = _read_weights(weights, unsafe_pickle=unsafe_pickle)
    ck = _unpack(obj, weights, ema=ema)
    ck.path, ck.fmt = path, fmt if not isinstance(obj, torch.nn.Module) else "pickled-module"
    if config is not None:
        ck.config, ck.config_path = config, config_path
    _read_side_configs(ck, weights.parent, raw if foreign else None, config_path)
    if ck.train_args is None:
        args_yaml = weights.parent / "args.yaml"
        if args_yaml.is_file():
            ck.train_args = read_args_yaml(args_yaml)
            ck.train_args_source = f"training args in {args_yaml.name} beside the weights"
    return ck


def _is_foreign_config(cfg: Any) -> bool:
    """A config.json written by transformers (model_type), not by timm (architecture)."""
    return isinstance(cfg, dict) and "model_type" in cfg and "architecture" not in cfg


def _read_side_configs(ck: Checkpoint, folder: Path, foreign: dict | None, path: Path) -> None:
    """Other libraries' configs beside the weights: what converting their keys needs."""
    if foreign is not None:
        ck.source_config, ck.config_path = foreign, path
    for name in _SIDE_CONFIGS:
        side = folder / name
        if not side.is_file():
            continue
        data = _read_json(side, "or remove it")
        if name == "preprocessor_config.json":
            ck.preprocessor = data
        elif ck.source_config is None and ck.config is None:
            ck.source_config, ck.config_path = data, side


def _weights_in_dir(path: Path) -> Path:
    for name in _SHARD_INDEXES:
        if (path / name).is_file() and not (path / name.removesuffix(".index.json")).is_file():
            return path / name
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


def _read_json(path: Path, fix: str) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VitdiagError(f"{path} is not valid JSON ({one_line(e)}); fix {fix}.") from None
    if not isinstance(cfg, dict):
        raise VitdiagError(f"{path} must hold a JSON object; fix {fix}.")
    return cfg


def _timm_config(cfg: dict, path: Path) -> dict:
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


def read_args_yaml(path: Path, *, option: str | None = None) -> dict | None:
    """The training arguments timm's train.py saved as args.yaml.

    Found beside the weights (no `option`), the file is only a hint: one that cannot be read
    is skipped with a warning. Asked for with an option (`option` is how to name it, e.g.
    ``--train-args FILE``), anything wrong with it is an error naming the option.
    """
    import yaml

    if option is not None and not path.is_file():
        raise VitdiagError(f"{option} is not a file; give the args.yaml timm wrote.")
    try:
        data = yaml.safe_load(path.read_text())
    except Exception as e:
        if option is None:  # an unreadable hint is not worth failing over
            log.warning("ignoring %s: not readable YAML", path)
            return None
        if isinstance(e, yaml.YAMLError):
            raise VitdiagError(f"{option} is not valid YAML ({e.__class__.__name__}).") from None
        raise
    if isinstance(data, dict):
        return data
    if option is None:
        return None
    raise VitdiagError(f"{option} does not hold a mapping of training arguments.")


def _read_weights(path: Path, *, unsafe_pickle: bool) -> tuple[Any, str]:
    if path.name.endswith(".index.json"):
        return _read_shards(path, unsafe_pickle=unsafe_pickle)
    if path.stat().st_size == 0:
        raise VitdiagError(f"{path} is empty; the download or copy probably failed.")
    if path.suffix == ".safetensors":
        return _read_safetensors(path), "safetensors"
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
                f"{path} is not a readable PyTorch checkpoint ({one_line(e)}); "
                "check that the file is complete."
            ) from None
    return _read_pickle_safely(path), "torch-pickle"


def _read_shards(index: Path, *, unsafe_pickle: bool) -> tuple[dict, str]:
    """One state dict from the shards a `*.index.json` weight map names."""
    weight_map = _read_json(index, "it or copy the model again").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise VitdiagError(f"{index} has no weight_map; copy the model again.")
    merged: dict = {}
    fmt = "safetensors"
    for name in sorted(set(weight_map.values())):
        shard = index.parent / str(name)
        if not shard.is_file():
            raise VitdiagError(f"{index} names {name}, which is missing; copy the model again.")
        part, fmt = _read_weights(shard, unsafe_pickle=unsafe_pickle)
        merged.update(part)
    return merged, f"{fmt} (sharded)"


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise VitdiagError(
            f"{path} is not a readable safetensors file ({one_line(e)}); "
            "it may be truncated or corrupt, so copy it again."
        ) from None


def _read_pickle_safely(path: Path) -> Any:
    try:
        # timm train.py and DeiT save their argparse.Namespace of training args; it is inert.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path, e)
        if unsafe:
            raise VitdiagError(
                f"{path} holds pickled Python objects ({', '.join(unsafe[:3])}) that can run "
                "code when loaded; if you trust the file, rerun with --unsafe-pickle."
            ) from None
        raise VitdiagError(
            f"{path} is not a readable PyTorch checkpoint ({one_line(e)}); "
            "check that the file is complete and really holds weights."
        ) from None
    except Exception as e:
        raise VitdiagError(
            f"{path} is not a readable PyTorch checkpoint ({one_line(e)}); "
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


def _unpack(obj: Any, path: Path, *, ema: bool) -> Checkpoint:
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
        key, used_ema, note = _pick_weights(obj, path, ema=ema)
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
    ck = Checkpoint(path=path, weights=path, fmt="", state_dict=sd, ema=used_ema, ema_note=note)
    if args:
        ck.train_args, ck.train_args_source = args, "training args saved in the checkpoint"
    ck.module_hints = hints
    return ck


def _pick_weights(obj: dict, path: Path, *, ema: bool) -> tuple[str, bool, str]:
    """Which entry of a training checkpoint holds the weights: (key, is EMA, note)."""
    ema_key = next((k for k in _EMA_KEYS if k in obj and obj[k] is not None), None)
    main_key = next((k for k in _MAIN_KEYS if k in obj and obj[k] is not None), None)
    if ema and ema_key is None:
        raise VitdiagError(
            f"{path} has no EMA weights ({'/'.join(_EMA_KEYS)}); drop --ema to use "
            f"the {main_key or 'plain'} weights."
        )
    if ema_key is not None and (ema or main_key is None):
        note = "" if ema else f"the file holds only EMA weights ({ema_key}), so those were used"
        return ema_key, True, note
    if main_key is not None:
        return main_key, False, ""
    shown = ", ".join(sorted(map(str, obj))[:6])
    raise VitdiagError(
        f"{path} holds a dict ({shown}) with no state dict under "
        f"{'/'.join(_MAIN_KEYS + _EMA_KEYS)}; save model.state_dict() instead."
    )


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
    margs = model_args_of(m)
    margs.pop("pretrained", None)
    hints["model_args"] = {k: v for k, v in margs.items() if plain(v)}
    pe = getattr(m, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        hints["img_size"] = tuple(pe.img_size)
    return hints
