"""Hostile and broken data: bad files are skipped and counted (numbers equal the clean subset),
bombs and extreme aspect ratios are refused from the header, odd names keep messages one line,
symlink loops, FIFOs and devices never hang, tar members cannot escape into class names."""

from __future__ import annotations

import io
import math
import os
import shutil
import signal
import tarfile
import zlib
from pathlib import Path

import pytest
from conftest import FIXTURES
from PIL import Image
from tolerances import FORWARD_RTOL

import vitdiag
from vitdiag.cli import app
from vitdiag.data import open_dataset
from vitdiag.data.sources import MAX_IMAGE_PIXELS, UnreadableImageError, shown
from vitdiag.errors import VitdiagError
from vitdiag.runner import run_all

VAL = FIXTURES / "data" / "val"


def _small_folder(dst: Path, per_class: int = 2) -> Path:
    for cdir in sorted(VAL.iterdir()):
        (dst / cdir.name).mkdir(parents=True)
        for f in sorted(cdir.iterdir())[:per_class]:
            shutil.copy(f, dst / cdir.name / f.name)
    return dst


def _bomb_png(path: Path, side: int = 20000) -> None:
    # A 1-bit PNG of side x side zeros: a few KB on disk, 400 MP once decoded.
    raw = zlib.compress(b"".join(b"\x00" + bytes(side // 8) for _ in range(side)), 9)

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    )


def _numbers(found) -> dict[str, float]:
    return {f"{r.probe}.{k}": v for r in found for k, v in r.metrics.items()}


def test_bad_files_are_skipped_and_the_numbers_equal_the_clean_subset(tmp_path):
    clean = _small_folder(tmp_path / "clean")
    dirty = _small_folder(tmp_path / "dirty")
    classes = sorted(p for p in dirty.iterdir())
    (classes[0] / "zero.jpg").write_bytes(b"")
    good = next(iter(sorted(classes[1].iterdir()))).read_bytes()
    (classes[1] / "trunc.jpg").write_bytes(good[: len(good) // 3])
    (classes[2] / "junk.png").write_bytes(b"not an image at all")
    _bomb_png(classes[3] / "bomb.png")
    Image.new("RGB", (500, 1)).save(classes[4] / "wide.png")
    loaded = vitdiag.load(FIXTURES / "models" / "vit_nomix")
    kw = dict(probes="eval,calibration,collapse", batch_size=8)
    a, b = run_all(loaded, str(clean), **kw), run_all(loaded, str(dirty), **kw)
    assert b.data["data"]["n_unreadable"] == 5
    assert b.data["data"]["n_images"] == a.data["data"]["n_images"] == 20
    na, nb = _numbers(a), _numbers(b)
    assert set(na) == set(nb) and na
    for key, va in na.items():
        vb = nb[key]
        if isinstance(va, float) and math.isnan(va):
            assert math.isnan(vb), key
        elif key.split(".")[1] in ("top1", "top5", "accuracy"):
            assert va == vb, key
        else:
            assert vb == pytest.approx(va, rel=FORWARD_RTOL, abs=FORWARD_RTOL), key
    notes = [n for r in b for n in r.notes]
    assert any("5 unreadable image(s) were skipped" in n for n in notes)


def test_a_decompression_bomb_is_refused_before_it_is_decoded(tmp_path):
    (tmp_path / "x").mkdir()
    _bomb_png(tmp_path / "x" / "bomb.png")
    assert (tmp_path / "x" / "bomb.png").stat().st_size < 100_000
    src = open_dataset(str(tmp_path / "x"), strict=True)
    with pytest.raises(UnreadableImageError) as err:
        src[0]
    msg = str(err.value)
    assert f"above the {MAX_IMAGE_PIXELS:,}-pixel limit" in msg and "\n" not in msg
    # Just above the limit but below PIL's own 2x error: still refused (PIL would only warn).
    Image.new("1", (9500, 9500)).save(tmp_path / "x" / "bomb.png")
    with pytest.raises(UnreadableImageError, match="9500x9500 pixels, above the"):
        src[0]


@pytest.mark.parametrize("size", [(1, 1), (1, 50), (50, 1), (7, 300)])
def test_tiny_and_elongated_images_within_the_bound_are_read(tmp_path, size):
    loaded = vitdiag.load(FIXTURES / "models" / "vit_nomix")
    d = tmp_path / "d"
    d.mkdir()
    Image.new("RGB", size, (200, 10, 10)).save(d / "a.png")
    Image.new("RGB", (40, 30), (10, 200, 10)).save(d / "b.png")
    found = run_all(loaded, str(d), probes="similarity", batch_size=2)
    assert found.data["data"]["n_images"] == 2 and found.data["data"]["n_unreadable"] == 0


@pytest.mark.parametrize("size", [(1, 500), (500, 1)])
def test_extreme_aspect_ratios_are_refused_from_the_header(tmp_path, size):
    d = tmp_path / "d"
    d.mkdir()
    Image.new("RGB", size).save(d / "a.png")
    with pytest.raises(UnreadableImageError, match="more elongated than 50:1"):
        open_dataset(str(d), strict=True)[0]


def test_odd_names_are_read_and_messages_stay_one_line(tmp_path, capfd):
    d = tmp_path / "d"
    d.mkdir()
    for name in ("with space.jpg", "é.jpg", "中文.jpg", "🙂.jpg"):
        Image.new("RGB", (8, 8), (1, 2, 3)).save(d / name)
    (d / "a\nb.jpg").write_bytes(b"junk")
    src = open_dataset(str(d), strict=True)
    assert len(src) == 5
    readable = [i for i in range(len(src)) if "\n" not in src.files[i]]
    assert all(src[i][0].size == (8, 8) for i in readable)
    bad = next(i for i in range(len(src)) if "\n" in src.files[i])
    with pytest.raises(UnreadableImageError) as err:
        src[bad]
    assert "\n" not in str(err.value) and "a\\nb.jpg" in str(err.value)
    assert shown("é 中文 🙂\t\x1b") == "é 中文 🙂\\t\\x1b"
    # The same through the CLI (in-process, stderr captured at the descriptor): one line, exit 2.
    capfd.readouterr()
    with pytest.raises(SystemExit) as done:
        app(["eval", str(FIXTURES / "models" / "vit_nomix"), "--data", str(d), "--strict"])
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert done.value.code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error:") and "a\\nb.jpg" in lines[0]
    # The Python API raises the CLI's message as a VitdiagError.
    loaded = vitdiag.load(FIXTURES / "models" / "vit_nomix")
    with pytest.raises(VitdiagError) as api:
        run_all(loaded, str(d), probes="eval", strict=True)
    assert lines[0] == f"error: {api.value}"


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM and FIFOs")
def test_symlink_loops_fifos_and_devices_never_hang(tmp_path):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    d = tmp_path / "d"
    (d / "cat").mkdir(parents=True)
    (d / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(d / "cat" / "1.png")
    Image.new("RGB", (8, 8)).save(d / "dog" / "1.png")
    os.symlink(d / "cat", d / "cat" / "self")  # a loop to itself
    os.symlink(d, d / "dog" / "up")  # a loop to the dataset's root
    os.symlink(outside, d / "dog" / "2.png")  # outside the folder: read
    os.mkfifo(d / "cat" / "x.jpg")  # would block open() forever
    os.symlink("/dev/zero", d / "dog" / "z.png")  # would never end
    src = _within(20, open_dataset, str(d), strict=True)
    assert src.classes == ["cat", "dog"]
    assert sorted(src.files) == ["cat/1.png", "dog/1.png", "dog/2.png"]
    assert [_within(20, src.__getitem__, i)[0].size for i in range(len(src))] == [(8, 8)] * 3


def _within(seconds: int, fn, *args, **kwargs):
    """fn(...) or a test failure after `seconds`: a regression here hangs rather than fails."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        return fn(*args, **kwargs)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_tar_members_with_dotdot_or_absolute_paths_are_ignored_with_a_note(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    png = buf.getvalue()
    path = tmp_path / "d.tar"
    with tarfile.open(path, "w") as tf:
        for name in ("cat/1.png", "dog/1.png", "../evil/1.png", "/abs/1.png", "cat/../../x/2.png"):
            _add(tf, name, png)
    src = open_dataset(str(path))
    assert src.classes == ["cat", "dog"] and len(src) == 2 and src.n_unsafe_members == 3
    loaded = vitdiag.load(FIXTURES / "models" / "vit_nomix")
    found = run_all(loaded, str(path), probes="similarity", batch_size=2)
    notes = [n for r in found for n in r.notes]
    assert any("3 tar member(s) with an absolute or '..' path were ignored" in n for n in notes)
    only_bad = tmp_path / "bad.tar"
    with tarfile.open(only_bad, "w") as tf:
        _add(tf, "../evil/1.png", png)
    with pytest.raises(VitdiagError, match=r"absolute or '\.\.' member paths"):
        open_dataset(str(only_bad))
