"""The engine: hooks tap the right tokens for every family, one forward per batch, sums stream."""

from __future__ import annotations

import pytest
import timm
import torch
from tolerances import FORWARD_RTOL

from vitdiag.engine import resolve_amp, resolve_device, run_probes
from vitdiag.errors import VitdiagError
from vitdiag.families import family_of
from vitdiag.probes.accuracy import AccuracyProbe
from vitdiag.probes.base import LAYERS, LOGITS, Probe

# (arch, build kwargs, expected grid tokens at the first tap, prefix tokens at the first tap)
FAMILY_MODELS = [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 16, 1),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, depth=2), 16, 2),
    ("deit3_small_patch16_224", dict(img_size=32, patch_size=8, depth=2), 16, 1),
    (
        "vit_tiny_patch16_224",
        dict(
            img_size=32,
            patch_size=8,
            depth=2,
            reg_tokens=4,
            class_token=False,
            no_embed_class=True,
            global_pool="avg",
        ),
        16,
        4,
    ),
    ("eva02_tiny_patch14_224", dict(img_size=28, depth=2), 4, 1),
    ("flexivit_small", dict(img_size=32, patch_size=8, depth=2), 16, 1),
    ("cait_xxs24_224", dict(img_size=32, patch_size=8, depth=2), 16, 0),
    ("pit_ti_224", dict(img_size=64), 49, 1),
    (
        "beit_base_patch16_224",
        dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2),
        16,
        1,
    ),
    ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=2, depths=(1, 1, 1, 1)), 256, 0),
    ("xcit_nano_12_p16_224", dict(img_size=32, depth=2), 4, 0),
    ("resnet18", dict(), 256, 0),
]


def _build(arch, kwargs, num_classes=5):
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs).eval()


class Recorder(Probe):
    """Keeps what it was given, to check the taps."""

    needs = frozenset({LAYERS, LOGITS})

    def __init__(self):
        super().__init__()
        self.batches = []

    def update(self, taps):
        self.batches.append(taps)

    def compute(self):
        return None


def _size(kwargs, arch):
    return 64 if arch == "resnet18" else kwargs["img_size"]


@pytest.mark.parametrize("arch,kwargs,n_grid,n_prefix", FAMILY_MODELS, ids=lambda v: str(v)[:30])
def test_layer_taps_give_grid_and_prefix_tokens_for_every_family(arch, kwargs, n_grid, n_prefix):
    model = _build(arch, kwargs)
    s = _size(kwargs, arch)
    images = torch.randn(3, 3, s, s)
    rec = Recorder()
    run_probes(model, [(images, torch.full((3,), -1))], [rec], device="cpu")
    taps = rec.batches[0]
    names = [t.name for t in family_of(model).layer_taps(model)]
    assert list(taps.layers) == names
    first = taps.layers[names[0]]
    assert first.shape[0] == 3 and first.shape[1] == n_grid
    if n_prefix:
        assert taps.prefix[names[0]].shape[1] == n_prefix
    else:
        assert names[0] not in taps.prefix
    for grid in taps.layers.values():
        assert grid.ndim == 3 and torch.isfinite(grid).all()
    # the logits the probes see are the model's own output
    torch.testing.assert_close(taps.logits, model(images), rtol=1e-5, atol=1e-5)


def test_vit_embed_tap_is_patch_embedding_plus_position():
    model = _build("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2))
    images = torch.randn(2, 3, 32, 32)
    rec = Recorder()
    run_probes(model, [(images, torch.full((2,), -1))], [rec], device="cpu")
    expected = model.patch_embed(images) + model.pos_embed[:, 1:]
    torch.testing.assert_close(rec.batches[0].layers["embed"], expected)
    expected_cls = model.cls_token + model.pos_embed[:, :1]
    torch.testing.assert_close(rec.batches[0].prefix["embed"], expected_cls.expand(2, -1, -1))
    last = rec.batches[0].layers["norm"]
    torch.testing.assert_close(last, model.forward_features(images)[:, 1:])


class _Batch:
    """A data.Batch's shape: images, targets, source indices."""

    def __init__(self, images, targets, indices):
        self.images, self.targets, self.indices = images, targets, indices


def test_probes_get_global_positions_and_the_loaders_source_indices():
    model = _build("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2))
    x = torch.randn(3, 3, 32, 32)
    empty = (torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.int64))
    given = torch.tensor([7, 2])
    rec = Recorder()
    batches = [(x, torch.full((3,), -1)), empty, _Batch(x[:2], torch.full((2,), -1), given)]
    run_probes(model, batches, [rec], device="cpu")
    first, second = rec.batches  # the empty batch reaches no probe and takes no position
    assert first.positions.tolist() == [0, 1, 2] and first.indices.tolist() == [0, 1, 2]
    assert second.positions.tolist() == [3, 4] and second.indices.tolist() == [7, 2]


def test_positions_follow_the_stride_rule_of_this_processs_shard(monkeypatch):
    import vitdiag.engine as engine
    from vitdiag.distributed import Shard

    # Process 1 of 3 reads images 1, 4, 7, … of the single-process order.
    monkeypatch.setattr(engine, "current_shard", lambda: Shard(1, 3))
    model = _build("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2))
    rec = Recorder()
    batches = [(torch.randn(2, 3, 32, 32), torch.full((2,), -1)) for _ in range(2)]
    run_probes(model, batches, [rec], device="cpu")
    assert [t.positions.tolist() for t in rec.batches] == [[1, 4], [7, 10]]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_a_shards_positions_are_where_its_images_sit_in_the_single_process_order(world):
    from vitdiag.data import select_indices
    from vitdiag.distributed import Shard

    order = select_indices(23, limit=17, seed=4)
    for rank in range(world):
        shard = Shard(rank, world)
        mine = select_indices(23, limit=17, seed=4, rank=rank, world_size=world)
        assert shard.take(order) == mine
        assert [order[p] for p in shard.positions(0, len(mine)).tolist()] == mine


def test_no_probe_knows_about_processes():
    """Sharding is the engine's: probes import neither the engine, vitdiag.distributed nor
    torch.distributed (they get global positions from the engine instead)."""
    import ast
    from pathlib import Path

    banned = ("vitdiag.engine", "vitdiag.distributed", "torch.distributed")
    root = Path(__file__).resolve().parents[1] / "vitdiag" / "probes"
    hits = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            hits += [f"{path.name}:{node.lineno} {n}" for n in names if n.startswith(banned)]
    assert not hits, hits


def test_one_forward_per_batch_feeds_every_probe():
    model = _build("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2))
    calls = []
    model.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))) for _ in range(3)]
    probes = [AccuracyProbe(), Recorder(), AccuracyProbe()]
    summary = run_probes(model, batches, probes, device="cpu")
    assert len(calls) == 3
    assert summary.n_images == 12
    assert summary.results[0].metrics == summary.results[2].metrics


