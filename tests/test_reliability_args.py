"""Arguments at their edges: lists of sizes, devices this machine lacks, absurd --workers and
--batch-size, and `vitdiag check` run from another working directory. Each is one line and
exit 2 (VitdiagError from the API, with the same message) or a correct run."""

from __future__ import annotations

import shutil

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import FIXTURES
from vitdiag.cli import app
from vitdiag.errors import VitdiagError
from vitdiag.settings import check_option
from vitdiag.validation import parse_sizes

runner = CliRunner()
MODEL = FIXTURES / "models" / "vit_nomix"
VAL = FIXTURES / "data" / "val"


@pytest.mark.parametrize(
    ("text", "sizes"), [("224,", [224]), (",224", [224]), (" 224 , 384", [224, 384])]
)
def test_empty_items_and_spaces_in_sizes_are_ignored(text, sizes):
    assert parse_sizes(text) == sizes


@pytest.mark.parametrize("text", ["224,224", "32, 48,32"])
def test_a_size_given_twice_is_refused(text):
    with pytest.raises(VitdiagError, match="more than once; give each size once"):
        parse_sizes(text)
    res = runner.invoke(app, ["variance", str(MODEL), "--data", str(VAL), "--sizes", text])
    assert res.exit_code == 2
    assert res.output.startswith("error: --sizes") and res.output.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "1000000"], "--workers must be 0 (load in this process) or more, up to 128"),
        (["--workers", "-1"], "--workers must be 0"),
        (["--batch-size", "1000000000"], "--batch-size must be between 1 and 65536"),
        (["--device", "tpu"], "--device 'tpu' is not a device"),
    ],
)
def test_absurd_arguments_are_one_line(args, message):
    res = runner.invoke(app, ["eval", str(MODEL), "--data", str(VAL), "--limit", "4", *args])
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"error: {message}") and res.output.count("\n") == 1


def test_api_settings_give_the_cli_message():
    with pytest.raises(VitdiagError, match="--workers must be 0 .* got 1000000"):
        check_option("workers", 10**6)
    with pytest.raises(VitdiagError, match="--batch-size must be between 1 and 65536"):
        check_option("batch_size", 10**9)
    check_option("workers", 128)
    check_option("batch_size", 65536)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_line(device):
    res = runner.invoke(
        app, ["eval", str(MODEL), "--data", str(VAL), "--limit", "4", "--device", device]
    )
    assert res.exit_code == 2
    assert "no CUDA GPU is visible; use --device cpu" in res.output
    assert "Traceback" not in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_amp_on_the_cpu_bf16_runs_fp16_is_refused():
    fp16 = runner.invoke(
        app,
        [
            "eval",
            str(MODEL),
            "--data",
            str(VAL),
            "--limit",
            "4",
            "--device",
            "cpu",
            "--amp",
            "fp16",
        ],
    )
    assert fp16.exit_code == 2
    assert fp16.output.startswith("error: --amp fp16 needs a GPU")
    bf16 = runner.invoke(
        app,
        [
            "eval",
            str(MODEL),
            "--data",
            str(VAL),
            "--limit",
            "4",
            "--device",
            "cpu",
            "--amp",
            "bf16",
        ],
    )
    assert bf16.exit_code == 0, bf16.output


def test_check_reads_config_paths_from_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "ci").mkdir()
    shutil.copytree(VAL, tmp_path / "data" / "val")
    config = tmp_path / "ci" / "vitdiag.toml"
    config.write_text('data = "../data/val"\nlimit = 4\nchecks = ["eval.top1 >= 0.0"]\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = runner.invoke(app, ["check", str(MODEL), "--config", str(config)])
    assert res.exit_code == 0, res.output
    # found only from the working directory: refused instead of silently read from there
    (elsewhere / "mine").mkdir()
    shutil.copytree(VAL, elsewhere / "mine" / "val")
    config.write_text('data = "mine/val"\nlimit = 4\nchecks = ["eval.top1 >= 0.0"]\n')
    res = runner.invoke(app, ["check", str(MODEL), "--config", str(config)])
    assert res.exit_code == 2
    assert "is not found next to the config" in res.output
