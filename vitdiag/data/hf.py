"""Hugging Face `datasets` sources (hfds/NAME, save_to_disk and Parquet folders)."""

from __future__ import annotations

from vitdiag.data.sources import ImageSource


def open_hf(
    text: str,
    *,
    strict: bool,
    split: str | None,
    image_column: str | None,
    label_column: str | None,
) -> ImageSource | None:
    """The HF dataset `text` names, or None when `text` is not one."""
    return None
