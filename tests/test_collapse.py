"""Neural collapse, classifier geometry and mixup geometry against closed forms and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

from vitdiag.probes.base import Taps
from vitdiag.probes.classifier import Head, classifier_heads, classifier_result, classifier_stats
from vitdiag.probes.collapse import (
    ClassSums,
    CollapseProbe,
    nc_stats,
    pool_moments,
    shifted_moments,
)
from vitdiag.probes.mixup_geometry import (
    MixupGeometryProbe,
    mix,
    mixed_features,
    select_pairs,
    zero_crossing,
)
from vitdiag.probes.nc4 import wilson_interval

# -- helpers ---------------------------------------------------------------------------------


def simplex_etf(c: int, d: int, scale: float = 3.0, seed: int = 0) -> np.ndarray:
    """(D, C) columns forming a simplex ETF, embedded in the first C of D dimensions and then
    rotated within them."""
    assert d >= c
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(c, c)))
    etf = q @ (np.eye(c) - 1.0 / c) * scale
    out = np.zeros((d, c))
    out[:c] = etf
    return out


def make_data(seed=0, counts=(120, 80, 50, 30, 20), d=16, offset=50.0, spread=1.0):
    """Imbalanced classes far from the origin (so the one-pass moment has something to cancel),
    a random classifier (so NC4 is far from 0)."""
    g = np.random.default_rng(seed)
    c = len(counts)
    means = g.normal(size=(c, d)) * 3 + offset
    y = np.repeat(np.arange(c), counts)
    g.shuffle(y)
    h = means[y] + spread * g.normal(size=(len(y), d))
    W = g.normal(size=(c, d))
    b = g.normal(size=c) - W @ means.mean(0)  # the bias undoes the offset: varied predictions
    return h, y, W, b, h @ W.T + b


def feed(probe, h, y, logits, batch, start=None):
    """Batches as the engine hands them; `start`: the global position of the first row (a
    process reading from there), None: no positions, as for one process fed directly."""
    h, y, logits = map(torch.as_tensor, (h, y, logits))
    for s in range(0, len(y), batch):
        e = s + batch
        probe.update(
            Taps(
                images=torch.zeros(len(y[s:e]), 1),
                targets=y[s:e],
                prelogits=h[s:e],
                logits=logits[s:e],
                positions=None if start is None else start + torch.arange(s, s + len(y[s:e])),
            )
        )
    return probe


def run_probe(h, y, W, b, logits, batch=64, **kw):
    head = Head(
        "head", torch.as_tensor(W, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    )
    return feed(CollapseProbe([head], seed=0, **kw), h, y, logits, batch).compute()


def simulate_ranks(probes):
    """What the engine does under torch.distributed: sum the sum-states, concatenate the
    cat-states in rank order, hand them to merge_cat_states."""
    main = probes[0]
    summed = {k: sum(p.sum_states()[k] for p in probes) for k in main.sum_states()}
    gathered = {k: [t for p in probes for t in p.cat_states()[k]] for k in main.cat_states()}
    for k, v in summed.items():
        main.set_state(k, v)
    main.merge_cat_states(gathered)
    return main


def _etf(g):
    c = g.shape[0]
    return np.linalg.norm(g / np.linalg.norm(g) - (np.eye(c) - 1.0 / c) / math.sqrt(c - 1))


def _angles(rows):
    c = rows.shape[0]
    cos = []
    for i in range(c):
        for j in range(i + 1, c):
            cos.append(rows[i] @ rows[j] / (np.linalg.norm(rows[i]) * np.linalg.norm(rows[j])))
    cos = np.array(cos)
    return np.std(cos, ddof=1), np.mean(np.abs(cos + 1.0 / (c - 1))), np.mean(cos)


def brute_force(h, y, W, logits, num_classes, weighted=False):
    """Plain numpy float64: two-pass Σ_W with explicit outer products, pinv, loops."""
    h, W = np.asarray(h, np.float64), np.asarray(W, np.float64)
    n, d = h.shape
    classes = [c for c in range(num_classes) if (y == c).any()]
    means = {}
    for c in classes:
        acc = np.zeros(d)
        for i in range(n):
            if y[i] == c:
                acc += h[i]
        means[c] = acc / (y == c).sum()
    counts = np.array([(y == c).sum() for c in classes], np.float64)
    mu = np.stack([means[c] for c in classes])
    mu_g = (counts[:, None] * mu).sum(0) / n if weighted else mu.mean(0)
    sw = np.zeros((d, d))
    for i in range(n):
        r = h[i] - means[y[i]]
        sw += np.outer(r, r)
    sw /= n
    M = (mu - mu_g).T
    cp = len(classes)
    sb = np.zeros((d, d))
    for k in range(cp):
        sb += np.outer(M[:, k], M[:, k])
    sb /= cp
    trace = np.trace(sw @ np.linalg.pinv(sb, rtol=1e-10, hermitian=True))
    Wp = W[classes]
    out = {
        "nc1": trace / cp,
        "nc1_trace": trace,
        "nc1_trace_ratio": np.trace(sw) / np.trace(sb),
    }
    mn, wn = np.linalg.norm(M, axis=0), np.linalg.norm(Wp, axis=1)
    out["nc2_equinorm_means"] = np.std(mn, ddof=1) / mn.mean()
    out["nc2_equinorm_weights"] = np.std(wn, ddof=1) / wn.mean()
    for tag, rows in (("means", M.T), ("weights", Wp)):
        s, a, m = _angles(rows)
        out[f"nc2_equiangular_{tag}"], out[f"nc2_maxangle_{tag}"], out[f"nc2_mean_cos_{tag}"] = (
            s,
            a,
            m,
        )
    out["nc2_etf_means"] = _etf(M.T @ M)
    out["nc2_etf_weights"] = _etf(Wp @ Wp.T)
    out["nc3"] = np.linalg.norm(Wp.T / np.linalg.norm(Wp) - M / np.linalg.norm(M)) ** 2
    out["nc3_etf"] = _etf(Wp @ M)
    if not weighted:
        wrong = wrong_nb = 0
        for i in range(n):
            dist = [np.linalg.norm(h[i] - means[c]) for c in classes]
            ncc = classes[int(np.argmin(dist))]
            wrong += ncc != int(np.argmax(logits[i]))
            wrong_nb += ncc != int(np.argmax(W @ h[i]))
        out["nc4"], out["nc4_nobias"] = wrong / n, wrong_nb / n
    return out


def assert_metrics_close(got, want, rel=1e-6, abs_tol=1e-12, suffix=""):
    for key, value in want.items():
        assert math.isclose(got[key + suffix], value, rel_tol=rel, abs_tol=abs_tol), (
            key + suffix,
            got[key + suffix],
            value,
        )


# -- classifier geometry ---------------------------------------------------------------------


def test_classifier_stats_of_a_simplex_etf():
    W = simplex_etf(6, 8).T
    s = classifier_stats(torch.from_numpy(W))
    assert s["norm_cov"] == pytest.approx(0, abs=1e-12)
    assert s["cos_mean"] == pytest.approx(-1 / 5, abs=1e-12)
    assert s["cos_std"] == pytest.approx(0, abs=1e-12)
    assert s["maxangle"] == pytest.approx(0, abs=1e-12)
    assert s["etf"] == pytest.approx(0, abs=1e-12)


def test_classifier_heads_of_a_distilled_deit_are_two_token_heads():
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224",
        pretrained=False,
        num_classes=5,
        img_size=32,
        depth=1,
        embed_dim=64,
        num_heads=2,
    ).eval()
    heads = classifier_heads(model)
    assert [(h.name, h.token_index, h.num_classes, h.dim) for h in heads] == [
        ("head", 0, 5, 64),
        ("dist", 1, 5, 64),
    ]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats).double()
    per_head = [feats[:, h.token_index].double() @ h.weight.T + h.bias for h in heads]
    torch.testing.assert_close(logits, (per_head[0] + per_head[1]) / 2, rtol=1e-5, atol=1e-5)
    res = classifier_result(model)
    assert {"w_norm_cov", "w_etf", "dist.w_norm_cov", "dist.w_etf"} <= set(res.metrics)


def test_classifier_heads_of_plain_vit_and_swin():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32)
    (head,) = classifier_heads(vit)
    assert head.token_index is None and head.weight.shape == (7, 192)
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=3,
        img_size=64,
        window_size=2,
        depths=(1, 1, 1, 1),
        embed_dim=16,
        num_heads=(1, 1, 1, 1),
    )
    (head,) = classifier_heads(swin)
    assert head.weight.shape == (3, 128)


def test_collapse_probe_reports_both_heads_of_a_distilled_deit():
    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224",
        pretrained=False,
        num_classes=5,
        img_size=32,
        depth=1,
        embed_dim=64,
        num_heads=2,
    ).eval()
    x, y = torch.randn(40, 3, 32, 32), torch.arange(40) % 5
    with torch.no_grad():
        feats = model.forward_features(x)
        pre, logits = model.forward_head(feats, pre_logits=True), model.forward_head(feats)
    probe = CollapseProbe.for_model(model, seed=0)
    probe.update(Taps(images=x, targets=y, features=feats, prelogits=pre, logits=logits))
    res = probe.compute()
    assert math.isfinite(res.metrics["nc1"]) and math.isfinite(res.metrics["dist.nc1"])
    assert res.metrics["nc1"] != res.metrics["dist.nc1"]
    # Head "dist" reads token 1 only: its sums match a brute force on that token.
    want = brute_force(
        feats[:, 1].double().numpy(),
        y.numpy(),
        probe.heads[1].weight.numpy(),
        (feats[:, 1].double() @ probe.heads[1].weight.T + probe.heads[1].bias).numpy(),
        5,
    )
    assert_metrics_close({k[5:]: v for k, v in res.metrics.items() if k.startswith("dist.")}, want)


# -- neural collapse -------------------------------------------------------------------------


def test_nc_metrics_are_zero_for_an_exact_simplex_etf():
    c, d, per_class = 5, 8, 12
    M = simplex_etf(c, d)
    offset = np.zeros(d)
    offset[-1] = 7.0  # μ_G off the ETF's subspace, so it cannot change the argmax
    y = np.repeat(np.arange(c), per_class)
    h = M.T[y] + offset
    W = M.T.copy()
    res = run_probe(h, y, W, np.zeros(c), h @ W.T, batch=13)
    m = res.metrics
    for key in (
        "nc1",
        "nc1_trace",
        "nc1_trace_ratio",
        "nc2_equinorm_means",
        "nc2_equinorm_weights",
        "nc2_equiangular_means",
        "nc2_maxangle_means",
        "nc2_etf_means",
        "nc2_etf_weights",
        "nc3",
        "nc3_etf",
        "nc4",
        "nc4_nobias",
    ):
        assert abs(m[key]) < 1e-9, (key, m[key])
    assert m["nc2_mean_cos_means"] == pytest.approx(-1 / (c - 1), abs=1e-12)
    assert not any("imbalanced" in n for n in res.notes)


def test_every_metric_matches_a_brute_force_on_imbalanced_random_features():
    h, y, W, b, logits = make_data()
    res = run_probe(h, y, W, b, logits, batch=64)
    assert_metrics_close(res.metrics, brute_force(h, y, W, logits, 5))
    weighted = brute_force(h, y, W, logits, 5, weighted=True)
    mu_g_dependent = {k: v for k, v in weighted.items() if "means" in k or k.startswith("nc1")}
    mu_g_dependent |= {"nc3": weighted["nc3"], "nc3_etf": weighted["nc3_etf"]}
    assert len(mu_g_dependent) == 10
    assert_metrics_close(res.metrics, mu_g_dependent, suffix="_wmean")
    assert res.metrics["n"] == 300 and res.metrics["classes"] == 5
    assert any("imbalanced" in n for n in res.notes)
    assert 0.2 < res.metrics["nc4"] < 1  # a random classifier disagrees with the class means


def test_one_pass_moments_survive_a_large_offset():
    rng = np.random.default_rng(1)
    h = rng.normal(size=(500, 4)) * 1e-3 + 1e4  # ‖μ‖²/σ² = 1e14: raw moments would lose it all
    y = np.zeros(500, dtype=np.int64)
    sums = ClassSums.from_features(torch.from_numpy(h), torch.from_numpy(y), 1)
    torch.testing.assert_close(
        sums.sigma_w, torch.from_numpy(np.cov(h.T, ddof=0)), rtol=1e-9, atol=0
    )


def test_metrics_do_not_depend_on_class_labels_order():
    h, y, W, b, logits = make_data(seed=3)
    perm = np.random.default_rng(4).permutation(5)
    W2, b2, logits2 = np.empty_like(W), np.empty_like(b), np.empty_like(logits)
    W2[perm], b2[perm], logits2[:, perm] = W, b, logits
    a = run_probe(h, y, W, b, logits).metrics
    p = run_probe(h, perm[y], W2, b2, logits2).metrics
    assert_metrics_close(p, a, rel=1e-9)


@pytest.mark.parametrize("batch", [1, 7, 300])
def test_streaming_in_batches_equals_one_batch(batch):
    h, y, W, b, logits = make_data(seed=5)
    one = run_probe(h, y, W, b, logits, batch=300).metrics
    # Unlabelled rows (target −1) with garbage features must be ignored.
    h2 = np.concatenate([h, np.full((9, 16), 1e6)])
    y2 = np.concatenate([y, -np.ones(9, dtype=np.int64)])
    logits2 = np.concatenate([logits, np.zeros((9, 5))])
    # Unlabelled rows at random places; labelled rows keep their order.
    order = np.empty(len(y2), dtype=np.int64)
    spots = np.zeros(len(y2), dtype=bool)
    spots[np.random.default_rng(0).choice(len(y2), 9, replace=False)] = True
    order[spots], order[~spots] = np.arange(300, 309), np.arange(300)
    many = run_probe(h2[order], y2[order], W, b, logits2[order], batch=batch).metrics
    assert_metrics_close(many, one, rel=1e-9)
    if batch == 1:
        return  # below: the same for a sampled NC4, which batch 7 covers at a fraction of the cost
    # Keys are drawn one per labelled sample in order, so even a sampled NC4 does not depend on
    # the batch size.
    one_s = run_probe(h, y, W, b, logits, batch=300, budget=50).metrics
    many_s = run_probe(h2[order], y2[order], W, b, logits2[order], batch=batch, budget=50).metrics
    assert many_s["nc4_sample_size"] == 50
    assert_metrics_close(many_s, one_s, rel=1e-9)


def test_two_ranks_merged_equal_one_process():
    h, y, W, b, logits = make_data(seed=6)
    head = Head("head", torch.from_numpy(W), torch.from_numpy(b))
    ranks = [CollapseProbe([head], seed=0) for _ in range(2)]
    feed(ranks[0], h[:170], y[:170], logits[:170], 32, start=0)
    feed(ranks[1], h[170:], y[170:], logits[170:], 50, start=170)
    merged = simulate_ranks(ranks).compute().metrics
    one = run_probe(h, y, W, b, logits).metrics
    assert_metrics_close(merged, one, rel=1e-9)


def test_reservoir_is_exact_within_budget_and_an_interval_beyond():
    h, y, W, b, logits = make_data(seed=7)
    exact = run_probe(h, y, W, b, logits, budget=300).metrics
    assert exact["nc4_sample_size"] == 300 and "nc4_ci_low" not in exact
    sampled = run_probe(h, y, W, b, logits, budget=100).metrics
    assert sampled["nc4_sample_size"] == 100 and sampled["nc4_population"] == 300
    for key in ("nc4", "nc4_nobias"):
        assert sampled[f"{key}_ci_low"] <= exact[key] <= sampled[f"{key}_ci_high"]
    # Every other metric comes from sums, not from the sample.
    assert sampled["nc1"] == pytest.approx(exact["nc1"], rel=1e-12)


def test_reservoirs_merge_to_the_smallest_keys_of_all_ranks():
    h, y, W, b, logits = make_data(seed=8)
    head = Head("head", torch.from_numpy(W), torch.from_numpy(b))
    ranks = [CollapseProbe([head], seed=0, budget=60) for _ in range(2)]
    feed(ranks[0], h[:150], y[:150], logits[:150], 40, start=0)
    feed(ranks[1], h[150:], y[150:], logits[150:], 40, start=150)
    union = torch.cat([k for p in ranks for k in p.h0_res_key])
    merged = simulate_ranks(ranks)
    (keys,) = merged.h0_res_key
    torch.testing.assert_close(keys, union.sort().values[:60])
    assert merged.compute().metrics["nc4_sample_size"] == 60


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(10, 100)
    assert lo == pytest.approx(0.05522, abs=1e-4) and hi == pytest.approx(0.17437, abs=1e-4)
    assert wilson_interval(0, 50)[0] == 0.0


def test_fewer_dims_than_simplex_needs_gives_finite_numbers_and_a_note():
    rng = np.random.default_rng(9)
    c, d = 10, 3
    y = np.repeat(np.arange(c), 20)
    h = rng.normal(size=(c, d))[y] * 4 + rng.normal(size=(len(y), d))
    W, b = rng.normal(size=(c, d)), rng.normal(size=c)
    res = run_probe(h, y, W, b, h @ W.T + b)
    for key in (
        "nc1",
        "nc1_trace_ratio",
        "nc2_etf_means",
        "nc2_etf_weights",
        "nc3",
        "nc3_etf",
        "nc4",
    ):
        assert math.isfinite(res.metrics[key]), key
    assert any("simplex ETF does not exist" in n for n in res.notes)
    assert_metrics_close(res.metrics, brute_force(h, y, W, h @ W.T + b, c))


def test_classes_without_samples_are_left_out_with_a_note():
    h, y, W, b, logits = make_data(seed=10)
    keep = y != 2
    res = run_probe(h[keep], y[keep], W, b, logits[keep])
    assert res.metrics["classes"] == 4
    assert any("no labelled sample" in n for n in res.notes)
    assert_metrics_close(res.metrics, brute_force(h[keep], y[keep], W, logits[keep], 5))


def test_pool_moments_from_different_shifts():
    rng = np.random.default_rng(11)
    h = torch.from_numpy(rng.normal(size=(90, 5)) + 20)
    parts = [h[:30], h[30:]]
    shifts = [p.mean(0) for p in parts]
    pieces = [shifted_moments(p, s) for p, s in zip(parts, shifts, strict=True)]
    t, scatter = pool_moments(
        torch.tensor([30.0, 60.0]),
        torch.stack(shifts),
        torch.stack([lin for lin, _ in pieces]),
        torch.stack([sc for _, sc in pieces]),
    )
    want = (h - t).T @ (h - t)
    torch.testing.assert_close(scatter, want, rtol=1e-10, atol=1e-9)


def test_nc_stats_with_fewer_than_two_classes_is_nan_not_an_error():
    sums = ClassSums.from_features(torch.randn(10, 4), torch.zeros(10, dtype=torch.int64), 3)
    out = nc_stats(sums, torch.randn(3, 4))
    assert math.isnan(out["nc1"])


# -- mixup geometry --------------------------------------------------------------------------


class FakeContext:
    """The part of the engine's RunContext the probe uses: model, seed, forward."""

    def __init__(self, model: nn.Module, seed: int = 0):
        self.model, self.seed = model, seed

    def forward(self, images):
        with torch.inference_mode():
            feats = self.model.forward_features(images)
            return (
                feats,
                self.model.forward_head(feats, pre_logits=True),
                self.model.forward_head(feats),
            )


