"""The augmentations of `vitdiag invariance`, each timm's or torchvision's own implementation.

Every augmentation maps a batch of *normalised* images (the engine's batch: the model's eval
transform, normalised with the model's mean/std) to one augmented view of the same shape.

Seeding contract (what makes a run reproducible and, for per-image augmentations, independent
of the batch size, the worker count and the number of processes): view ``v`` of the image with
index ``p`` in its source (for plain tensor batches, which carry no index, its place in the
stream, counted across batches) is what the underlying timm/torchvision transform produces when
Python's ``random``, NumPy's global generator and torch's generator (CPU, and the data's CUDA
device) are all seeded with ``view_seed(seed, name, p, v)`` just before it runs. The global
generators are restored afterwards, so nothing outside sees the reseeding.

Mixing augmentations (mixup, cutmix) are the exception: λ (and the cutmix box) follow the same
per-image rule, but the partner comes from the same batch by a seeded permutation (a random
cyclic order, so no image is its own partner), and the batch's composition depends on the batch
size. A batch with a single image has no partner; the probe skips it and says so.

Pixel-space augmentations (``PIXEL``: RandAugment, AutoAugment, TrivialAugment, colour jitter,
random-resized-crop) work on 8-bit PIL images, as in a timm training pipeline. They act on the
eval transform's 8-bit crop (resized and centre-cropped at the model's size, before ToTensor and
Normalize), so random-resized-crop crops from the centre crop. Through `vitdiag.data` loaders
they are made in the DataLoader workers (`WorkerViews`), straight from that crop, and handed
over as uint8. Given normalised tensors instead (`Augmentation.__call__`), they go through a
round trip: denormalise (x·std + mean), clamp to [0, 1], round to uint8, apply, divide by 255,
renormalise. For real images that is exact (the crop's own 8-bit values come back); synthetic
N(0, 1) data, mostly outside [0, 1], is clipped. Erasing and cutout work on the normalised
tensor, on the device, as timm applies random erasing.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torchvision.transforms import TrivialAugmentWide

from vitdiag.errors import VitdiagError

AUGMENTATIONS: tuple[str, ...] = (
    "mixup",
    "cutmix",
    "erasing-pixel",
    "erasing-const",
    "erasing-rand",
    "cutout",
    "randaugment",
    "autoaugment",
    "trivialaugment",
    "colorjitter",
    "rrc",
)
MIXING: frozenset[str] = frozenset({"mixup", "cutmix"})
# Those that work on 8-bit PIL images (the others work on the normalised tensor).
PIXEL: frozenset[str] = frozenset(
    {"randaugment", "autoaugment", "trivialaugment", "colorjitter", "rrc"}
)
DEFAULT_ALPHA: dict[str, float] = {"mixup": 0.8, "cutmix": 1.0}

# timm's DeiT/ViT training recipe (`--aa rand-m9-mstd0.5-inc1`) and the AutoAugment paper's
# ImageNet policy; timm 1.0.31 has no TrivialAugment, so torchvision's is used. The magnitude is
# clipped at 9 (`mmax9`): at 10, timm's increasing posterize asks for 0 bits, which recent
# Pillow refuses (ValueError), so an unlucky magnitude draw would abort the whole run.
RANDAUGMENT_CONFIG = "rand-m9-mstd0.5-inc1-mmax9"
AUTOAUGMENT_CONFIG = "original"
COLOR_JITTER = 0.4
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CUTOUT_FRACTION = 0.5  # box side / image side: DeVries & Taylor's 16 px on 32 px CIFAR images

_MASK63 = (1 << 63) - 1


def parse_augmentations(text: str | Sequence[str]) -> list[str]:
    """Comma-separated names (or a list) → validated names, order kept, duplicates dropped.

    ``all`` stands for every augmentation.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for item in items:
        name = item.strip().lower()
        if not name:
            continue
        if name == "all":
            names.extend(n for n in AUGMENTATIONS if n not in names)
            continue
        if name not in AUGMENTATIONS:
            raise VitdiagError(
                f"--aug {item.strip()!r} is not a known augmentation; choose from "
                f"{', '.join(AUGMENTATIONS)} (or all)."
            )
        if name not in names:
            names.append(name)
    if not names:
        raise VitdiagError(f"--aug needs at least one of {', '.join(AUGMENTATIONS)}.")
    return names


