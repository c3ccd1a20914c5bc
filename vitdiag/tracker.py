"""`vitdiag.Tracker`: the probes inside a training loop, on a fixed set of images, logged per step.

    tracker = vitdiag.Tracker(model, "data/train", probes=["eval", "collapse", "similarity"],
                              val="data/val", log_dir="runs/exp1")
    for epoch in range(epochs):
        train_one_epoch(...)
        tracker.step(epoch)
    tracker.history  # [{"step": 0, "eval.top1": ..., "collapse.nc1": ..., ...}, ...]

Each step goes through `runner.run_all`, the path `vitdiag report` takes, so a step's numbers
are the report's numbers on a checkpoint saved at that step. Measuring must not change
training: the images are the same every call (the loader's order is seeded, the transform is
the eval transform), the forwards run in inference mode with every module in eval mode, and
afterwards every module's train/eval flag, every parameter's `.grad`, every parameter and buffer
(device, dtype, the same tensor objects) and the Python, NumPy, torch CPU and CUDA random states
are as the loop left them (`engine.unchanged`). The optimizer is never seen.

Under torchrun every rank calls `step`: the images are sharded, the sums all-reduced, every
rank gets the same numbers, and rank 0 alone logs.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from vitdiag.distributed import is_main_process
from vitdiag.engine import unchanged
from vitdiag.errors import VitdiagError
from vitdiag.model import LoadedModel, from_module
from vitdiag.results import write_atomic
from vitdiag.runner import Results, Settings, open_source, parse_probes, plan_probes, run_all

CSV_NAME = "vitdiag_tracker.csv"
DEFAULT_PROBES = ("eval", "collapse", "similarity")

Writer = Callable[[int, dict[str, float]], Any]


class Tracker:
    """Run vitdiag's probes on a live model every `every` steps and log what they measure.

    model: the `nn.Module` being trained (timm or any model the family table knows; a
        DistributedDataParallel or torch.compile wrapper is looked through).
    data: what `vitdiag.open_dataset` takes, or an opened source; it feeds the probes that read
        training data (collapse, similarity, ...) and, without `val`, the evaluation ones too.
    val: the same for eval, calibration and variance (optional).
    probes: probe names (a list or a comma string); None or "all" for every probe that applies.
    every: run when `step % every == 0`. limit: the first `limit` images of a seeded shuffle.
    data_config: timm's data config (input_size, mean, std, crop_pct, interpolation) for when
        the module's own pretrained_cfg is not how it is fed.
    device: where the probes run; default the model's own device. Another device moves the
        model there for the step and back afterwards.
    log_dir: a folder for `vitdiag_tracker.csv` (one row per step that ran, header
        `step,<probe.metric>,...`, an empty cell where a metric was not measured; `vitdiag trend
        --from-log DIR` reads it) and, when the `tensorboard` package is installed (the
        `vitdiag[tensorboard]` extra), TensorBoard scalars `<probe>/<metric>`; without it that
        part is skipped silently (tensorboard=False skips it always).
    writer: any callable `writer(step, metrics)`; it gets the finite metrics only, named as in
        the CSV (`finite_metrics`). `vitdiag.integrations.mlflow.MlflowWriter` and
        `vitdiag.integrations.wandb.WandbWriter` log to MLflow and W&B.
    options: `runner.Settings` fields (batch_size, workers, per_class, seed, amp, ...).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data: Any,
        probes: Iterable[str] | str | None = DEFAULT_PROBES,
        every: int = 1,
        limit: int | None = None,
        data_config: dict | None = None,
        device: str | torch.device | None = None,
        log_dir: str | Path | None = None,
        writer: Writer | None = None,
        *,
        val: Any = None,
        tensorboard: bool | None = None,
        **options: Any,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise VitdiagError(f"Tracker every= must be a positive whole number, got {every!r}.")
        if writer is not None and not callable(writer):
            raise VitdiagError("Tracker writer= must be a callable writer(step, metrics).")
        self.model = _unwrap(model)
        self.every = every
        self.settings = _settings(self.model, limit, device, options)
        self.loaded: LoadedModel = from_module(self.model, data_config)
        self.source = open_source(data, self.settings)
        self.val = open_source(val, self.settings)
        self.probes = parse_probes(list(probes) if not isinstance(probes, str) else probes)
        # Asking for a probe that cannot run is an error now, not at the end of epoch one.
        plan_probes(self.loaded, self.source, self.val, self.probes)
        self.history: list[dict[str, Any]] = []
        self.writer = writer
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._csv = CsvLog(self.log_dir / CSV_NAME) if self.log_dir is not None else None
        self._tensorboard = tensorboard
        self._board: Any = None

    def step(self, step: int) -> Results | None:
        """Measure at `step` (when `step % every == 0`), log, and return the results (None when
        this step is not measured). Under torchrun every rank must call it."""
        if step % self.every:
            return None
        with unchanged(self.model, placement=True):
            results = run_all(
                self.loaded,
                self.source,
                probes=self.probes,
                val_source=self.val,
                settings=self.settings,
            )
        metrics = flatten(results)
        self.history.append({"step": step, **metrics})
        if is_main_process():
            self._log(step, metrics)
        return results

    def close(self) -> None:
        """Flush and close the TensorBoard writer, if one was opened, and the writer= when it
        has a close() (the MLflow and W&B writers end only a run they started)."""
        close = getattr(self.writer, "close", None)
        if callable(close):
            close()
        if self._board is not None:
            self._board.close()
            self._board = None

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if self._csv is not None:
            self._csv.write(step, metrics)
        board = self._board_writer()
        if board is not None:
            for key, value in finite_metrics(metrics).items():
                board.add_scalar(board_name(key), value, step)
            board.flush()
        if self.writer is not None:
            self.writer(step, finite_metrics(metrics))

    def _board_writer(self) -> Any:
        if self._board is None and self.log_dir is not None and self._tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the optional extra is absent: CSV and writer still log
                self._tensorboard = False
                return None
            self._board = SummaryWriter(log_dir=str(self.log_dir))
        return self._board