class LinearNet(nn.Module):
    """Pre-logits linear (affine) in the input, with timm's head interface."""

    def __init__(self, num_classes=4, dim=6, size=8):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, x, pre_logits=False):
        return x if pre_logits else self.head(x)

    def get_classifier(self):
        return self.head


def _mixup_run(model, images, labels, batch, **kw):
    probe = MixupGeometryProbe.for_model(model, **kw)
    ctx = FakeContext(model)
    for s in range(0, len(labels), batch):
        probe.update(Taps(images=images[s : s + batch], targets=labels[s : s + batch], context=ctx))
    return probe, probe.compute()


def _tiny_vit():
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8, depth=2
    ).eval()


def test_mixed_features_at_lambda_one_are_the_clean_prelogits():
    model = _tiny_vit()
    ctx = FakeContext(model)
    xa, xb = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    lambdas = [0.0, 0.3, 1.0]
    assert torch.equal(mix(xa, xb, lambdas).view(3, 3, 3, 32, 32)[:, -1], xa)
    (head,) = classifier_heads(model)
    h = mixed_features(ctx.forward, head, xa, xb, lambdas, chunk=4)
    torch.testing.assert_close(h[:, -1], ctx.forward(xa)[1].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h[:, 0], ctx.forward(xb)[1].double(), rtol=1e-5, atol=1e-5)


