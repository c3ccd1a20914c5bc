"""How far the fixture reports move across CPU kernel sets and thread counts, against the golden
files and the tolerances of tests/test_golden_report.py.

    .venv/bin/python tests/golden/kernel_spread.py               # 3 kernel sets x 2 threads
    .venv/bin/python tests/golden/kernel_spread.py --reports DIR # reuse DIR/<cap>-<t>-<model>/

For each run it prints, per tolerance class, the largest deviation as a share of the class's
tolerance (|got - want| / (rtol*|want| + atol)); a share above 1 is a golden-test failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

from test_golden_report import (  # noqa: E402
    FORWARD_RTOL,
    MODELS,
    WEIGHTS_RTOL,
    _leaf_scale,
    _volatile,
    rule,
)

CAPABILITIES = ("unset", "default", "avx2")
THREADS = (1, 2)


def _leaves(got, want, path=(), probe=None, scale=0.0):
    """(class, share of the tolerance) for every float leaf of the golden document."""
    if _volatile(path):
        return
    if isinstance(want, dict):
        if path[:1] == ("results",) and len(path) == 2:
            probe = want.get("probe")
        elif path == ("findings",):
            probe = "findings"
        for k in want:
            yield from _leaves(got[k], want[k], (*path, k), probe)
    elif isinstance(want, list):
        inner = max((abs(w) for w in want if isinstance(w, float) and math.isfinite(w)), default=0)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            yield from _leaves(g, w, (*path, i), probe, inner)
    elif isinstance(want, float) and math.isfinite(want):
        kind = rule(probe if path[:1] in (("results",), ("findings",)) else None, path)
        diff = abs(float(got) - want)
        if kind == "exact":
            yield kind, math.inf if diff else 0.0, path
        else:
            rtol = WEIGHTS_RTOL if kind == "weights" else FORWARD_RTOL
            floor = rtol * _leaf_scale(path, scale)
            yield kind, diff / (max(rtol * abs(want), floor) or math.inf), path


def _run(model: str, cap: str, threads: int, out: Path) -> Path:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("ATEN_CPU_CAPABILITY", None)
    if cap != "unset":
        env["ATEN_CPU_CAPABILITY"] = cap
    cmd = [sys.executable, "-m", "vitdiag", "report", f"fixtures/models/{model}"]
    cmd += ["--data", "fixtures/data/val", "--sizes", "48", "--out", str(out), "--no-plots"]
    subprocess.run([*cmd, "--quiet"], cwd=ROOT, env=env, check=True, capture_output=True)
    return out / "report.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=Path, help="reuse reports made earlier")
    args = parser.parse_args()
    work = args.reports or Path(tempfile.mkdtemp(prefix="vitdiag-spread-"))
    print(f"{'run':28s} {'forward':>10s} {'weights':>10s} {'exact':>6s}  worst forward leaf")
    for cap in CAPABILITIES:
        for threads in THREADS:
            for model in MODELS:
                name = f"{cap}-{threads}-{model}"
                path = work / name / "report.json"
                if not path.exists():
                    path = _run(model, cap, threads, work / name)
                got = json.loads(path.read_text())
                want = json.loads((HERE / f"report_{model}.json").read_text())
                worst = {"forward": (0.0, ()), "weights": (0.0, ())}
                moved = 0
                for kind, share, where in _leaves(got, want):
                    if kind == "exact":
                        moved += share > 0
                    elif share > worst[kind][0]:
                        worst[kind] = (share, where)
                leaf = "/".join(map(str, worst["forward"][1]))
                print(
                    f"{name:28s} {worst['forward'][0]:10.3g} {worst['weights'][0]:10.3g} "
                    f"{moved:6d}  {leaf}"
                )


if __name__ == "__main__":
    main()
