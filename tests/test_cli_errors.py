"""Bad input end to end through the CLI, as a catalogue: every case must exit 2 with one line
`error: ...` naming the file or option, no traceback, nothing written and no input changed."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


@dataclass
class Env:
    """What a case builds its command line from. Inputs live in `tmp`, outputs go to `out`."""

    tmp: Path
    ckpt: Path  # a tiny ViT folder (config.json + model.safetensors), 32 px, patch 8, 3 classes
    data: Path  # an ImageFolder of 3 classes x 4 PNGs
    out: Path

    @property
    def json(self) -> list[str]:
        return ["--json", str(self.out / "r.json")]

    @property
    def weights(self) -> Path:
        return self.ckpt / "model.safetensors"

    def file(self, name: str, data: bytes) -> Path:
        f = self.tmp / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        return f

    def pickle(self, name: str, obj) -> Path:
        """`obj` saved the way checkpoints are: torch.save (a zip holding a pickle)."""
        import torch

        f = self.tmp / name
        torch.save(obj, f)
        return f

    def tensors(self, name: str, change: Callable[[dict], None]) -> Path:
        """A copy of the tiny checkpoint with its tensors changed by `change`."""
        from safetensors.torch import load_file, save_file

        d = self.tmp / name
        d.mkdir()
        sd = load_file(str(self.weights))
        change(sd)
        save_file(sd, str(d / "model.safetensors"))
        shutil.copy(self.ckpt / "config.json", d / "config.json")
        return d

    def toml(self, text: str) -> Path:
        return self.file("vitdiag.toml", text.encode())

    def folder(self, name: str, files: dict[str, bytes] | None = None) -> Path:
        d = self.tmp / name
        d.mkdir(parents=True, exist_ok=True)
        for rel, data in (files or {}).items():
            self.file(f"{name}/{rel}", data)
        return d


@dataclass
class Case:
    id: str
    args: Callable[[Env], list[str]]
    needles: tuple[str, ...] = ()


def _eval(e: Env, *extra: str) -> list[str]:
    return ["eval", str(e.ckpt), "--data", str(e.data), "--quiet", *e.json, *extra]


def _header_lies(e: Env) -> Path:
    """A safetensors file whose 8-byte header length claims far more bytes than there are."""
    data = e.weights.read_bytes()
    return e.file("lies.safetensors", struct.pack("<Q", 10**12) + data[8:])


def _header_not_json(e: Env) -> Path:
    body = b"{ this is not json " + b" " * 13
    return e.file("garbled.safetensors", struct.pack("<Q", len(body)) + body + b"\0" * 64)


def _nan(sd: dict) -> None:
    sd["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")


def _inf(sd: dict) -> None:
    sd["head.weight"][1, 2] = float("inf")


def _two_class_ckpt(e: Env) -> Path:
    from conftest import save_tiny_vit

    return save_tiny_vit(e.tmp / "two", num_classes=2)


def _five_classes(e: Env) -> Path:
    from conftest import make_image_folder

    return make_image_folder(e.tmp / "five", classes=5, per_class=1)


def _tar(e: Env, name: str, members: dict[str, bytes]) -> Path:
    f = e.tmp / name
    with tarfile.open(f, "w") as tar:
        for arcname, data in members.items():
            src = e.file(f"_src/{arcname}", data)
            tar.add(src, arcname=arcname)
    return f


def _toml_case(text: str) -> Callable[[Env], list[str]]:
    def build(e: Env) -> list[str]:
        cfg = e.toml(text.format(data=e.data.as_posix()))
        return ["check", str(e.ckpt), "--config", str(cfg), "--quiet", *e.json]

    return build


_JPEG_JUNK = b"\xff\xd8 not really a jpeg"

CASES = [
    # -- info: the checkpoint itself ---------------------------------------------------------
    Case(
        "info/missing-file",
        lambda e: ["info", str(e.tmp / "nope.safetensors"), *e.json],
        ("nope.safetensors",),
    ),
    Case(
        "info/folder-without-weights",
        lambda e: ["info", str(e.folder("empty_model")), *e.json],
        ("empty_model",),
    ),
    Case(
        "info/random-bytes",
        lambda e: ["info", str(e.file("noise.pt", bytes(range(256)) * 40)), *e.json],
        ("noise.pt",),
    ),
    Case(
        "info/empty-file",
        lambda e: ["info", str(e.file("zero.pth", b"")), *e.json],
        ("zero.pth", "empty"),
    ),
    Case(
        "info/truncated-safetensors",
        lambda e: ["info", str(e.file("cut.safetensors", e.weights.read_bytes()[:5000])), *e.json],
        ("cut.safetensors",),
    ),
    Case(
        "info/safetensors-header-lies-about-size",
        lambda e: ["info", str(_header_lies(e)), *e.json],
        ("lies.safetensors",),
    ),
    Case(
        "info/safetensors-header-not-json",
        lambda e: ["info", str(_header_not_json(e)), *e.json],
        ("garbled.safetensors",),
    ),
    Case(
        "info/pickle-with-code-payload",
        lambda e: [
            "info",
            str(e.pickle("evil.pt", {"state_dict": _Payload(str(e.tmp / "m"))})),
            *e.json,
        ],
        ("evil.pt", "--unsafe-pickle"),
    ),
    Case(
        "info/pickle-of-a-list",
        lambda e: ["info", str(e.pickle("list.pt", [1, 2, 3])), *e.json],
        ("list.pt", "list", "state dict"),
    ),
    Case(
        "info/pickle-of-an-int",
        lambda e: ["info", str(e.pickle("int.pt", 7)), *e.json],
        ("int.pt", "int", "state dict"),
    ),
    Case(
        "info/pickle-of-a-dict-of-strings",
        lambda e: ["info", str(e.pickle("strs.pt", {"a": "b", "c": "d"})), *e.json],
        ("strs.pt", "state dict"),
    ),
    Case(
        "info/nan-weights",
        lambda e: ["info", str(e.tensors("nanckpt", _nan)), *e.json],
        ("nanckpt", "blocks.1.mlp.fc1.weight", "NaN"),
    ),
    Case(
        "info/inf-weights",
        lambda e: ["info", str(e.tensors("infckpt", _inf)), *e.json],
        ("infckpt", "head.weight", "inf"),
    ),
    Case(
        "info/arch-does-not-fit-the-weights",
        lambda e: ["info", str(e.weights), "--arch", "vit_small_patch16_224", *e.json],
        ("vit_small_patch16_224",),
    ),
    Case(
        "info/unknown-arch",
        lambda e: ["info", "--arch", "vit_tinny_patch16_224", *e.json],
        ("vit_tinny_patch16_224",),
    ),
    Case("info/no-checkpoint-and-no-arch", lambda e: ["info", *e.json], ("--arch",)),
    Case(
        "info/corrupt-config-json",
        lambda e: [
            "info",
            str(
                e.folder(
                    "badcfg",
                    {"model.safetensors": e.weights.read_bytes(), "config.json": b"{ not json"},
                )
            ),
            *e.json,
        ],
        ("config.json",),
    ),
    Case(
        "info/native-size-zero",
        lambda e: ["info", str(e.ckpt), "--native-size", "0", *e.json],
        ("--native-size",),
    ),
    Case(
        "info/unknown-option",
        lambda e: ["info", str(e.ckpt), "--jsno", "x.json"],
        ("--jsno", "--help"),
    ),
    # -- output paths (checked before the model is loaded) -----------------------------------
    Case(
        "info/json-is-a-folder",
        lambda e: ["info", str(e.ckpt), "--json", str(e.out)],
        ("--json", "folder"),
    ),
    Case(
        "info/json-is-the-checkpoint",
        lambda e: ["info", str(e.weights), "--json", str(e.weights)],
        ("--json", "model.safetensors", "input"),
    ),
    Case(
        "info/json-parent-is-a-file",
        lambda e: ["info", str(e.ckpt), "--json", str(e.file("afile", b"x") / "r.json")],
        ("--json", "afile"),
    ),
    Case(
        "eval/json-overwrites-an-image-in-the-data",
        lambda e: _eval(e)[:-2] + ["--json", str(e.data / "class0" / "0.png")],
        ("--json", "0.png", "input"),
    ),
    Case(
        "eval/json-is-the-data-folder",
        lambda e: _eval(e)[:-2] + ["--json", str(e.data)],
        ("--json", "input"),
    ),
    # -- eval: option ranges ------------------------------------------------------------------
    Case("eval/crop-pct-zero", lambda e: _eval(e, "--crop-pct", "0"), ("--crop-pct", "(0, 1]")),
    Case("eval/crop-pct-above-one", lambda e: _eval(e, "--crop-pct", "1.7"), ("--crop-pct",)),
    Case("eval/crop-pct-nan", lambda e: _eval(e, "--crop-pct", "nan"), ("--crop-pct",)),
    Case("eval/size-off-the-patch-grid", lambda e: _eval(e, "--size", "36"), ("36", "32", "40")),
    Case("eval/size-zero", lambda e: _eval(e, "--size", "0"), ("--size",)),
    Case("eval/size-negative", lambda e: _eval(e, "--size", "-32"), ("--size",)),
    Case("eval/limit-zero", lambda e: _eval(e, "--limit", "0"), ("--limit",)),
    Case("eval/limit-not-a-number", lambda e: _eval(e, "--limit", "abc"), ("--limit", "--help")),
    Case("eval/batch-size-zero", lambda e: _eval(e, "--batch-size", "0"), ("--batch-size",)),
    Case("eval/workers-negative", lambda e: _eval(e, "--workers", "-1"), ("--workers",)),
    Case("eval/seed-negative", lambda e: _eval(e, "--seed", "-5"), ("--seed",)),
    Case("eval/mean-not-numbers", lambda e: _eval(e, "--mean", "0.5,abc,0.5"), ("--mean",)),
    Case("eval/mean-nan", lambda e: _eval(e, "--mean", "nan"), ("--mean", "finite")),
    Case("eval/std-zero", lambda e: _eval(e, "--std", "0"), ("--std", "positive")),
    Case("eval/std-two-values", lambda e: _eval(e, "--std", "0.5,0.5"), ("--std",)),
    Case(
        "eval/interpolation-unknown",
        lambda e: _eval(e, "--interpolation", "cubic-ish"),
        ("--interpolation",),
    ),
    Case("eval/amp-fp8", lambda e: _eval(e, "--amp", "fp8"), ("fp8",)),
    # -- eval: the data -----------------------------------------------------------------------
    Case(
        "eval/data-folder-empty",
        lambda e: ["eval", str(e.ckpt), "--data", str(e.folder("nothing")), *e.json],
        ("nothing",),
    ),
    Case(
        "eval/data-folder-of-text-files",
        lambda e: [
            "eval",
            str(e.ckpt),
            "--data",
            str(e.folder("texts", {f"{i}.txt": b"hello" for i in range(3)})),
            *e.json,
        ],
        ("texts",),
    ),
    Case(
        "eval/data-folder-of-corrupt-images",
        lambda e: [
            "eval",
            str(e.ckpt),
            "--quiet",
            "--data",
            str(e.folder("broken", {f"{i}.jpg": _JPEG_JUNK for i in range(3)})),
            *e.json,
        ],
        ("broken", "valid image"),
    ),
    Case(
        "eval/data-missing",
        lambda e: ["eval", str(e.ckpt), "--data", str(e.tmp / "gone"), *e.json],
        ("gone",),
    ),
    Case(
        "eval/data-corrupt-tar",
        lambda e: [
            "eval",
            str(e.ckpt),
            "--data",
            str(e.file("data.tar", b"not a tar" * 80)),
            *e.json,
        ],
        ("data.tar",),
    ),
    Case(
        "eval/data-tar-without-images",
        lambda e: [
            "eval",
            str(e.ckpt),
            "--data",
            str(_tar(e, "noimg.tar", {"a.txt": b"x"})),
            *e.json,
        ],
        ("noimg.tar",),
    ),
    Case(
        "eval/more-classes-than-outputs",
        lambda e: [
            "eval",
            str(_two_class_ckpt(e)),
            "--data",
            str(_five_classes(e)),
            "--quiet",
            *e.json,
        ],
        ("5 classes",),
    ),
    # -- variance -----------------------------------------------------------------------------
    Case(
        "variance/sizes-garbage",
        lambda e: ["variance", str(e.ckpt), "--sizes", "big,bigger", *e.json],
        ("--sizes",),
    ),
    Case(
        "variance/sizes-zero",
        lambda e: ["variance", str(e.ckpt), "--sizes", "0,32", *e.json],
        ("--sizes",),
    ),
    Case(
        "variance/size-off-the-patch-grid",
        lambda e: ["variance", str(e.ckpt), "--sizes", "36", *e.json],
        ("36",),
    ),
    Case(
        "variance/reduction-unknown",
        lambda e: ["variance", str(e.ckpt), "--sizes", "48", "--reduction", "max", *e.json],
        ("--reduction",),
    ),
    Case("variance/no-sizes", lambda e: ["variance", str(e.ckpt), *e.json], ("--sizes",)),
    # -- fix-posembed ---------------------------------------------------------------------------
    Case(
        "fix-posembed/out-is-a-file",
        lambda e: [
            "fix-posembed",
            str(e.ckpt),
            "--size",
            "48",
            "--rescale",
            "none",
            "--out",
            str(e.file("occupied", b"x")),
            *e.json,
        ],
        ("--out", "occupied"),
    ),
    Case(
        "fix-posembed/out-is-the-checkpoint",
        lambda e: [
            "fix-posembed",
            str(e.ckpt),
            "--size",
            "48",
            "--rescale",
            "none",
            "--out",
            str(e.ckpt),
            "--force",
            *e.json,
        ],
        ("--out", "input"),
    ),
    Case(
        "fix-posembed/out-inside-the-checkpoint",
        lambda e: [
            "fix-posembed",
            str(e.ckpt),
            "--size",
            "48",
            "--rescale",
            "none",
            "--out",
            str(e.ckpt / "fixed"),
            *e.json,
        ],
        ("--out", "inside"),
    ),
    Case(
        "fix-posembed/out-exists",
        lambda e: [
            "fix-posembed",
            str(e.ckpt),
            "--size",
            "48",
            "--rescale",
            "none",
            "--out",
            str(e.folder("done")),
            *e.json,
        ],
        ("--out", "--force"),
    ),
    Case(
        "fix-posembed/size-negative",
        lambda e: [
            "fix-posembed",
            str(e.ckpt),
            "--size",
            "-48",
            "--rescale",
            "none",
            "--out",
            str(e.out / "f"),
            *e.json,
        ],
        ("--size",),
    ),
    Case(
        "fix-posembed/rescale-unknown",
        lambda e: [
            "fix-posembed",
            str(e.ckpt),
            "--size",
            "48",
            "--rescale",
            "twice",
            "--out",
            str(e.out / "f"),
            *e.json,
        ],
        ("--rescale",),
    ),
    # -- similarity -----------------------------------------------------------------------------
    Case(
        "similarity/plot-is-a-folder",
        lambda e: ["similarity", str(e.ckpt), "--data", str(e.data), "--plot", str(e.out), *e.json],
        ("--plot", "folder"),
    ),
    Case(
        "similarity/plot-and-json-same-file",
        lambda e: [
            "similarity",
            str(e.ckpt),
            "--data",
            str(e.data),
            "--plot",
            str(e.out / "r.json"),
            *e.json,
        ],
        ("--json", "--plot"),
    ),
    Case(
        "similarity/limit-negative",
        lambda e: ["similarity", str(e.ckpt), "--data", str(e.data), "--limit", "-1", *e.json],
        ("--limit",),
    ),
    # -- invariance -----------------------------------------------------------------------------
    Case(
        "invariance/aug-unknown",
        lambda e: [
            "invariance",
            str(e.ckpt),
            "--data",
            str(e.data),
            "--aug",
            "mixup,blur",
            *e.json,
        ],
        ("--aug", "blur"),
    ),
    Case(
        "invariance/views-one",
        lambda e: ["invariance", str(e.ckpt), "--data", str(e.data), "--views", "1", *e.json],
        ("--views",),
    ),
    Case(
        "invariance/embedding-unknown",
        lambda e: [
            "invariance",
            str(e.ckpt),
            "--data",
            str(e.data),
            "--embedding",
            "logits",
            *e.json,
        ],
        ("--embedding",),
    ),
    Case(
        "invariance/alpha-negative",
        lambda e: ["invariance", str(e.ckpt), "--data", str(e.data), "--alpha", "-0.5", *e.json],
        ("--alpha",),
    ),
    # -- collapse ---------------------------------------------------------------------------------
    Case(
        "collapse/pairs-zero",
        lambda e: ["collapse", str(e.ckpt), "--data", str(e.data), "--pairs", "0", *e.json],
        ("--pairs",),
    ),
    Case(
        "collapse/nc4-budget-zero",
        lambda e: ["collapse", str(e.ckpt), "--data", str(e.data), "--nc4-budget", "0", *e.json],
        ("--nc4-budget",),
    ),
    Case(
        "collapse/per-class-zero",
        lambda e: ["collapse", str(e.ckpt), "--data", str(e.data), "--per-class", "0", *e.json],
        ("--per-class",),
    ),
    Case(
        "collapse/plots-is-a-file",
        lambda e: [
            "collapse",
            str(e.ckpt),
            "--val",
            str(e.data),
            "--plots",
            str(e.file("plots.png", b"x")),
            *e.json,
        ],
        ("--plots", "plots.png"),
    ),
    Case(
        "collapse/mixup-geometry-without-data",
        lambda e: ["collapse", str(e.ckpt), "--mixup-geometry", *e.json],
        ("--mixup-geometry",),
    ),
    # -- augment ----------------------------------------------------------------------------------
    Case(
        "augment/reprob-above-one",
        lambda e: ["augment", "--data", str(e.data), "--reprob", "1.5", *e.json],
        ("--reprob",),
    ),
    Case(
        "augment/mixup-negative",
        lambda e: ["augment", "--data", str(e.data), "--mixup", "-1", *e.json],
        ("--mixup",),
    ),
    Case(
        "augment/remode-unknown",
        lambda e: ["augment", "--data", str(e.data), "--remode", "zebra", *e.json],
        ("remode",),
    ),
    # -- report -----------------------------------------------------------------------------------
    Case(
        "report/probes-unknown",
        lambda e: [
            "report",
            str(e.ckpt),
            "--data",
            str(e.data),
            "--out",
            str(e.out / "rep"),
            "--probes",
            "eval,magic",
        ],
        ("magic",),
    ),
    Case(
        "report/out-is-a-file",
        lambda e: [
            "report",
            str(e.ckpt),
            "--data",
            str(e.data),
            "--out",
            str(e.file("report.md", b"old")),
        ],
        ("--out", "report.md"),
    ),
    Case(
        "report/out-not-empty",
        lambda e: [
            "report",
            str(e.ckpt),
            "--data",
            str(e.data),
            "--out",
            str(e.folder("old_report", {"keep.txt": b"mine"})),
        ],
        ("--out", "--force"),
    ),
    Case(
        "report/out-is-the-data",
        lambda e: ["report", str(e.ckpt), "--data", str(e.data), "--out", str(e.data), "--force"],
        ("--out", "input"),
    ),
    Case(
        "report/views-one",
        lambda e: [
            "report",
            str(e.ckpt),
            "--data",
            str(e.data),
            "--out",
            str(e.out / "rep"),
            "--views",
            "1",
        ],
        ("--views",),
    ),
    Case(
        "report/aug-unknown",
        lambda e: [
            "report",
            str(e.ckpt),
            "--data",
            str(e.data),
            "--out",
            str(e.out / "rep"),
            "--aug",
            "sharpen",
        ],
        ("--aug", "sharpen"),
    ),
    Case(
        "report/crop-pct-zero",
        lambda e: [
            "report",
            str(e.ckpt),
            "--data",
            str(e.data),
            "--out",
            str(e.out / "rep"),
            "--crop-pct",
            "0",
        ],
        ("--crop-pct",),
    ),
    # -- check ------------------------------------------------------------------------------------
    Case(
        "check/toml-malformed",
        _toml_case('checks = ["eval.top1 >= 0.5"\ndata = '),
        ("vitdiag.toml", "TOML"),
    ),
    Case(
        "check/toml-unknown-metric",
        _toml_case('data = "{data}"\nchecks = ["eval.top5 >= 0.5"]'),
        ("vitdiag.toml", "top5"),
    ),
    Case(
        "check/toml-unknown-probe",
        _toml_case('data = "{data}"\nchecks = ["speed.fps > 3"]'),
        ("vitdiag.toml", "speed"),
    ),
    Case(
        "check/toml-unknown-key",
        _toml_case('data = "{data}"\nthreshold = 3\nchecks = ["eval.top1 >= 0.5"]'),
        ("vitdiag.toml", "threshold"),
    ),
    Case(
        "check/toml-not-a-threshold",
        _toml_case('data = "{data}"\nchecks = ["eval.top1 ~ 0.5"]'),
        ("vitdiag.toml", "eval.top1 ~ 0.5"),
    ),
    Case(
        "check/toml-limit-negative",
        _toml_case('data = "{data}"\nlimit = -3\nchecks = ["eval.top1 >= 0.5"]'),
        ("vitdiag.toml", "limit"),
    ),
    Case(
        "check/toml-workers-negative",
        _toml_case('data = "{data}"\nworkers = -1\nchecks = ["eval.top1 >= 0.5"]'),
        ("vitdiag.toml", "workers"),
    ),
    Case(
        "check/toml-aug-unknown",
        _toml_case('data = "{data}"\naug = "blur"\nchecks = ["invariance.mixup.linv < 1"]'),
        ("vitdiag.toml", "blur"),
    ),
    Case(
        "check/config-missing",
        lambda e: ["check", str(e.ckpt), "--config", str(e.tmp / "absent.toml"), *e.json],
        ("absent.toml",),
    ),
    Case(
        "check/junit-is-a-folder",
        lambda e: [
            *_toml_case('data = "{data}"\nchecks = ["eval.top1 >= 0.5"]')(e),
            "--junit",
            str(e.out),
        ],
        ("--junit", "folder"),
    ),
    Case(
        "check/junit-is-the-config",
        lambda e: [
            *_toml_case('data = "{data}"\nchecks = ["eval.top1 >= 0.5"]')(e),
            "--junit",
            str(e.tmp / "vitdiag.toml"),
        ],
        ("--junit", "vitdiag.toml", "input"),
    ),
    Case(
        "check/junit-and-json-same-file",
        lambda e: [
            *_toml_case('data = "{data}"\nchecks = ["eval.top1 >= 0.5"]')(e),
            "--junit",
            str(e.out / "r.json"),
        ],
        ("--junit", "--json"),
    ),
]


def _tree(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones too) → its sha256."""
    if root.is_file():
        return {str(root): hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def _assert_clean_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err, f"expected one line, got:\n{err}"
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)
    return err


