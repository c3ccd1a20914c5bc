"""Determinism: the same command gives the same JSON bytes (timings aside), any --workers and
--batch-size give the same numbers, and `--json -` writes one valid JSON document to stdout
(no NaN token: an undefined statistic is null with a note saying why)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES
from tolerances import FORWARD_RTOL

from vitdiag.cli import app

MODEL = str(FIXTURES / "models" / "vit_nomix")
# What may differ between two runs of one command: wall-clock time, and the settings that the
# compared runs differ in on purpose.
TIMING_KEYS = {"seconds"}
EXACT = {"top1", "top5", "accuracy", "n", "count", "counts", "n_images", "n_unreadable"}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    dst = tmp_path_factory.mktemp("small")
    for cdir in sorted((FIXTURES / "data" / "val").iterdir()):
        (dst / cdir.name).mkdir()
        for f in sorted(cdir.iterdir())[:2]:
            shutil.copy(f, dst / cdir.name / f.name)
    return str(dst)


def _no_constant(token: str):
    raise ValueError(f"{token} is not valid JSON")


def _cli(args: list[str], capfd) -> tuple[int, str, str]:
    """The CLI in-process, with stdout captured at the file descriptor (library prints too)."""
    capfd.readouterr()
    try:
        app(args, prog_name="vitdiag")
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    sys.stdout.flush()
    out, err = capfd.readouterr()
    return code, out, err


def _strip(doc, drop: set[str]):
    if isinstance(doc, dict):
        return {k: _strip(v, drop) for k, v in doc.items() if k not in drop}
    if isinstance(doc, list):
        return [_strip(v, drop) for v in doc]
    return doc


def _same_numbers(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _same_numbers(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_numbers(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and where.rsplit(".", 1)[-1] not in EXACT:
        assert isinstance(b, (int, float)), where
        assert b == pytest.approx(a, rel=FORWARD_RTOL, abs=FORWARD_RTOL) or (
            math.isnan(a) and math.isnan(b)
        ), where
    else:
        assert a == b, where


def _report(small: str, out: Path, capfd, *extra: str) -> dict:
    args = ["report", MODEL, "--data", small, "--json", str(out / "r.json"), "--no-plots"]
    # Fewer invariance views and mixup pairs than the defaults keep the test fast; every probe
    # still runs.
    args += ["--out", str(out), "--views", "2", "--pairs", "8"]
    code, _, err = _cli([*args, *extra], capfd)
    assert code == 0, err
    return json.loads((out / "r.json").read_text(), parse_constant=_no_constant)


def test_the_same_report_twice_is_byte_identical_and_workers_change_no_number(
    small, tmp_path, capfd
):
    first, again, workers = (
        _report(small, tmp_path / name, capfd, *extra)
        for name, extra in (("a", ()), ("b", ()), ("w", ("--workers", "2")))
    )
    one, two = (json.dumps(_strip(d, TIMING_KEYS), indent=2).encode() for d in (first, again))
    assert one == two
    _same_numbers(
        _strip(first, TIMING_KEYS | SETTINGS_KEYS), _strip(workers, TIMING_KEYS | SETTINGS_KEYS)
    )


# invariance and mixup_geometry pair images inside a batch (mixing partners; documented in
# each), so their numbers depend on --batch-size by definition; every other probe must not.
PROBES = "classifier,eval,calibration,variance,collapse,similarity"
SETTINGS_KEYS = {"batch_size", "workers"}


def test_batch_size_changes_no_number(small, tmp_path, capfd):
    docs = [
        _strip(
            _report(small, tmp_path / b, capfd, "--batch-size", b, "--probes", PROBES),
            TIMING_KEYS | SETTINGS_KEYS,
        )
        for b in ("64", "7", "1")
    ]
    for other in docs[1:]:
        _same_numbers(docs[0], other)


@pytest.mark.parametrize(
    "command", ["info", "eval", "collapse", "similarity", "variance", "invariance", "report"]
)
def test_json_dash_writes_one_valid_document_and_nothing_else(small, command, capfd, tmp_path):
    args = [command, MODEL] if command == "info" else [command, MODEL, "--data", small]
    if command != "info":
        args += ["--limit", "1"]
    if command == "variance":
        args += ["--sizes", "32,48"]
    if command == "report":
        args += ["--out", str(tmp_path / "o"), "--no-plots"]
    code, out, err = _cli([*args, "--json", "-"], capfd)
    assert code == 0, err
    doc = json.loads(out, parse_constant=_no_constant)  # the whole of stdout, strictly
    assert isinstance(doc, dict) and doc


def _nulls(doc, where=""):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _nulls(v, f"{where}.{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _nulls(v, f"{where}[{i}]")
    elif doc is None:
        yield where


def test_limit_1_report_marks_every_undefined_metric_as_null_with_a_note(small, capfd, tmp_path):
    args = ["report", MODEL, "--data", small, "--limit", "1", "--json", "-", "--no-plots"]
    code, out, err = _cli([*args, "--out", str(tmp_path / "o")], capfd)
    assert code == 0, err
    doc = json.loads(out, parse_constant=_no_constant)
    undefined = 0
    for result in doc["results"]:
        nulls = list(_nulls(result["metrics"]))
        undefined += len(nulls)
        if nulls:
            assert result["notes"], f"{result['probe']}: {nulls[:3]} are null with no note"
    assert undefined > 0  # one image: NC1 and the like cannot be defined
    by_probe = {r["probe"]: r for r in doc["results"]}
    assert by_probe["eval"]["metrics"]["n_images"] == 1