def flatten(results: Iterable[Any]) -> dict[str, float]:
    """`{"<probe>.<metric>": value}` over every result's numeric metrics, in report order."""
    out: dict[str, float] = {}
    for result in results:
        for key, value in result.metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{result.probe}.{key}"] = value
    return out


def finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """What every writer logs: the metrics whose value is a finite number, as floats, names
    unchanged (``<probe>.<metric>``). None and NaN mean "not measured" and are left out (the
    CSV's empty cell), so no writer shows a point that was not measured."""
    out = {}
    for key, value in metrics.items():
        if value is None or isinstance(value, bool):
            continue
        number = float(value)
        if math.isfinite(number):
            out[key] = number
    return out


def board_name(key: str) -> str:
    """TensorBoard's tag for a metric: the first '.' becomes '/' (``eval/top1``), so TensorBoard
    groups a probe's metrics; the one transformation any writer applies to the names."""
    return key.replace(".", "/", 1)


class CsvLog:
    """The tracker's CSV: rows are appended; a new metric rewrites the file with a wider header
    (through a temporary file and a rename, so a reader never sees half a file).

    Rows an earlier run left in the file are kept when they come before this run's first step
    (a resumed run continues its log) and dropped from there on (a restarted run redoes them).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.columns: list[str] = []
        self.rows: list[dict[str, str]] | None = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        first = self.rows is None
        if first:
            self.columns, earlier = read_csv(self.path)
            self.rows = [r for r in earlier if _step_of(r, self.path) < step]
        row = {"step": str(step), **{k: _cell(v) for k, v in metrics.items()}}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if first or new:
            self.columns += new
            self._rewrite()
        else:
            with self.path.open("a", newline="") as fh:
                csv.DictWriter(fh, self.columns, restval="").writerow(row)

    def _rewrite(self) -> None:
        buf = io.StringIO(newline="")
        out = csv.DictWriter(buf, self.columns, restval="")
        out.writeheader()
        out.writerows(self.rows or [])
        write_atomic(self.path, buf.getvalue().encode())


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a tracker CSV; ([], []) when there is none yet."""
    path = Path(path)
    if not path.exists():
        return [], []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    if not columns or columns[0] != "step":
        raise VitdiagError(
            f"{path} is not a vitdiag tracker log (its first column is not 'step'); "
            "give the Tracker another log_dir or remove the file."
        )
    return ["step", *columns[1:]], rows


def _step_of(row: dict[str, str], path: Path) -> float:
    try:
        return float(row["step"])
    except (TypeError, ValueError):
        raise VitdiagError(
            f"{path} has a row whose step {row.get('step')!r} is not a number; "
            "give the Tracker another log_dir or remove the file."
        ) from None


def _cell(value: Any) -> str:
    # repr: the shortest text that reads back as the same float, so the log loses no digit.
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""  # not measured, as the other writers skip it
    return repr(float(value)) if isinstance(value, float) else str(value)


def _unwrap(model: Any) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise VitdiagError(f"Tracker needs the torch.nn.Module being trained, got {type(model)}.")
    model = getattr(model, "_orig_mod", model)  # torch.compile
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _own_device(model: torch.nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _settings(
    model: torch.nn.Module, limit: int | None, device: Any, options: dict[str, Any]
) -> Settings:
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise VitdiagError(
            f"Tracker got unknown option(s) {', '.join(unknown)}; "
            f"options are runner.Settings fields ({', '.join(sorted(known))})."
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise VitdiagError(f"Tracker limit= must be a positive number of images, got {limit!r}.")
    where = str(device) if device is not None else str(_own_device(model))
    return dataclasses.replace(Settings(), limit=limit, device=where, **options)
