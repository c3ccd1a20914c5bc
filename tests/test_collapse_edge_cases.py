"""Collapse and mixup geometry at the edges: train-mode side effects, one class, degenerate
geometry (coinciding class means, a zero classifier, zero variance) and large offsets."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import FIXTURES, save_tiny_vit
from typer.testing import CliRunner

from vitdiag.cli import app
from vitdiag.engine import RunContext, run_probes
from vitdiag.probes.base import Taps
from vitdiag.probes.classifier import Head, classifier_result, classifier_stats
from vitdiag.probes.collapse import ClassSums, CollapseProbe, nc_stats
from vitdiag.probes.mixup_geometry import MixupGeometryProbe

runner = CliRunner()

# -- train-mode mixup geometry leaves the model as it found it ------------------------------


def _resnet():
    from vitdiag.model import load

    torch.manual_seed(0)
    return load(None, arch="resnet10t", model_args={"num_classes": 4}).model.eval()


def _batches(n=32, size=64, batch=8, classes=4):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.arange(n) % classes
    return [(images[s : s + batch], labels[s : s + batch]) for s in range(0, n, batch)]


def test_train_mode_mixup_forward_restores_buffers_and_every_training_flag():
    model = _resnet()
    model.fc.train()  # a submodule left in train mode on purpose: its flag must survive too
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    flags = {k: m.training for k, m in model.named_modules()}
    probe = MixupGeometryProbe.for_model(model, pairs=2, plot_pairs=1, seed=0, train_mode=True)
    ctx = RunContext(model, torch.device("cpu"))
    images, labels = _batches()[0]
    probe.update(Taps(images=images, targets=labels, context=ctx))
    assert probe.compute().metrics["pairs_diff"] == 2  # the train-mode forwards did run
    for name, before in buffers.items():
        assert torch.equal(dict(model.named_buffers())[name], before), name
    assert {k: m.training for k, m in model.named_modules()} == flags


def test_train_mode_mixup_geometry_does_not_change_collapse_in_the_same_pass():
    model = _resnet()
    plain = run_probes(model, _batches(), [CollapseProbe.for_model(model, seed=0)])
    both = run_probes(
        model,
        _batches(),
        [
            CollapseProbe.for_model(model, seed=0),
            MixupGeometryProbe.for_model(model, pairs=4, plot_pairs=1, seed=0, train_mode=True),
        ],
    )
    want, got = plain.results[0].metrics, both.results[0].metrics
    assert math.isfinite(want["nc1"])
    assert got["nc1"] == want["nc1"]
    assert got["nc4"] == want["nc4"]


# -- one labelled class ------------------------------------------------------------------------


def test_nc_stats_with_one_class_still_reports_nc4_and_every_key():
    torch.manual_seed(0)
    h, W = torch.randn(10, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    y = torch.zeros(10, dtype=torch.int64)
    from vitdiag.probes.nc4 import NC4Sample

    sample = NC4Sample(h=h[:4], pred=(h[:4] @ W.T).argmax(1), population=10)
    one = nc_stats(ClassSums.from_features(h, y, 3), W, sample=sample)
    # The nearest class mean is always class 0: NC4 is the share predicted as another class.
    want = float(((h[:4] @ W.T).argmax(1) != 0).double().mean())
    assert one["nc4"] == pytest.approx(want, abs=1e-15)
    assert one["nc4_ci_low"] <= one["nc4"] <= one["nc4_ci_high"]
    assert math.isnan(one["nc1"]) and math.isnan(one["nc3"])
    # The same keys as with two classes.
    y2 = torch.arange(10) % 2
    two = nc_stats(ClassSums.from_features(h, y2, 3), W, sample=sample)
    assert set(one) == set(two)


def test_cli_collapse_on_one_class_with_a_sampled_nc4(tiny_ckpt, tmp_path):
    # A folder with one class sub-folder is read as unlabelled, so the second class holds only
    # an unreadable file: skipped, which leaves 8 labelled images of class 0.
    data = tmp_path / "one"
    (data / "astronaut").mkdir(parents=True)
    for f in sorted((FIXTURES / "data" / "train" / "astronaut").glob("*.jpg"))[:8]:
        shutil.copy(f, data / "astronaut" / f.name)
    (data / "broken").mkdir()
    (data / "broken" / "0000.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "c.json"
    args = ["collapse", str(tiny_ckpt), "--data", str(data), "--nc4-budget", "3"]
    result = runner.invoke(app, [*args, "--json", str(out), "-q"])
    assert result.exit_code == 0, result.output
    res = next(r for r in json.loads(out.read_text())["results"] if r["probe"] == "collapse")
    m = res["metrics"]
    assert m["classes"] == 1 and m["nc4_sample_size"] == 3 and m["nc4_population"] == 8
    assert m["nc4"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert m["nc4_ci_low"] <= m["nc4"] <= m["nc4_ci_high"]
    assert m["nc1"] is None  # NaN, written as JSON null
    assert any("fewer than 2 classes" in n for n in res["notes"])


# -- degenerate geometry: coinciding class means, a zero classifier ------------------------------


def test_classifier_stats_of_a_zero_classifier_are_nan_with_a_note():
    s = classifier_stats(torch.zeros(5, 8), torch.zeros(5))
    for key in ("norm_cov", "cos_std", "cos_mean", "maxangle", "etf"):
        assert math.isnan(s[key]), key
    assert s["bias_mean"] == 0.0

    class Zero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 5)
            torch.nn.init.zeros_(self.head.weight)

        def get_classifier(self):
            return self.head

    res = classifier_result(Zero())
    assert math.isnan(res.metrics["w_norm_cov"])
    assert any("all zero" in n for n in res.notes)


def _coinciding_means():
    """Three classes whose means are all exactly 0 (±v around it), and a random classifier."""
    rng = np.random.default_rng(0)
    v = rng.normal(size=(3, 4))
    h = np.concatenate([v, -v, 2 * v[:1], -2 * v[:1]])
    y = np.array([0, 1, 2, 0, 1, 2, 0, 0])
    return torch.from_numpy(h), torch.from_numpy(y), torch.from_numpy(rng.normal(size=(3, 4)))


def test_nc_stats_when_every_class_mean_is_the_same_are_nan_not_an_error():
    h, y, W = _coinciding_means()
    sums = ClassSums.from_features(h, y, 3)
    assert torch.equal(sums.total, torch.zeros(3, 4, dtype=torch.float64))
    out = nc_stats(sums, W)
    for key in ("nc1", "nc1_trace", "nc1_trace_ratio", "nc2_equinorm_means", "nc2_etf_means"):
        assert math.isnan(out[key]), key
    for key in ("nc3", "nc3_etf", "nc2_equiangular_means", "nc2_mean_cos_means"):
        assert math.isnan(out[key]), key
    # What depends on W only is still defined.
    want = classifier_stats(W)
    assert out["nc2_equinorm_weights"] == pytest.approx(want["norm_cov"], rel=1e-12)
    assert out["nc2_etf_weights"] == pytest.approx(want["etf"], rel=1e-12)


def test_constant_features_give_nan_and_a_note_even_when_the_means_differ_by_rounding():
    # A dead model: every image has the same features. Class sums of 3, 7 and 5 copies of 0.1
    # divided by the counts need not give the same double, but the means still coincide.
    counts = (3, 7, 5)
    y = torch.from_numpy(np.repeat(np.arange(3), counts))
    h = torch.full((len(y), 4), 0.1, dtype=torch.float64)
    W = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    probe = CollapseProbe([Head("head", W, torch.zeros(3))], seed=0)
    probe.update(Taps(images=torch.zeros(len(y), 1), targets=y, prelogits=h, logits=h @ W.T))
    res = probe.compute()
    for key in ("nc1", "nc1_trace_ratio", "nc2_equinorm_means", "nc3"):
        assert math.isnan(res.metrics[key]), (key, res.metrics[key])
    assert any("class means coincide" in n for n in res.notes)


def test_nc_stats_with_a_zero_classifier_are_nan_where_they_need_w():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 5)
    h = torch.from_numpy(rng.normal(size=(3, 4))[y] * 5 + rng.normal(size=(15, 4)))
    sums = ClassSums.from_features(h, torch.from_numpy(y), 3)
    out = nc_stats(sums, torch.zeros(3, 4))
    assert math.isfinite(out["nc1"]) and math.isfinite(out["nc2_equinorm_means"])
    for key in ("nc2_equinorm_weights", "nc2_equiangular_weights", "nc2_etf_weights", "nc3"):
        assert math.isnan(out[key]), key
    assert math.isnan(out["nc3_etf"])


def test_cli_collapse_with_a_zeroed_classifier_exits_0_with_nulls_and_notes(image_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = save_tiny_vit(tmp_path / "zero")
    weights = load_file(ckpt / "model.safetensors")
    weights["head.weight"].zero_()
    weights["head.bias"].zero_()
    save_file(weights, ckpt / "model.safetensors")
    out = tmp_path / "c.json"
    result = runner.invoke(
        app, ["collapse", str(ckpt), "--data", str(image_folder), "--json", str(out), "-q"]
    )
    assert result.exit_code == 0, result.output
    by = {r["probe"]: r for r in json.loads(out.read_text())["results"]}
    assert by["classifier"]["metrics"]["w_norm_cov"] is None
    assert by["classifier"]["metrics"]["w_etf"] is None
    assert any("all zero" in n for n in by["classifier"]["notes"])
    m = by["collapse"]["metrics"]
    assert m["nc2_equinorm_weights"] is None and m["nc3"] is None
    assert isinstance(m["nc1"], float) and m["nc1"] > 0
    assert any("all zero" in n for n in by["collapse"]["notes"])


# -- mixup geometry's span share -----------------------------------------------------------------


def _span_share_brute_force(h, ia, ib, W):
    """Two passes in numpy: centre h at each λ, then project each pair on span{w_a, w_b}."""
    h, W = np.asarray(h, np.float64), np.asarray(W, np.float64)
    out = []
    for lam in range(h.shape[1]):
        x = h[:, lam] - h[:, lam].mean(0)
        span = 0.0
        for p in range(len(x)):
            q, _ = np.linalg.qr(np.stack([W[ia[p]], W[ib[p]]], axis=1))
            span += float(np.sum((q.T @ x[p]) ** 2))
        out.append(span / float(np.sum(x**2)))
    return np.array(out)


def _diff_probe(W, lambdas):
    head = Head("head", torch.from_numpy(W), None)
    return MixupGeometryProbe(head, pairs=1, lambdas=lambdas, seed=0)


def _feed_diff(probe, h, ia, ib, chunk):
    for s in range(0, len(h), chunk):
        e = s + chunk
        probe._add_diff(*(torch.from_numpy(a[s:e]) for a in (h, ia, ib)))


def _offset_pairs(seed=0, p=40, lam=3, d=6, c=5, offset=1e6, spread=0.1):
    rng = np.random.default_rng(seed)
    h = offset + spread * rng.normal(size=(p, lam, d))
    ia = rng.integers(0, c, size=p)
    ib = (ia + 1 + rng.integers(0, c - 1, size=p)) % c
    return h, ia, ib, rng.normal(size=(c, d))


def test_span_share_survives_a_large_common_offset():
    h, ia, ib, W = _offset_pairs()
    probe = _diff_probe(W, [0.0, 0.5, 1.0])
    _feed_diff(probe, h, ia, ib, chunk=7)
    got = np.array(probe.per_lambda()["diff_span_share"])
    want = _span_share_brute_force(h, ia, ib, W)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_span_share_of_two_processes_merged_equals_one_process():
    h, ia, ib, W = _offset_pairs(seed=1)
    one = _diff_probe(W, [0.0, 0.5, 1.0])
    _feed_diff(one, h, ia, ib, chunk=40)
    ranks = [_diff_probe(W, [0.0, 0.5, 1.0]) for _ in range(2)]
    _feed_diff(ranks[0], h[:15], ia[:15], ib[:15], chunk=4)
    _feed_diff(ranks[1], h[15:], ia[15:], ib[15:], chunk=9)
    main = ranks[0]  # what the engine does: add sum states, concatenate cat states in rank order
    for k in main.sum_states():
        main.set_state(k, sum(p.sum_states()[k] for p in ranks))
    main.merge_cat_states(
        {k: [t for p in ranks for t in p.cat_states()[k]] for k in main.cat_states()}
    )
    np.testing.assert_allclose(
        main.per_lambda()["diff_span_share"], one.per_lambda()["diff_span_share"], rtol=1e-9
    )
    np.testing.assert_allclose(
        one.per_lambda()["diff_span_share"], _span_share_brute_force(h, ia, ib, W), rtol=1e-6
    )


def test_identical_features_give_a_nan_span_share_and_a_note():
    _, ia, ib, W = _offset_pairs(seed=2, p=12)
    h = np.full((12, 3, 6), 0.1)
    probe = _diff_probe(W, [0.0, 0.5, 1.0])
    _feed_diff(probe, h, ia, ib, chunk=5)
    share = probe.per_lambda()["diff_span_share"]
    assert all(math.isnan(v) for v in share), share
    res = probe.compute()
    assert math.isnan(res.metrics["diff_span_share_mean"])
    assert any("zero variance" in n for n in res.notes)
