"""Every private timm and torch API the loader touches, in one place.

A timm or torch upgrade that moves one of these breaks this file and nothing else:
`torch.utils._device` (the meta-device mode), `TorchFunctionMode` (skipping initialisers),
`timm.models._builder.build_model_with_cfg` (read each entrypoint's recipe without building),
`timm.models._pretrained.PretrainedCfg` (which pretrained_cfg fields exist) and the
`_model_args` timm keeps on a built model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch.overrides import TorchFunctionMode

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


def meta_device() -> Any:
    """Build on the meta device, skipping in-place initialisers there: there is nothing to
    fill, and timm's truncated-normal init otherwise dominates the cost of a meta build."""
    if _MetaBuild is not None:
        return _MetaBuild("meta")
    stack = contextlib.ExitStack()
    stack.enter_context(torch.device("meta"))
    stack.enter_context(_SkipMetaInit())
    return stack


class SkipParamInit(TorchFunctionMode):
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


def recipes(archs: list[str]) -> dict[str, tuple[str, dict, Any] | None]:
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
            with meta_device():
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


def pretrained_cfg_fields() -> set[str]:
    """The field names timm's PretrainedCfg has."""
    from timm.models._pretrained import PretrainedCfg

    return {f.name for f in dataclasses.fields(PretrainedCfg)}


def model_args_of(m: torch.nn.Module) -> dict:
    """The arguments timm recorded on a built model (empty for models timm did not build)."""
    return dict(getattr(m, "_model_args", {}) or {})
