"""Small value helpers the loading modules share: plain values, and values shown in messages."""

from __future__ import annotations

from typing import Any


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def plain(v: Any) -> bool:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return True
    if isinstance(v, (tuple, list)):
        return all(plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and plain(x) for k, x in v.items())
    return False


def freeze(v: Any) -> Any:
    """A hashable stand-in for model arguments, for caching."""
    if isinstance(v, dict):
        return tuple(sorted((k, freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(freeze(x) for x in v)
    return v if plain(v) else repr(v)


def fmt_kwargs(kw: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kw.items()) or "no arguments"
