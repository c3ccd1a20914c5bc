"""Results are data: one dataclass serves the table, the JSON, the plot and the CI check."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vitdiag.errors import VitdiagError

SCHEMA_VERSION = 1


@dataclass
class Table:
    """A table for people: a title, column names and rows of plain values."""

    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class Result:
    """What one probe found.

    `metrics` is a flat mapping of named numbers (e.g. ``top1``, ``nc1``, ``shift@384``); these
    are the names thresholds refer to. `tables` are for people, `extra` holds any other
    JSON-able detail (per-layer arrays, plot data).
    """

    probe: str
    definition: str
    metrics: dict[str, float] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


def jsonable(value: Any) -> Any:
    """Turn tensors, numpy values and non-finite floats into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_error(path: Path | str, exc: OSError) -> VitdiagError:
    """The one-line error for an output that could not be written (full disk, read-only, ...)."""
    reason = {
        errno.ENOSPC: "no space left",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EFBIG: "the file size limit was reached",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }.get(exc.errno, exc.strerror or type(exc).__name__)
    return VitdiagError(
        f"{reason} writing {path}; free some space or choose another path (nothing was written)."
    )


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into the one-line VitdiagError."""
    try:
        yield
    except OSError as exc:
        raise write_error(path, exc) from None


def _special(path: Path) -> bool:
    # /dev/null, /dev/stdout, a FIFO: written in place; renaming over one would replace the
    # device itself (as root, /dev is writable).
    try:
        return path.exists() and not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file through a temporary sibling and a rename, so no half-written file remains.

    A device or FIFO (``/dev/null``) is written in place. An OSError (full disk, read-only
    folder) becomes a VitdiagError naming the path; no temporary file remains.
    """
    path = Path(path)
    with writing(path):
        if _special(path):
            with open(path, "wb") as fh:
                fh.write(data)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def document(command: str, results: list[Result], model: dict | None, data: dict | None) -> dict:
    """The JSON document every command writes with --json."""
    from vitdiag import __version__

    return jsonable(
        {
            "schema_version": SCHEMA_VERSION,
            "vitdiag_version": __version__,
            "command": command,
            "model": model,
            "data": data,
            "results": [r.to_dict() for r in results],
        }
    )


def dumps(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def json_to_stdout(json_path: Path | str | None) -> bool:
    """`--json -` sends the document to stdout; the tables for people then go to stderr."""
    return json_path is not None and str(json_path) == "-"


def write_json_text(text: str, json_path: Path | str) -> None:
    """The JSON document to stdout (`-`) or to a file, written atomically."""
    import sys

    if json_to_stdout(json_path):
        sys.stdout.write(text)
    else:
        write_atomic(Path(json_path), text.encode())
