"""`vitdiag calibrate`: temperature scaling (SPEC §9). The Newton fit against brute force, a
planted temperature recovered, the fold into the head(s) exact, the written folder loading in
plain timm, the refusals, and the input left as it was."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, perturb
from tolerances import FORWARD_RTOL
from typer.testing import CliRunner

from vitdiag.cli import app
from vitdiag.errors import VitdiagError
from vitdiag.probes.calibration import calibration_bins
from vitdiag.studies.calibrate import (
    BETA_MAX,
    BETA_MIN,
    fit_temperature,
    fold_temperature,
    head_layers,
    temperature_interval,
    weighted_bins,
)

runner = CliRunner()
TRAIN, VAL = FIXTURES / "data" / "train", FIXTURES / "data" / "val"
# vit_cutmix is the one fixture model with at least 10 errors on its (clean) training images:
# 18 of 600 (vit_nomix 0, vit_mixup 2), so the fit on --fit fixtures/data/train is defined.
CUTMIX = FIXTURES / "models" / "vit_cutmix"
NOMIX = FIXTURES / "models" / "vit_nomix"
KEYS = (
    "temperature",
    "ece_before",
    "ece_after",
    "nll_before",
    "nll_after",
    "mce_before",
    "mce_after",
    "n_fit",
    "n_val",
    "intervals",
)


# -- the fit, against brute force -------------------------------------------------------------


def _synthetic(seed: int, n: int, c: int, t_true: float, scale: float):
    """Logits ~ N(0, scale²) and labels drawn from softmax(z / t_true): T = t_true is the
    temperature that generated the labels."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    y = torch.multinomial(torch.softmax(z / t_true, dim=1), 1, generator=g)[:, 0]
    return z, y


