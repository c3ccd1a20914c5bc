"""`open_dataset`: every data source behind one call; the first that recognises the text wins."""

from __future__ import annotations

from pathlib import Path

from vitdiag.data import hf, wds
from vitdiag.data.sources import ImageSource, open_local
from vitdiag.errors import VitdiagError


def open_dataset(
    source: str | Path,
    *,
    strict: bool = False,
    split: str | None = None,
    synthetic_count: int = 256,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
) -> ImageSource:
    """Open a dataset: an image folder, a ``.tar``, WebDataset shards (a brace pattern or a
    list), a Hugging Face dataset (``hfds/NAME``, a ``save_to_disk`` or Parquet folder),
    ``torch/NAME:ROOT`` or ``synthetic[:N]``.

    ``split`` picks a split sub-folder (``val`` also finds ``valid``/``validation``...) or the
    split of an HF or timm source. ``seed`` seeds synthetic pixels. ``image_column`` and
    ``label_column`` name an HF dataset's columns. Raises ``VitdiagError`` with the path and
    the fix for every bad input.
    """
    text = str(source)
    found = hf.open_hf(
        text, strict=strict, split=split, image_column=image_column, label_column=label_column
    )
    if found is None:
        found = wds.open_wds(text, strict=strict, split=split)
    if found is None:
        given = [
            f for f, v in (("--image-column", image_column), ("--label-column", label_column)) if v
        ]
        if given:
            # Ignoring them would read other labels than the user named.
            raise VitdiagError(
                f"{' and '.join(given)} apply to Hugging Face datasets only, and {text!r} is "
                "not one; leave them out, or give a save_to_disk or Parquet folder or hfds/NAME."
            )
        found = open_local(
            source, strict=strict, split=split, synthetic_count=synthetic_count, seed=seed
        )
    return found
