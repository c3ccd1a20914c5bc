"""`vitdiag report` and `runner.run_all`: every probe that applies, one engine pass per dataset,
one folder (report.json, report.md, PNGs) written whole or not at all."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import make_image_folder, save_tiny_vit
from typer.testing import CliRunner

from vitdiag.check import known_metric
from vitdiag.cli import app
from vitdiag.errors import VitdiagError
from vitdiag.report import md_cell, md_table, write_folder

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_ckpts(tmp_path_factory, tiny_ckpt) -> list[Path]:
    other = save_tiny_vit(tmp_path_factory.mktemp("ckpt2") / "tiny_b", seed=1)
    return [tiny_ckpt, other]


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("val") / "val", classes=3, per_class=2)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, two_ckpts, image_folder, val_folder) -> Path:
    out = tmp_path_factory.mktemp("report") / "rep"
    args = ["report", *map(str, two_ckpts), "--data", str(image_folder), "--val", str(val_folder)]
    args += ["--sizes", "48", "--aug", "cutout,mixup", "--views", "2", "--pairs", "2"]
    args += ["--batch-size", "4", "--out", str(out), "--device", "cpu", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "report written to" in result.output
    return out


def test_report_folder_holds_json_markdown_and_figures(report_dir):
    names = sorted(p.name for p in report_dir.iterdir())
    assert "report.json" in names and "report.md" in names
    pngs = [n for n in names if n.endswith(".png")]
    assert {"similarity.png", "invariance.png"} <= set(pngs)
    assert {"reliability-tiny.png", "reliability-tiny_b.png"} <= set(pngs)
    for name in pngs:
        assert (report_dir / name).read_bytes()[:8] == PNG_MAGIC
    # every image the markdown shows lies beside it, and nothing half-written is left around
    md = (report_dir / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links and all((report_dir / link).is_file() for link in links)
    assert set(pngs) == set(links)
    assert not [p for p in report_dir.parent.iterdir() if p.name.startswith(".rep")]


def test_report_json_is_one_document_for_all_checkpoints(report_dir):
    doc = json.loads((report_dir / "report.json").read_text())
    assert doc["schema_version"] == 1 and doc["command"] == "report"
    assert doc["model"] is None  # several checkpoints: each result names its own
    assert [c["label"] for c in doc["checkpoints"]] == ["tiny", "tiny_b"]
    assert all(c["model"]["sha256"] for c in doc["checkpoints"])
    probes = ["classifier", "eval", "calibration", "variance"]
    probes += ["collapse", "mixup_geometry", "similarity", "invariance"]
    for label in ("tiny", "tiny_b"):
        mine = [r for r in doc["results"] if r["extra"]["checkpoint"] == label]
        assert [r["probe"] for r in mine] == probes
    assert doc["comparison"]["columns"] == ["metric", "tiny", "tiny_b"]
    first = [row[0] for row in doc["comparison"]["rows"]]
    assert first[:2] == ["eval.top1", "eval.nll"] and "variance.shift@48" in first
    assert set(doc["data"]) == {"data", "val"}
    assert doc["data"]["data"]["n_images"] == 12 and doc["data"]["val"]["n_images"] == 6


def test_training_and_validation_probes_use_their_own_split(report_dir):
    doc = json.loads((report_dir / "report.json").read_text())
    where = {r["probe"]: r["extra"].get("dataset") for r in doc["results"]}
    assert where["collapse"] == where["similarity"] == where["invariance"] == "data"
    assert where["eval"] == where["calibration"] == where["variance"] == "val"
    assert where["classifier"] is None
    evals = [r for r in doc["results"] if r["probe"] == "eval"]
    assert all(r["metrics"]["n_images"] == 6 for r in evals)
    # one pass per dataset; the extra size is the only other pass (plus its empirical table),
    # and the random-init reference of similarity and collapse one more, on its own model
    passes = ["data", "val", "variance@48", "variance@48 empirical", "random-init reference"]
    assert doc["checkpoints"][0]["passes"] == passes


def test_markdown_compares_checkpoints_then_has_a_section_each(report_dir):
    md = (report_dir / "report.md").read_text()
    assert md.startswith("# vitdiag report")
    assert md.index("## Comparison") < md.index("## tiny\n") < md.index("## tiny_b\n")
    assert "| metric | tiny | tiny\\_b |" in md
    assert "| eval.top1 |" in md
    for title in ("### Neural collapse — on --data", "### Calibration — on --val"):
        assert md.count(title) == 2
    # a GitHub table is header, separator, rows: every row has the header's cell count
    for block in re.findall(r"((?:^\|.*\|\n)+)", md, flags=re.M):
        rows = block.strip().split("\n")
        assert re.fullmatch(r"\|(---\|)+", rows[1])
        widths = {len(re.split(r"(?<!\\)\|", r)) for r in rows}
        assert len(widths) == 1, block


def test_every_reported_metric_name_is_known_to_check(report_dir):
    doc = json.loads((report_dir / "report.json").read_text())
    for r in doc["results"]:
        unknown = [k for k in r["metrics"] if not known_metric(r["probe"], k)]
        assert not unknown, (r["probe"], unknown)


def test_refuses_a_non_empty_out_without_force(tmp_path, tiny_ckpt, image_folder):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["report", str(tiny_ckpt), "--data", str(image_folder), "--probes", "eval"]
    args += ["--out", str(out), "-q", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "exists and is not empty" in result.stderr and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"

    result = runner.invoke(app, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_a_failed_report_leaves_the_old_folder_and_no_temporary(tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "old.md").write_text("old")

    def fill(folder: Path) -> None:
        (folder / "report.md").write_text("new")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_folder(out, fill, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    assert (out / "old.md").read_text() == "old"
    write_folder(out, lambda f: (f / "report.md").write_text("new"), force=True)
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_run_all_feeds_every_probe_from_one_forward_per_batch(tiny_ckpt, image_folder):
    from vitdiag import load, open_dataset, run_all

    loaded = load(str(tiny_ckpt))
    calls = []
    original = loaded.model.forward_features
    loaded.model.forward_features = lambda x: calls.append(x.shape[0]) or original(x)
    source = open_dataset(str(image_folder))
    probes = {"eval", "calibration", "collapse", "similarity", "variance", "classifier"}
    results = run_all(loaded, source, probes=probes, batch_size=5, device="cpu")
    assert calls == [5, 5, 2]  # 12 images, each through the model exactly once
    # The reference pass runs another model (the architecture at random init), not this one.
    assert results.passes == ["data", "random-init reference"]
    assert [r.probe for r in results] == [
        "classifier",
        "eval",
        "calibration",
        "variance",
        "collapse",
        "similarity",
    ]
    variance = next(r for r in results if r.probe == "variance")
    assert variance.metrics["shift@32"] == pytest.approx(1.0)
    assert variance.metrics["top1@32/none"] == results[1].metrics["top1"]


def test_probes_that_do_not_apply_are_skipped_or_refused(tmp_path, tiny_ckpt, image_folder):
    from vitdiag import load, run_all

    flat = tmp_path / "flat"
    flat.mkdir()
    for i, png in enumerate(sorted(image_folder.rglob("*.png"))[:4]):
        shutil.copy(png, flat / f"{i}.png")
    loaded = load(str(tiny_ckpt))
    results = run_all(loaded, str(flat), probes="eval")
    assert [r.probe for r in results] == ["eval"]
    everything = run_all(loaded, str(flat), aug="cutout", views=2, device="cpu")
    assert set(everything.skipped) == {"calibration", "collapse", "mixup_geometry"}
    assert "labelled" in everything.skipped["collapse"]
    with pytest.raises(VitdiagError, match="collapse probe does not apply"):
        run_all(loaded, str(flat), probes={"collapse"})
    with pytest.raises(VitdiagError, match="unknown probe"):
        run_all(loaded, str(flat), probes="colapse")
    # no data at all: only the classifier statistics can be computed
    alone = run_all(loaded, None)
    assert [r.probe for r in alone] == ["classifier"] and "eval" in alone.skipped


def test_markdown_cells_are_escaped():
    assert md_cell("a|b") == "a\\|b"
    assert md_cell("<script>") == "\\<script>"
    assert md_cell("nc2_etf") == "nc2\\_etf"
    assert md_cell(float("nan")) == "–"
    assert md_table(["a", "b"], [[1, 0.123456]]) == ["| a | b |", "|---|---|", "| 1 | 0.1235 |"]


def test_the_library_api_is_importable_from_the_package():
    from vitdiag import load, open_dataset, run_all, run_probes

    assert all(callable(f) for f in (load, open_dataset, run_probes, run_all))
