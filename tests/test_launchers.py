"""Launchers: the environment of torchrun, `accelerate launch` and `srun` read as one
(rank, world, local rank, master address and port), and a real two-process run under a
simulated SLURM environment giving one process's numbers."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
from tolerances import FORWARD_RTOL

from tests.conftest import FIXTURES
from vitdiag.distributed import DEFAULT_PORT, Launch, launch_env
from vitdiag.errors import VitdiagError

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
            "MASTER_PORT": "29600"}  # fmt: skip
T4 = Launch(3, 4, 1, "10.0.0.2", 29600, "torchrun")
S8 = Launch(5, 8, 1, "gpu03", DEFAULT_PORT, "slurm")
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
         "SLURM_NODELIST": "gpu[03-05,07],cpu1"}  # fmt: skip


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, Launch()),
        (TORCHRUN, T4),
        # accelerate launch starts its processes through torchrun's launcher: the same variables
        ({**TORCHRUN, "ACCELERATE_MIXED_PRECISION": "no"}, T4),
        (SLURM, S8),
        ({**SLURM, "SLURM_LAUNCH_NODE_IPADDR": "10.1.1.1"},
         Launch(5, 8, 1, "10.1.1.1", DEFAULT_PORT, "slurm")),
        ({**SLURM, "MASTER_ADDR": "h0", "MASTER_PORT": "1234", "SLURM_LAUNCH_NODE_IPADDR": "x"},
         Launch(5, 8, 1, "h0", 1234, "slurm")),
        # torchrun inside an sbatch job: torchrun's own variables win
        ({**SLURM, **TORCHRUN}, T4),
    ],
)  # fmt: skip
def test_launch_env(env, expected):
    assert launch_env(env) == expected


@pytest.mark.parametrize(
    "env",
    [{"SLURM_PROCID": "2", "SLURM_NTASKS": "2"}, {"WORLD_SIZE": "two"}],
)
def test_a_bad_launch_environment_is_one_sentence(env):
    with pytest.raises(VitdiagError, match="check the environment"):
        launch_env(env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_slurm_tasks_match_one_process(tmp_path):
    args = ["eval", str(FIXTURES / "models" / "vit_nomix"), "--data",
            str(FIXTURES / "data" / "val"), "--limit", "20", "--device", "cpu"]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    base.pop("WORLD_SIZE", None)
    base.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    one = subprocess.run(
        [sys.executable, "-m", "vitdiag", *args, "--json", str(tmp_path / "one.json")],
        env=base, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vitdiag", *args, "--json", str(tmp_path / f"r{r}.json")],
            env=dict(
                base,
                SLURM_PROCID=str(r),
                SLURM_NTASKS="2",
                SLURM_LOCALID=str(r),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    single = json.loads((tmp_path / "one.json").read_text())
    multi = json.loads((tmp_path / "r0.json").read_text())
    assert multi["run"]["world_size"] == 2 and single["run"]["world_size"] == 1
    assert not (tmp_path / "r1.json").exists()  # rank 1 writes nothing
    (a,), (b,) = single["results"], multi["results"]
    assert a["metrics"].keys() == b["metrics"].keys()
    for key, value in a["metrics"].items():
        assert math.isclose(value, b["metrics"][key], rel_tol=FORWARD_RTOL), key
