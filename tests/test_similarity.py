"""P(h), the signed mean cosine and the effective rank: closed forms, properties, real models."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import FORWARD_RTOL

from vitdiag.errors import VitdiagError
from vitdiag.families import LayerTap, family_of, module_at
from vitdiag.plots import plot_similarity
from vitdiag.probes.base import Taps
from vitdiag.probes.similarity import (
    DEFINITION,
    SimilarityProbe,
    effective_rank,
    mean_signed_cosine,
    patchwise_abs_cosine,
)
from vitdiag.results import Result


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    # float64: the closed forms hold to 1e-12 there; float32 tokens take the float32 Gram,
    # tested against the float64 definition on real tokens below.
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _brute_force(h: np.ndarray, absolute: bool = True) -> float:
    """The paper's formula verbatim: a double loop over ordered pairs i ≠ j."""
    n = h.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                c = float(h[i] @ h[j]) / (np.linalg.norm(h[i]) * np.linalg.norm(h[j]))
                total += abs(c) if absolute else c
    return total / (n * (n - 1))


def _taps(layers: dict[str, torch.Tensor], prefix: dict[str, torch.Tensor] | None = None) -> Taps:
    b = next(iter(layers.values())).shape[0]
    return Taps(
        images=torch.zeros(b, 3, 1, 1),
        targets=torch.full((b,), -1),
        layers=layers,
        prefix=prefix or {},
    )


# -- closed forms ---------------------------------------------------------------------------


