"""WebDataset shards are a random-access source: the numbers are those of the same images as an
image folder, whatever the worker count, batch size or process count, each sample counted once;
every bad shard list is refused in one line."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from tolerances import FORWARD_RTOL
from typer.testing import CliRunner

wds = pytest.importorskip("webdataset")

import vitdiag  # noqa: E402
from vitdiag.cli import app  # noqa: E402
from vitdiag.data import class_order, open_dataset  # noqa: E402
from vitdiag.errors import VitdiagError  # noqa: E402
from vitdiag.runner import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VAL = ROOT / "fixtures" / "data" / "val"
MODEL = ROOT / "fixtures" / "models" / "vit_nomix"
N_SHARDS = 4
CLASSES = class_order(p.name for p in VAL.iterdir())
# Every image of the fixture folder with its class index (timm's folder order).
IMAGES = [(f, c) for c, name in enumerate(CLASSES) for f in sorted((VAL / name).glob("*.jpg"))]


def _write(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def _sample(i: int, label: bool = True) -> dict:
    f, c = IMAGES[i]
    out = {"__key__": f"{i:06d}", "jpg": f.read_bytes()}
    if label:
        out["cls"] = str(c).encode()
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The 200 fixture images in 4 shards, dealt round-robin (so the shards' order is not the
    folder's)."""
    root = tmp_path_factory.mktemp("shards")
    for s in range(N_SHARDS):
        _write(root / f"shard-{s:06d}.tar", [_sample(i) for i in range(s, len(IMAGES), N_SHARDS)])
    return root


def _pattern(root: Path) -> str:
    return str(root / "shard-{000000..000003}.tar")


def _run(source, **settings):
    s = Settings(device="cpu", **settings)
    loaded = vitdiag.load(str(MODEL))
    found = vitdiag.run_all(loaded, source, probes={"eval", "collapse"}, settings=s)
    return {r.probe: r.metrics for r in found}, found.data


def _same(a: dict, b: dict) -> None:
    assert a["eval"]["n_images"] == b["eval"]["n_images"]
    assert a["eval"]["top1"] == b["eval"]["top1"]  # a count: exact
    for probe, key in (("eval", "nll"), ("collapse", "nc1")):
        assert math.isclose(a[probe][key], b[probe][key], rel_tol=FORWARD_RTOL), (probe, key)


@pytest.fixture(scope="module")
def folder_numbers():
    return _run(open_dataset(str(VAL)), workers=0, batch_size=64)[0]


def test_shards_give_the_numbers_of_the_same_images_as_a_folder(shards, folder_numbers):
    source = open_dataset(_pattern(shards))
    assert source.labelled and len(source) == len(IMAGES)
    got, data = _run(source, workers=0, batch_size=64)
    _same(got, folder_numbers)
    assert got["eval"]["n_images"] == len(IMAGES)
    assert 0.9 < got["eval"]["top1"] < 1.0  # labels reached their outputs (chance is 0.1)
    assert data["data"]["n_shards"] == N_SHARDS and data["data"]["labels"] == "cls"


def test_each_sample_is_read_once_whatever_the_workers_and_batch_size(shards, folder_numbers):
    source = open_dataset(_pattern(shards))
    got, data = _run(source, workers=2, batch_size=7)
    _same(got, folder_numbers)
    assert data["data"]["n_images"] == len(IMAGES) and data["data"]["n_unreadable"] == 0


def _eval_args(data: str) -> list[str]:
    return ["eval", str(MODEL), "--data", data, "--batch-size", "16", "--device", "cpu", "-q"]


def test_cli_evaluates_a_brace_pattern_and_states_the_sample_count(shards):
    done = CliRunner().invoke(app, [*_eval_args(_pattern(shards)), "--json", "-"])
    assert done.exit_code == 0, done.output
    doc = json.loads(done.stdout)
    assert doc["data"]["n_images"] == len(IMAGES)
    assert doc["data"]["n_shards"] == N_SHARDS
    assert doc["results"][0]["metrics"]["n_images"] == len(IMAGES)


@pytest.mark.slow
def test_two_processes_read_the_shards_as_one(shards, folder_numbers):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "vitdiag", *_eval_args(_pattern(shards)), "--workers", "1", "--json", "-"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout)
    assert doc["run"]["world_size"] == 2
    metrics = doc["results"][0]["metrics"]
    # the two shards of the index list cover every sample once: 100 + 100
    assert metrics["n_images"] == len(IMAGES) == doc["data"]["n_images"]
    assert metrics["top1"] == folder_numbers["eval"]["top1"]
    assert math.isclose(metrics["nll"], folder_numbers["eval"]["nll"], rel_tol=FORWARD_RTOL)


