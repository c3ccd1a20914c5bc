"""The run's settings, each option declared once, on the field it sets.

A field of `Settings` that users can set carries an `Option` in its metadata: the flag, the
command-line type, the help and its panel, the rule a valid value keeps, and whether
`vitdiag check` reads it from vitdiag.toml. Everything else is read from there: the Typer
options (`vitdiag.options.setting`), the `@shared` groups of the commands, `check`'s config
keys and their checks (`vitdiag.check.load_config`), the range checks (`check_option`), and
the README's option table (`option_table`; `python -m vitdiag.settings --readme README.md`
rewrites it). The command line and `check` both build their run with `build_settings`, so the
same options give the same `Settings`, defaults included.

A leaf module: it imports no torch, so `vitdiag --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitdiag import hardware
from vitdiag.errors import VitdiagError

MODEL, DATA, RUNTIME, OUTPUT, PROBES = "Model", "Data", "Runtime", "Output", "Probes"
_LIBRARY = object()  # marks "the command line's default is the library's"


def parse_floats(text: str | None, option: str, n: int = 3) -> tuple[float, ...] | None:
    """`0.5` or `0.5,0.4,0.3` -> n finite numbers (one number is repeated n times)."""
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
    if not all(math.isfinite(v) for v in values):
        raise VitdiagError(f"{option} {text!r} must be finite numbers; write e.g. 0.5,0.5,0.5.")
    return values


def parse_std(text: str | None) -> tuple[float, ...] | None:
    """--std: finite and strictly positive (it divides)."""
    s = parse_floats(text, "--std")
    if s is not None and not all(v > 0 for v in s):
        raise VitdiagError(
            f"--std {text!r} must be positive numbers; write e.g. 0.229,0.224,0.225."
        )
    return s


def parse_norm(
    mean: str | None, std: str | None
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """--mean and --std checked together: finite, and std strictly positive."""
    return parse_floats(mean, "--mean"), parse_std(std)


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",")]


@dataclass(frozen=True)
class Option:
    """How users set one `Settings` field.

    type: what the command line and the config give (a comma list is a str, parsed by
    `parse` into the field's value). valid/want: the rule a value keeps and how a valid value
    reads in the error. groups: the `@shared` groups that put it on a command. config: also a
    key of vitdiag.toml. cli_default: the command line's default where it differs from the
    library's (`Settings()`); default_text: the default as the docs show it."""

    flag: str
    type: Any
    help: str
    panel: str
    valid: Callable[[Any], bool] | None = None
    want: str = ""
    groups: tuple[str, ...] = ()
    config: bool = True
    short: str | None = None
    parse: Callable[[str], Any] | None = None
    cli_default: Any = _LIBRARY
    default_text: str | None = None


def option(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **how: Any):
    """A `Settings` field that users can set; `how` are the `Option`'s fields."""
    return field(default=default, default_factory=factory, metadata={"option": Option(**how)})


MAX_BATCH = 65536
MAX_WORKERS = 128


def _workers() -> int:
    return hardware.DEFAULT_WORKERS


# the @shared groups (besides one per option name): images, similarity, invariance, collapse;
# probes: the options of the commands that run every probe (report, trend)
_IMAGES = ("images",)
_SIM = ("probes", "similarity")
_INV = ("probes", "invariance")
_COL = ("probes", "collapse")


@dataclass
class Settings:
    """Data, device and probe options shared by every pass (the CLI's common options)."""

    batch_size: int = option(
        64,
        flag="--batch-size",
        type=int,
        help="Images per forward pass.",
        panel=DATA,
        # bounded so a typo cannot ask the loader for a batch larger than any memory
        valid=lambda v: 1 <= v <= MAX_BATCH,
        want=f"between 1 and {MAX_BATCH}, e.g. 64",
        groups=_IMAGES,
    )
    workers: int = option(
        factory=_workers,
        flag="--workers",
        type=int,
        panel=DATA,
        groups=_IMAGES,
        help="Processes that decode and augment images while the model runs (0: in this "
        "process). Default: half the CPUs, at most 8.",
        # bounded so a typo (10**6) cannot fork a million loader processes
        valid=lambda v: 0 <= v <= MAX_WORKERS,
        want=f"0 (load in this process) or more, up to {MAX_WORKERS}",
        default_text="half the CPUs, at most 8",
    )
    limit: int | None = option(
        None,
        flag="--limit",
        type=int | None,
        help="Use at most this many images.",
        panel=DATA,
        valid=lambda v: v >= 1,
        want="positive (or leave it out for every image)",
        groups=_IMAGES,
    )
    seed: int = option(
        0,
        flag="--seed",
        type=int,
        help="Seed for sampling, augmentation and --limit.",
        panel=DATA,
        valid=lambda v: 0 <= v < 2**63,
        want="an integer from 0 to 2^63-1",
        groups=_IMAGES,
    )
    strict: bool = option(
        False,
        flag="--strict",
        type=bool,
        panel=DATA,
        groups=_IMAGES,
        help="Fail on the first unreadable image instead of skipping it.",
    )
    labels: str = option(
        "auto",
        flag="--labels",
        type=str,
        panel=DATA,
        groups=_IMAGES,
        help="How class folders become output indices: name (the model's class names; a "
        "partial match is refused) or positional (folder order = output order). Default auto: "
        "name when the checkpoint carries class names, else positional.",
        valid=lambda v: v in ("auto", "name", "positional"),
        want="auto, name or positional",
    )
    split: str | None = option(
        None,
        flag="--split",
        type=str | None,
        panel=DATA,
        groups=_IMAGES,
        help="Which split: a split sub-folder of --data (val also finds valid/validation), or "
        "the split of an HF dataset (hfds/NAME, a save_to_disk or Parquet folder). Default: the "
        "folder itself; for HF datasets validation, else test, else the only split.",
        want="a split name, e.g. validation",
    )
    image_column: str | None = option(
        None,
        flag="--image-column",
        type=str | None,
        panel=DATA,
        groups=_IMAGES,
        help="HF datasets: the image column (default: the one column with an Image feature).",
        want="a column name of the dataset",
    )
    label_column: str | None = option(
        None,
        flag="--label-column",
        type=str | None,
        panel=DATA,
        groups=_IMAGES,
        help="HF datasets: the label column (default: the one ClassLabel column, else none).",
        want="a column name of the dataset",
    )
    # training-data subsample (collapse, mixup geometry)
    per_class: int | None = option(
        None,
        flag="--per-class",
        type=int | None,
        panel=PROBES,
        groups=_COL,
        help="At most N --data images per class (collapse, mixup geometry).",
        valid=lambda v: v >= 1,
        want="at least 1 (or leave it out for every image)",
    )
    mean: Sequence[float] | None = option(
        None,
        flag="--mean",
        type=str | None,
        panel=DATA,
        groups=_IMAGES,
        help="Normalisation mean, e.g. 0.485,0.456,0.406.",
        parse=lambda text: parse_floats(text, "--mean"),
        want="3 numbers, e.g. 0.485,0.456,0.406",
    )
    std: Sequence[float] | None = option(
        None,
        flag="--std",
        type=str | None,
        panel=DATA,
        groups=_IMAGES,
        help="Normalisation std, e.g. 0.229,0.224,0.225.",
        parse=parse_std,
        want="3 positive numbers, e.g. 0.229,0.224,0.225",
    )
    interpolation: str | None = option(
        None,
        flag="--interpolation",
        want="bicubic, bilinear, nearest, ... (default: the model's)",
        type=str | None,
        panel=DATA,
        groups=("interpolation",),
        help="Resize interpolation (bicubic, bilinear, ...).",
    )
    crop_pct: float | None = option(
        None,
        flag="--crop-pct",
        type=float | None,
        help="Centre-crop fraction.",
        panel=DATA,
        valid=lambda v: 0 < v <= 1,
        want="a fraction in (0, 1], e.g. 0.875 or 1 for no crop",
        groups=("crop_pct",),
    )
    device: str = option(
        "auto",
        flag="--device",
        want="auto, cpu, cuda, cuda:N or mps",
        type=str,
        help="auto, cpu, cuda, cuda:N or mps.",
        panel=RUNTIME,
        groups=("runtime",),
        config=False,
    )
    amp: str = option(
        "off",
        flag="--amp",
        want="off, bf16 or fp16",
        type=str,
        help="Mixed precision: off, bf16 or fp16.",
        panel=RUNTIME,
        groups=("runtime",),
        config=False,
    )
    channels_last: bool = option(
        False,
        flag="--channels-last",
        type=bool,
        help="Run in channels-last memory format.",
        panel=RUNTIME,
        groups=("runtime",),
        config=False,
    )
    quiet: bool = option(
        True,
        flag="--quiet",
        short="-q",
        type=bool,
        help="No progress bar.",
        panel=RUNTIME,
        groups=("runtime",),
        config=False,
        cli_default=False,
    )
    # probes
    layers: list[str] | None = option(
        None,
        flag="--layers",
        want="layer names as the similarity table shows them (default: every layer)",
        type=str | None,
        panel=PROBES,
        groups=_SIM,
        parse=_names,
        help="Similarity: comma-separated layer names to measure (default: every layer).",
    )
    erank_every: int = option(
        16,
        flag="--erank-every",
        type=int,
        panel=PROBES,
        groups=_SIM,
        help="Similarity: effective rank on the images whose index is a multiple of N "
        "(1: every image).",
        valid=lambda v: v >= 1,
        want="at least 1 (1 measures every image), e.g. 16",
    )
    reference_images: int = option(
        256,
        flag="--reference-images",
        type=int,
        panel=PROBES,
        groups=("probes",),
        help="Findings: how many images the same architecture at random initialisation is "
        "measured on, as the reference for P(h) and NC1 (0: no reference).",
        valid=lambda v: v >= 0,
        want="0 (no reference) or more, e.g. 256",
    )
    aug: str | Sequence[str] = option(
        "all",
        flag="--aug",
        want="augmentation names or all, comma-separated",
        type=str,
        panel=PROBES,
        groups=_INV,
        help="Invariance: comma-separated augmentations: mixup, cutmix, erasing-pixel, "
        "erasing-const, erasing-rand, cutout, randaugment, autoaugment, trivialaugment, "
        "colorjitter, rrc (or all); each costs --views extra forwards per image.",
    )
    views: int = option(
        4,
        flag="--views",
        type=int,
        panel=PROBES,
        groups=_INV,
        help="Invariance: augmented views per image (at least 2).",
        valid=lambda v: v >= 2,
        want="at least 2 (Ldiv compares views with each other)",
    )
    embedding: str = option(
        "prelogits",
        flag="--embedding",
        want="prelogits, cls or gap",
        type=str,
        panel=PROBES,
        groups=_INV,
        help="Invariance: f(x) is prelogits (classifier input), cls (final-norm class token) "
        "or gap (mean of final-norm grid tokens).",
    )
    alpha: str | float | None = option(
        None,
        flag="--alpha",
        want="a positive number, or mixup=A,cutmix=B",
        type=str | None,
        panel=PROBES,
        groups=("invariance",),
        help="Invariance: Beta(α, α) of mixup/cutmix: one number for both, or "
        "mixup=0.8,cutmix=1.0 (the defaults).",
    )
    nc4_budget: int = option(
        10_000,
        flag="--nc4-budget",
        type=int,
        panel=PROBES,
        groups=_COL,
        help="Collapse: images kept for NC4 (exact up to this many).",
        valid=lambda v: v >= 1,
        want="at least 1, e.g. 10000",
    )
    pairs: int = option(
        64,
        flag="--pairs",
        type=int,
        panel=PROBES,
        groups=_COL,
        help="Mixup geometry: image pairs of each kind.",
        valid=lambda v: v >= 1,
        want="at least 1, e.g. 64",
    )
    train_mode: bool = option(
        False,
        flag="--train-mode",
        type=bool,
        panel=PROBES,
        groups=("collapse",),
        help="Mixup geometry: run the model in train mode (as the paper does).",
    )
    bins: int = 15
    table_interpolations: Sequence[str] = ("bicubic",)
    rescales: Sequence[str | float] = ("none", "sqrt-axis", "sqrt-area", "empirical")
    reduction: str = "per-token"
    # Refuse data with more classes than outputs (off for probes that never read labels).
    label_check: bool = True
    label: str | None = None  # the progress bar's label (default: the dataset's role)


# -- reading the declarations -------------------------------------------------------------------


def options() -> dict[str, Option]:
    """field name -> its Option, in declaration order (the fields users can set)."""
    return {
        f.name: f.metadata["option"] for f in dataclasses.fields(Settings) if "option" in f.metadata
    }


def library_default(name: str) -> Any:
    f = next(f for f in dataclasses.fields(Settings) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


DATASET_OPTIONS = ("strict", "seed", "split", "image_column", "label_column")


def dataset_options(settings: Any) -> dict[str, Any]:
    """The keyword arguments of `vitdiag.data.open_dataset` that run options set, read off a
    `Settings` or anything with the same attributes (a command's options)."""
    return {name: getattr(settings, name) for name in DATASET_OPTIONS}


def cli_default(name: str) -> Any:
    """The command line's default for field `name` (the library's unless declared otherwise)."""
    opt = options()[name]
    return library_default(name) if opt.cli_default is _LIBRARY else opt.cli_default


def group(name: str) -> tuple[str, ...]:
    """The fields the `@shared` group `name` puts on a command, in declaration order."""
    return tuple(n for n, opt in options().items() if name in opt.groups)


def config_keys() -> tuple[str, ...]:
    """The fields `vitdiag check` reads from vitdiag.toml (the key is the field's name)."""
    return tuple(n for n, opt in options().items() if opt.config)


def check_option(name: str, value: Any, *, where: str | None = None) -> Any:
    """`value` for field `name`, parsed where the option is a comma list and checked against
    its declared rule; None (not given) passes. where: how the error names the option (its
    flag unless given, e.g. "vitdiag.toml: limit")."""
    opt = options()[name]
    label = where or opt.flag
    if value is None:
        return None
    if opt.parse is not None and isinstance(value, str):
        value = opt.parse(value)
    if opt.valid is not None:
        bad = isinstance(value, float) and not math.isfinite(value) or not opt.valid(value)
        if bad:
            raise VitdiagError(f"{label} must be {opt.want}, got {value}.")
    return value


def check_invariance_names(aug: str | Sequence[str], embedding: str, alpha: Any = None) -> None:
    """--aug, --embedding and --alpha of the invariance probe, by name (reads the augmentation
    table, so it imports torch)."""
    from vitdiag.augmentations import parse_alpha, parse_augmentations
    from vitdiag.probes.invariance import EMBEDDINGS

    parse_augmentations(aug)
    parse_alpha(alpha)
    if embedding not in EMBEDDINGS:
        raise VitdiagError(f"--embedding {embedding!r} is not known; use {', '.join(EMBEDDINGS)}.")


def build_settings(values: Mapping[str, Any], *, invariance: bool = False) -> Settings:
    """THE way a command's options become a run's `Settings` (the CLI's commands and `vitdiag
    check` alike): `values` by field name, each parsed and checked by its declaration, every
    other option at the command line's default. invariance: also check --aug, --embedding
    and --alpha by name (that reads the augmentation table)."""
    given = {n: cli_default(n) for n in options()}
    given.update(values)
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(Settings)})
    if unknown:
        raise VitdiagError(f"unknown setting(s) {', '.join(unknown)}.")
    if invariance:
        check_invariance_names(given["aug"], given["embedding"], given["alpha"])
    parsed = {n: check_option(n, v) if n in options() else v for n, v in given.items()}
    return Settings(**parsed)