def _nll(betas: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """NLL(β) for each β, straight from the definition (float64)."""
    bz = betas[:, None, None] * z[None]
    return (torch.logsumexp(bz, dim=2) - bz[:, torch.arange(len(y)), y]).mean(dim=1)


def _grid_min(z, y, lo=1e-3, hi=20.0) -> float:
    """Brute force: the best of 2001 points, then a finer grid around it, down to 1e-9."""
    while hi - lo > 1e-9:
        betas = torch.linspace(lo, hi, 2001, dtype=torch.float64)
        i = int(_nll(betas, z, y).argmin())
        lo, hi = float(betas[max(i - 1, 0)]), float(betas[min(i + 1, 2000)])
    return (lo + hi) / 2


def _golden_section(z, y, lo=1e-3, hi=20.0) -> float:
    """Golden-section search for the minimum of the (convex, so unimodal) NLL; no scipy."""
    f = lambda b: float(_nll(torch.tensor([b], dtype=torch.float64), z, y)[0])  # noqa: E731
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    while b - a > 1e-10:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
    return (a + b) / 2


@pytest.mark.parametrize(
    ("seed", "t_true", "scale"),
    [(0, 2.0, 3.0), (1, 0.5, 1.0), (2, 60.0, 180.0)],  # the last: β* ≈ 1/60, far from 1
)
def test_newton_equals_a_grid_and_golden_section_minimum(seed, t_true, scale):
    z, y = _synthetic(seed, n=300, c=6, t_true=t_true, scale=scale)
    beta, info = fit_temperature(z, y)
    assert info["converged"] and info["errors"] >= 10
    # NLL is flat at its minimum (NLL − NLL* ≈ NLL″/2 · δβ²), so float64 NLL values place a
    # brute-force minimum to ~1e-7: 1e-6 is what the comparison can resolve.
    assert beta == pytest.approx(_grid_min(z, y), abs=1e-6)
    assert beta == pytest.approx(_golden_section(z, y), abs=1e-6)
    assert abs(info["gradient"]) < 1e-12 * float(z.abs().max())  # NLL′ at rounding level


def test_the_fit_recovers_a_planted_temperature_within_its_sampling_error():
    z, y = _synthetic(3, n=20_000, c=10, t_true=2.0, scale=3.0)
    beta, info = fit_temperature(z, y)
    se = info["se_temperature"]
    assert 0 < se < 0.05  # the check below has teeth
    assert abs(1 / beta - 2.0) <= 4 * se
    lo, hi = temperature_interval(beta, info["se_beta"])
    assert lo < 1 / beta < hi


def test_a_fit_from_the_far_side_of_the_bracket_bisects_and_converges():
    z, y = _synthetic(4, n=300, c=6, t_true=400.0, scale=1200.0)  # β* ≈ 0.0025, near BETA_MIN
    beta, info = fit_temperature(z, y)
    assert info["converged"] and BETA_MIN < beta < 0.01
    # Newton from β = 1 leaves the bracket (the softmax is saturated there): bisections bring
    # it back, then Newton finishes
    assert info["bisections"] >= 1 and info["newton_steps"] + info["bisections"] <= 20
    assert beta == pytest.approx(_golden_section(z, y, hi=0.05), abs=1e-6)


def _with_errors(k: int, n: int = 300):
    z, _ = _synthetic(5, n=n, c=6, t_true=1.0, scale=2.0)
    y = z.argmax(dim=1)
    y[:k] = (y[:k] + 1) % 6  # exactly k images wrong
    return z, y


def test_fewer_than_10_errors_is_refused_and_10_are_fit():
    with pytest.raises(VitdiagError, match=r"only 9 of the 300 --fit images wrong"):
        fit_temperature(*_with_errors(9))
    beta, info = fit_temperature(*_with_errors(10))
    assert info["errors"] == 10 and BETA_MIN < beta < BETA_MAX


@pytest.mark.parametrize(("scale", "bound"), [(1e-5, "T = 0.001"), (1e5, "T = 1000")])
def test_an_optimum_beyond_the_bracket_is_refused(scale, bound):
    z, y = _synthetic(6, n=300, c=6, t_true=2.0, scale=3.0)  # β* ≈ 0.5, so β*/scale is out
    with pytest.raises(VitdiagError, match=f"hit its bound {bound}") as e:
        fit_temperature(z * scale, y)
    assert "\n" not in str(e.value)


def test_weighted_bins_with_unit_weights_are_the_calibration_probes_bins():
    z, y = _synthetic(7, n=500, c=10, t_true=1.0, scale=2.0)
    got = weighted_bins(z, y, torch.ones(500, 1, dtype=torch.float64), 15)
    want = calibration_bins(z, y, 15)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g[:, 0], w, rtol=1e-12, atol=1e-12)


# -- the fold --------------------------------------------------------------------------------


def test_fold_scales_both_heads_of_a_distilled_deit():
    import timm

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    model = perturb(timm.create_model("deit_tiny_distilled_patch16_224", num_classes=5, **args))
    assert [name for name, _ in head_layers(model)] == ["head", "head_dist"]
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model(x)
    assert fold_temperature(model, 2.5) == ["head", "head_dist"]
    with torch.inference_mode():
        after = model(x)
    scale = float(before.abs().max()) * 2.5
    torch.testing.assert_close(after, 2.5 * before, rtol=FORWARD_RTOL, atol=FORWARD_RTOL * scale)
    assert torch.equal(after.argmax(dim=1), before.argmax(dim=1))