def test_the_catalogue_is_large_and_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 50
    commands = {i.split("/")[0] for i in ids}
    assert commands >= {
        "info",
        "eval",
        "variance",
        "fix-posembed",
        "similarity",
        "invariance",
        "collapse",
        "augment",
        "report",
        "check",
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tiny_ckpt: Path, image_folder: Path, tmp_path: Path):
    # Private copies of the checkpoint and data: a case that does write over an input must
    # fail alone, not spoil the shared fixtures for every case after it.
    inputs = tmp_path / "in"
    env = Env(
        tmp=inputs,
        ckpt=Path(shutil.copytree(tiny_ckpt, inputs / "tiny")),
        data=Path(shutil.copytree(image_folder, inputs / "imgs")),
        out=tmp_path / "out",
    )
    env.out.mkdir()
    args = case.args(env)
    before = _tree(inputs)
    result = runner.invoke(app, args)
    _assert_clean_error(result, *case.needles)
    assert list(env.out.iterdir()) == [], "an output (or a temporary file) was written"
    assert _tree(inputs) == before, "an input was changed, or a file appeared beside the inputs"


def test_debug_shows_the_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "info", str(tmp_path / "nope.pt")])
    assert result.exit_code != 0
    assert result.exception is not None and type(result.exception).__name__ == "VitdiagError"