# -- the README's option table --------------------------------------------------------------------


def _default_text(name: str, opt: Option) -> str:
    if opt.default_text is not None:
        return opt.default_text
    value = cli_default(name)
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "off" if not value else "on"
    return f"`{value}`"


def option_table() -> str:
    """The README's table of the run options, from the declarations (Markdown)."""
    lines = [
        "| option | default | valid values | `vitdiag.toml` key | what it sets |",
        "|---|---|---|---|---|",
    ]
    for name, opt in options().items():
        flag = f"`{opt.flag}`" + (f" / `{opt.short}`" if opt.short else "")
        key = f"`{name}`" if opt.config else "—"
        want = opt.want or ("a flag" if opt.type is bool else "")
        help_text = opt.help.replace("|", "\\|")
        lines.append(f"| {flag} | {_default_text(name, opt)} | {want} | {key} | {help_text} |")
    return "\n".join(lines)


BEGIN, END = "<!-- options: begin -->", "<!-- options: end -->"


def readme_with_table(text: str) -> str:
    """`text` (the README) with the table between its BEGIN and END markers regenerated."""
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise VitdiagError(f"the README has no {BEGIN} ... {END} markers.")
    return f"{head}{BEGIN}\n{option_table()}\n{END}{tail}"


def main(argv: Sequence[str]) -> None:
    """`python -m vitdiag.settings` prints the table; `--readme README.md` rewrites it there."""
    if len(argv) == 2 and argv[0] == "--readme":
        path = Path(argv[1])
        path.write_text(readme_with_table(path.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(option_table())


if __name__ == "__main__":
    main(sys.argv[1:])