def parse_alpha(text: str | float | None) -> dict[str, float]:
    """``0.5`` (both mixup and cutmix) or ``mixup=0.8,cutmix=1.0`` → {name: α}, defaults filled."""
    alpha = dict(DEFAULT_ALPHA)
    if text is None:
        return alpha
    if isinstance(text, (int, float)):
        parts = [str(text)]
    else:
        parts = [p.strip() for p in text.split(",") if p.strip()]
    for part in parts:
        key, sep, value = part.partition("=")
        targets = [key.strip().lower()] if sep else list(MIXING)
        raw = value if sep else key
        if sep and targets[0] not in MIXING:
            raise VitdiagError(
                f"--alpha {part!r}: only mixup and cutmix take an α; write e.g. "
                "0.8 or mixup=0.8,cutmix=1.0."
            )
        try:
            a = float(raw)
        except ValueError:
            raise VitdiagError(
                f"--alpha {part!r} is not a number; write e.g. 0.8 or mixup=0.8,cutmix=1.0."
            ) from None
        if not a > 0 or not np.isfinite(a):
            raise VitdiagError(f"--alpha must be a positive number (Beta(α, α)), got {raw}.")
        for t in targets:
            alpha[t] = a
    return alpha


def view_seed(seed: int, name: str, position: int, view: int) -> int:
    """The 63-bit seed of view ``view`` of the image at stream ``position`` for ``name``."""
    entropy = [
        int(seed) & 0xFFFFFFFFFFFFFFFF,
        zlib.crc32(name.encode()),
        int(position),
        int(view),
    ]
    lo, hi = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return ((int(hi) << 32) | int(lo)) & _MASK63


@contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Seed Python, NumPy and torch (CPU and ``device`` when CUDA) with ``seed``; restore after."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# ---------------------------------------------------------------------------------------------
# the uint8 round trip