# -- the command on the fixtures --------------------------------------------------------------


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _scaled_copy(src: Path, dst: Path, k: float) -> Path:
    """A copy of the timm folder `src` with head.weight and head.bias multiplied by k."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    for key in ("head.weight", "head.bias"):
        state[key] = (state[key].double() * k).float()
    save_file(state, str(dst / "model.safetensors"))
    return dst


def _calibrate(ckpt, out, *more: str, fit=TRAIN, val=VAL):
    args = ["calibrate", str(ckpt), "--fit", str(fit), "--val", str(val), "--out", str(out)]
    return runner.invoke(app, [*args, "--workers", "0", "-q", "--device", "cpu", *more])


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> dict:
    """vit_cutmix calibrated on train (T0), then its calibrated output with the head scaled by
    1/3 and by 3, calibrated again: those logits are the calibrated ones × k, so the fit must
    give T = k (NLL(β; k·z) = NLL(kβ; z), whatever the images)."""
    import vitdiag.model

    root = tmp_path_factory.mktemp("calibrate")
    before = _sha(CUTMIX)
    seen = []
    original_load = vitdiag.model.load

    def load_and_keep(*args, **kwargs):
        loaded = original_load(*args, **kwargs)
        state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
        seen.append((loaded.model, state, loaded.model.training))
        return loaded

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vitdiag.model, "load", load_and_keep)
        done = _calibrate(CUTMIX, root / "cal", "--json", str(root / "cal.json"))
    assert done.exit_code == 0, done.output
    # the fold is made on a copy: the model the command loaded is as it was (weights, mode)
    (model, state, training), *_ = seen
    assert model.training == training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    runs = {"base": (CUTMIX, root / "cal", done)}
    for name, k in (("third", 1 / 3), ("triple", 3.0)):
        scaled = _scaled_copy(root / "cal", root / f"{name}_in", k)
        done = _calibrate(scaled, root / f"{name}_out")
        assert done.exit_code == 0, done.output
        runs[name] = (scaled, root / f"{name}_out", done)
    assert _sha(CUTMIX) == before  # measuring changes nothing
    return runs


def _doc(out: Path) -> dict:
    return json.loads((out / "calibration.json").read_text())


def test_calibration_json_has_every_key_and_intervals(calibrated):
    doc = _doc(calibrated["base"][1])
    assert set(KEYS) <= set(doc)
    assert doc["n_fit"] == 600 and doc["n_val"] == 200 and doc["errors_fit"] == 18
    for key in ("ece_before", "ece_after", "nll_before", "nll_after", "mce_before", "mce_after"):
        iv = doc["intervals"][key]
        assert iv["method"] == "poisson-bootstrap-200" and iv["level"] == 0.95
        assert iv["lo"] <= iv["hi"]
    assert doc["intervals"]["temperature"]["method"] == "sandwich-wald"
    # the --json document carries the same numbers
    cal = json.loads((calibrated["base"][1].parent / "cal.json").read_text())
    metrics = cal["results"][0]["metrics"]
    assert cal["command"] == "calibrate" and metrics["temperature"] == doc["temperature"]
    assert {"config.json", "model.safetensors", "calibration.json"} == {
        p.name for p in calibrated["base"][1].iterdir()
    }


@pytest.mark.parametrize(("name", "k"), [("third", 1 / 3), ("triple", 3.0)])
def test_a_head_scaled_by_k_is_fit_temperature_k(calibrated, name, k):
    doc = _doc(calibrated[name][1])
    assert doc["errors_fit"] == 18  # scaling changes no argmax: still ≥ 10 errors on --fit
    # Exact in arithmetic. The scaled head's logits carry float32 rounding, and T is a smooth
    # function of them with O(1) relative condition, so T is within the forward budget
    # FORWARD_RTOL = 7.6e-6 of k (measured: 2e-8 and 7e-8). The fit's own sampling error, the
    # sandwich se of T on these 600 images, is 8 % of T: 10^4 times wider.
    assert doc["temperature"] == pytest.approx(k, rel=FORWARD_RTOL)
    assert doc["fit"]["se_temperature"] / doc["temperature"] > 1000 * FORWARD_RTOL
    lo, hi = doc["intervals"]["temperature"]["lo"], doc["intervals"]["temperature"]["hi"]
    assert lo < k < hi


def test_calibration_lowers_ece_on_val_where_the_model_is_under_confident(calibrated):
    for name in ("base", "third"):  # T < 1 on --fit: under-confident on it
        doc = _doc(calibrated[name][1])
        assert doc["ece_after"] < doc["ece_before"] and doc["nll_after"] < doc["nll_before"]
        assert doc["intervals"]["ece_change"]["hi"] < 0
    # × 3 makes it over-confident on train, but val (1 error in 200) rewards confidence: ECE
    # there rises, and the command says so instead of claiming a gain.
    doc = _doc(calibrated["triple"][1])
    assert doc["ece_after"] > doc["ece_before"]
    assert "ECE on --val rose" in calibrated["triple"][2].output


# Plain timm in a fresh interpreter, timm's own eval pipeline: logits of each folder.
_RELOAD = textwrap.dedent(
    """
    import sys, torch, timm
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder
    out = {}
    for folder in sys.argv[4:]:
        model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
        tf = create_transform(**resolve_data_config(model=model))
        logits = []
        for root in sys.argv[2:4]:
            data = ImageFolder(root, transform=tf)
            x = torch.stack([data[i][0] for i in range(len(data))])
            with torch.inference_mode():
                logits.append(model(x))
        out[folder] = torch.cat(logits)
    assert not any(m == "vitdiag" or m.startswith("vitdiag.") for m in sys.modules), "vitdiag!"
    torch.save(out, sys.argv[1])
    """
)


@pytest.mark.slow
def test_the_output_loads_in_plain_timm_and_gives_beta_times_the_logits(calibrated, tmp_path):
    scaled_in, out, _ = calibrated["third"]
    before = _sha(scaled_in)
    path = tmp_path / "logits.pt"
    argv = [str(path), str(TRAIN), str(VAL), str(scaled_in), str(out)]
    subprocess.run([sys.executable, "-c", _RELOAD, *argv], check=True)
    got = torch.load(path)
    original, folded = got[str(scaled_in)], got[str(out)]
    beta = 1 / _doc(out)["temperature"]
    want = beta * original
    scale = float(want.abs().max())
    torch.testing.assert_close(folded, want, rtol=FORWARD_RTOL, atol=FORWARD_RTOL * scale)
    assert torch.equal(folded.argmax(dim=1), original.argmax(dim=1))  # all 800 images
    assert _sha(scaled_in) == before


# -- refusals: exit 2, one line, nothing written ------------------------------------------------


def _refused(done, out: Path, needle: str) -> None:
    assert done.exit_code == 2, (done.exit_code, done.output)
    err = done.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert needle in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_the_same_images_for_fit_and_val_are_refused(tmp_path):
    link = tmp_path / "val_link"
    link.symlink_to(VAL, target_is_directory=True)
    out = tmp_path / "out"
    for fit in (VAL, VAL.parent / ".." / "data" / "val", link, VAL.parent):
        done = _calibrate(CUTMIX, out, fit=fit, val=VAL)
        _refused(done, out, "--val other labelled images")


def test_a_model_with_fewer_than_10_errors_on_fit_is_refused(tmp_path):
    before = _sha(NOMIX)
    _refused(_calibrate(NOMIX, tmp_path / "out"), tmp_path / "out", "only 0 of the 600")
    assert _sha(NOMIX) == before


def test_a_fit_at_its_bound_is_refused(tmp_path):
    # logits × 1e-4: the NLL would want β ≈ 2.3e4, past BETA_MAX
    tiny = _scaled_copy(CUTMIX, tmp_path / "tiny", 1e-4)
    before = _sha(tiny)
    _refused(_calibrate(tiny, tmp_path / "out"), tmp_path / "out", "hit its bound T = 0.001")
    assert _sha(tiny) == before


def test_an_existing_out_needs_force_and_the_input_is_never_an_output(calibrated, tmp_path):
    existing = tmp_path / "exists"
    existing.mkdir()
    done = _calibrate(CUTMIX, existing)
    assert done.exit_code == 2 and "already exists" in done.stderr and not any(existing.iterdir())
    scaled_in = calibrated["third"][0]
    before = _sha(scaled_in)
    done = _calibrate(scaled_in, scaled_in, "--force")
    assert done.exit_code == 2 and "overwrite the input" in done.stderr
    assert _sha(scaled_in) == before
