"""Findings: each rule fires on a planted positive and stays silent on a planted negative, the
severity is capped by the evidence, and a saved report judged again gives the same findings.

The rule tests feed hand-made results documents (rules are pure functions of the document);
the end-to-end tests plant the faults in real fixture models: a head sharpened 3x, a head
left at random initialisation, a network left at random initialisation.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vitdiag.cli import app
from vitdiag.findings import SCHEMA_VERSION, evaluate, findings_block, max_severity
from vitdiag.findings.base import FAIL, INFO, WARN, graded

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"


def _interval(lo, hi, method="poisson-bootstrap-200"):
    return {"lo": lo, "hi": hi, "method": method, "level": 0.95}


def _doc(*results, path="runs/ckpt", data="data/val", val=None, classes=10):
    data_desc = {"data": {"source": data, "n_images": 200, "seed": 0}}
    if val:
        data_desc["val"] = {"source": val, "n_images": 200}
    return {
        "command": "report",
        "model": {"path": path, "num_classes": classes},
        "checkpoints": [{"label": "ckpt", "model": {"path": path, "num_classes": classes}}],
        "data": data_desc,
        "results": [
            {"probe": p, "metrics": m, "extra": {"checkpoint": "ckpt", **e}, "tables": []}
            for p, m, e in results
        ],
    }


def _rules(doc):
    return {f.rule: f for f in evaluate(doc)}


# -- eval.not_above_chance -------------------------------------------------------------------


def test_chance_fires_on_chance_accuracy_and_not_on_a_trained_one():
    chance = {"chance": {"metric": "top1", "value": 0.1, "interval": [0.1, 0.1], "how": "x"}}
    at_chance = ("eval", {"top1": 0.105, "n_labelled": 2000.0}, {"references": chance})
    found = _rules(_doc(at_chance))["eval.not_above_chance"]
    assert found.severity == FAIL and found.reference["value"] == 0.1
    lo, hi = found.interval
    assert lo < 0.105 < hi and found.interval_method == "wilson-score"
    assert shlex.split(found.remedy) == ["vitdiag", "info", "runs/ckpt"]
    trained = ("eval", {"top1": 0.9, "n_labelled": 200.0}, {"references": chance})
    assert "eval.not_above_chance" not in _rules(_doc(trained))
    # 20 images: the interval reaches chance but also 30 points above it: a warning only.
    few = ("eval", {"top1": 0.15, "n_labelled": 20.0}, {"references": chance})
    assert _rules(_doc(few))["eval.not_above_chance"].severity == WARN


def test_chance_without_class_counts_is_one_over_c():
    found = _rules(_doc(("eval", {"top1": 0.25, "n_labelled": 400.0}, {}), classes=4))
    assert found["eval.not_above_chance"].reference["value"] == 0.25


# -- calibration -----------------------------------------------------------------------------

NULL = {"metric": "ece", "value": 0.01, "interval": [0.004, 0.02], "q95": 0.018, "how": "null"}


def _calibration(ece, gap, gap_lo, gap_hi):
    extra = {
        "intervals": {
            "ece": _interval(ece * 0.8, ece * 1.2),
            "confidence_minus_accuracy": _interval(gap_lo, gap_hi),
        },
        "references": {"perfect_calibration": NULL},
    }
    return ("calibration", {"ece": ece, "confidence_minus_accuracy": gap}, extra)


def test_over_and_under_confidence_against_the_perfect_calibration_null():
    over = _rules(_doc(_calibration(0.12, 0.11, 0.08, 0.14), val="data/val2"))
    f = over["calibration.over_confident"]
    assert f.severity == FAIL  # excludes 0, and 0.12 - 0.01 exceeds the practical 0.05
    words = shlex.split(f.remedy)
    assert words[:3] == ["vitdiag", "calibrate", "runs/ckpt"]
    assert words[words.index("--fit") + 1] == "data/val" and "--val" in words
    under = _rules(_doc(_calibration(0.03, -0.03, -0.04, -0.02)))
    g = under["calibration.under_confident"]
    assert g.severity == WARN and g.remedy is None  # one split: nothing to judge a fit on
    # Direction unsure (its interval holds 0): reported, at most info.
    unsure = _rules(_doc(_calibration(0.03, 0.01, -0.01, 0.03)))["calibration.over_confident"]
    assert unsure.severity == INFO


def test_calibration_silent_within_the_null():
    assert not [r for r in _rules(_doc(_calibration(0.015, 0.01, 0.0, 0.02))) if "calib" in r]


# -- variance ------------------------------------------------------------------------------


def _variance(gain_lo, gain_hi, gain=0.03):
    metrics = {"gain@48/sqrt-area": gain, "gain@48/none": 0.0, "top1@48/none": 0.8}
    extra = {
        "intervals": {
            "gain@48/sqrt-area": _interval(gain_lo, gain_hi, "poisson-bootstrap-200 (paired)"),
            "gain@48/none": _interval(0.0, 0.0),
        }
    }
    return ("variance", metrics, extra)


def test_rescale_helps_when_the_paired_gain_excludes_zero():
    f = _rules(_doc(_variance(0.01, 0.05)))["variance.rescale_helps@48"]
    assert f.severity == FAIL and f.value == 0.03
    words = shlex.split(f.remedy)
    assert words[:3] == ["vitdiag", "fix-posembed", "runs/ckpt"]
    assert words[words.index("--size") + 1] == "48"
    assert words[words.index("--rescale") + 1] == "sqrt-area"
    assert "variance.rescale_helps@48" not in _rules(_doc(_variance(-0.01, 0.05)))


# -- similarity ------------------------------------------------------------------------------


def _similarity(value, lo, hi, ref_value, ref_lo, ref_hi):
    ref = {"metric": "last_block", "value": ref_value, "interval": [ref_lo, ref_hi], "how": "r"}
    extra = {"intervals": {"last_block": _interval(lo, hi)}, "references": {"random_init": ref}}
    return ("similarity", {"last_block": value}, extra)


def test_over_smoothing_needs_p_h_above_the_random_init_reference():
    f = _rules(_doc(_similarity(0.85, 0.83, 0.87, 0.60, 0.55, 0.65)))["similarity.over_smoothed"]
    assert f.severity == FAIL and "patch_cosine_loss" in f.remedy
    # The no-mix fixture: 0.702 against 0.698 untrained (SPEC §8): not a finding.
    quiet = _rules(_doc(_similarity(0.702, 0.69, 0.715, 0.698, 0.68, 0.71)))
    assert "similarity.over_smoothed" not in quiet
    assert "similarity.over_smoothed" not in _rules(_doc(("similarity", {"last_block": 0.9}, {})))


# -- collapse, classifier, augment ----------------------------------------------------------


def _collapse(lo, hi, ref_lo, ref_hi):
    ref = {"metric": "nc1", "value": (ref_lo + ref_hi) / 2, "interval": [ref_lo, ref_hi]}
    extra = {"intervals": {"nc1": _interval(lo, hi, "delete-a-group-jackknife-10")}}
    return ("collapse", {"nc1": (lo + hi) / 2}, {**extra, "references": {"random_init": ref}})


def test_nc4_fires_above_the_practical_share_only():
    def head(nc4):
        metrics = {"nc4": nc4, "nc4_sample_size": 200.0, "nc1": 0.05}
        return _rules(_doc(("collapse", metrics, {})))

    assert head(0.82)["collapse.head_disagrees_with_class_means"].severity == FAIL
    assert head(0.07)["collapse.head_disagrees_with_class_means"].severity == WARN
    assert "collapse.head_disagrees_with_class_means" not in head(0.015)  # vit_cutmix's


def test_nc1_against_random_init():
    assert _rules(_doc(_collapse(0.02, 0.06, 1.5, 3.0)))["collapse.nc1_below_random_init"]
    above = _rules(_doc(_collapse(4.0, 5.0, 1.5, 3.0)))["collapse.nc1_above_random_init"]
    assert above.severity == WARN
    like = _rules(_doc(_collapse(1.0, 2.0, 1.5, 3.0)))["collapse.nc1_like_random_init"]
    assert like.severity == INFO


def test_head_geometry_against_random_gaussian_heads():
    ref = {"metric": "w_etf", "value": 0.491, "interval": [0.428, 0.562], "how": "g"}

    def head(v):
        return _rules(_doc(("classifier", {"w_etf": v}, {"references": {"gaussian_heads": ref}})))

    assert "classifier.etf_like_random" in head(0.54)  # the fixtures' heads (issue 20)
    assert "classifier.closer_to_etf_than_random" in head(0.1)
    assert "classifier.farther_from_etf_than_random" in head(0.9)
    assert all(f.severity == INFO for f in head(0.1).values())


def test_augment_flags_become_findings_with_the_train_argument_change():
    metrics = {"flag/mixup": 1.0, "flag/erasing-mode": 0.0, "ratio_image_global/mixup": 0.58}
    found = _rules(_doc(("augment", metrics, {})))
    assert set(found) == {"augment.mixup"}
    assert found["augment.mixup"].value == 0.58 and "--cutmix" in found["augment.mixup"].remedy


# -- the evidence rule, the block, the order --------------------------------------------------


def test_severity_is_capped_by_the_evidence():
    assert graded(False, 10.0, 0.05) == INFO
    assert graded(True, 0.01, 0.05) == WARN
    assert graded(True, 0.06, 0.05) == FAIL


def test_findings_are_ordered_most_severe_first_and_versioned():
    doc = _doc(
        _similarity(0.85, 0.83, 0.87, 0.60, 0.55, 0.65),
        _collapse(0.02, 0.06, 1.5, 3.0),
        _calibration(0.03, -0.03, -0.04, -0.02),
    )
    found = evaluate(doc)
    assert [f.severity for f in found] == [FAIL, WARN, INFO]
    block = findings_block(found)
    assert block["schema_version"] == SCHEMA_VERSION and len(block["items"]) == 3
    assert set(block["items"][0]) >= {"rule", "severity", "value", "interval", "reference"}
    assert max_severity(block["items"]) == FAIL and max_severity([]) is None


# -- end to end, on planted models -----------------------------------------------------------


def _planted(tmp_path: Path, name: str, change) -> Path:
    from safetensors.torch import load_file, save_file

    out = tmp_path / name
    shutil.copytree(FIXTURES / "models" / "vit_mixup", out)
    weights = load_file(out / "model.safetensors")
    change(weights)
    save_file(weights, out / "model.safetensors")
    return out


def _relabelled(tmp_path: Path) -> Path:
    """The val images with every third one filed under the next class: a split on which the
    fixture models (99.5 % on the clean one) make a third of their answers wrong."""
    out = tmp_path / "relabelled"
    shutil.copytree(FIXTURES / "data" / "val", out)
    classes = sorted(p.name for p in out.iterdir() if p.is_dir())
    for i, name in enumerate(classes):
        for image in sorted((out / name).iterdir())[::3]:
            target = out / classes[(i + 1) % len(classes)] / f"moved-{image.name}"
            image.rename(target)
    return out


def _report(ckpt: Path, out: Path, *extra: str, data: Path | None = None) -> dict:
    data = data or FIXTURES / "data" / "val"
    args = ["report", str(ckpt), "--data", str(data), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--no-plots", "-q", "--batch-size", "50", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


def _fired(doc: dict) -> set[str]:
    return {f["rule"] for f in doc["findings"]["items"]}


@pytest.mark.slow
def test_a_head_sharpened_three_times_is_over_confident(tmp_path):
    def sharpen(w):
        w["head.weight"] = w["head.weight"] * 3
        w["head.bias"] = w["head.bias"] * 3

    # 99.5 % right on the clean split leaves no room to be over-confident: 1 error in 200.
    # On a split with a third of the labels moved, confidence ≈ 1 against accuracy ≈ 2/3.
    sharp = _report(
        _planted(tmp_path, "sharp", sharpen),
        tmp_path / "r1",
        "--probes",
        "eval,calibration",
        data=_relabelled(tmp_path),
    )
    assert "calibration.over_confident" in _fired(sharp)
    f = next(f for f in sharp["findings"]["items"] if f["rule"] == "calibration.over_confident")
    assert f["severity"] == "fail" and f["interval"][0] > f["reference"]["q95"]
    plain = _report(
        FIXTURES / "models" / "vit_mixup", tmp_path / "r0", "--probes", "eval,calibration"
    )
    assert "calibration.over_confident" not in _fired(plain)
    # A saved report judged again gives the same findings, item for item.
    again = CliRunner().invoke(app, ["findings", str(tmp_path / "r1"), "--json", "-"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == sharp["findings"]


@pytest.mark.slow
def test_an_untrained_head_disagrees_with_the_class_means(tmp_path):
    """A random head on trained features is above chance (the features carry the classes:
    top-1 0.175 here), so `eval.not_above_chance` rightly stays silent; what shows it is the
    head deciding otherwise than the nearest class mean."""
    import torch

    def untrain(w):
        gen = torch.Generator().manual_seed(0)
        w["head.weight"] = torch.randn(w["head.weight"].shape, generator=gen) * 0.02
        w["head.bias"] = torch.zeros_like(w["head.bias"])

    probes = ("--probes", "eval,collapse")
    doc = _report(_planted(tmp_path, "nohead", untrain), tmp_path / "r", *probes)
    found = {f["rule"]: f for f in doc["findings"]["items"]}
    assert found["collapse.head_disagrees_with_class_means"]["severity"] == "fail"
    trained = _report(FIXTURES / "models" / "vit_mixup", tmp_path / "t", *probes)
    assert "collapse.head_disagrees_with_class_means" not in _fired(trained)
    assert "eval.not_above_chance" not in _fired(trained)


@pytest.mark.slow
def test_a_random_init_network_is_its_own_reference(tmp_path):
    """At random initialisation the network is at chance, and its P(h) is the reference's
    (the same seed): over-smoothing must not fire, whatever P(h) is."""
    import torch

    def reinit(w):
        import vitdiag
        from vitdiag.model import random_init_like

        loaded = vitdiag.load(FIXTURES / "models" / "vit_mixup")
        fresh = random_init_like(loaded, seed=0).model.state_dict()
        w.update({k: v.clone() for k, v in fresh.items() if k in w})
        assert not torch.equal(w["head.weight"], loaded.model.state_dict()["head.weight"])

    doc = _report(
        _planted(tmp_path, "random", reinit), tmp_path / "r", "--probes", "eval,similarity"
    )
    fired = _fired(doc)
    assert "eval.not_above_chance" in fired and "similarity.over_smoothed" not in fired
    sim = next(r for r in doc["results"] if r["probe"] == "similarity")
    ref = sim["extra"]["references"]["random_init"]
    assert ref["value"] == pytest.approx(sim["metrics"]["last_block"], rel=1e-6)


@pytest.mark.slow
def test_every_printed_remedy_command_runs_as_printed(tmp_path, monkeypatch):
    """The CutMix fixture on two splits: under-confident (remedy: vitdiag calibrate, with the
    18 training errors it needs) and over-smoothed (remedy: the vitdiag.train losses)."""
    data, val = FIXTURES / "data" / "train", FIXTURES / "data" / "val"
    args = ["report", str(FIXTURES / "models" / "vit_cutmix"), "--data", str(data)]
    args += ["--val", str(val), "--out", str(tmp_path / "r"), "--no-plots", "-q"]
    result = CliRunner().invoke(app, [*args, "--probes", "eval,calibration,similarity"])
    assert result.exit_code == 0, result.output
    items = json.loads((tmp_path / "r" / "report.json").read_text())["findings"]["items"]
    fired = {f["rule"]: f for f in items}
    assert {"calibration.under_confident", "similarity.over_smoothed"} <= set(fired)
    assert fired["similarity.over_smoothed"]["remedy"].startswith("vitdiag.train.")
    commands = [f["remedy"] for f in items if (f["remedy"] or "").startswith("vitdiag ")]
    assert commands, items
    monkeypatch.chdir(tmp_path)  # remedies write beside the user, never into the fixtures
    for line in commands:
        words = shlex.split(line)
        ran = CliRunner().invoke(app, words[1:])
        assert ran.exit_code == 0, (line, ran.output)
    assert (tmp_path / "vit_cutmix-calibrated" / "calibration.json").is_file()


@pytest.mark.slow
def test_check_gates_on_findings(tmp_path):
    config = tmp_path / "vitdiag.toml"
    config.write_text(
        f'data = "{FIXTURES / "data" / "val"}"\n'
        "checks = [\n"
        '  "findings.max_severity < fail",\n'
        '  "findings.eval.* absent",\n'
        '  "findings.classifier.etf_like_random absent",\n'
        "]\n"
    )
    junit = tmp_path / "junit.xml"
    args = ["check", str(FIXTURES / "models" / "vit_nomix"), "--config", str(config)]
    result = CliRunner().invoke(app, [*args, "--junit", str(junit), "--json", "-"])
    # vit_nomix: its worst finding is a warning, nothing on eval, but its head's ETF distance
    # lies within random heads' (an info finding), so the third check fails: exit 1.
    assert result.exit_code == 1, result.output
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["findings.max_severity < fail"]["passed"]
    assert checks["findings.max_severity < fail"]["measured"] == "warn"
    assert checks["findings.eval.* absent"]["passed"]
    failed = checks["findings.classifier.etf_like_random absent"]
    assert not failed["passed"] and failed["measured"] == "classifier.etf_like_random"
    assert junit.read_text().count("<failure") == 1
    bad = tmp_path / "bad.toml"
    bad.write_text('data = "x"\nchecks = ["findings.nosuch.rule absent"]\n')
    refused = CliRunner().invoke(app, ["check", "--config", str(bad)])
    assert refused.exit_code == 2 and "rule family" in refused.output