def test_no_arguments_still_shows_the_help():
    result = runner.invoke(app, [])
    assert "Usage" in result.output and "error:" not in result.output


# -- every image mode Pillow opens is evaluated -------------------------------------------------

_GREY = np.tile(np.linspace(0, 255, 40).round().astype(np.uint8), (40, 1))


def _in_every_mode() -> dict[str, tuple[object, str]]:
    """name → (PIL image, file extension); each holds the same left-to-right grey ramp."""
    from PIL import Image

    grey = Image.fromarray(_GREY)
    rgb = Image.merge("RGB", [grey] * 3)
    return {
        "L": (grey, "png"),
        "LA": (Image.merge("LA", [grey, Image.fromarray(np.full_like(_GREY, 90))]), "png"),
        "RGBA": (rgb.convert("RGBA"), "png"),
        "CMYK": (rgb.convert("CMYK"), "tiff"),
        "I16": (Image.fromarray(_GREY.astype(np.uint16) * 257), "png"),
        "I32": (Image.fromarray(_GREY.astype(np.int32) * 257), "tiff"),
        "F": (Image.fromarray(_GREY.astype(np.float32) / 255), "tiff"),
        "P": (rgb.convert("P"), "png"),
        "1": (grey.convert("1"), "png"),
    }


def test_every_pillow_mode_decodes_to_the_same_picture(tmp_path):
    """16-bit and float images are scaled to 0-255, not clipped (which made them white or black)."""
    from PIL import Image

    from vitdiag.data import decode_image

    for name, (img, ext) in _in_every_mode().items():
        f = tmp_path / f"{name}.{ext}"
        img.save(f)
        with Image.open(f) as opened:
            mode = opened.mode
        got = np.asarray(decode_image(f)).astype(float)
        assert got.shape == (40, 40, 3), name
        # P and 1 lose detail when saved (palette, dithering): compare with what was saved.
        want = np.asarray(img.convert("RGB"))[..., 0] if name in ("P", "1") else _GREY
        err = np.abs(got[..., 0] - want).mean()
        assert err < 1.0, (name, mode, err)