def to_pil(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
    """A normalised (3, H, W) tensor → 8-bit RGB PIL image (clamped to [0, 1], rounded)."""
    from PIL import Image

    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    x = image.detach().float().cpu() * s + m
    arr = x.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def normalise_uint8(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """8-bit images (..., 3, H, W) → normalised float32, bit for bit what the eval transform's
    ToTensor + Normalize give (divide by 255, subtract, divide), on whatever device they are."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return images.float().div(255).sub(m).div(s)


def from_pil(img: Any, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An 8-bit RGB PIL image → normalised (3, H, W) float32 tensor."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s


# ---------------------------------------------------------------------------------------------
# augmentations


class Augmentation:
    """One augmentation: ``aug(images, seed=, positions=, view=)`` → one view of the batch.

    ``images`` is (B, C, H, W) normalised; ``positions`` are the images' stream positions.
    Subclasses set ``name``, ``description`` and (for partner-needing ones) ``mixing``.
    """

    name: str = "augmentation"
    description: str = ""
    mixing: bool = False

    def __call__(
        self, images: torch.Tensor, *, seed: int, positions: Sequence[int], view: int
    ) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "implementation": self.description, "mixing": self.mixing}


class PerImageAugmentation(Augmentation):
    """Applies ``one(image)`` to each image under ``seeded(view_seed(...))``."""

    def __init__(
        self,
        name: str,
        fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        description: str = "",
        device: torch.device | str | None = None,
    ) -> None:
        self.name = name
        self.fn = fn
        self.description = description or name
        self.device = device

    def one(self, image: torch.Tensor) -> torch.Tensor:
        if self.fn is None:  # pragma: no cover - subclasses override one()
            raise NotImplementedError
        return self.fn(image)

    def __call__(
        self, images: torch.Tensor, *, seed: int, positions: Sequence[int], view: int
    ) -> torch.Tensor:
        out = []
        for image, pos in zip(images, positions, strict=True):
            with seeded(view_seed(seed, self.name, pos, view), self.device or images.device):
                out.append(self.one(image).to(images.device, images.dtype))
        return torch.stack(out)


class PixelAugmentation(PerImageAugmentation):
    """A PIL transform, run through the uint8 round trip (see the module docstring)."""

    def __init__(
        self,
        name: str,
        transform: Callable[[Any], Any],
        mean: Sequence[float],
        std: Sequence[float],
        description: str = "",
    ) -> None:
        super().__init__(name, None, description or repr(transform), torch.device("cpu"))
        self.transform = transform
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def one(self, image: torch.Tensor) -> torch.Tensor:
        return from_pil(self.transform(to_pil(image, self.mean, self.std)), self.mean, self.std)

    def from_crop(self, crop: Any) -> torch.Tensor:
        """One view of an 8-bit PIL crop, as a (3, H, W) uint8 tensor (`normalise_uint8` makes
        it the model's input): no round trip, the transform sees the crop's own pixels."""
        out = np.asarray(self.transform(crop).convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))

    def __call__(
        self, images: torch.Tensor, *, seed: int, positions: Sequence[int], view: int
    ) -> torch.Tensor:
        # PIL needs host memory: one copy of the batch rather than one per image.
        views = super().__call__(images.cpu(), seed=seed, positions=positions, view=view)
        return views.to(images.device, images.dtype)


def portable_linspace(start: float, end: float, steps: int) -> torch.Tensor:
    """`torch.linspace(start, end, steps)` in float32 with the same bits on every CPU.

    torch's vectorised kernel (AVX2, AVX-512) fuses ``start + step·i`` (and ``end − step·(n−1−i)``
    for the upper half) into one rounding; its scalar kernel (``ATEN_CPU_CAPABILITY=default``)
    rounds twice, so some bins differ in the last bit. Here the product and sum are exact in
    float64 (a float32 step times an integer below 2^24 fits in 53 bits) and rounded once to
    float32: the vectorised kernel's values, computed by IEEE arithmetic alone."""
    a, b = np.float32(start), np.float32(end)
    if steps == 1:
        return torch.tensor([a], dtype=torch.float32)
    step = np.float32((b - a) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    low = np.float64(a) + np.float64(step) * i
    high = np.float64(b) - np.float64(step) * (steps - 1 - i)
    values = np.where(i < steps // 2, low, high).astype(np.float32)
    return torch.from_numpy(values)


class PortableTrivialAugmentWide(TrivialAugmentWide):
    """torchvision's TrivialAugmentWide with magnitude bins that do not depend on the CPU.

    torchvision takes the bins from `torch.linspace`, whose scalar and vectorised kernels differ
    in the last bit (see `portable_linspace`); TranslateX then shifts by ``int(15.999999)`` or
    ``int(16.0)`` pixels, and under ``ATEN_CPU_CAPABILITY=default`` the fixtures' TrivialAugment
    Linv/Ldiv moved by 2e-4 where float32 noise is 1e-7. Every float bin is rebuilt from its
    end points with `portable_linspace`; the draws and the ops are torchvision's own."""

    def _augmentation_space(self, num_bins: int) -> dict[str, tuple[torch.Tensor, bool]]:
        space = super()._augmentation_space(num_bins)
        for op, (magnitudes, signed) in space.items():
            if magnitudes.ndim == 1 and magnitudes.is_floating_point() and len(magnitudes) > 1:
                ends = float(magnitudes[0]), float(magnitudes[-1])
                space[op] = (portable_linspace(*ends, len(magnitudes)), signed)
        return space


class ErasingAugmentation(PerImageAugmentation):
    """timm RandomErasing with probability 1, on the normalised image (as timm applies it)."""

    def __init__(self, mode: str, device: torch.device | str) -> None:
        from timm.data.random_erasing import RandomErasing

        device = torch.device(device)
        # timm's default device is 'cuda'; the fill must be made where the images are.
        self.erase = RandomErasing(probability=1.0, mode=mode, device=device)
        super().__init__(
            f"erasing-{mode}",
            None,
            f"timm.data.random_erasing.RandomErasing(probability=1.0, mode={mode!r}, "
            "min_area=0.02, max_area=1/3, min_aspect=0.3, max_count=1)",
            device,
        )

    def one(self, image: torch.Tensor) -> torch.Tensor:
        return self.erase(image.clone())


class CutoutAugmentation(PerImageAugmentation):
    """One square box of side ``fraction``·min(H, W), filled with 0 in the normalised space.

    vitdiag's own few lines (neither timm nor torchvision has Cutout): as in DeVries & Taylor's
    code, the centre is uniform over the image and the box is clipped at the border, and zero
    after normalisation is the normalisation mean's colour.
    """

    def __init__(self, fraction: float = CUTOUT_FRACTION) -> None:
        self.fraction = fraction
        super().__init__(
            "cutout",
            None,
            f"vitdiag Cutout: one square zero box (normalised space), side {fraction:g}·min(H, W), "
            "centre uniform over the image, clipped at the border",
        )

    def one(self, image: torch.Tensor) -> torch.Tensor:
        _, h, w = image.shape
        side = max(1, round(self.fraction * min(h, w)))
        cy, cx = random.randrange(h), random.randrange(w)
        y0, y1 = max(0, cy - side // 2), min(h, cy - side // 2 + side)
        x0, x1 = max(0, cx - side // 2), min(w, cx - side // 2 + side)
        out = image.clone()
        out[:, y0:y1, x0:x1] = 0
        return out


def partner_permutation(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation with no fixed point (n ≥ 2): a random cyclic order of the batch."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    partner = torch.empty(n, dtype=torch.int64)
    partner[order] = order.roll(-1)
    return partner


class MixAugmentation(Augmentation):
    """Mixup or CutMix with λ ~ Beta(α, α) drawn per image (timm Mixup's ``mode='elem'``).

    mixup: λ·x + (1−λ)·x_partner. cutmix: the box of timm's ``cutmix_bbox_and_lam`` (λ corrected
    for clipping) is pasted from the partner. Both are linear in the image, so doing them on the
    normalised batch equals doing them in pixel space and then normalising.
    """

    mixing = True

    def __init__(self, name: str, alpha: float) -> None:
        if name not in MIXING:
            raise ValueError(name)
        self.name = name
        self.alpha = float(alpha)
        how = (
            "λ·x + (1−λ)·x_partner"
            if name == "mixup"
            else "box from timm.data.mixup.cutmix_bbox_and_lam(correct_lam=True)"
        )
        self.description = (
            f"{name}: λ ~ Beta({self.alpha:g}, {self.alpha:g}) per image (numpy), {how}; "
            "partner = seeded cyclic permutation of the batch"
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "alpha": self.alpha}

    def __call__(
        self, images: torch.Tensor, *, seed: int, positions: Sequence[int], view: int
    ) -> torch.Tensor:
        from timm.data.mixup import cutmix_bbox_and_lam

        n = images.shape[0]
        if n < 2:
            raise ValueError("mixing needs at least two images in a batch")
        partner = partner_permutation(
            n, view_seed(seed, self.name + ":partner", positions[0], view)
        )
        out = images.clone()
        for i, pos in enumerate(positions):
            j = int(partner[i])
            with seeded(view_seed(seed, self.name, pos, view)):
                lam = float(np.random.beta(self.alpha, self.alpha))
                if self.name == "cutmix":
                    (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(images.shape, lam)
            if self.name == "mixup":
                out[i] = lam * images[i] + (1.0 - lam) * images[j]
            else:
                out[i, :, yl:yh, xl:xh] = images[j, :, yl:yh, xl:xh]
        return out


def build_augmentation(
    name: str,
    *,
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    device: torch.device | str = "cpu",
    alpha: dict[str, float] | None = None,
) -> Augmentation:
    """The augmentation ``name`` (one of ``AUGMENTATIONS``) for images of ``size``."""
    from timm.data.transforms import str_to_pil_interp

    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    alpha = {**DEFAULT_ALPHA, **(alpha or {})}
    interpolation = interpolation or "bicubic"
    if name in MIXING:
        return MixAugmentation(name, alpha[name])
    if name.startswith("erasing-"):
        return ErasingAugmentation(name.split("-", 1)[1], device)
    if name == "cutout":
        return CutoutAugmentation()
    if name in ("randaugment", "autoaugment"):
        from timm.data.auto_augment import auto_augment_transform, rand_augment_transform

        # The hyper-parameters timm's create_transform passes (transforms_factory.py).
        hparams = dict(
            translate_const=int(min(h, w) * 0.45),
            img_mean=tuple(min(255, round(255 * m)) for m in mean),
            interpolation=str_to_pil_interp(interpolation),
        )
        if name == "randaugment":
            t = rand_augment_transform(RANDAUGMENT_CONFIG, hparams)
            desc = f"timm rand_augment_transform({RANDAUGMENT_CONFIG!r})"
        else:
            t = auto_augment_transform(AUTOAUGMENT_CONFIG, hparams)
            desc = f"timm auto_augment_transform({AUTOAUGMENT_CONFIG!r})"
        return PixelAugmentation(name, t, mean, std, desc)
    if name == "trivialaugment":
        # Described as torchvision's: the ops, draws and (on AVX2/AVX-512) bins are its own.
        return PixelAugmentation(
            name, PortableTrivialAugmentWide(), mean, std, "torchvision TrivialAugmentWide()"
        )
    if name == "colorjitter":
        from torchvision.transforms import ColorJitter

        j = COLOR_JITTER
        return PixelAugmentation(
            name,
            ColorJitter(brightness=j, contrast=j, saturation=j),
            mean,
            std,
            f"torchvision ColorJitter(brightness={j}, contrast={j}, saturation={j}) "
            "(timm's --color-jitter 0.4)",
        )
    if name == "rrc":
        from timm.data.transforms import RandomResizedCropAndInterpolation

        t = RandomResizedCropAndInterpolation(
            (h, w), scale=RRC_SCALE, ratio=RRC_RATIO, interpolation=interpolation
        )
        return PixelAugmentation(
            name,
            t,
            mean,
            std,
            f"timm RandomResizedCropAndInterpolation(({h}, {w}), scale={RRC_SCALE}, "
            f"ratio=(3/4, 4/3), interpolation={interpolation!r}) of the eval centre crop",
        )
    raise VitdiagError(
        f"{name!r} is not a known augmentation; choose from {', '.join(AUGMENTATIONS)}."
    )


class WorkerViews:
    """The views of pixel-space augmentations, made in the DataLoader workers.

    A loader ``views`` maker (`vitdiag.data.ViewMaker`): for each image it returns, per
    augmentation, ``views`` views stacked (V, 3, H, W), each the library transform applied to the
    eval transform's 8-bit crop under ``seeded(view_seed(seed, name, index, v))`` with ``index``
    the image's index in its source, so the views depend on neither the worker count, the batch
    size nor the number of processes. Views of real images are uint8 (4× less to hand over and
    copy to the device than float; `normalise_uint8` finishes them); a synthetic source has no
    8-bit image, so its views go through the uint8 round trip and come back normalised.
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        views: int,
        seed: int,
        size: int | tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        prefix: str = "",
    ) -> None:
        self.names = list(names)
        self.views = views
        self.seed = seed
        self.prefix = prefix
        self.augs = {
            name: build_augmentation(
                name, size=size, mean=mean, std=std, interpolation=interpolation
            )
            for name in self.names
        }
        if not all(isinstance(a, PixelAugmentation) for a in self.augs.values()):
            raise ValueError(f"only pixel-space augmentations are made in workers: {names}")

    def key(self, name: str) -> str:
        """Where the views of ``name`` are in a batch's ``views``."""
        return self.prefix + name

    def __call__(
        self, image: Any, crop: Any, clean: torch.Tensor, index: int
    ) -> dict[str, torch.Tensor]:
        out = {}
        for name, aug in self.augs.items():
            assert isinstance(aug, PixelAugmentation)
            views = []
            for v in range(self.views):
                with seeded(view_seed(self.seed, name, index, v)):
                    views.append(aug.one(clean) if crop is None else aug.from_crop(crop))
            out[self.key(name)] = torch.stack(views)
        return out