def test_accuracy_probe_matches_brute_force_and_is_batch_size_invariant():
    model = _build("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), num_classes=3)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(20, 3, 32, 32, generator=g)
    targets = torch.randint(0, 3, (20,), generator=g)
    targets[::5] = -1  # some images without labels
    with torch.no_grad():
        logits = model(images).double()
    lab = targets >= 0
    top1 = (logits[lab].argmax(1) == targets[lab]).double().mean().item()
    nll = torch.nn.functional.cross_entropy(logits[lab], targets[lab]).item()
    conf = logits.softmax(1).max(1).values.mean().item()
    for bs in (3, 7, 20):
        batches = [(images[i : i + bs], targets[i : i + bs]) for i in range(0, 20, bs)]
        m = run_probes(model, batches, [AccuracyProbe()], device="cpu").results[0].metrics
        assert m["top1"] == pytest.approx(top1, abs=1e-12)
        assert m["nll"] == pytest.approx(nll, rel=1e-5)
        assert m["mean_confidence"] == pytest.approx(conf, rel=1e-5)
        assert m["n_labelled"] == 16 and m["n_images"] == 20


def test_bf16_autocast_runs_on_cpu_and_stays_close():
    model = _build("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2))
    images = torch.randn(4, 3, 32, 32)
    targets = torch.randint(0, 5, (4,))
    full = run_probes(model, [(images, targets)], [AccuracyProbe()], device="cpu").results[0]
    half = run_probes(
        model, [(images, targets)], [AccuracyProbe()], device="cpu", amp="bf16"
    ).results[0]
    assert half.metrics["nll"] == pytest.approx(full.metrics["nll"], rel=0.05)


def test_channels_last_gives_the_same_logits():
    model = _build("resnet18", {})
    images = torch.randn(2, 3, 64, 64)
    ref = Recorder()
    run_probes(model, [(images, torch.full((2,), -1))], [ref], device="cpu")
    cl = Recorder()
    run_probes(model, [(images, torch.full((2,), -1))], [cl], device="cpu", channels_last=True)
    torch.testing.assert_close(cl.batches[0].logits, ref.batches[0].logits, rtol=1e-4, atol=1e-4)


def test_devices_and_amp_are_checked():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(VitdiagError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    with pytest.raises(VitdiagError, match="not a device"):
        resolve_device("tpu-ish")
    with pytest.raises(VitdiagError, match="fp16 needs a GPU"):
        resolve_amp("fp16", torch.device("cpu"))
    with pytest.raises(VitdiagError, match="not known"):
        resolve_amp("fp8", torch.device("cpu"))


def test_an_empty_pass_is_a_clear_error():
    model = _build("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2))
    with pytest.raises(VitdiagError, match="no image could be read"):
        run_probes(model, [], [AccuracyProbe()], device="cpu")


def test_variance_probe_reads_the_patch_embedding_of_the_shared_forward():
    """X = patch_embed(images) is taken from the forward the engine runs anyway (one
    patch_embed call per batch), and equals what a separate patch_embed call gives."""
    from vitdiag.probes.variance import VarianceShiftProbe, patch_tokens, variances_from_sums

    model = _build("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2))
    calls = []
    model.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    g = torch.Generator().manual_seed(3)
    images = torch.randn(10, 3, 32, 32, generator=g)
    batches = [
        (images[i : i + 4], torch.zeros(len(images[i : i + 4]), dtype=torch.long))
        for i in range(0, 10, 4)
    ]
    probe = VarianceShiftProbe(measure_x=True, accuracy=False)
    result = run_probes(model, batches, [probe], device="cpu").results[0]
    assert len(calls) == 3
    with torch.inference_mode():
        x = patch_tokens(model, images).double()
    # Batches of 4, 4, 2 against one of 10: the float32 patch embedding may block its sums
    # differently per shape, so the budget of tests/tolerances.py, not bit-identity.
    want = float(x.var(unbiased=False))
    assert result.metrics["var_x_global"] == pytest.approx(want, rel=FORWARD_RTOL)
    assert variances_from_sums(probe.x_sums)["per_token"] == pytest.approx(
        float(x.var(dim=-1, unbiased=False).mean()), rel=FORWARD_RTOL
    )
