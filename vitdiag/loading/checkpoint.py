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
from dataclasses import dataclass, field
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
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
_MAIN_KEYS = ("state_dict", "model", "model_state_dict", "module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# No config vitdiag reads comes near this; a bigger file is a mistake, not a config.
_MAX_JSON_BYTES = 16 << 20


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
    # One-line notes on choices the files leave open (which weight file, EMA or plain,
    # stored precision), for provenance and stderr.
    notes: list[str] = field(default_factory=list)
    stored_dtype: str = "float32"
    # Another library's own config (transformers config.json, open_clip_config.json) and
    # preprocessing, for `vitdiag.loading.convert`; None for timm checkpoints.
    source_config: dict | None = None
    preprocessor: dict | None = None


def read_source(path: Path, *, ema: bool, unsafe_pickle: bool) -> Checkpoint:
    if not path.exists():
        raise VitdiagError(f"{path}: no such file or directory; check the checkpoint path.")
    if path.is_file() and path.name == "config.json":
        path = path.parent
    dir_note = ""
    if path.is_dir():
        weights, dir_note = _weights_in_dir(path)
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
    if dir_note:
        ck.notes.insert(0, dir_note)
    if config is not None:
        check_config_types(config, config_path)
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


def _weights_in_dir(path: Path) -> tuple[Path, str]:
    """The folder's weight file, and a note naming the others when there is a choice."""
    for name in _SHARD_INDEXES:
        if (path / name).is_file() and not (path / name.removesuffix(".index.json")).is_file():
            return path / name, ""
    present = [n for n in _DIR_WEIGHTS if (path / n).is_file()]
    if present:
        chosen = path / present[0]
        others = [f.name for f in _weight_files(path) if f.name != present[0]]
        if not others:
            return chosen, ""
        return chosen, (
            f"{path} holds {', '.join([present[0], *others])}; used {present[0]}, the first in "
            "vitdiag's order (README 'Checkpoint sources'); give another file's path to use it"
        )
    files = _weight_files(path)
    if len(files) == 1:
        return files[0], ""
    if files:
        raise VitdiagError(
            f"{path} holds several weight files ({', '.join(f.name for f in files[:4])}) and "
            "none of them is model.safetensors or pytorch_model.bin; give the path of the one "
            "to load."
        )
    raise VitdiagError(
        f"{path} holds no weights file (model.safetensors, pytorch_model.bin or another "
        f"{'/'.join(_WEIGHT_EXTS)} file); put the weights there or point at the weights file."
    )


def _weight_files(path: Path) -> list[Path]:
    out = {f for ext in _WEIGHT_EXTS for f in path.glob(f"*{ext}") if f.is_file()}
    return sorted(out - {path / n for n in _SHARD_INDEXES})


def _read_json(path: Path, fix: str) -> dict:
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise VitdiagError(
            f"{path} is {path.stat().st_size >> 20} MiB, far more than any config; fix {fix}."
        )
    try:
        cfg = json.loads(
            path.read_bytes().decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
        )
    except RecursionError:
        raise VitdiagError(f"{path} is nested too deeply to be a config; fix {fix}.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise VitdiagError(f"{path} is not valid JSON ({one_line(e)}); fix {fix}.") from None
    if not isinstance(cfg, dict):
        raise VitdiagError(f"{path} must hold a JSON object; fix {fix}.")
    return cfg


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"key {k!r} appears twice, so which value counts is unclear")
        seen[k] = v
    return seen


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_INT_ARGS = ("num_classes", "depth", "embed_dim", "num_heads", "patch_size", "in_chans")
_STAGED_ARGS = ("depth", "embed_dim", "num_heads", "patch_size")


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_config_types(cfg: dict, path: Path) -> None:
    """Refuse a timm config whose fields have the wrong type, naming the field."""

    def bad(field_: str, want: str, got: Any) -> VitdiagError:
        shown = repr(got) if len(repr(got)) <= 40 else repr(got)[:37] + "..."
        return VitdiagError(f"{path}: {field_} must be {want}, not {shown}; fix the file.")

    arch = cfg.get("architecture")
    if arch is not None and not isinstance(arch, str):
        raise bad("'architecture'", "a timm model name", arch)
    places = (("model_args", cfg["model_args"]), ("", cfg))
    for where, d in places:
        for k in _INT_ARGS:
            v = d.get(k)
            # Staged models (PiT) give depth, widths and heads per stage, patch_size may be (h, w).
            items = v if isinstance(v, list) and v and k in _STAGED_ARGS else [v]
            if v is not None and not all(_count(x) for x in items):
                staged = " or a list of them" if k in _STAGED_ARGS else ""
                want = "a non-negative integer" + staged
                raise bad(f"{where + '.' if where else ''}{k}", want, v)
    pc = cfg["pretrained_cfg"]
    for k in ("mean", "std"):
        v = pc.get(k)
        if v is not None and not (
            isinstance(v, list) and v and all(_number(x) for x in v) and len(v) <= 4
        ):
            raise bad(f"pretrained_cfg.{k}", "a list of per-channel numbers", v)
    if "std" in pc and isinstance(pc["std"], list) and any(x == 0 for x in pc["std"]):
        raise bad("pretrained_cfg.std", "non-zero", pc["std"])
    for k in ("crop_pct",):
        v = pc.get(k)
        if v is not None and not (_number(v) and 0 < v <= 4):
            raise bad(f"pretrained_cfg.{k}", "a number in (0, 4]", v)
    for k in ("interpolation", "crop_mode"):
        if pc.get(k) is not None and not isinstance(pc[k], str):
            raise bad(f"pretrained_cfg.{k}", "a string", pc[k])
    names = cfg.get("label_names")
    if names is not None and not (isinstance(names, list) and all(plain(n) for n in names)):
        raise bad("label_names", "a list of names", names)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
    if note:
        ck.notes.append(note)
    ck.stored_dtype = _stored_dtype(sd)
    if ck.stored_dtype != "float32":
        ck.notes.append(
            f"the weights are stored as {ck.stored_dtype}; vitdiag upcasts them and computes "
            "in float32"
        )
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
        if ema and main_key is not None:
            note = f"used the EMA weights ({ema_key}, --ema), not the plain ones ({main_key})"
        return ema_key, True, note
    if main_key is not None:
        note = ""
        if ema_key is not None:
            note = (
                f"the file holds plain ({main_key}) and EMA ({ema_key}) weights; used the "
                "plain ones (pass --ema for the EMA ones)"
            )
        return main_key, False, note
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


def _stored_dtype(sd: dict[str, torch.Tensor]) -> str:
    """The floating dtype(s) of the weights as stored, e.g. 'float16' or 'bfloat16+float32'."""
    kinds = sorted(
        {str(t.dtype).removeprefix("torch.") for t in sd.values() if t.is_floating_point()}
    )
    return "+".join(kinds) or "float32"


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