def test_identical_tokens_give_one() -> None:
    h = _randn(1, 1, 12).expand(3, 9, 12).clone()
    assert torch.allclose(patchwise_abs_cosine(h), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(mean_signed_cosine(h), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(effective_rank(h), torch.ones(3, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("n,d", [(2, 2), (5, 8), (16, 16)])
def test_pairwise_orthogonal_tokens_give_zero(n: int, d: int) -> None:
    q, _ = torch.linalg.qr(_randn(d, d, seed=n).double())
    scales = torch.linspace(0.5, 3.0, n, dtype=torch.float64)[:, None]
    h = (q[:n] * scales).unsqueeze(0)  # orthogonal but not orthonormal rows
    assert patchwise_abs_cosine(h).item() == pytest.approx(0.0, abs=1e-12)
    assert mean_signed_cosine(h).item() == pytest.approx(0.0, abs=1e-12)


def test_effective_rank_of_rank_one_is_one_and_of_orthonormal_rows_is_n() -> None:
    u, v = _randn(4, 10, 1, seed=1), _randn(4, 1, 7, seed=2)
    assert torch.allclose(effective_rank(u @ v), torch.ones(4, dtype=torch.float64), atol=1e-9)
    q, _ = torch.linalg.qr(_randn(9, 9, seed=3).double())
    assert effective_rank(q[:6].unsqueeze(0)).item() == pytest.approx(6.0, abs=1e-9)


def test_opposite_tokens_count_fully_in_p_and_cancel_in_signed_cosine() -> None:
    v = _randn(6)
    h = torch.stack([v, v, -v, -v]).unsqueeze(0)
    assert patchwise_abs_cosine(h).item() == pytest.approx(1.0, abs=1e-12)
    # 4 same-sign ordered pairs (+1) and 8 opposite ones (−1) out of 12.
    assert mean_signed_cosine(h).item() == pytest.approx(-1 / 3, abs=1e-12)


def test_zero_token_is_orthogonal_to_everything_not_nan() -> None:
    v = _randn(5)
    h = torch.stack([v, 2 * v, torch.zeros(5)]).unsqueeze(0)
    # Only the pair (v, 2v) counts, twice, out of 3·2 ordered pairs.
    assert patchwise_abs_cosine(h).item() == pytest.approx(2 / 6, abs=1e-12)
    assert effective_rank(torch.zeros(2, 4, 3)).tolist() == [0.0, 0.0]


def test_single_token_is_nan_because_there_are_no_pairs() -> None:
    h = _randn(3, 1, 8)
    assert torch.isnan(patchwise_abs_cosine(h)).all()
    assert torch.isnan(mean_signed_cosine(h)).all()
    assert torch.allclose(effective_rank(h), torch.ones(3, dtype=torch.float64))


def test_matches_brute_force_double_loop() -> None:
    h = _randn(4, 11, 7, seed=5) + 0.3  # an offset so the cosines are not all near zero
    fast_abs = patchwise_abs_cosine(h)
    fast_signed = mean_signed_cosine(h)
    for b in range(4):
        hb = h[b].double().numpy()
        assert fast_abs[b].item() == pytest.approx(_brute_force(hb), abs=1e-10)
        assert fast_signed[b].item() == pytest.approx(_brute_force(hb, absolute=False), abs=1e-10)


def test_blocked_gram_equals_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import vitdiag.probes.similarity as sim

    h = _randn(3, 37, 6, seed=6) + 0.2
    whole = patchwise_abs_cosine(h)
    monkeypatch.setattr(sim, "_GRAM_BLOCK_BYTES", 8 * 3 * 37 * 5)  # 5 rows per block
    assert torch.allclose(patchwise_abs_cosine(h), whole, atol=1e-14)


def test_result_is_float64_on_the_tokens_device() -> None:
    h = _randn(2, 5, 4).float()
    for f in (patchwise_abs_cosine, mean_signed_cosine, effective_rank):
        out = f(h)
        assert out.dtype == torch.float64 and out.device == h.device and out.shape == (2,)


# -- properties -----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 12),
    d=st.integers(1, 9),
    offset=st.floats(-1.0, 1.0),
)
def test_invariant_to_per_token_scaling_of_either_sign_and_to_token_order(
    seed: int, n: int, d: int, offset: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, n, d, generator=g, dtype=torch.float64) + offset
    magnitude = torch.exp(torch.empty(2, n, 1, dtype=torch.float64).uniform_(-3, 3, generator=g))
    sign = torch.where(torch.rand(2, n, 1, generator=g) < 0.5, -1.0, 1.0).double()
    perm = torch.randperm(n, generator=g)
    p = patchwise_abs_cosine(h)
    assert torch.allclose(patchwise_abs_cosine(h * magnitude * sign), p, atol=1e-12)
    assert torch.allclose(patchwise_abs_cosine(h[:, perm]), p, atol=1e-12)
    # Positive scaling keeps the signed cosine; order never matters to either.
    s = mean_signed_cosine(h)
    assert torch.allclose(mean_signed_cosine(h * magnitude), s, atol=1e-12)
    assert torch.allclose(mean_signed_cosine(h[:, perm]), s, atol=1e-12)
    assert ((p >= -1e-12) & (p <= 1 + 1e-12)).all()
    assert (s.abs() <= p + 1e-12).all()
    assert torch.allclose(effective_rank(h[:, perm]), effective_rank(h), atol=1e-9)


# -- the probe ------------------------------------------------------------------------------


def _random_layers(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "embed": _randn(b, 16, 8, seed=seed),
        "block1": _randn(b, 16, 8, seed=seed + 1) + 0.5,
        "norm": _randn(b, 16, 8, seed=seed + 2) + 2.0,
    }


@pytest.mark.parametrize("batch", [1, 5])
def test_streaming_in_batches_equals_one_batch(batch: int) -> None:
    layers = _random_layers(10)
    whole = SimilarityProbe()
    whole.update(_taps(layers))
    streamed = SimilarityProbe()
    for start in range(0, 10, batch):
        streamed.update(_taps({k: v[start : start + batch] for k, v in layers.items()}))
    a, b = whole.compute(), streamed.compute()
    for key in ("mean", "std", "signed", "erank"):
        np.testing.assert_allclose(b.extra[key], a.extra[key], rtol=0, atol=1e-12)
    assert b.extra["n_images"] == a.extra["n_images"] == 10


def test_probe_mean_and_std_over_images_with_ddof_zero() -> None:
    layers = _random_layers(7)
    probe = SimilarityProbe()
    probe.update(_taps(layers))
    res = probe.compute()
    for i, (name, h) in enumerate(layers.items()):
        p = patchwise_abs_cosine(h).numpy()
        assert res.metrics[f"{name}.mean"] == pytest.approx(p.mean(), abs=1e-12)
        assert res.metrics[f"{name}.std"] == pytest.approx(p.std(ddof=0), abs=1e-9)
        # The default samples images 0, 16, 32...: of these 7, image 0 only.
        assert res.extra["erank"][i] == pytest.approx(effective_rank(h[:1]).item(), abs=1e-12)
    assert res.extra["erank_every"] == 16 and res.extra["erank_images"] == 1
    assert res.metrics["last_block"] == res.metrics["block1.mean"]
    assert res.metrics["final_norm"] == res.metrics["norm.mean"]
    assert res.metrics["max"] == max(res.extra["mean"])
    assert res.probe == "similarity" and res.definition == DEFINITION
    assert res.extra["layers"] == ["embed", "block1", "norm"]
    assert res.extra["n_tokens"] == [16, 16, 16]
    (table,) = res.tables
    assert table.columns[0] == "layer" and [r[0] for r in table.rows] == res.extra["layers"]
    assert res.to_dict()["metrics"]["embed.mean"] == res.metrics["embed.mean"]


def test_probe_ignores_prefix_tokens() -> None:
    layers = _random_layers(4)
    results = []
    for seed in (0, 1):
        prefix = {k: _randn(4, 2, 8, seed=100 + seed) * (1 + 10 * seed) for k in layers}
        probe = SimilarityProbe()
        probe.update(_taps(layers, prefix))
        results.append(probe.compute())
    assert results[0].extra == results[1].extra


def test_layer_subset_keeps_depth_order_and_unknown_names_list_valid_ones() -> None:
    probe = SimilarityProbe(layers=["norm", "embed"])
    probe.update(_taps(_random_layers(2)))
    res = probe.compute()
    assert res.extra["layers"] == ["embed", "norm"]
    assert "final_norm" in res.metrics and res.metrics["last_block"] == res.metrics["embed.mean"]

    bad = SimilarityProbe(layers=["block7"])
    with pytest.raises(VitdiagError, match="block7.*valid layers: embed, block1, norm"):
        bad.update(_taps(_random_layers(2)))
    with pytest.raises(VitdiagError):
        SimilarityProbe(layers=[])
    with pytest.raises(VitdiagError, match="no images"):
        SimilarityProbe().compute()


def test_model_without_final_norm_reports_last_layer_as_last_block() -> None:
    probe = SimilarityProbe()
    probe.update(_taps({"stem": _randn(2, 9, 4), "out": _randn(2, 9, 4, seed=1) + 1}))
    res = probe.compute()
    assert res.metrics["last_block"] == res.metrics["out.mean"]
    assert "final_norm" not in res.metrics


# -- real timm models, hooked by hand the way the engine will --------------------------------


def _grid_and_prefix(value: object, tap: LayerTap) -> tuple[torch.Tensor, torch.Tensor]:
    if tap.layout == "pit":
        x, prefix = value  # type: ignore[misc]
        return x.flatten(2).transpose(1, 2), prefix
    t = value
    assert isinstance(t, torch.Tensor)
    if tap.layout == "nlc":
        return t[:, tap.num_prefix :], t[:, : tap.num_prefix]
    if tap.layout == "nhwc":
        b, h, w, d = t.shape
        return t.reshape(b, h * w, d), t.new_zeros(b, 0, d)
    if tap.layout == "nchw":
        b, d = t.shape[:2]
        return t.flatten(2).transpose(1, 2), t.new_zeros(b, 0, d)
    raise AssertionError(tap.layout)


def _hooked_taps(model: torch.nn.Module, images: torch.Tensor) -> Taps:
    taps = family_of(model).layer_taps(model)
    captured: dict[str, object] = {}
    handles = []
    for tap in taps:
        module = module_at(model, tap.module)
        if tap.where == "input":
            handles.append(
                module.register_forward_pre_hook(
                    lambda _m, args, name=tap.name: captured.__setitem__(name, args[0])
                )
            )
        else:
            handles.append(
                module.register_forward_hook(
                    lambda _m, _a, out, name=tap.name: captured.__setitem__(name, out)
                )
            )
    try:
        with torch.inference_mode():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    out = Taps(images=images, targets=torch.full((len(images),), -1))
    for tap in taps:  # depth order, as the engine inserts them
        grid, prefix = _grid_and_prefix(captured[tap.name], tap)
        out.layers[tap.name] = grid.float()
        out.prefix[tap.name] = prefix.float()
    return out


MODELS = [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8), 32, 1),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8), 32, 2),
    # A slimmer Swin than tiny (same class and stage layout): its full width only costs time.
    (
        "swin_tiny_patch4_window7_224",
        dict(img_size=64, window_size=2, depths=(1, 1, 2, 1), embed_dim=32, num_heads=(1, 2, 4, 8)),
        64,
        0,
    ),
    ("pit_ti_224", dict(img_size=64), 64, 1),
    ("resnet18", {}, 64, 0),
]