def test_mixup_probe_on_a_tiny_vit_gives_finite_margins_and_a_projection():
    model = _tiny_vit()
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(40, 3, 32, 32, generator=g), torch.arange(40) % 5
    probe, res = _mixup_run(model, images, labels, 20, pairs=4, plot_pairs=2, seed=0)
    m = res.metrics
    assert m["pairs_same"] == 4 and m["pairs_diff"] == 4
    for lam in (0, 0.5, 1):
        assert math.isfinite(m[f"margin@{lam:g}"])
    stats = res.extra["per_lambda"]
    assert all(0 <= v <= 1 + 1e-9 for v in stats["diff_span_share"] + stats["diff_span_energy"])
    proj = res.extra["projection"]
    assert proj["classes"] == [0, 1, 2] and len(proj["pairs"]) == 4
    assert all(p["a"] in (0, 1, 2) and p["b"] in (0, 1, 2) for p in proj["pairs"])


def test_margin_is_exactly_linear_in_lambda_for_a_linear_model():
    torch.manual_seed(1)
    model = LinearNet().double().eval()  # float64 throughout: linear up to 1e-16, not 1e-7
    g = torch.Generator().manual_seed(1)
    images = torch.randn(48, 3, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.arange(48) % 4
    _, res = _mixup_run(model, images, labels, 16, pairs=8, seed=3)
    lam = np.array(res.extra["per_lambda"]["lambda"])
    margin = np.array(res.extra["per_lambda"]["diff_margin"])
    second = margin[2:] - 2 * margin[1:-1] + margin[:-2]
    assert np.abs(second).max() < 1e-9 * np.abs(margin).max()
    steps = np.diff(margin)
    assert (steps > 0).all() or (steps < 0).all()
    slope, intercept = np.polyfit(lam, margin, 1)
    if 0 <= -intercept / slope <= 1:
        assert res.metrics["lambda_star"] == pytest.approx(-intercept / slope, abs=1e-9)
    # Different-class features of a linear model lie on a line through h_a and h_b: the same
    # holds for ‖h_λ‖ of same-class pairs only at the ends, so check the ends are consistent.
    assert res.metrics["pairs_same"] == 8 and res.metrics["pairs_diff"] == 8


def test_class_sorted_batches_still_give_different_class_pairs():
    torch.manual_seed(2)
    model = LinearNet().eval()
    images = torch.randn(32, 3, 8, 8)
    labels = torch.arange(4).repeat_interleave(8)  # every batch holds a single class
    _, res = _mixup_run(model, images, labels, 8, pairs=3, plot_pairs=1, seed=0)
    assert res.metrics["pairs_diff"] == 3 and res.metrics["pairs_same"] == 3


def test_select_pairs_uses_each_index_once_and_respects_kinds():
    rng = np.random.default_rng(0)
    labels = [0, 0, 1, 1, 2, 2, 2, 3]
    same, diff, unused = select_pairs(labels, rng, 2, 2)
    assert len(same) == 2 and len(diff) == 2
    assert all(labels[a] == labels[b] for a, b in same)
    assert all(labels[a] != labels[b] for a, b in diff)
    used = [i for p in same + diff for i in p]
    assert len(set(used)) == len(used) and set(used).isdisjoint(unused)


def test_zero_crossing_interpolates_linearly():
    assert zero_crossing([0, 0.5, 1], [-1, -0.5, 1]) == pytest.approx(0.5 + 0.5 * 0.5 / 1.5)
    assert math.isnan(zero_crossing([0, 1], [1, 2]))


def test_plots_write_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    from vitdiag.plots import plot_mixup_geometry

    model = LinearNet(num_classes=3).eval()
    images, labels = torch.randn(30, 3, 8, 8), torch.arange(30) % 3
    _, res = _mixup_run(model, images, labels, 15, pairs=2, plot_pairs=2, seed=0)
    out = plot_mixup_geometry(res, tmp_path / "mixup.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


# -- through the engine ----------------------------------------------------------------------


def test_probes_run_through_the_engine():
    from vitdiag.engine import run_probes
    from vitdiag.probes.calibration import CalibrationProbe

    model = _tiny_vit()
    batches = [(torch.randn(10, 3, 32, 32), torch.arange(10) % 5) for _ in range(2)]
    probes = [
        CollapseProbe.for_model(model),
        MixupGeometryProbe.for_model(model, pairs=2, plot_pairs=1),
        CalibrationProbe(),
    ]
    summary = run_probes(model, batches, probes, device="cpu")
    by_name = {r.probe: r for r in summary.results}
    assert by_name["collapse"].metrics["n"] == 20
    assert by_name["mixup_geometry"].metrics["pairs_diff"] == 2
    assert by_name["calibration"].metrics["n"] == 20
    by_name["collapse"].to_dict()  # JSON-able


# -- float32 products, float64 sums (the accelerator path, forced on the CPU) ----------------


def test_compute_dtype_is_float32_on_accelerators_and_float64_on_the_cpu():
    from vitdiag.probes.collapse import compute_dtype_for

    assert compute_dtype_for(torch.device("cpu")) is torch.float64
    assert compute_dtype_for(torch.device("cuda")) is torch.float32
    assert compute_dtype_for(torch.device("mps")) is torch.float32


@pytest.mark.parametrize("model_name", ["vit_nomix", "vit_cutmix"])
def test_float32_products_match_the_float64_path_on_the_fixtures(model_name):
    """Both probes see the same features in one pass; only the per-batch products differ."""
    from tests.conftest import FIXTURES
    from vitdiag import load
    from vitdiag.runner import Settings, open_source, run_pass, transform_at

    loaded = load(str(FIXTURES / "models" / model_name))
    s = Settings(device="cpu", batch_size=16)
    source = open_source(str(FIXTURES / "data" / "train"), s)
    probes = [
        CollapseProbe.for_model(loaded.model, seed=0, compute_dtype=dtype)
        for dtype in (torch.float64, torch.float32)
    ]
    done = run_pass(
        loaded, source, probes, s, transform=transform_at(loaded.data_config, s, loaded.img_size)
    )
    exact, fast = (r.metrics for r in done.summary.results)
    assert set(exact) == set(fast)
    assert {k for k, v in exact.items() if math.isnan(v)} == {
        k for k, v in fast.items() if math.isnan(v)
    }
    assert exact["n"] > 100
    worst = max(
        abs(fast[k] - exact[k]) / abs(exact[k])
        for k in exact
        if exact[k] != 0 and exact[k] == exact[k]
    )
    assert worst < 1e-6, worst
    # The float32 path really ran: its NC1 is not bit-identical to the float64 one.
    assert fast["nc1"] != exact["nc1"]
    assert probes[1].h0_mom_scatter[0].dtype is torch.float64  # float64 sums
