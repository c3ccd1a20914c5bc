"""Diagnostics over training: the probes on every checkpoint of a run, in epoch order.

A run is a list of checkpoints (files, folders holding them, globs). They are ordered by the
epoch each one records (timm train.py's and DeiT's ``epoch``), else by the number in the file
name, else as given, and the choice is stated. The model is built once and the next
checkpoint's weights are loaded into it whenever the recorded architecture, arguments and
native size are the same, so a run costs one build plus one pass per checkpoint; each
checkpoint then goes through `runner.run_all`, the one orchestration path, as `report` does.

A Tracker's CSV (``vitdiag_tracker.csv``: ``step,<probe.metric>,...``) gives the same rows
without checkpoints (`read_log`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import glob
import math
import re
import signal
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitdiag.errors import VitdiagError
from vitdiag.results import Result

LOG_NAME = "vitdiag_tracker.csv"
BY_EPOCH, BY_NAME, BY_GIVEN, BY_STEP = "recorded epoch", "file name", "order given", "logged step"

_SUFFIXES = (".pth.tar", ".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Copies of a numbered checkpoint in a training folder (timm train.py's last/model_best/tmp and
# recovery files, DeiT's best_checkpoint): taken from a folder they would repeat an epoch.
_ALIASES = re.compile(r"(last|model_best|best_checkpoint|tmp|recovery-.*)")
_GLOB = re.compile(r"[*?\[]")


@dataclass
class Row:
    """One checkpoint (or one logged step): where it sits on the x axis and what was measured."""

    label: str
    epoch: float | None  # recorded epoch, number in the name, or logged step; None: position
    x: float  # the plotted position: epoch when known, else the place in the order
    metrics: dict[str, float | None]
    path: str | None = None
    results: list[Result] = field(default_factory=list)
    model: dict | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    reused: bool = False  # weights loaded into the previous checkpoint's model


@dataclass
class TrendRun:
    name: str
    order_by: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    seconds: float = 0.0
    world_size: int = 1
    interrupted: bool = False  # a watch ended by Ctrl-C (SIGINT)


# --------------------------------------------------------------------------- finding


def find_checkpoints(items: Sequence[str], what: str = "") -> list[Path]:
    """Files, model folders (config.json inside), folders holding checkpoints, or globs, in
    the order given (a folder's files in natural name order), each path once; `what` names
    the run in the error when nothing matches."""
    found: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.exists():
            found += _expand(path)
        elif _GLOB.search(item):
            for match in sorted(glob.glob(str(path)), key=_natural):
                found += _expand(Path(match))
        else:
            raise VitdiagError(f"{item}: no such file or folder; check the checkpoint path.")
    unique = list({p.resolve(): p for p in reversed(found)}.values())[::-1]
    if not unique:
        raise VitdiagError(
            f"no checkpoints matched {' '.join(items) or '(nothing given)'}"
            f"{f' (run {what})' if what else ''}; give "
            f"checkpoint files ({'/'.join(_SUFFIXES)}), a folder holding them, or a glob."
        )
    return unique


def _expand(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / "config.json").is_file():
        return [path]  # a model folder is one checkpoint
    inside = sorted(path.iterdir(), key=lambda p: _natural(p.name))
    weights = [p for p in inside if p.is_file() and p.name.endswith(_SUFFIXES)]
    numbered = [p for p in weights if not _ALIASES.fullmatch(_stem(p))]
    folders = [p for p in inside if p.is_dir() and (p / "config.json").is_file()]
    return (numbered or weights) + folders


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


# --------------------------------------------------------------------------- ordering


def recorded_epoch(path: Path, *, unsafe_pickle: bool = False) -> int | None:
    """The epoch a checkpoint records (``epoch`` in a training checkpoint's dict or in a
    safetensors file's metadata), None when it records none. Tensors are memory-mapped, so
    this is cheap; a file that cannot be read gets the loader's own one-line error."""
    if path.is_dir():
        return None
    try:
        value = _metadata_epoch(path, unsafe_pickle)
    except Exception:
        from vitdiag.loading.checkpoint import read_source

        read_source(path, ema=False, unsafe_pickle=unsafe_pickle)  # raises the exact reason
        raise VitdiagError(
            f"{path} is not a readable checkpoint; check that the file is complete."
        ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number.is_integer() else None


def _metadata_epoch(path: Path, unsafe_pickle: bool) -> Any:
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("epoch")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle, mmap=True)
        except RuntimeError:  # torch's legacy (non-zip) format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    return obj.get("epoch") if isinstance(obj, dict) else None


def name_number(path: Path) -> int | None:
    """The last number in a checkpoint's name (``checkpoint-12.pth.tar`` -> 12)."""
    numbers = re.findall(r"\d+", _stem(path))
    return int(numbers[-1]) if numbers else None


def order_checkpoints(
    paths: Sequence[Path], *, unsafe_pickle: bool = False
) -> tuple[list[tuple[Path, int | None]], str, list[str]]:
    """(path, epoch) in training order, how the order was decided, and notes.

    Recorded epochs when every checkpoint records one; else the numbers in the file names
    when every name has one; else the order given (epoch None)."""
    recorded = [recorded_epoch(p, unsafe_pickle=unsafe_pickle) for p in paths]
    named = [name_number(p) for p in paths]
    notes = []
    if all(e is not None for e in recorded):
        epochs, how = recorded, BY_EPOCH
    elif all(n is not None for n in named):
        epochs, how = named, BY_NAME
        if any(e is not None for e in recorded):
            notes.append("not every checkpoint records its epoch, so the file names order them.")
    else:
        return (
            [(p, None) for p in paths],
            BY_GIVEN,
            [
                "the checkpoints record no epoch and their names hold no number, so they are "
                "taken in the order given."
            ],
        )
    ordered = sorted(zip(paths, epochs, strict=True), key=lambda pe: pe[1])
    seen: dict[int, Path] = {}
    for p, e in ordered:
        if e in seen:
            notes.append(f"{seen[e].name} and {p.name} both give epoch {e}.")
        seen[e] = p
    return ordered, how, notes


# --------------------------------------------------------------------------- loading


@dataclass
class ModelOptions:
    arch: str | None = None
    ema: bool = False
    unsafe_pickle: bool = False
    model_args: dict = field(default_factory=dict)
    native_size: int | None = None


class SharedModel:
    """Loads checkpoints one after another into one model while the architecture allows.

    The first checkpoint is loaded by `vitdiag.model.load`; a later one whose resolved
    architecture, arguments, native size and recorded data config (the whole `Spec` but its
    label names) equal the model's has its weights loaded strictly into the same module, which
    is what `load` would have built. Otherwise it is loaded on its own and becomes the model.
    """

    def __init__(self, options: ModelOptions) -> None:
        self.options = options
        self.loaded: Any = None
        self.spec: Any = None
        self.first: Path | None = None

    def __call__(self, path: Path) -> tuple[Any, bool]:
        from vitdiag.loading.checkpoint import read_source
        from vitdiag.loading.resolve import resolve

        o = self.options
        ck = read_source(path, ema=o.ema, unsafe_pickle=o.unsafe_pickle)
        spec = resolve(ck, arch=o.arch, model_args=dict(o.model_args), native=o.native_size)
        if self.spec is not None and spec.arch != self.spec.arch:
            raise VitdiagError(
                f"{path.name} is a {spec.arch} but {self.first.name} is a {self.spec.arch}; a "
                "trend across architectures means nothing, so give each its own --run NAME=GLOB."
            )
        self.first = self.first or path
        if self.loaded is not None and _same(spec, self.spec):
            self.loaded = _swap(self.loaded, ck, spec)
            return self.loaded, True
        del ck
        self.loaded = None  # one model in memory at a time
        from vitdiag.model import load

        self.loaded = load(
            path,
            arch=o.arch,
            ema=o.ema,
            unsafe_pickle=o.unsafe_pickle,
            model_args=dict(o.model_args) or None,
            native_size=o.native_size,
        )
        self.spec = spec
        return self.loaded, False


def _same(a: Any, b: Any) -> bool:
    return dataclasses.replace(a, label_names=None) == dataclasses.replace(b, label_names=None)


def _swap(loaded: Any, ck: Any, spec: Any) -> Any:
    """`loaded` with `ck`'s weights in its model; its provenance is `ck`'s."""
    from vitdiag.loading.build import check_fit
    from vitdiag.loading.checkpoint import sha256_file

    model = loaded.model
    sd = dict(ck.state_dict)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_fit(shapes, sd, spec.arch, str(ck.path))
    model.load_state_dict(sd, strict=True)
    provenance = dict(loaded.provenance)
    provenance.update(
        path=str(ck.path),
        weights_file=str(ck.weights),
        config=str(ck.config_path) if ck.config_path else None,
        sha256=sha256_file(ck.weights),
        format=ck.fmt,
        decided_by=spec.decided_by,
        ema=ck.ema,
        label_names=spec.label_names,
    )
    provenance.pop("ema_note", None)
    if ck.ema_note:
        provenance["ema_note"] = ck.ema_note
    return dataclasses.replace(loaded, provenance=provenance, state_dict=sd)


# --------------------------------------------------------------------------- measuring


def flatten(results: Sequence[Result]) -> dict[str, float | None]:
    """{"probe.metric": value} over every result, NaN as None (as the JSON writes it)."""
    out: dict[str, float | None] = {}
    for r in results:
        for key, value in r.metrics.items():
            v = float(value) if value is not None else None
            out[f"{r.probe}.{key}"] = v if v is None or math.isfinite(v) else None
    return out


def labels_of(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def trend_run(
    name: str,
    paths: Sequence[Path],
    source: Any,
    *,
    val_source: Any = None,
    probes: set[str] | None = None,
    sizes: Sequence[int] | None = None,
    settings: Any = None,
    model: ModelOptions | None = None,
) -> TrendRun:
    """Order `paths` and run the probes on each checkpoint: one `Row` per checkpoint."""
    from vitdiag.runner import Settings

    model = model or ModelOptions()
    settings = settings or Settings()
    ordered, how, notes = order_checkpoints(paths, unsafe_pickle=model.unsafe_pickle)
    run = TrendRun(name, how, notes=list(notes))
    measure = Measure(SharedModel(model), source, val_source, probes, sizes, settings)
    labels = labels_of([p for p, _ in ordered])
    start = time.perf_counter()
    for i, ((path, epoch), label) in enumerate(zip(ordered, labels, strict=True)):
        run.rows.append(measure(run, path, epoch, label, i))
    run.seconds = time.perf_counter() - start
    if all(_ALIASES.fullmatch(_stem(p)) for p, _ in ordered):
        names = ", ".join(p.name for p, _ in ordered)
        run.notes.append(
            f"only {names} (a copy train.py keeps, not a numbered checkpoint) is there, so the "
            "trend has no more points than that; keep checkpoint-N files for a trend."
        )
    run.notes += rebuilt_notes(run)
    return run


@dataclass
class Measure:
    """The probes on one checkpoint as a `Row` of `run` (whose data and world size it sets;
    the caller appends the row): the one measurement `trend_run` and `watch_run` share."""

    shared: SharedModel
    source: Any
    val_source: Any
    probes: set[str] | None
    sizes: Sequence[int] | None
    settings: Any

    def __call__(self, run: TrendRun, path: Path, epoch: int | None, label: str, i: int) -> Row:
        from vitdiag.model import describe
        from vitdiag.runner import run_all

        loaded, reused = self.shared(path)
        s = dataclasses.replace(self.settings, label=label)
        results = run_all(
            loaded,
            self.source,
            probes=self.probes,
            val_source=self.val_source,
            sizes=self.sizes,
            settings=s,
        )
        row = Row(
            label=label,
            epoch=epoch,
            x=float(epoch) if epoch is not None else float(i),
            metrics=flatten(results),
            path=str(path),
            results=list(results),
            model=describe(loaded),
            skipped=dict(results.skipped),
            reused=reused,
        )
        run.data = run.data or dict(results.data)
        run.world_size = results.world_size
        return row


def rebuilt_notes(run: TrendRun) -> list[str]:
    rebuilt = sum(1 for r in run.rows[1:] if not r.reused)
    if not rebuilt:
        return []
    return [
        f"{rebuilt} checkpoint(s) could not share the previous one's model (another "
        "architecture, arguments or size), so they were loaded separately."
    ]


# --------------------------------------------------------------------------- watching


@dataclass
class WatchOptions:
    poll: float = 10.0  # seconds between looks at the folder
    max_checkpoints: int | None = None  # stop after this many are measured; None: until Ctrl-C


def watch_candidates(folder: Path) -> dict[Path, tuple[int, int]]:
    """The numbered checkpoint files in `folder` now, each with (size, mtime_ns). train.py's
    last/model_best/tmp copies are left out: each repeats a numbered one, and last.pth.tar is
    rewritten every epoch."""
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise VitdiagError(
            f"--watch {folder} cannot be read ({e.strerror}); give train.py's output folder."
        ) from None
    found = {}
    for p in entries:
        if p.name.startswith(".") or not p.name.endswith(_SUFFIXES):
            continue
        if _ALIASES.fullmatch(_stem(p)):
            continue
        try:
            st = p.stat()
        except OSError:
            continue  # removed since the listing (train.py keeps only the best few)
        if stat.S_ISREG(st.st_mode):
            found[p] = (st.st_size, st.st_mtime_ns)
    return found


class Watcher:
    """Gives each checkpoint file in a folder once, when it is complete: non-empty, its size
    and mtime unchanged over two consecutive looks, and readable (its epoch can be read). A file
    that stops changing but cannot be read is tried again once it changes."""

    def __init__(self, folder: Path, unsafe_pickle: bool = False) -> None:
        self.folder, self.unsafe_pickle = folder, unsafe_pickle
        self.seen: dict[Path, tuple[int, int]] = {}
        self.given: set[Path] = set()
        self.unreadable: dict[Path, tuple[int, int]] = {}
        self.notes: list[str] = []

    def complete(self) -> list[tuple[Path, int | None, bool]]:
        """(path, epoch, whether the file records it) of the files complete since the last
        look, by epoch (recorded, else the number in the name)."""
        now = watch_candidates(self.folder)
        stable = [
            p
            for p, sig in sorted(now.items(), key=lambda ps: _natural(ps[0].name))
            if sig[0] > 0
            and self.seen.get(p) == sig
            and p not in self.given
            and self.unreadable.get(p) != sig
        ]
        self.seen = now
        found = []
        for p in stable:
            try:
                recorded = recorded_epoch(p, unsafe_pickle=self.unsafe_pickle)
            except VitdiagError as e:
                self.unreadable[p] = now[p]
                self.notes.append(f"{p.name} stopped changing but is not readable ({e}).")
                continue
            self.given.add(p)
            epoch = recorded if recorded is not None else name_number(p)
            found.append((p, epoch, recorded is not None))
        return sorted(found, key=lambda f: (f[1] is None, f[1] or 0))


@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C (SIGINT) inside the block takes effect when it ends, so a write it would cut
    short finishes first. Only the main thread can set signal handlers; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, None)


def watch_run(
    folder: Path,
    source: Any,
    *,
    val_source: Any = None,
    probes: set[str] | None = None,
    sizes: Sequence[int] | None = None,
    settings: Any = None,
    model: ModelOptions | None = None,
    watch: WatchOptions | None = None,
    on_update: Any = None,
    name: str = "",
) -> TrendRun:
    """Follow a training run's output folder: measure each checkpoint once it is complete
    (those already there first), keep the rows in epoch order and call `on_update(run, row)`
    after each new `row`, with Ctrl-C held until it returns, so what it writes is whole. Ends after
    `watch.max_checkpoints` rows or at Ctrl-C (then `run.interrupted`, the rows so far)."""
    from vitdiag.runner import Settings

    model, watch = model or ModelOptions(), watch or WatchOptions()
    run = TrendRun(name, BY_EPOCH)
    measure = Measure(SharedModel(model), source, val_source, probes, sizes, settings or Settings())
    watcher = Watcher(Path(folder), model.unsafe_pickle)
    recorded: list[bool] = []
    start = time.perf_counter()

    def more() -> bool:
        return watch.max_checkpoints is None or len(run.rows) < watch.max_checkpoints

    try:
        while more():
            for path, epoch, has_epoch in watcher.complete():
                if not more():
                    break
                row = _measure_present(measure, run, path, epoch)
                if row is None:
                    continue
                with interrupts_held():
                    run.rows.append(row)
                    run.rows.sort(key=lambda r: r.x)
                    recorded.append(has_epoch)
                    run.order_by = _watch_order(recorded, run.rows)
                    run.notes = [*watcher.notes, *rebuilt_notes(run)]
                    run.seconds = time.perf_counter() - start
                    if on_update is not None:
                        on_update(run, row)
            if more():
                time.sleep(watch.poll)
    except KeyboardInterrupt:
        run.interrupted = True
    return run


def _measure_present(measure: Measure, run: TrendRun, path: Path, epoch: int | None) -> Any:
    """The row of `path`, None when train.py removed the file before it was read (it keeps
    only the best few checkpoints)."""
    try:
        return measure(run, path, epoch, path.name, len(run.rows))
    except VitdiagError:
        if path.exists():
            raise
        return None


def _watch_order(recorded: list[bool], rows: list[Row]) -> str:
    if all(recorded):
        return BY_EPOCH
    return BY_NAME if all(r.epoch is not None for r in rows) else BY_GIVEN


def log_runs(runs: Sequence[TrendRun], make_writer: Any) -> None:
    """Each run's rows through `make_writer(run_name)` -> `writer(step, metrics)` (the
    Tracker's writer protocol; the step is the row's epoch, else its place), then close()."""
    for run in runs:
        writer = make_writer(run.name)
        try:
            for row in run.rows:
                writer(int(row.x), dict(row.metrics))
        finally:
            close = getattr(writer, "close", None)
            if callable(close):
                close()


# --------------------------------------------------------------------------- a Tracker's log


def log_file(path: Path) -> Path:
    """The CSV a Tracker wrote: the file itself, or vitdiag_tracker.csv in the folder."""
    path = Path(path).expanduser()
    csv_path = path / LOG_NAME if path.is_dir() else path
    if not csv_path.is_file():
        raise VitdiagError(
            f"{path}: no {LOG_NAME} there; point --from-log at the Tracker's log_dir (or the CSV)."
        )
    return csv_path


def read_log(path: Path, name: str) -> TrendRun:
    """A Tracker's CSV (header ``step,<probe.metric>,...``; an empty cell = not measured)."""
    csv_path = log_file(path)
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            table = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise VitdiagError(f"{csv_path} is not a readable CSV ({e}); check the file.") from None
    if not table or not table[0] or table[0][0].strip() != "step":
        raise VitdiagError(
            f"{csv_path} does not start with a 'step' column; give a CSV the Tracker wrote."
        )
    header = [h.strip() for h in table[0]]
    if len(set(header)) != len(header):
        raise VitdiagError(f"{csv_path} names a column twice; give a CSV the Tracker wrote.")
    run = TrendRun(name, BY_STEP)
    for line, cells in enumerate(table[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise VitdiagError(
                f"{csv_path} line {line} has {len(cells)} cells for {len(header)} columns; "
                "fix or regenerate the file."
            )
        values = [_cell(c, csv_path, line, col) for c, col in zip(cells, header, strict=True)]
        step = values[0]
        if step is None:
            raise VitdiagError(f"{csv_path} line {line} has no step; fix the file.")
        metrics = dict(zip(header[1:], values[1:], strict=True))
        label = f"step {int(step) if step.is_integer() else step}"
        run.rows.append(Row(label=label, epoch=step, x=step, metrics=metrics))
    if not run.rows:
        raise VitdiagError(f"{csv_path} holds no rows; let the Tracker step at least once.")
    run.rows.sort(key=lambda r: r.x)
    return run


def _cell(text: str, path: Path, line: int, column: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        v = float(text)
    except ValueError:
        raise VitdiagError(
            f"{path} line {line}, column {column}: {text!r} is not a number; fix the file."
        ) from None
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------- the document


def trend_document(runs: Sequence[TrendRun]) -> dict:
    """trend.json: every run, each row with its epoch, flattened metrics and full results."""
    from vitdiag import __version__
    from vitdiag.results import SCHEMA_VERSION, jsonable

    doc = {
        "schema_version": SCHEMA_VERSION,
        "vitdiag_version": __version__,
        "command": "trend",
        "data": next((r.data for r in runs if r.data), None),
        "runs": [
            {
                "name": run.name,
                "order_by": run.order_by,
                "notes": list(run.notes),
                "rows": [_row_json(row) for row in run.rows],
            }
            for run in runs
        ],
        "run": {
            "seconds": sum(r.seconds for r in runs),
            "world_size": max((r.world_size for r in runs), default=1),
        },
    }
    return jsonable(doc)


def _row_json(row: Row) -> dict:
    out = {"label": row.label, "epoch": row.epoch, "x": row.x, "metrics": dict(row.metrics)}
    if row.path is not None:
        out.update(
            path=row.path,
            model_reused=row.reused,
            model=row.model,
            skipped=dict(row.skipped),
            results=[r.to_dict() for r in row.results],
        )
    return out
