"""vitdiag.train: DiversePatch losses and the fixed simplex-ETF head, against brute-force loops in
float64, closed forms, autograd's gradcheck, the similarity probe, and a real training loop."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_ARGS

from vitdiag.probes.classifier import classifier_heads
from vitdiag.probes.similarity import patchwise_abs_cosine
from vitdiag.train import (
    forward_tokens,
    head_modules,
    install_fixed_etf_head,
    patch_contrastive_loss,
    patch_cosine_loss,
    patch_cutmix,
    patch_mixing_loss,
    patchwise_abs_cosine_per_image,
    simplex_etf,
)

F64 = torch.float64


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def tiny_vit(arch: str = "vit_tiny_patch16_224", num_classes: int = 3, **kw) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    args = {**TINY_ARGS, **kw}
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **args)


# -- patch-wise cosine loss ----------------------------------------------------------------------


def brute_abs_cosine(h: torch.Tensor) -> torch.Tensor:
    """P(h) per image by the definition's double loop; a zero token has cosine 0."""
    out = []
    for img in h.tolist():
        n, total = len(img), 0.0
        for i, j in itertools.permutations(range(n), 2):
            ni = math.sqrt(sum(x * x for x in img[i]))
            nj = math.sqrt(sum(x * x for x in img[j]))
            if ni > 0 and nj > 0:
                total += abs(sum(a * b for a, b in zip(img[i], img[j], strict=True))) / (ni * nj)
        out.append(total / (n * (n - 1)))
    return torch.tensor(out, dtype=F64)


