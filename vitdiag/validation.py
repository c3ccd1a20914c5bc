"""Checks on what a command is given, made before any model or data is opened: option ranges,
lists of numbers, --model-arg, the invariance options, and every output path."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitdiag.errors import VitdiagError
from vitdiag.settings import check_invariance_names, check_option, parse_floats, parse_norm
from vitdiag.settings import options as setting_options

__all__ = ["check_option", "parse_floats", "parse_norm"]  # re-exported for the commands


# -- option ranges ----------------------------------------------------------------------------

# option -> (test, what a valid value is), for the options that are not run settings (those
# declare their rule on `vitdiag.settings.Settings`). Checked before anything is loaded,
# because a value out of range either fails deep inside a pass or, worse, silently changes the
# numbers (--crop-pct 0 used to fall back to the model's default).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "--size": (lambda v: v > 0, "a positive number of pixels, e.g. 224"),
    "--native-size": (lambda v: v > 0, "a positive number of pixels, e.g. 224"),
    "--bins": (lambda v: v >= 1, "at least 1, e.g. 15"),
    "--mixup": (lambda v: v >= 0, "0 (off) or a positive Beta α, e.g. 0.8"),
    "--cutmix": (lambda v: v >= 0, "0 (off) or a positive Beta α, e.g. 1.0"),
    "--reprob": (lambda v: 0 <= v <= 1, "a probability in [0, 1], e.g. 0.25"),
}


def check_ranges(**values: Any) -> None:
    """Each option in its range, e.g. ``check_ranges(crop_pct=..., limit=...)``; None = not given.

    Keyword names are the option names without dashes (crop_pct → --crop-pct).
    """
    for key, value in values.items():
        if value is None:
            continue
        if key in setting_options():
            check_option(key, value)
            continue
        option = "--" + key.replace("_", "-")
        ok, want = _RANGES[option]
        if isinstance(value, float) and not math.isfinite(value) or not ok(value):
            raise VitdiagError(f"{option} must be {want}, got {value}.")


# -- output paths -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """A path a command will write. folder: a directory is written (else one file).
    replace: for folders, what may already be there without --force: "keep" (files are added
    to it), "empty" (an empty folder), "new" (nothing)."""

    option: str
    path: Path | str | None
    folder: bool = False
    replace: str = "keep"


def _resolved(p: Path | str) -> Path:
    return Path(p).expanduser().resolve()


def _existing_ancestor(p: Path) -> Path:
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    return p


def check_outputs(
    outputs: Iterable[Output], inputs: Iterable[Path | str | None] = (), *, force: bool = False
) -> None:
    """Refuse, before any work, every output path that cannot be written as asked.

    A file must not be an existing folder, a folder not an existing file; the nearest existing
    parent must be a writable folder (missing ones are created); no output may be an input (the
    checkpoint, the data, a config) or hold one, and no two outputs may be the same path.
    `inputs` that are not paths on disk (synthetic:16, torch/NAME:ROOT) are ignored.
    """
    given_inputs = [str(i) for i in inputs if i is not None]
    ins = [(i, _resolved(i)) for i in given_inputs if Path(i).expanduser().exists()]
    seen: dict[Path, str] = {}
    for out in outputs:
        if out.path is None or (not out.folder and str(out.path) == "-"):
            continue
        given, path = str(out.path), _resolved(out.path)
        what = f"{out.option} {given}"
        if path in seen:
            raise VitdiagError(
                f"{what} is also given to {seen[path]}; give each output its own path."
            )
        seen[path] = out.option
        for text, src in ins:
            if path == src or (out.folder and path in src.parents):
                raise VitdiagError(
                    f"{what} would overwrite the input {text}; choose another path "
                    "(vitdiag never writes over its inputs)."
                )
            # A new file inside an input folder is refused too: a PNG in the data folder
            # would become an image, a .pth in a checkpoint folder a second weight file.
            if src.is_dir() and src in path.parents:
                raise VitdiagError(
                    f"{what} lies inside the input folder {text}; choose a path outside it."
                )
        if out.folder:
            _check_folder(out, what, path, force)
        elif path.is_dir():
            raise VitdiagError(
                f"{what} is a folder; give a file name, e.g. {Path(given) / _example(out.option)}."
            )
        _check_parent(what, path)


def _example(option: str) -> str:
    return {"--junit": "junit.xml", "--plot": "plot.png"}.get(option, "results.json")


def _check_folder(out: Output, what: str, path: Path, force: bool) -> None:
    if path.exists() and not path.is_dir():
        raise VitdiagError(f"{what} is a file; give a folder (a new or an empty one).")
    if force or not path.is_dir() or out.replace == "keep":
        return
    if out.replace == "new":
        raise VitdiagError(f"{what} already exists; choose a new folder or pass --force.")
    if any(path.iterdir()):
        raise VitdiagError(
            f"{what} exists and is not empty; choose another folder or pass --force to replace it."
        )


def _check_parent(what: str, path: Path) -> None:
    anchor = _existing_ancestor(path.parent)
    if not anchor.is_dir():
        raise VitdiagError(
            f"{what}: {anchor} is a file, so no folder can be made there; choose another path."
        )
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise VitdiagError(f"{what}: the folder {anchor} is not writable; choose another path.")


def parse_sizes(text: str, option: str = "--sizes") -> list[int]:
    try:
        sizes = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise VitdiagError(
            f"{option} {text!r} is not a list of integers; write e.g. 224,384."
        ) from None
    if not sizes or any(s <= 0 for s in sizes):
        raise VitdiagError(f"{option} needs positive sizes in pixels, e.g. 224,384.")
    twice = sorted({s for s in sizes if sizes.count(s) > 1})
    if twice:
        # a size measured twice would be a second row with the same name in every table
        raise VitdiagError(
            f"{option} {text!r} lists {', '.join(map(str, twice))} more than once; give each "
            "size once."
        )
    return sizes


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise VitdiagError(f"--model-arg {item!r} must look like KEY=VALUE, e.g. num_heads=6.")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def check_invariance_options(
    aug: str, views: int, embedding: str, alpha: str | float | None = None
) -> None:
    """--aug, --views, --embedding and --alpha of the invariance probe, before any model."""
    check_invariance_names(aug, embedding, alpha)
    check_option("views", views)
