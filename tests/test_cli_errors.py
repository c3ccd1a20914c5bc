"""Bad input end to end through the CLI: one line naming the problem, exit 2, nothing written."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vitdiag.cli import app

runner = CliRunner()


class _Payload:
    """Unpickling this runs code: it writes a marker file. vitdiag must never unpickle it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def _assert_clean_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err, f"expected one line, got:\n{err}"
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)
    return err


def _run(args: list[str], json_out: Path):
    return runner.invoke(app, [*args, "--json", str(json_out)])


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out.json"


def _info(target, out, *extra):
    return _run(["info", str(target), *extra], out)


def test_missing_checkpoint(tmp_path, out):
    _assert_clean_error(_info(tmp_path / "nope.safetensors", out), "nope.safetensors")
    assert not out.exists()


def test_directory_without_weights(tmp_path, out):
    d = tmp_path / "empty_model"
    d.mkdir()
    _assert_clean_error(_info(d, out), "empty_model")
    assert not out.exists()


def test_random_bytes(tmp_path, out):
    f = tmp_path / "noise.pt"
    f.write_bytes(bytes(range(256)) * 40)
    _assert_clean_error(_info(f, out), "noise.pt")
    assert not out.exists()


def test_truncated_safetensors(tiny_ckpt, tmp_path, out):
    data = (tiny_ckpt / "model.safetensors").read_bytes()
    f = tmp_path / "cut.safetensors"
    f.write_bytes(data[: len(data) // 2])
    _assert_clean_error(_info(f, out), "cut.safetensors")
    assert not out.exists()


def test_empty_file(tmp_path, out):
    f = tmp_path / "zero.pth"
    f.write_bytes(b"")
    _assert_clean_error(_info(f, out), "zero.pth")
    assert not out.exists()


def test_pickle_with_code_payload_does_not_run(tmp_path, out):
    marker = tmp_path / "marker.txt"
    f = tmp_path / "evil.pt"
    with open(f, "wb") as fh:
        pickle.dump({"state_dict": _Payload(str(marker))}, fh)
    _assert_clean_error(_info(f, out), "evil.pt", "--unsafe-pickle")
    assert not marker.exists(), "the pickle's payload ran"
    assert not out.exists()


def test_arch_that_does_not_fit_the_weights(tiny_ckpt, out):
    result = _info(tiny_ckpt / "model.safetensors", out, "--arch", "vit_small_patch16_224")
    _assert_clean_error(result, "vit_small_patch16_224")
    assert not out.exists()


def test_unknown_arch(out):
    result = runner.invoke(app, ["info", "--arch", "vit_tinny_patch16_224", "--json", str(out)])
    _assert_clean_error(result, "vit_tinny_patch16_224")
    assert not out.exists()


def test_no_checkpoint_and_no_arch(out):
    _assert_clean_error(runner.invoke(app, ["info", "--json", str(out)]), "--arch")
    assert not out.exists()


def test_corrupt_config_json(tiny_ckpt, tmp_path, out):
    d = tmp_path / "badcfg"
    d.mkdir()
    (d / "model.safetensors").write_bytes((tiny_ckpt / "model.safetensors").read_bytes())
    (d / "config.json").write_text("{ not json")
    _assert_clean_error(_info(d, out), "config.json")
    assert not out.exists()


def _eval(ckpt, data, out, *extra):
    return _run(["eval", str(ckpt), "--data", str(data), "--quiet", *extra], out)


def test_size_the_patch_grid_cannot_take(tiny_ckpt, image_folder, out):
    err = _assert_clean_error(_eval(tiny_ckpt, image_folder, out, "--size", "36"), "36")
    assert "32" in err and "40" in err, "the nearest valid sizes are named"
    assert not out.exists()


def test_empty_dataset(tiny_ckpt, tmp_path, out):
    d = tmp_path / "nothing"
    d.mkdir()
    _assert_clean_error(_eval(tiny_ckpt, d, out), "nothing")
    assert not out.exists()


def test_folder_of_non_images(tiny_ckpt, tmp_path, out):
    d = tmp_path / "texts"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.txt").write_text("hello")
    _assert_clean_error(_eval(tiny_ckpt, d, out), "texts")
    assert not out.exists()


def test_every_image_unreadable(tiny_ckpt, tmp_path, out):
    d = tmp_path / "broken"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    _assert_clean_error(_eval(tiny_ckpt, d, out))
    assert not out.exists()


def test_missing_data_path(tiny_ckpt, tmp_path, out):
    _assert_clean_error(_eval(tiny_ckpt, tmp_path / "gone", out), "gone")
    assert not out.exists()


def test_corrupt_tar(tiny_ckpt, tmp_path, out):
    f = tmp_path / "data.tar"
    f.write_bytes(b"this is not a tar archive" * 50)
    _assert_clean_error(_eval(tiny_ckpt, f, out), "data.tar")
    assert not out.exists()


def test_tar_without_images(tiny_ckpt, tmp_path, out):
    txt = tmp_path / "readme.txt"
    txt.write_text("no images here")
    f = tmp_path / "noimg.tar"
    with tarfile.open(f, "w") as tar:
        tar.add(txt, arcname="readme.txt")
    _assert_clean_error(_eval(tiny_ckpt, f, out), "noimg.tar")
    assert not out.exists()


def test_more_data_classes_than_model_outputs(tmp_path, out):
    from conftest import make_image_folder, save_tiny_vit

    ckpt = save_tiny_vit(tmp_path / "two", num_classes=2)
    data = make_image_folder(tmp_path / "five", classes=5, per_class=1)
    _assert_clean_error(_eval(ckpt, data, out), "5 classes")
    assert not out.exists()


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--device", "cuda:7"], "cuda"),
        (["--amp", "fp16"], "fp16"),
        (["--amp", "fp8"], "fp8"),
        (["--mean", "0.5,abc,0.5"], "--mean"),
        (["--std", "0.5,0.5"], "--std"),
        (["--limit", "0"], "--limit"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_bad_run_options(tiny_ckpt, image_folder, out, extra, needle):
    if extra[:2] == ["--device", "cuda:7"]:
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    _assert_clean_error(_eval(tiny_ckpt, image_folder, out, *extra), needle)
    assert not out.exists()


def test_debug_shows_the_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "info", str(tmp_path / "nope.pt")])
    assert result.exit_code != 0
    assert result.exception is not None and type(result.exception).__name__ == "VitdiagError"