def test_lists_prefix_and_folder_name_the_same_shards(shards, monkeypatch):
    monkeypatch.chdir(shards)
    names = [f"shard-{s:06d}.tar" for s in range(N_SHARDS)]
    for text in (
        "::".join(names),
        ",".join(names),
        "wds/shard-{000000..000003}.tar",
        "wds/shard-{000000,000001,000002,000003}.tar",
        f"wds/{shards}",
        str(shards),  # a folder holding only .tar files
    ):
        source = open_dataset(text)
        assert source.kind == "wds", text
        assert [Path(s).name for s in source.shards] == names, text
        assert len(source) == len(IMAGES), text
    two = open_dataset("shard-{000000..000001}.tar")
    assert len(two) == 100 and two.describe()["n_shards"] == 2


def test_a_lone_tar_stays_an_image_tar_unless_it_carries_cls_or_wds(tmp_path, shards):
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tf:
        for f, _ in IMAGES[:3]:
            tf.add(f, arcname=f"{f.parent.name}/{f.name}")
    assert open_dataset(str(plain)).kind == "tar"
    one = str(shards / "shard-000000.tar")
    assert open_dataset(one).kind == "wds"  # its members include .cls labels
    unlabelled = _write(tmp_path / "u-000000.tar", [_sample(i, label=False) for i in range(3)])
    assert open_dataset(str(unlabelled)).kind == "tar"
    source = open_dataset(f"wds/{unlabelled}")
    assert source.kind == "wds" and not source.labelled and source[0][1] == -1


def test_missing_shards_are_named_and_counted(shards):
    with pytest.raises(VitdiagError) as err:
        open_dataset(str(shards / "shard-{000000..000009}.tar"))
    msg = str(err.value)
    assert "6 of the 10 shards" in msg and "shard-000004.tar" in msg and "\n" not in msg


def test_a_shard_that_is_not_a_tar_is_named(tmp_path, shards):
    bad = tmp_path / "shard-000001.tar"
    bad.write_text("not a tar archive\n")
    text = f"{shards / 'shard-000000.tar'}::{bad}"
    with pytest.raises(VitdiagError, match="shard-000001.tar is not a readable uncompressed tar"):
        open_dataset(text)


def test_some_samples_without_labels_are_refused(tmp_path):
    _write(tmp_path / "m-000000.tar", [_sample(0), _sample(1, label=False), _sample(2)])
    with pytest.raises(VitdiagError, match=r"1 of the 3 samples .* have no \.cls label"):
        open_dataset(f"wds/{tmp_path / 'm-000000.tar'}")


def test_a_label_that_is_not_a_class_index_is_refused(tmp_path):
    _write(tmp_path / "b-000000.tar", [{**_sample(0), "cls": b"cat"}])
    with pytest.raises(VitdiagError, match="not a class index"):
        open_dataset(f"wds/{tmp_path / 'b-000000.tar'}")


def test_a_sample_without_image_is_skipped_and_counted(tmp_path):
    samples = [_sample(0), {"__key__": "000001", "cls": b"0", "txt": b"no image"}, _sample(2)]
    path = _write(tmp_path / "n-000000.tar", samples)
    source = open_dataset(f"wds/{path}")
    assert len(source) == 3 and source.describe()["n_without_image"] == 1
    got, data = _run(source, workers=0, batch_size=2)
    assert got["eval"]["n_images"] == 2 and data["data"]["n_unreadable"] == 1
    strict = open_dataset(f"wds/{path}", strict=True)
    with pytest.raises(VitdiagError, match=r"n-000000.tar:000001 \(OSError: sample has no image"):
        _run(strict, workers=0, batch_size=2)


def test_member_names_with_dotdot_are_read_not_extracted(tmp_path, monkeypatch):
    path = tmp_path / "evil-000000.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in [
            ("../escape/000000.jpg", IMAGES[0][0].read_bytes()),
            ("../escape/000000.cls", b"0"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    source = open_dataset(f"wds/{path}")
    img, target = source[0]
    assert img.size == (96, 96) and target == 0 and source.name(0).endswith(":../escape/000000.jpg")
    assert not (tmp_path / "escape").exists() and list(work.iterdir()) == []


def test_split_is_refused_for_shards(shards):
    with pytest.raises(VitdiagError, match="--split does not apply to the WebDataset shards"):
        open_dataset(_pattern(shards), split="val")
