"""WebDataset shards (a brace pattern, a list, wds/PATTERN)."""

from __future__ import annotations

from vitdiag.data.sources import ImageSource


def open_wds(text: str, *, strict: bool, split: str | None) -> ImageSource | None:
    """The WebDataset shards `text` names, or None when `text` is not one."""
    return None
