"""The steps every command shares: load the model, open the data, run the pass, print and save."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitdiag.errors import VitdiagError


def parse_floats(text: str | None, option: str, n: int = 3) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise VitdiagError(
            f"{option} {text!r} is not a list of numbers; write e.g. 0.5,0.5,0.5."
        ) from None
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise VitdiagError(f"{option} needs 1 or {n} comma-separated numbers, got {len(values)}.")
    return values


def parse_sizes(text: str, option: str = "--sizes") -> list[int]:
    try:
        sizes = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise VitdiagError(
            f"{option} {text!r} is not a list of integers; write e.g. 224,384."
        ) from None
    if not sizes or any(s <= 0 for s in sizes):
        raise VitdiagError(f"{option} needs positive sizes in pixels, e.g. 224,384.")
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


def load_model(
    ckpt: str | None,
    arch: str | None,
    *,
    ema: bool = False,
    unsafe_pickle: bool = False,
    model_arg: list[str] | None = None,
    native_size: int | None = None,
):
    from vitdiag.model import load

    if ckpt is None and arch is None:
        raise VitdiagError(
            "give a checkpoint path, or --arch NAME for a model with random weights."
        )
    return load(
        ckpt,
        arch=arch,
        ema=ema,
        unsafe_pickle=unsafe_pickle,
        model_args=parse_model_args(model_arg) or None,
        native_size=native_size,
    )


@dataclass
class DataOptions:
    data: str | None
    limit: int | None = None
    batch_size: int = 64
    workers: int = 0
    seed: int = 0
    strict: bool = False
    mean: str | None = None
    std: str | None = None
    interpolation: str | None = None
    crop_pct: float | None = None


def open_data(opts: DataOptions):
    from vitdiag.data import open_dataset

    if opts.data is None:
        raise VitdiagError("this command needs images: give --data DIR (or --data synthetic).")
    if opts.batch_size <= 0:
        raise VitdiagError(f"--batch-size must be positive, got {opts.batch_size}.")
    if opts.limit is not None and opts.limit <= 0:
        raise VitdiagError(f"--limit must be positive, got {opts.limit}.")
    if opts.workers < 0:
        raise VitdiagError(f"--workers must be 0 or more, got {opts.workers}.")
    return open_dataset(opts.data, strict=opts.strict, seed=opts.seed)


def transform_for(loaded, opts: DataOptions, size: int | tuple[int, int] | None):
    from vitdiag.data import eval_transform

    return eval_transform(
        loaded.data_config,
        size,
        mean=parse_floats(opts.mean, "--mean"),
        std=parse_floats(opts.std, "--std"),
        interpolation=opts.interpolation,
        crop_pct=opts.crop_pct,
    )


def loader_for(source, transform, opts: DataOptions, per_class: int | None = None):
    from vitdiag.data import make_loader
    from vitdiag.engine import init_distributed

    rank, world = init_distributed()
    return make_loader(
        source,
        transform,
        batch_size=opts.batch_size,
        workers=opts.workers,
        limit=opts.limit,
        seed=opts.seed,
        rank=rank,
        world_size=world,
        per_class=per_class,
    )


def label_check(loaded, source) -> list[str]:
    """Warnings when the data's classes cannot be the model's classes."""
    notes = []
    if source.labelled and source.classes is not None:
        names = loaded.provenance.get("label_names")
        if len(source.classes) > loaded.num_classes:
            raise VitdiagError(
                f"the data has {len(source.classes)} classes but the model has "
                f"{loaded.num_classes} "
                "outputs; point --data at a dataset with the model's classes."
            )
        if names and list(names) != list(source.classes):
            notes.append(
                "the data's class folders are not named like the checkpoint's label_names; "
                "accuracy assumes folder order = output order."
            )
    return notes


def json_to_stdout(json_path: Path | None) -> bool:
    """`--json -` sends the document to stdout; the tables for people then go to stderr."""
    return json_path is not None and str(json_path) == "-"


def write_json_text(text: str, json_path: Path) -> None:
    """The JSON document to stdout (`-`) or to a file, written atomically."""
    from vitdiag.results import write_atomic

    if json_to_stdout(json_path):
        sys.stdout.write(text)
    else:
        write_atomic(Path(json_path), text.encode())


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=False)


def emit(
    command: str,
    results: list,
    *,
    loaded=None,
    data: dict | None = None,
    json_path: Path | None = None,
    run: dict | None = None,
) -> None:
    """Print the tables for people and, if asked, write the JSON document (rank 0 only)."""
    from vitdiag.engine import is_main_process
    from vitdiag.report import render
    from vitdiag.results import document, dumps

    if not is_main_process():
        return
    render(results, console(stderr=json_to_stdout(json_path)), loaded=loaded, data=data)
    if json_path is None:
        return
    from vitdiag.model import describe

    doc = document(command, results, describe(loaded) if loaded is not None else None, data)
    if run:
        doc["run"] = run
    write_json_text(dumps(doc), json_path)
