"""`vitdiag --help` wall time against a bare interpreter start (`python -c pass`).

The CLI imports torch and timm lazily, so `--help` should cost the interpreter plus Typer/rich,
not a deep-learning stack. Each command runs as a fresh subprocess, alternating, and the
medians are compared.

    python benchmarks/bench_help.py [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "vitdiag --help": [sys.executable, "-m", "vitdiag", "--help"],
    "vitdiag report --help": [sys.executable, "-m", "vitdiag", "report", "--help"],
    "import torch (for scale)": [sys.executable, "-c", "import torch"],
}


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    for cmd in COMMANDS.values():  # warm the file cache once
        wall(cmd)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.reps):  # interleaved, so a burst of machine load hits every command
        for name, cmd in COMMANDS.items():
            times[name].append(wall(cmd))
    base = statistics.median(times["python -c pass"])
    print(f"{'command':28s} {'median s':>9s} {'min s':>7s} {'x python -c pass':>17s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:28s} {med:9.3f} {min(ts):7.3f} {med / base:17.1f}")
    extra = statistics.median(times["vitdiag --help"]) - base
    print(f"\nvitdiag --help minus interpreter start: {extra:.3f} s")
    assert "torch" not in sys.modules


if __name__ == "__main__":
    main()