def test_patch_cosine_loss_is_the_double_loop_of_the_definition_with_zero_tokens():
    h = randn(3, 5, 4)
    h[1, 2] = 0.0  # a zero token: orthogonal to everything, still counted in n(n−1)
    expected = brute_abs_cosine(h)
    torch.testing.assert_close(patchwise_abs_cosine_per_image(h), expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(patch_cosine_loss(h), expected.mean(), rtol=0, atol=1e-14)


def test_patch_cosine_loss_is_one_for_identical_or_opposite_tokens_and_zero_for_orthogonal():
    v = randn(1, 1, 8)
    same = v.expand(2, 6, 8).clone()
    same[:, ::2] *= -3.0  # |cos| ignores sign and scale
    assert patch_cosine_loss(same).item() == pytest.approx(1.0, abs=1e-15)
    orthogonal = torch.eye(6, 8, dtype=F64).expand(2, 6, 8) * 5.0
    assert patch_cosine_loss(orthogonal).item() == 0.0


@pytest.mark.parametrize("n, d", [(7, 16), (20, 4)])  # the probe's Gram path and blocked path
def test_patch_cosine_loss_agrees_with_the_probe_to_1e12_in_float64(n, d):
    h = randn(4, n, d, seed=n) * torch.logspace(-3, 3, n, dtype=F64)[None, :, None]
    h[0, 0] = 0.0
    ours = patchwise_abs_cosine_per_image(h)
    torch.testing.assert_close(ours, patchwise_abs_cosine(h), rtol=0, atol=1e-12)


def test_patch_cosine_loss_agrees_with_the_probe_on_real_vit_tokens():
    model = tiny_vit().eval()
    with torch.no_grad():
        out = forward_tokens(model, randn(3, 3, 32, 32, dtype=torch.float32))
    for tokens in (out.first, out.last):
        assert tokens.shape == (3, 16, 32)
        probe32, probe64 = patchwise_abs_cosine(tokens), patchwise_abs_cosine(tokens.double())
        ours64 = patchwise_abs_cosine_per_image(tokens.double())
        torch.testing.assert_close(ours64, probe64, rtol=0, atol=1e-12)
        ours32 = patchwise_abs_cosine_per_image(tokens).double()
        torch.testing.assert_close(ours32, probe32, rtol=0, atol=1e-6)
        assert patch_cosine_loss(tokens).item() == pytest.approx(probe64.mean().item(), abs=1e-6)


def test_patch_cosine_loss_refuses_a_single_token_and_other_shapes():
    with pytest.raises(ValueError, match="at least 2"):
        patch_cosine_loss(randn(2, 1, 4))
    with pytest.raises(ValueError, match=r"\(B, n, D\)"):
        patch_cosine_loss(randn(5, 4))


def test_patch_cosine_loss_passes_gradcheck_and_a_zero_token_gets_zero_gradient():
    h = randn(2, 4, 3).requires_grad_()
    assert torch.autograd.gradcheck(patch_cosine_loss, (h,))
    z = randn(1, 3, 4)
    z[0, 1] = 0.0
    z.requires_grad_()
    patch_cosine_loss(z).backward()
    assert torch.isfinite(z.grad).all() and z.grad[0, 1].abs().max() == 0


def test_patch_cosine_loss_runs_half_precision_tokens_in_float32():
    h = randn(2, 5, 8, dtype=torch.float32)
    loss = patch_cosine_loss(h.to(torch.bfloat16))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(patch_cosine_loss(h).item(), abs=2e-2)


# -- patch-wise contrastive loss -----------------------------------------------------------------


def brute_contrastive(first: torch.Tensor, last: torch.Tensor, normalize: bool) -> float:
    """−log(e^a/(e^a+e^b)) per patch by loops, mean over patches then images."""
    if normalize:
        first, last = F.normalize(first, dim=-1), F.normalize(last, dim=-1)
    per_image = []
    for f, h in zip(first.tolist(), last.tolist(), strict=True):
        n, total = len(h), 0.0
        for i in range(n):
            a = sum(x * y for x, y in zip(f[i], h[i], strict=True))
            mean_others = [
                sum(h[j][k] for j in range(n) if j != i) / (n - 1) for k in range(len(h[i]))
            ]
            b = sum(x * y for x, y in zip(f[i], mean_others, strict=True))
            total += -math.log(math.exp(a) / (math.exp(a) + math.exp(b)))
        per_image.append(total / n)
    return sum(per_image) / len(per_image)


@pytest.mark.parametrize("normalize", [False, True])
def test_contrastive_loss_is_the_papers_formula_by_loops(normalize):
    first, last = randn(3, 5, 4, seed=1), randn(3, 5, 4, seed=2)
    got = patch_contrastive_loss(first, last, normalize=normalize).item()
    assert got == pytest.approx(brute_contrastive(first, last, normalize), rel=1e-13)


def test_contrastive_loss_is_log_2_when_the_last_tokens_are_all_equal():
    last = randn(2, 1, 6).expand(2, 9, 6)
    assert patch_contrastive_loss(randn(2, 9, 6), last).item() == pytest.approx(math.log(2), 1e-14)


def test_contrastive_loss_is_stable_where_the_exponentials_overflow():
    # Inner products of ~1e6: e^a overflows, softplus(b − a) does not.
    first, last = randn(2, 6, 8, seed=3) * 1e3, (randn(2, 6, 8, seed=4) * 1e3).requires_grad_()
    a = (first * last).sum(-1)
    b = (first * (last.sum(1, keepdim=True) - last) / 5).sum(-1)
    expected = (torch.logaddexp(a, b) - a).mean()
    loss = patch_contrastive_loss(first, last)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(expected.item(), rel=1e-12)
    loss.backward()
    assert torch.isfinite(last.grad).all()


def test_contrastive_loss_gradcheck_and_first_detached_by_default():
    first, last = randn(2, 4, 3, seed=5).requires_grad_(), randn(2, 4, 3, seed=6).requires_grad_()

    def both(f, h):
        return patch_contrastive_loss(f, h, detach_first=False)

    assert torch.autograd.gradcheck(both, (first, last))
    assert torch.autograd.gradcheck(lambda h: patch_contrastive_loss(first, h), (last,))
    patch_contrastive_loss(first, last).backward()
    assert first.grad is None and last.grad is not None


def test_contrastive_loss_refuses_mismatched_token_sets():
    with pytest.raises(ValueError, match="same grid tokens"):
        patch_contrastive_loss(randn(2, 4, 3), randn(2, 5, 3))


# -- patch CutMix and the mixing loss ------------------------------------------------------------


def test_patch_cutmix_pastes_whole_patches_and_the_mask_says_whence():
    a, b = torch.zeros(16, 3, 32, 24), torch.ones(16, 3, 32, 24)
    mix = patch_cutmix(a, b, patch_size=(8, 4), generator=torch.Generator().manual_seed(0))
    assert mix.mask.shape == (16, 4 * 6) and mix.mask.dtype == torch.bool
    # Patch (r, c) in timm's row-major order is all b where the mask says so, all a elsewhere.
    patches = mix.images.unfold(2, 8, 8).unfold(3, 4, 4)  # (B, 3, 4, 6, 8, 4)
    per_patch = patches.mean(dim=(1, 4, 5)).reshape(16, 24)
    assert torch.equal(per_patch, mix.mask.double().to(per_patch.dtype))
    torch.testing.assert_close(mix.lam, 1 - mix.mask.float().mean(dim=1))
    grid = mix.mask.reshape(16, 4, 6)
    for m in grid:  # a box: its rows share one column set
        rows = m.any(dim=1)
        assert all(torch.equal(m[r], m[rows][0]) for r in torch.nonzero(rows).flatten())
    assert 0 < mix.mask.float().mean() < 1  # over 16 draws, some patches come from each image
    again = patch_cutmix(a, b, patch_size=(8, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.mask, mix.mask)


def test_patch_cutmix_refuses_images_that_do_not_split_into_patches():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patch_cutmix(torch.zeros(2, 3, 30, 32), torch.zeros(2, 3, 30, 32), 8)


def test_patch_mixing_loss_is_the_mean_token_cross_entropy_by_loops():
    logits, mask = randn(3, 5, 4, seed=7), randn(3, 5, seed=8) > 0
    ya, yb = torch.tensor([0, 1, 3]), torch.tensor([2, 2, 0])
    total = 0.0
    for b in range(3):
        for i in range(5):
            y = int(yb[b] if mask[b, i] else ya[b])
            z = logits[b, i].tolist()
            total += math.log(sum(math.exp(v) for v in z)) - z[y]
    got = patch_mixing_loss(logits, ya, yb, mask).item()
    assert got == pytest.approx(total / 15, rel=1e-13)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: patch_mixing_loss(t, ya, yb, mask), (x,))


def test_patch_mixing_loss_refuses_logits_that_do_not_match_the_mask():
    with pytest.raises(ValueError, match="every grid token"):
        patch_mixing_loss(
            randn(3, 4),
            torch.tensor([0, 1, 2]),
            torch.tensor([0, 1, 2]),
            torch.zeros(3, 4, dtype=torch.bool),
        )


# -- simplex ETF ---------------------------------------------------------------------------------


@pytest.mark.parametrize("c, d", [(2, 2), (3, 8), (10, 64), (10, 10), (4, 3), (10, 9), (2, 1)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (F64, 1e-12)])
def test_simplex_etf_rows_are_unit_with_pairwise_cosine_minus_one_over_c_minus_1(c, d, dtype, tol):
    w = simplex_etf(c, d, seed=3, dtype=dtype)
    assert w.shape == (c, d) and w.dtype == dtype
    gram = w.double() @ w.double().T
    target = torch.full((c, c), -1.0 / (c - 1), dtype=F64).fill_diagonal_(1.0)
    torch.testing.assert_close(gram, target, rtol=0, atol=tol)  # unit norms and −1/(C−1)
    torch.testing.assert_close(w.double().sum(dim=0), torch.zeros(d, dtype=F64), rtol=0, atol=tol)


def test_simplex_etf_is_the_seeded_draw():
    assert torch.equal(simplex_etf(5, 12, seed=1), simplex_etf(5, 12, seed=1))
    assert not torch.allclose(simplex_etf(5, 12, seed=1), simplex_etf(5, 12, seed=2))
    assert not torch.allclose(simplex_etf(5, 4, seed=1), simplex_etf(5, 4, seed=2))


def test_simplex_etf_refuses_fewer_than_c_minus_1_dimensions_and_names_the_fix():
    with pytest.raises(ValueError, match=r"C−1 = 9.*D = 8.*projection"):
        simplex_etf(10, 8)
    with pytest.raises(ValueError, match="at least 2 classes"):
        simplex_etf(1, 8)


# -- fixed ETF head ------------------------------------------------------------------------------


def test_fixed_etf_head_is_frozen_and_its_logits_are_s_w_h(tmp_path):
    model = tiny_vit(num_classes=5)
    w = install_fixed_etf_head(model, scale=2.5, seed=4)
    torch.testing.assert_close(w, simplex_etf(5, 32, seed=4))
    head = model.head
    assert not head.weight.requires_grad and not head.bias.requires_grad
    assert not any(n.startswith("head.") for n, _ in model.named_parameters())
    model.requires_grad_(True)  # cannot thaw buffers
    assert not head.weight.requires_grad and torch.equal(head.bias, torch.zeros(5))

    x, y = randn(4, 3, 32, 32, dtype=torch.float32), torch.tensor([0, 1, 2, 4])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    model.train()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    after = model.state_dict()
    assert torch.equal(after["head.weight"], before["head.weight"])
    assert torch.equal(after["head.bias"], before["head.bias"])
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "blocks.0.attn.qkv.weight" in changed and "patch_embed.proj.weight" in changed

    model.eval()
    with torch.no_grad():
        h = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model(x), 2.5 * h @ w.T, rtol=1e-6, atol=1e-6)
    # Plain timm loads the checkpoint (same keys), and vitdiag's probes read the same head.
    plain = tiny_vit(num_classes=5).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(plain(x), model(x).detach())
    (read,) = classifier_heads(model)
    torch.testing.assert_close(read.weight, 2.5 * w.double(), rtol=0, atol=1e-6)