@pytest.mark.parametrize("arch,kwargs,size,n_prefix", MODELS, ids=[m[0] for m in MODELS])
def test_real_random_weight_model_end_to_end(
    arch: str, kwargs: dict, size: int, n_prefix: int
) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=3, **kwargs).eval()
    images = torch.randn(3, 3, size, size)
    taps = _hooked_taps(model, images)
    probe = SimilarityProbe()
    probe.update(taps)
    res = probe.compute()

    names = [t.name for t in family_of(model).layer_taps(model)]
    assert res.extra["layers"] == names
    assert all(math.isfinite(res.metrics[f"{n}.mean"]) for n in names)
    assert all(math.isfinite(res.metrics[f"{n}.std"]) for n in names)
    assert all(0.0 <= m <= 1.0 for m in res.extra["mean"])
    assert math.isfinite(res.metrics["last_block"]) and math.isfinite(res.metrics["max"])
    assert next(iter(taps.prefix.values())).shape[1] == n_prefix

    if arch == "resnet18":  # post-ReLU tokens: no negative cosine, so signed equals absolute
        assert all((h >= 0).all() for h in taps.layers.values())
        # Equal up to the float32 Gram's rounding (the blocked path sums them differently).
        np.testing.assert_allclose(res.extra["signed"], res.extra["mean"], rtol=0, atol=1e-6)

    # The paper's formula by hand on one hooked layer, image by image.
    name = names[len(names) // 2]
    h = taps.layers[name]
    by_hand = np.mean([_brute_force(h[b].double().numpy()) for b in range(h.shape[0])])
    assert res.metrics[f"{name}.mean"] == pytest.approx(by_hand, abs=1e-5)


def test_resnet_at_32px_has_a_single_token_last_layer_reported_as_nan() -> None:
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    probe = SimilarityProbe()
    probe.update(_hooked_taps(model, torch.randn(2, 3, 32, 32)))
    res = probe.compute()
    assert res.extra["n_tokens"] == [64, 64, 16, 4, 1]
    assert math.isnan(res.metrics["layer4.out.mean"]) and math.isnan(res.metrics["last_block"])
    assert all(math.isfinite(m) for m in res.extra["mean"][:-1])
    assert res.metrics["max"] == max(res.extra["mean"][:-1])
    assert any("layer4.out" in note for note in res.notes)
    assert res.to_dict()["metrics"]["layer4.out.mean"] is None  # NaN becomes null in JSON


# -- the Gram route against the float64 definition, on real tokens ---------------------------


def _fixture_taps() -> Taps:
    """Tokens of the bundled trained fixture ViT (32 px, 64 grid tokens of width 64) on 10
    fixture images, one per class."""
    from PIL import Image

    from vitdiag import load
    from vitdiag.data import eval_transform

    root = Path(__file__).resolve().parents[1] / "fixtures"
    loaded = load(str(root / "models" / "vit_nomix"))
    transform = eval_transform(loaded.data_config, loaded.img_size)
    files = [sorted(d.glob("*.jpg"))[0] for d in sorted((root / "data" / "val").iterdir())]
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    return _hooked_taps(loaded.model.eval(), images)


def _reference(h: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """P(h) and effective rank per image from the definitions, numpy float64 (full SVD)."""
    p, r = [], []
    for x in h.double().numpy():
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        n = len(u)
        p.append((np.abs(u @ u.T).sum() - np.trace(u @ u.T)) / (n * (n - 1)))
        s = np.linalg.svd(x, compute_uv=False)
        q = s / s.sum()
        q = q[q > 0]
        r.append(math.exp(-(q * np.log(q)).sum()))
    return np.array(p), np.array(r)


def test_default_path_matches_float64_definition_on_real_tokens() -> None:
    """P(h) and the signed cosine from the float32 Gram (every device) within 1e-6 absolute of
    the float64 definition (measured: 4e-8); the effective rank, from the float64 Gram, within
    1e-6 relative of a float64 SVD (measured: 1.1e-10, and 2.7e-7 on the final norm whose
    σ_min/σ_max ≈ 1e-8 fall under the rank cutoff)."""
    import vitdiag.probes.similarity as sim

    taps = _fixture_taps()
    assert len(taps.layers) >= 5
    for name, h in taps.layers.items():
        assert h.dtype == torch.float32 and h.shape[1:] == (64, 64), name
        abs_sum, signed_sum = sim._pairwise_cosine_sums(h)
        p_ref, r_ref = _reference(h)
        s_ref = [_brute_force(x, absolute=False) for x in h.double().numpy()[:3]]
        np.testing.assert_allclose(abs_sum.numpy() / (64 * 63), p_ref, rtol=0, atol=1e-6)
        np.testing.assert_allclose(signed_sum.numpy()[:3] / (64 * 63), s_ref, rtol=0, atol=1e-6)
        np.testing.assert_allclose(effective_rank(h).numpy(), r_ref, rtol=1e-6, atol=0)
        probe = SimilarityProbe(layers=[name], erank_every=1)
        probe.update(taps)
        res = probe.compute()
        assert res.extra["mean"][0] == pytest.approx(p_ref.mean(), abs=1e-6)
        assert res.extra["erank"][0] == pytest.approx(r_ref.mean(), rel=1e-6)


# -- the effective rank's sample -------------------------------------------------------------


def test_effective_rank_is_measured_on_images_whose_global_index_is_a_multiple() -> None:
    taps = _fixture_taps()
    taps.indices = torch.arange(10) + 3  # global indices 3..12: 4, 8 and 12 are sampled
    probe = SimilarityProbe(erank_every=4)
    probe.update(taps)
    res = probe.compute()
    assert res.extra["erank_every"] == 4 and res.extra["erank_images"] == 3
    assert res.extra["n_images"] == 10  # P(h) still reads every image
    rows = [1, 5, 9]
    for i, (name, h) in enumerate(taps.layers.items()):
        exact = effective_rank(h[rows]).numpy()
        _, svd = _reference(h[rows])
        assert res.extra["erank"][i] == pytest.approx(exact.mean(), rel=1e-12), name
        assert res.extra["erank_std"][i] == pytest.approx(exact.std(), rel=1e-9), name
        # The SVD: 1e-9 on every layer whose small singular values clear the Gram's cutoff.
        tol = 1e-6 if name == "norm" else 1e-9
        assert res.extra["erank"][i] == pytest.approx(svd.mean(), rel=tol), name
        assert res.extra["mean"][i] == pytest.approx(
            patchwise_abs_cosine(h).mean().item(), abs=1e-12
        )
    assert any("3 of 10 images" in note and "multiple of 4" in note for note in res.notes)
    assert res.extra["erank_definition"].startswith("roy-vetterli-2007-erank")


def test_without_indices_the_stream_position_is_the_global_index() -> None:
    layers = _random_layers(10)
    probe = SimilarityProbe(erank_every=3)
    for start in (0, 4, 7):  # batches of 4, 3, 3: positions 0, 3, 6, 9 are sampled
        stop = {0: 4, 4: 7, 7: 10}[start]
        probe.update(_taps({k: v[start:stop] for k, v in layers.items()}))
    res = probe.compute()
    assert res.extra["erank_images"] == 4
    for i, h in enumerate(layers.values()):
        want = effective_rank(h[[0, 3, 6, 9]]).mean().item()
        assert res.extra["erank"][i] == pytest.approx(want, rel=1e-12)


def test_an_empty_sample_falls_back_to_the_first_image_and_says_so() -> None:
    layers = _random_layers(5)
    taps = _taps(layers)
    taps.indices = torch.tensor([7, 1, 3, 5, 9])  # no index is a multiple of 16
    probe = SimilarityProbe()
    probe.update(taps)
    res = probe.compute()
    assert res.extra["erank_images"] == 1 and res.extra["erank_std"] == [0.0, 0.0, 0.0]
    for i, h in enumerate(layers.values()):
        assert res.extra["erank"][i] == pytest.approx(effective_rank(h[:1]).item(), rel=1e-12)
    assert any("first image only" in note for note in res.notes)


def test_erank_every_one_measures_every_image() -> None:
    layers = _random_layers(7)
    probe = SimilarityProbe(erank_every=1)
    probe.update(_taps(layers))
    res = probe.compute()
    assert res.extra["erank_images"] == 7
    for i, h in enumerate(layers.values()):
        r = effective_rank(h).numpy()
        assert res.extra["erank"][i] == pytest.approx(r.mean(), rel=1e-12)
        assert res.extra["erank_std"][i] == pytest.approx(r.std(), rel=1e-9)
    assert any("every image" in note for note in res.notes)


def _run_val(**settings: object) -> Result:
    from vitdiag import load
    from vitdiag.data import open_dataset
    from vitdiag.runner import Settings, run_all

    root = Path(__file__).resolve().parents[1] / "fixtures"
    loaded = load(str(root / "models" / "vit_nomix"))
    source = open_dataset(str(root / "data" / "val"))
    s = Settings(device="cpu", **settings)  # type: ignore[arg-type]
    return run_all(loaded, source, probes={"similarity"}, settings=s)[0]


def test_sample_does_not_depend_on_batch_size_or_workers() -> None:
    runs = [_run_val(limit=40, batch_size=bs, workers=w) for bs, w in ((4, 0), (16, 0), (16, 1))]
    first = runs[0].extra
    # 40 shuffled images of 200: the sample is those whose source index is a multiple of 16.
    assert 0 < first["erank_images"] < 40 and first["erank_every"] == 16
    for other in runs[1:]:
        assert other.extra["erank_images"] == first["erank_images"]
        # Other batch sizes give the float32 forward other shapes (tests/tolerances.py).
        np.testing.assert_allclose(other.extra["erank"], first["erank"], rtol=FORWARD_RTOL)
        np.testing.assert_allclose(other.extra["erank_std"], first["erank_std"], rtol=FORWARD_RTOL)
        np.testing.assert_allclose(other.extra["mean"], first["mean"], rtol=FORWARD_RTOL)


def test_erank_every_one_is_the_every_image_mean_of_the_svd_definition() -> None:
    """With --erank-every 1 every image counts: the mean effective rank over the 200 fixture
    validation images equals the float64 SVD definition's (1e-6 relative: the final norm's
    σ_min/σ_max ≈ 1e-8 falls under the rank cutoff), and P(h) its mean within 1e-6."""
    from PIL import Image

    from vitdiag import load
    from vitdiag.data import eval_transform

    got = _run_val(erank_every=1, batch_size=64, workers=0).extra
    assert got["erank_images"] == got["n_images"] == 200
    root = Path(__file__).resolve().parents[1] / "fixtures"
    loaded = load(str(root / "models" / "vit_nomix"))
    transform = eval_transform(loaded.data_config, loaded.img_size)
    files = sorted((root / "data" / "val").glob("*/*.jpg"))
    assert len(files) == 200
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    taps = _hooked_taps(loaded.model.eval(), images)
    for i, name in enumerate(got["layers"]):
        p, r = _reference(taps.layers[name])
        assert got["erank"][i] == pytest.approx(r.mean(), rel=1e-6), name
        assert got["mean"][i] == pytest.approx(p.mean(), abs=1e-6), name


def test_eigvalsh_on_one_thread_is_bit_identical_and_restores_the_thread_count() -> None:
    import vitdiag.probes.similarity as sim

    taps = _fixture_taps()
    grams = [torch.bmm(h.double(), h.double().mT) for h in taps.layers.values()]
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        many = [torch.linalg.eigvalsh(g) for g in grams]
        with sim._one_thread():
            assert torch.get_num_threads() == 1
            one = [torch.linalg.eigvalsh(g) for g in grams]
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)


def test_erank_every_is_wired_from_settings_and_the_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vitdiag.cli import app
    from vitdiag.runner import Settings

    assert SimilarityProbe.build(None, Settings(erank_every=3), None).erank_every == 3
    assert SimilarityProbe.build(None, Settings(), None).erank_every == 16
    with pytest.raises(VitdiagError, match="--erank-every"):
        SimilarityProbe(erank_every=0)
    for command in ("similarity", "report"):
        result = CliRunner().invoke(
            app, [command, "--arch", "vit_tiny_patch16_224", "--data", "x", "--erank-every", "0"]
        )
        assert result.exit_code == 2, result.output
        assert "--erank-every must be at least 1" in result.output
    out = tmp_path / "s.json"
    result = CliRunner().invoke(
        app,
        [
            "similarity",
            "fixtures/models/vit_nomix",
            "--data",
            "fixtures/data/val",
            "--limit",
            "6",
            "--erank-every",
            "2",
            "--json",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    (res,) = json.loads(out.read_text())["results"]
    assert res["extra"]["erank_every"] == 2 and 0 < res["extra"]["erank_images"] <= 6


# -- the plot -------------------------------------------------------------------------------


def _result(seed: int, nan_last: bool = False) -> Result:
    probe = SimilarityProbe()
    probe.update(_taps(_random_layers(3, seed=seed)))
    res = probe.compute()
    if nan_last:
        res.extra["mean"][-1] = None
        res.extra["std"][-1] = None
    return res


def test_plot_writes_a_png_atomically(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "sub" / "similarity.png"
    written = plot_similarity([("a", _result(0)), ("b", _result(1, nan_last=True))], out)
    assert written == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["similarity.png"]  # no temp file left


def test_plot_explains_how_to_install_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(VitdiagError, match=r"pip install 'vitdiag\[plot\]'"):
        plot_similarity([("a", _result(0))], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_rejects_other_results(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with pytest.raises(VitdiagError, match="not a similarity result"):
        plot_similarity([("a", Result(probe="collapse", definition="x"))], tmp_path / "x.png")
    with pytest.raises(VitdiagError, match="nothing to plot"):
        plot_similarity([], tmp_path / "x.png")
