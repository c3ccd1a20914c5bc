"""Making a model at an image size, with the weights loaded strictly.

Models are always built with ``pretrained=False``: nothing built here can reach for a file or
the network. A state dict trained at another size is fitted the way timm's own loader fits
it: the position table resampled (through `vitdiag.posembed.resample_table`), any other
size-dependent tensor through the architecture's checkpoint filter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import timm
import torch

from vitdiag.errors import VitdiagError
from vitdiag.families import NCHW, family_of, pos_prefix_rows
from vitdiag.loading.common import fmt_kwargs, one_line
from vitdiag.loading.timm_internals import SkipParamInit, pretrained_cfg_fields, recipes
from vitdiag.posembed import resample_table

# pretrained_cfg fields that describe where weights come from; never passed on, so that
# nothing we build can reach for a file or the network.
SOURCE_FIELDS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source")


def default_size(arch: str) -> tuple[int, int]:
    cfg = timm.models.get_pretrained_cfg(arch)
    size = cfg.input_size if cfg is not None and cfg.input_size else (3, 224, 224)
    return int(size[-2]), int(size[-1])


def fixed_input_size(arch: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(arch)
    return bool(cfg is not None and cfg.fixed_input_size)


def overlay_of(cfg: dict) -> dict:
    """The pretrained_cfg fields that may be passed on to timm (none naming a source)."""
    allowed = pretrained_cfg_fields() - set(SOURCE_FIELDS)
    allowed.discard("architecture")
    return {k: v for k, v in cfg.items() if k in allowed and v is not None}


def build(
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
    with SkipParamInit():
        model = _create(arch, kwargs, size, overlay)
    sd = _adapt(dict(state_dict), model, arch, old_size)
    _load_strict(model, sd, arch, where)
    return model.float().eval(), sd


def _create(
    arch: str, kwargs: dict, size: tuple[int, int] | None, overlay: dict
) -> torch.nn.Module:
    kw = dict(kwargs)
    if size is not None and fixed_input_size(arch):
        kw["img_size"] = size
    ov = overlay_of(overlay)
    ov["num_classes"] = kw.get("num_classes", ov.get("num_classes"))
    if ov["num_classes"] is None:
        ov.pop("num_classes")
    try:
        return timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=ov, **kw)
    except Exception as e:
        raise VitdiagError(
            f"timm cannot build {arch} with {fmt_kwargs(kw)} ({one_line(e)}); "
            "check --arch and --model-arg."
        ) from None


def _adapt(sd: dict, model: torch.nn.Module, arch: str, old_size) -> dict:
    """Fit a native-size state dict to a model built at another size."""
    fam = family_of(model)
    pos_key = fam.pos_embed
    target = getattr(model, pos_key, None) if pos_key else None
    if pos_key in sd and isinstance(target, torch.Tensor):
        sd[pos_key] = _resample_pos(sd[pos_key], model, arch, old_size)
    own = model.state_dict()
    if any(k in own and tuple(v.shape) != tuple(own[k].shape) for k, v in sd.items()):
        # Size-dependent tensors beyond the position table (the family's relative bias
        # tables): timm's own checkpoint filter for the architecture resizes them.
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
    fam = family_of(model)
    target = getattr(model, fam.pos_embed)
    if fam.pos_layout == NCHW:
        # PiT keeps its table channels-first (1, D, H, W) and timm does not resample it on
        # load: go through timm's NLC resampler (bicubic, antialiased) for the same arithmetic.
        if tuple(v.shape) == tuple(target.shape):
            return v
        old, new = tuple(v.shape[-2:]), tuple(target.shape[-2:])
        return resample_table(v, layout=NCHW, prefix_rows=0, old_grid=old, new_grid=new)
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
    return resample_table(
        v,
        layout=fam.pos_layout,
        prefix_rows=prefix,
        old_grid=old_grid,
        new_grid=new_grid,
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
    r = recipes([arch]).get(arch)
    return r[2] if r is not None else None


def _load_strict(model: torch.nn.Module, sd: dict, arch: str, where: str) -> None:
    check_fit({k: tuple(v.shape) for k, v in model.state_dict().items()}, sd, arch, where)
    model.load_state_dict(sd, strict=True)


def check_fit(shapes: dict, sd: dict, arch: str, where: str) -> None:
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


def size_rule(model: Any) -> Callable[[int], bool]:
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
    if layers is not None and fam.patch_merging:
        downs = sum(
            1
            for st in layers
            if not isinstance(getattr(st, "downsample", None), (type(None), torch.nn.Identity))
        )
        step *= 2**downs
    return lambda n: n >= step and n % step == 0


def check_size_with(ok: Callable[[int], bool], arch: str, hw: tuple[int, int]) -> None:
    for n in hw:
        if not ok(n):
            raise VitdiagError(
                f"size {n} does not fit the token grid of {arch}; nearest valid sizes: "
                f"{', '.join(map(str, near(ok, n)))}."
            )


def near(ok: Callable[[int], bool], size: int) -> list[int]:
    """[size] if it is valid, otherwise the nearest valid size below (if any) and above."""
    if ok(size):
        return [size]
    below = next((s for s in range(size - 1, 0, -1) if ok(s)), None)
    above = next(s for s in range(size + 1, size + 100_000) if ok(s))
    return [s for s in (below, above) if s is not None]
