"""Pixel augmentations give the same 8-bit views on every CPU kernel set.

A view is a function of the image and the seed only: a kernel set may change float32 results
in their last bits, but an augmentation that rounds to pixels (or truncates a magnitude to
whole pixels) turns such a bit into a different image. TrivialAugment's magnitude bins did
(torch.linspace), so its Linv/Ldiv moved by 2e-4 under ATEN_CPU_CAPABILITY=default.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitdiag.augmentations import PortableTrivialAugmentWide, portable_linspace

ROOT = Path(__file__).resolve().parents[1]
# The hash of 64 seeded views of one fixture image, in a fresh process.
VIEWS = """
import hashlib, sys, numpy as np, torch
from PIL import Image
from vitdiag.augmentations import build_augmentation
image = Image.open(sys.argv[1]).convert("RGB").resize((32, 32))
digest = hashlib.sha256()
for name in ("trivialaugment", "randaugment", "autoaugment", "colorjitter", "rrc"):
    aug = build_augmentation(name, size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    for seed in range(64):
        torch.manual_seed(seed)
        import random; random.seed(seed); np.random.seed(seed)
        digest.update(aug.from_crop(image).numpy().tobytes())
print(digest.hexdigest())
"""


def _views_digest(capability: str | None) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    image = next((ROOT / "fixtures/data/val").rglob("*.jpg"))
    proc = subprocess.run(
        [sys.executable, "-c", VIEWS, str(image)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


@pytest.mark.slow
def test_pixel_views_are_the_same_under_the_scalar_kernels():
    assert _views_digest("default") == _views_digest(None)


def test_portable_linspace_equals_torch_where_torch_vectorises():
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("torch.linspace is not vectorised with AVX2/AVX-512 here")
    for start, end, steps in ((0.0, 0.99, 31), (0.0, 32.0, 31), (255.0, 0.0, 31), (0, 1, 7)):
        assert torch.equal(portable_linspace(start, end, steps), torch.linspace(start, end, steps))


def test_portable_linspace_keeps_the_end_points_and_the_spacing():
    values = portable_linspace(0.0, 0.99, 31).double()
    assert values[0] == 0.0 and values[-1] == torch.tensor(0.99, dtype=torch.float32).item()
    steps = values.diff()
    assert (steps - 0.99 / 30).abs().max() < 2 * 2.0**-24  # within one float32 ulp of 0.99
    assert torch.equal(portable_linspace(3.0, 3.0, 1), torch.tensor([3.0]))


def test_only_the_float_bins_change():
    from torchvision.transforms import TrivialAugmentWide

    ours = PortableTrivialAugmentWide()._augmentation_space(31)
    theirs = TrivialAugmentWide()._augmentation_space(31)
    assert ours.keys() == theirs.keys()
    for op, (magnitudes, signed) in ours.items():
        assert signed == theirs[op][1] and magnitudes.dtype == theirs[op][0].dtype, op
        assert torch.allclose(magnitudes.double(), theirs[op][0].double(), rtol=2.0**-23), op
