"""Scale-out: `torchrun --nproc-per-node 2 -m vitdiag report` (gloo on CPU) gives the numbers of
one process, to 1e-6 relative, for every probe whose definition does not depend on how images are
grouped into batches; only rank 0 writes.

Left out of the comparison, by definition rather than by accident: mixup and cutmix views take
their partner from the same batch, and mixup geometry draws its pairs per process, so both
change with the sharding (they remain valid samples; they are not the same sample).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from tolerances import FORWARD_RTOL
from typer.testing import CliRunner

from vitdiag.cli import app

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]

PROBES = "classifier,eval,calibration,variance,collapse,similarity,invariance"
REL = 1e-6


def _args(ckpt: Path, data: Path, val: Path, out: Path) -> list[str]:
    # 12 training images on 2 processes in batches of 4: shards of 6, so the last batch of each
    # process is short, and batch boundaries differ from the single process's.
    return [
        "report",
        str(ckpt),
        "--data",
        str(data),
        "--val",
        str(val),
        "--probes",
        PROBES,
        "--sizes",
        "48",
        "--aug",
        "cutout,erasing-pixel,randaugment",
        "--views",
        "2",
        "--batch-size",
        "4",
        "--no-plots",
        "--device",
        "cpu",
        "--out",
        str(out),
        "-q",
    ]


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-12)


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory) -> Path:
    from conftest import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("val") / "val", classes=3, per_class=3)


def test_two_processes_match_one(tmp_path, tiny_ckpt, image_folder, val_folder):
    single_out = tmp_path / "single"
    result = CliRunner().invoke(app, _args(tiny_ckpt, image_folder, val_folder, single_out))
    assert result.exit_code == 0, result.output
    single = json.loads((single_out / "report.json").read_text())

    multi_out = tmp_path / "multi"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "vitdiag", *_args(tiny_ckpt, image_folder, val_folder, multi_out)]
    cmd += ["--json", "-"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # rank 0 alone writes: stdout is exactly one JSON document, and the folder holds one report
    multi = json.loads(proc.stdout)
    assert json.loads((multi_out / "report.json").read_text()) == multi
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi", "single"]

    assert single["run"]["world_size"] == 1 and multi["run"]["world_size"] == 2
    for role in ("data", "val"):
        assert multi["data"][role]["n_images"] == single["data"][role]["n_images"]
    assert [r["probe"] for r in multi["results"]] == [r["probe"] for r in single["results"]]
    assert {r["probe"] for r in single["results"]} == set(PROBES.split(","))
    for one, two in zip(single["results"], multi["results"], strict=True):
        assert one["metrics"].keys() == two["metrics"].keys(), one["probe"]
        off = {
            k: (v, two["metrics"][k])
            for k, v in one["metrics"].items()
            if not _close(v, two["metrics"][k])
        }
        assert not off, (one["probe"], off)
    # NC4 is exact here (12 images within the budget), so the reservoirs merged completely
    collapse = next(r for r in multi["results"] if r["probe"] == "collapse")
    assert collapse["metrics"]["nc4_sample_size"] == collapse["metrics"]["nc4_population"] == 12


def test_a_process_without_images_fails_cleanly_instead_of_hanging(tiny_ckpt, image_folder):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "vitdiag", "similarity", str(tiny_ckpt), "--data", str(image_folder)]
    cmd += ["--limit", "1", "--device", "cpu", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode != 0
    assert "1 of 2 processes got no image to read" in proc.stderr


def test_augment_erasing_on_two_processes_matches_one(tiny_ckpt, image_folder):
    # Random erasing is drawn per image from (seed, image index): two processes must draw for
    # each image what one process draws, whatever shard or batch the image lands in.
    args = ["augment", "--ckpt", str(tiny_ckpt), "--data", str(image_folder), "--reprob", "0.5"]
    args += ["--limit", "8", "--batch-size", "4", "--device", "cpu", "-q", "--json", "-"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    single = json.loads(result.stdout)["results"][0]["metrics"]

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "vitdiag", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    multi = json.loads(proc.stdout)["results"][0]["metrics"]

    assert single.keys() == multi.keys()
    assert any(k.startswith("ratio_x_token/erasing-") for k in single)
    off = {k: (v, multi[k]) for k, v in single.items() if not _close(v, multi[k])}
    assert not off, off


def test_invariance_views_on_two_processes_match_one_to_1e_12(tiny_ckpt, image_folder):
    # Views are made in the loader's workers and seeded by each image's index in the dataset,
    # so a process count (and worker count) that moves images between shards and batches must
    # not move a number beyond float64 summation order.
    augs = "erasing-pixel,cutout,randaugment,autoaugment,trivialaugment,colorjitter,rrc"
    args = ["invariance", str(tiny_ckpt), "--data", str(image_folder), "--aug", augs]
    args += ["--views", "2", "--batch-size", "4", "--device", "cpu", "-q", "--json", "-"]
    result = CliRunner().invoke(app, [*args, "--workers", "0"])
    assert result.exit_code == 0, result.output
    single = json.loads(result.stdout)["results"][0]["metrics"]

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "vitdiag", *args, "--workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    multi = json.loads(proc.stdout)["results"][0]["metrics"]

    assert single.keys() == multi.keys() and len(single) == 14
    # Each process forwards its own batches (shards of 6 in batches of 4 and 2, against 4, 4,
    # 4 in one process): other float32 shapes, equal within the forward budget.
    off = {
        k: (v, multi[k])
        for k, v in single.items()
        if not math.isclose(v, multi[k], rel_tol=FORWARD_RTOL)
    }
    assert not off, off