def test_eval_reads_an_image_folder_of_every_mode(tmp_path):
    from conftest import save_tiny_vit

    ckpt = save_tiny_vit(tmp_path / "m", num_classes=3)
    data = tmp_path / "modes"
    for i, (name, (img, ext)) in enumerate(_in_every_mode().items()):
        d = data / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{name}.{ext}")
    out = tmp_path / "r.json"
    result = runner.invoke(
        app, ["eval", str(ckpt), "--data", str(data), "--strict", "--quiet", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["data"]["n_images"] == 9 and doc["data"]["n_unreadable"] == 0


# -- paths are shown as given ----------------------------------------------------------------


def test_report_md_shows_paths_as_given_not_absolute(tmp_path, monkeypatch):
    """A report is shared (CI artifacts, PRs): no home or temporary folder may leak into it."""
    from conftest import make_image_folder, save_tiny_vit

    save_tiny_vit(tmp_path / "ckpt")
    make_image_folder(tmp_path / "imgs", classes=3, per_class=1)
    monkeypatch.chdir(tmp_path)
    args = ["report", "ckpt", "--data", "imgs", "--out", "rep", "--probes", "eval,classifier"]
    result = runner.invoke(app, [*args, "--no-plots", "--quiet"])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "`imgs`" in md
    for absolute in {str(tmp_path), str(tmp_path.resolve())}:
        assert absolute not in md
    data = json.loads((tmp_path / "rep" / "report.json").read_text())["data"]["data"]
    assert data["path"] == "imgs" and Path(data["resolved_path"]) == (tmp_path / "imgs").resolve()