def test_fixed_etf_head_replaces_both_heads_of_a_distilled_deit():
    model = tiny_vit("deit_tiny_distilled_patch16_224", num_classes=4)
    w = install_fixed_etf_head(model)
    assert len(head_modules(model)) == 2 and len(classifier_heads(model)) == 2
    for fc in (model.head, model.head_dist):
        torch.testing.assert_close(fc.weight, w)  # default scale 1
        assert not fc.weight.requires_grad and not fc.bias.any()


def test_fixed_etf_head_refuses_a_headless_model_and_too_narrow_features():
    with pytest.raises(ValueError, match="num_classes=0"):
        install_fixed_etf_head(tiny_vit(num_classes=0))
    with pytest.raises(ValueError, match="projection"):
        install_fixed_etf_head(tiny_vit(num_classes=40))  # D = 32 < C − 1 = 39
    with pytest.raises(ValueError, match="positive"):
        install_fixed_etf_head(tiny_vit(), scale=0.0)


def test_forward_tokens_gives_the_embed_and_last_block_grid_tokens_with_their_graph():
    model = tiny_vit().train()
    x = randn(2, 3, 32, 32, dtype=torch.float32)
    out = forward_tokens(model, x)
    assert out.logits.shape == (2, 3) and out.last.requires_grad
    assert not model.blocks[0]._forward_pre_hooks and not model.blocks[-1]._forward_hooks
    with torch.no_grad():
        embed = model._pos_embed(model.patch_embed(x))[:, model.num_prefix_tokens :]
        (last,) = model.forward_intermediates(x, indices=[1], norm=False, intermediates_only=True)
    torch.testing.assert_close(out.first.detach(), embed)
    torch.testing.assert_close(out.last.detach(), last.flatten(2).transpose(1, 2))


# -- the package -------------------------------------------------------------------------------


def test_vitdiag_train_imports_no_cli_module():
    code = "import json, sys, vitdiag.train; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = [m for m in json.loads(out.stdout) if m.startswith(("vitdiag", "typer"))]
    assert "vitdiag.train" in loaded
    cli = ("vitdiag.cli", "vitdiag.commands", "vitdiag.options", "vitdiag.runner", "typer")
    assert [m for m in loaded if m.startswith(cli)] == []


def test_docs_training_loop_trains_two_steps_and_the_tracker_logs_both():
    out = subprocess.run(
        [sys.executable, "docs/train_loop.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["losses"]) == 2 and all(math.isfinite(v) for v in result["losses"])
    history = result["history"]
    assert [row["step"] for row in history] == [0, 1]
    for row in history:
        assert 0 <= row["similarity.last_block"] <= 1
        assert row["classifier.w_etf"] < 1e-6  # the installed head is a simplex ETF
    # The head is frozen, so its geometry is identical at both steps.
    assert history[0]["classifier.w_etf"] == history[1]["classifier.w_etf"]
