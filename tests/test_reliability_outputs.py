"""Outputs under hostile conditions, for real: /dev/null and /dev/full, a file size limit
(RLIMIT_FSIZE, the kernel's own EFBIG), a read-only folder, an output that is an input, and
Ctrl-C in the middle of `vitdiag report`. Each gives a correct write or one line and exit 2;
never a traceback, a partial file, a temporary file left behind, or a replaced device."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import FIXTURES
from vitdiag.errors import VitdiagError
from vitdiag.results import write_atomic, write_json_text

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
MODEL = FIXTURES / "models" / "vit_nomix"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _is_char_device(path: str) -> bool:
    return stat.S_ISCHR(os.stat(path).st_mode)


def _cli(args: list[str], limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    """`python -m vitdiag ARGS`, optionally under RLIMIT_FSIZE with SIGXFSZ ignored, so that a
    write past the limit fails with EFBIG as on a full disk."""
    pre = None
    if limit_bytes is not None:

        def pre() -> None:
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-m", "vitdiag", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        preexec_fn=pre,
        timeout=120,
    )


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_json_to_dev_null_writes_to_the_device_and_keeps_it():
    from vitdiag.cli import app

    for _ in range(1):
        res = runner.invoke(
            app,
            [
                "eval",
                str(MODEL),
                "--data",
                str(FIXTURES / "data/val"),
                "--limit",
                "4",
                "--json",
                "/dev/null",
            ],
        )
        assert res.exit_code == 0, res.output
        assert _is_char_device("/dev/null")


def test_dev_full_is_one_line_no_space_and_the_device_stays():
    with pytest.raises(VitdiagError, match="no space left writing /dev/full"):
        write_json_text("{}\n", "/dev/full")
    assert _is_char_device("/dev/full")
    from vitdiag.cli import app

    res = runner.invoke(
        app,
        ["eval", str(MODEL), "--data", "fixtures/data/val", "--limit", "4", "--json", "/dev/full"],
    )
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert errors == [res.output.splitlines()[-1]]  # the tables printed, then one line
    assert errors[0].startswith("error: no space left writing /dev/full")
    assert "Traceback" not in res.output
    assert _is_char_device("/dev/full")


_UNDER_LIMIT = """
import resource, signal, sys
from typer.testing import CliRunner
from vitdiag.cli import app
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG
for limit, args in [(2000, sys.argv[1:9]), (50000, sys.argv[9:])]:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    res = CliRunner().invoke(app, args)
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error")]
    print(res.exit_code, " | ".join(errors), "Traceback" in res.output)
"""


def test_file_size_limit_leaves_no_partial_report_or_checkpoint(tmp_path):
    # one process, two writers: report.json alone is over 2 kB, the weights far over 50 kB
    report = ["report", str(MODEL), "--data", "fixtures/data/val", "--limit", "8"]
    report += ["--out", str(tmp_path / "rep")]
    fix = ["fix-posembed", str(MODEL), "--size", "64", "--rescale", "none"]
    fix += ["--out", str(tmp_path / "fx")]
    proc = subprocess.run(
        [sys.executable, "-c", _UNDER_LIMIT, *report, *fix],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=120,
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout + proc.stderr
    for line, out in zip(lines, ("rep", "fx"), strict=True):
        assert line.startswith(f"2 error: the file size limit was reached writing {tmp_path / out}")
        assert line.endswith(" False") and " | " not in line  # one error line, no traceback
    assert list(tmp_path.iterdir()) == []  # no output, no temporary sibling


def test_write_atomic_failure_leaves_the_old_file(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    # /proc refuses writes even to root: a real read-only target
    with pytest.raises(VitdiagError, match="writing /proc/version"):
        write_atomic(Path("/proc/version"), b"x")
    write_atomic(target, b"new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_read_only_folder_is_refused_before_work(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 555 does not stop root's writes")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    proc = _cli(
        [
            "eval",
            str(MODEL),
            "--data",
            "fixtures/data/val",
            "--limit",
            "4",
            "--json",
            str(ro / "r.json"),
        ]
    )
    ro.chmod(0o755)
    assert proc.returncode == 2
    assert "not writable" in _one_error_line(proc)


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "{m}", "--data", "fixtures/data/val", "--limit", "4", "--json", "{m}/config.json"],
        [
            "eval",
            "{m}",
            "--data",
            "fixtures/data/val",
            "--limit",
            "4",
            "--json",
            "{link}/config.json",
        ],
        ["fix-posembed", "{m}", "--size", "64", "--rescale", "none", "--out", "{link}", "--force"],
        # a new file inside the checkpoint folder: it would sit beside the weights
        ["eval", "{m}", "--data", "fixtures/data/val", "--limit", "4", "--json", "{m}/new.json"],
        ["report", "{m}", "--data", "fixtures/data/val", "--out", "fixtures/data", "--force"],
    ],
)
def test_an_output_that_is_an_input_is_refused_even_with_force(tmp_path, args):
    link = tmp_path / "link"
    link.symlink_to(MODEL)
    before = {p.name: p.stat().st_mtime_ns for p in MODEL.iterdir()}
    from vitdiag.cli import app

    argv = [a.format(m=MODEL, link=link) for a in args]
    res = runner.invoke(app, argv)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.output.startswith("error: ") and "input" in res.output
    assert {p.name: p.stat().st_mtime_ns for p in MODEL.iterdir()} == before


def test_ctrl_c_during_report_leaves_the_old_folder_and_no_temporaries(tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.md").write_text("the previous report\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vitdiag",
            "report",
            str(MODEL),
            "--data",
            "fixtures/data/train",
            "--workers",
            "0",
            "--out",
            str(out),
            "--force",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    time.sleep(6)  # past start-up, inside the probes (the whole run takes over a minute)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["interrupted"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    assert [p.name for p in out.iterdir()] == ["report.md"]
    assert (out / "report.md").read_text() == "the previous report\n"
