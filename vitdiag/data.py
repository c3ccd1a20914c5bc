"""Dataset sources, the model's evaluation transform at a size, and loaders.

Sources (``open_dataset``):

- an ImageFolder directory: two or more class sub-folders; labels are the sorted folder names
  (plain ``sorted``, as torchvision does);
- a flat folder of images (or a folder with a single sub-folder): unlabelled, targets -1;
- a ``.tar`` of images: labelled by the member's parent folder when there are two or more distinct
  parents, else unlabelled;
- timm ``create_dataset`` sources with random access: ``torch/NAME:ROOT`` (torchvision datasets,
  never downloaded) and ``hfds/NAME[:CACHE_DIR]`` (needs the ``datasets`` package);
- ``synthetic`` / ``synthetic:N``: i.i.d. N(0, 1) images in the *normalised* space, seeded per
  index, so a run is reproducible whatever the batch size, worker count or sharding.

Policies worth knowing:

- Alpha is dropped, not composited (RGBA / LA / PA / palette with transparency keep the colour
  stored under each pixel). This is what timm's ``ImageDataset`` and torchvision's ``pil_loader``
  do (``convert("RGB")``), so vitdiag sees the same pixels as ``timm validate.py``. 16-bit
  grayscale is scaled to 8 bits (PIL alone would clip everything above 255 to white).
- Unreadable files are skipped and counted per ``Batch``; a batch whose every item failed is not
  yielded, its count is carried into a neighbouring batch, so the counts still sum exactly. With
  ``strict=True`` the first unreadable file (in loader order) raises ``UnreadableImageError``
  naming it. A loader that reaches its end having yielded nothing because every image failed
  raises ``VitdiagError``: checking up front would mean decoding the whole dataset twice.
- Synthetic images need a size: ``eval_transform`` returns an ``EvalTransform`` that carries its
  output ``size``, and ``make_loader`` takes the size from it (falling back to ``source.size``
  when a plain callable is passed). The transform itself is skipped for synthetic sources.
"""

from __future__ import annotations

import importlib.util
import math
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import timm.data
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vitdiag.errors import VitdiagError

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
)
_EXT_TEXT = ", ".join(IMAGE_EXTENSIONS)
_SPLIT_SYNONYMS = {
    "train": ("train", "training"),
    "training": ("training", "train"),
    "val": ("val", "valid", "validation", "eval", "evaluation"),
    "valid": ("valid", "val", "validation", "eval", "evaluation"),
    "validation": ("validation", "val", "valid", "eval", "evaluation"),
    "eval": ("eval", "evaluation", "val", "valid", "validation"),
    "evaluation": ("evaluation", "eval", "val", "valid", "validation"),
    "test": ("test", "testing"),
    "testing": ("testing", "test"),
}
_SPLIT_NAMES = frozenset(_SPLIT_SYNONYMS)
_COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_TORCH_NAMES = (
    "cifar10",
    "cifar100",
    "mnist",
    "kmnist",
    "fashion_mnist",
    "qmnist",
    "imagenet",
    "places365",
    "inaturalist",
    "inat",
    "image_folder",
    "folder",
)
_STREAMING_PREFIXES = ("hfids", "tfds", "wds")
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
_CROP_MODES = ("center", "squash", "border")


class UnreadableImageError(VitdiagError):
    """An image file that PIL cannot decode (raised only for ``strict`` sources)."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(
            f"Cannot read image {name} ({reason}); fix or remove the file, "
            "or run without --strict to skip unreadable images."
        )


def _short(exc: BaseException) -> str:
    # Library messages can span lines (tarfile lists every method it tried); keep one line.
    text = str(exc).strip().splitlines()
    first = text[0].rstrip(":") if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _is_hidden(name: str) -> bool:
    return name.startswith(".") and name not in (".", "..")


def _is_image_name(name: str) -> bool:
    return not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------
# decoding


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode ``img`` fully and return it as 8-bit RGB (alpha dropped, 16-bit scaled)."""
    # PIL opens lazily: without load() a truncated file only fails later, inside a transform.
    img.load()
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "I" or mode.startswith("I;16"):
        # 16-bit PNG/TIFF open as "I;16" (older Pillow: "I"); convert("RGB") would clip at 255.
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        # Float images (TIFF) hold fractions in [0, 1] by convention; convert("RGB") would
        # clip those to black. Values beyond 1 are taken as already on the 0-255 scale.
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        # Going through RGBA avoids PIL's transparency warning; the colours are the same.
        return img.convert("RGBA").convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:
        # Modes without a direct RGB conversion (e.g. "PA") have one via RGBA.
        return img.convert("RGBA").convert("RGB")


def _decode(fp: Any) -> Image.Image:
    with Image.open(fp) as img:
        rgb = to_rgb(img)
        # convert() returns a new image for every mode but RGB; copy so closing `img` is safe.
        return rgb.copy() if rgb is img else rgb


# ---------------------------------------------------------------------------------------------
# sources


class ImageSource(Dataset):
    """A random-access collection of images with optional labels.

    ``source[i]`` returns ``(PIL RGB image, target)`` (``target`` -1 when unlabelled); for a
    synthetic source it returns a ``(3, H, W)`` float tensor at ``source.size``. An unreadable
    image raises ``UnreadableImageError``.
    """

    kind: str = ""
    classes: list[str] | None = None
    labelled: bool = False
    synthetic: bool = False

    def __init__(self, source: str, *, strict: bool = False, split: str | None = None) -> None:
        self.source = source
        self.strict = strict
        self.split = split
        # Set by make_loader so describe() records how the data was sampled.
        self.limit: int | None = None
        self.seed: int | None = None
        self.size: tuple[int, int] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, index: int) -> str:
        """Where image ``index`` comes from, for messages (a path, a tar member, ``src[i]``)."""
        return f"{self.source}[{index}]"

    def _read(self, index: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Image.Image | torch.Tensor, int]:
        try:
            return self._read(index)
        except VitdiagError:
            raise
        except Exception as exc:  # decoders raise many types on bad bytes; all mean unreadable
            raise UnreadableImageError(self.name(index), _short(exc)) from exc

    def describe(self) -> dict[str, Any]:
        """JSON-able provenance of the data."""
        return {
            "source": self.source,
            "kind": self.kind,
            "split": self.split,
            "n_images": len(self),
            "classes": list(self.classes) if self.classes is not None else None,
            "n_classes": len(self.classes) if self.classes is not None else None,
            "labelled": self.labelled,
            "synthetic": self.synthetic,
            "strict": self.strict,
            "limit": self.limit,
            "seed": self.seed,
        }


def _paths(given: str, path: Path, split: str | None) -> dict[str, str]:
    """The path as the user spelled it (reports are shared: no home or temp folders in them)
    and, for provenance, the absolute one."""
    shown = os.path.join(given, path.name) if split and path.name != Path(given).name else given
    return {"path": shown, "resolved_path": str(path.resolve())}


class _FileSource(ImageSource):
    def __init__(
        self,
        source: str,
        root: Path,
        files: list[str],
        targets: list[int],
        classes: list[str] | None,
        *,
        strict: bool,
        split: str | None,
    ) -> None:
        super().__init__(source, strict=strict, split=split)
        self.root = root
        self.files = files  # relative to root, so the object pickles small to workers
        self.targets = targets
        self.classes = classes
        self.labelled = classes is not None
        self.kind = "imagefolder" if self.labelled else "flat"

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **_paths(self.source, self.root, self.split)}

    def name(self, index: int) -> str:
        return str(self.root / self.files[index])

    def _read(self, index: int) -> tuple[Image.Image, int]:
        return _decode(self.root / self.files[index]), self.targets[index]


class _TarSource(ImageSource):
    kind = "tar"

    def __init__(
        self,
        source: str,
        path: Path,
        members: list[tarfile.TarInfo],
        targets: list[int],
        classes: list[str] | None,
        *,
        strict: bool,
    ) -> None:
        super().__init__(source, strict=strict)
        self.path = path
        self.members = members
        self.targets = targets
        self.classes = classes
        self.labelled = classes is not None
        self._tar: tarfile.TarFile | None = None
        self._tar_pid: int | None = None

    def __len__(self) -> int:
        return len(self.members)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **_paths(self.source, self.path, None)}

    def name(self, index: int) -> str:
        return f"{self.path}:{self.members[index].name}"

    def _handle(self) -> tarfile.TarFile:
        # One handle per process: forked workers would otherwise share one file offset.
        if self._tar is None or self._tar_pid != os.getpid():
            self._tar = tarfile.open(self.path, "r:")  # noqa: SIM115 - kept open for reuse
            self._tar_pid = os.getpid()
        return self._tar

    def _read(self, index: int) -> tuple[Image.Image, int]:
        fobj = self._handle().extractfile(self.members[index])
        if fobj is None:
            raise OSError("not a regular file")
        return _decode(BytesIO(fobj.read())), self.targets[index]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tar"] = None
        state["_tar_pid"] = None
        return state

    def __del__(self) -> None:
        # getattr: __del__ also runs on objects whose __init__ did not finish.
        tar = getattr(self, "_tar", None)
        if tar is not None and getattr(self, "_tar_pid", None) == os.getpid():
            tar.close()


class _TimmSource(ImageSource):
    kind = "timm"

    def __init__(self, source: str, dataset: Any, *, strict: bool, split: str | None) -> None:
        super().__init__(source, strict=strict, split=split)
        self.dataset = dataset
        reader = getattr(dataset, "reader", None)
        self._reader = reader  # timm ImageDataset: read raw bytes, decode with vitdiag's policy
        classes = None
        if reader is not None and getattr(reader, "class_to_idx", None):
            c2i = reader.class_to_idx
            classes = [str(c) for c, _ in sorted(c2i.items(), key=lambda kv: kv[1])]
        elif getattr(dataset, "classes", None) is not None:
            classes = [c if isinstance(c, str) else str(c[0]) for c in dataset.classes]
        self.classes = classes
        self.labelled = True

    def __len__(self) -> int:
        return len(self.dataset)

    def name(self, index: int) -> str:
        samples = getattr(self.dataset, "samples", None)
        if isinstance(samples, list) and index < len(samples):
            return str(samples[index][0])
        return f"{self.source}[{index}]"

    def _read(self, index: int) -> tuple[Image.Image, int]:
        if self._reader is not None:
            fobj, target = self._reader[index][:2]
            try:
                img = _decode(fobj)
            finally:
                close = getattr(fobj, "close", None)
                if close is not None:
                    close()
        else:
            img, target = self.dataset[index][:2]
            img = to_rgb(img) if isinstance(img, Image.Image) else img
        return img, -1 if target is None else int(target)


class _SyntheticSource(ImageSource):
    kind = "synthetic"
    synthetic = True

    def __init__(self, source: str, count: int, seed: int) -> None:
        super().__init__(source)
        self.count = count
        self.image_seed = seed
        self.seed = seed

    def __len__(self) -> int:
        return self.count

    def tensor(self, index: int, size: tuple[int, int]) -> torch.Tensor:
        """Image ``index`` as a (3, H, W) float32 tensor; depends only on (seed, index, size)."""
        if not 0 <= index < self.count:
            raise IndexError(index)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.image_seed, index])))
        arr = rng.standard_normal((3, size[0], size[1]), dtype=np.float32)
        return torch.from_numpy(arr)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.size is None:
            raise ValueError("set source.size = (h, w) (make_loader does) before indexing")
        return self.tensor(index, self.size), -1

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["seed"] = self.image_seed
        out["size"] = list(self.size) if self.size is not None else None
        out["distribution"] = "i.i.d. N(0,1) per pixel in the normalised space"
        return out


# ---------------------------------------------------------------------------------------------
# open_dataset


def _parse_synthetic(text: str, default_count: int, seed: int) -> _SyntheticSource | None:
    head, sep, tail = text.partition(":")
    if head.strip().lower() != "synthetic":
        return None
    count = default_count
    if sep:
        try:
            count = int(tail)
        except ValueError:
            count = 0
    if count <= 0:
        raise VitdiagError(
            f"Dataset {text!r} needs a positive image count; write 'synthetic' or 'synthetic:N' "
            "with N ≥ 1."
        )
    return _SyntheticSource(f"synthetic:{count}", count, seed)


def _open_timm(text: str, *, strict: bool, split: str | None) -> _TimmSource | None:
    prefix, sep, rest = text.partition("/")
    prefix = prefix.lower()
    if not sep or prefix not in ("torch", "hfds", *_STREAMING_PREFIXES):
        return None
    if prefix in _STREAMING_PREFIXES:
        raise VitdiagError(
            f"Dataset {text!r} is a streaming ({prefix}/) source, which vitdiag does not support "
            "(seeded subsets and exact sharding need random access); use hfds/ or an image folder."
        )
    name, _, root = rest.partition(":")
    if not name:
        raise VitdiagError(f"Dataset {text!r} has no dataset name; write {prefix}/NAME:ROOT.")
    if prefix == "torch":
        if name.lower() not in _TORCH_NAMES:
            raise VitdiagError(
                f"Dataset {text!r} names an unknown torchvision dataset {name!r}; known: "
                f"{', '.join(_TORCH_NAMES)}."
            )
        if not root:
            raise VitdiagError(
                f"Dataset {text!r} needs the folder holding the data; write torch/{name}:ROOT."
            )
    if prefix == "hfds" and importlib.util.find_spec("datasets") is None:
        raise VitdiagError(
            f"Dataset {text!r} needs the Hugging Face 'datasets' package; "
            "install it with `pip install datasets`."
        )
    if root and not Path(root).exists():
        raise VitdiagError(
            f"Dataset root {root} (from {text!r}) does not exist; check the path "
            "(vitdiag never downloads datasets)."
        )
    try:
        ds = timm.data.create_dataset(
            f"{prefix}/{name}", root=root or None, split=split or "validation", download=False
        )
    except Exception as exc:  # timm/torchvision/datasets raise assert, runtime and I/O errors
        raise VitdiagError(
            f"Could not open dataset {text!r} ({_short(exc)}); check the name and root, "
            "and download the data beforehand (vitdiag never downloads)."
        ) from exc
    return _TimmSource(text, ds, strict=strict, split=split or "validation")


def _walk_images(top: Path) -> list[str]:
    """Image files under ``top`` (recursively, hidden entries skipped), sorted, relative."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        rel = os.path.relpath(dirpath, top)
        for f in sorted(filenames):
            if _is_image_name(f):
                found.append(f if rel == "." else os.path.join(rel, f))
    return sorted(found)


def _resolve_split(root: Path, split: str) -> Path:
    candidates = _SPLIT_SYNONYMS.get(split.lower(), (split,))
    for cand in (split, *candidates):
        if (root / cand).is_dir():
            return root / cand
    raise VitdiagError(
        f"Dataset folder {root} has no {split!r} split folder (looked for "
        f"{', '.join(dict.fromkeys((split, *candidates)))}); check --split or point at the folder."
    )


def _open_dir(text: str, root: Path, *, strict: bool, split: str | None) -> _FileSource:
    if split:
        root = _resolve_split(root, split)
    entries = [e for e in os.scandir(root) if not _is_hidden(e.name)]
    if not entries:
        raise VitdiagError(
            f"Dataset folder {root} is empty; put images ({_EXT_TEXT}) in it, "
            "or one sub-folder of images per class."
        )
    loose = sorted(e.name for e in entries if e.is_file() and _is_image_name(e.name))
    subdirs = sorted(e.name for e in entries if e.is_dir())
    per_class = {d: _walk_images(root / d) for d in subdirs}
    per_class = {d: files for d, files in per_class.items() if files}

    if not loose and not per_class:
        raise VitdiagError(
            f"Dataset folder {root} contains no images; accepted extensions are {_EXT_TEXT} "
            "(case-insensitive), in the folder itself or in one sub-folder per class."
        )
    # train/ and val/ holding class folders would otherwise become two "classes".
    if (
        not split
        and per_class
        and all(d.lower() in _SPLIT_NAMES for d in per_class)
        and any(any(os.sep in f for f in files) for files in per_class.values())
    ):
        raise VitdiagError(
            f"Dataset folder {root} holds split folders ({', '.join(per_class)}) rather than "
            f"classes; pass --split {next(iter(per_class))} or point at one split's folder."
        )
    if len(per_class) >= 2:
        if loose:
            raise VitdiagError(
                f"Dataset folder {root} mixes {len(per_class)} class folders with {len(loose)} "
                f"loose images (e.g. {loose[0]}); move the loose images into a class folder "
                "or remove them."
            )
        classes = sorted(per_class)
        files = [os.path.join(c, f) for c in classes for f in per_class[c]]
        targets = [i for i, c in enumerate(classes) for _ in per_class[c]]
        return _FileSource(text, root, files, targets, classes, strict=strict, split=split)
    # A single sub-folder is a wrapper (e.g. "images/"), not a one-class labelling: same rule
    # as for tars, so that accuracy is never computed against a meaningless class 0.
    files = _walk_images(root)
    return _FileSource(text, root, files, [-1] * len(files), None, strict=strict, split=split)


def _open_tar(text: str, path: Path, *, strict: bool, split: str | None) -> _TarSource:
    if split:
        raise VitdiagError(
            f"--split does not apply to the tar archive {path}; pack one split per .tar "
            "and pass that file."
        )
    try:
        with tarfile.open(path, "r:") as tf:
            all_members = tf.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise VitdiagError(
            f"Dataset {path} is not a readable uncompressed tar archive ({_short(exc)}); "
            "re-create it with `tar -cf` (decompress .tar.gz first)."
        ) from exc
    members: list[tarfile.TarInfo] = []
    parents: list[str] = []
    for ti in all_members:
        if not ti.isfile():
            continue
        parts = [p for p in ti.name.split("/") if p not in ("", ".")]
        if not parts or any(_is_hidden(p) for p in parts) or not _is_image_name(parts[-1]):
            continue
        members.append(ti)
        parents.append("/".join(parts[:-1]))
    if not members:
        raise VitdiagError(
            f"Tar archive {path} contains no images; accepted extensions are {_EXT_TEXT} "
            "(hidden members are ignored)."
        )
    order = sorted(range(len(members)), key=lambda i: members[i].name)
    members = [members[i] for i in order]
    parents = [parents[i] for i in order]
    distinct = sorted(set(parents))
    if len(distinct) < 2:
        return _TarSource(text, path, members, [-1] * len(members), None, strict=strict)
    # Show the folder name; fall back to the full parent path when two folders share a name.
    short = {p: p.rsplit("/", 1)[-1] for p in distinct}
    label = short if len(set(short.values())) == len(distinct) else {p: p for p in distinct}
    classes = sorted(set(label.values()))
    index = {c: i for i, c in enumerate(classes)}
    targets = [index[label[p]] for p in parents]
    return _TarSource(text, path, members, targets, classes, strict=strict)


def open_dataset(
    source: str | Path,
    *,
    strict: bool = False,
    split: str | None = None,
    synthetic_count: int = 256,
    seed: int = 0,
) -> ImageSource:
    """Open a dataset: a folder, a ``.tar``, ``torch/NAME:ROOT``, ``hfds/NAME``, ``synthetic[:N]``.

    ``split`` picks a split sub-folder (``val`` also finds ``valid``/``validation``...) or the
    split of a timm source (default ``validation``). ``seed`` seeds synthetic pixels.
    Raises ``VitdiagError`` with the path and the fix for every bad input.
    """
    text = str(source)
    if isinstance(source, str):
        synth = _parse_synthetic(text, synthetic_count, seed)
        if synth is not None:
            return synth
    path = Path(source).expanduser()
    if isinstance(source, str) and not path.exists():
        timm_source = _open_timm(text, strict=strict, split=split)
        if timm_source is not None:
            return timm_source
    if not path.exists():
        raise VitdiagError(
            f"Dataset path {path} does not exist; give an image folder, a .tar of images, "
            "'synthetic[:N]', torch/NAME:ROOT or hfds/NAME."
        )
    if path.is_dir():
        return _open_dir(text, path, strict=strict, split=split)
    lower = path.name.lower()
    if lower.endswith(".tar"):
        return _open_tar(text, path, strict=strict, split=split)
    if lower.endswith(_COMPRESSED_TAR):
        raise VitdiagError(
            f"Dataset {path} is a compressed tar, which cannot be read image by image; "
            "decompress it to a plain .tar first."
        )
    if _is_image_name(path.name):
        raise VitdiagError(
            f"Dataset {path} is a single image; put it (and others) in a folder and pass "
            "the folder."
        )
    raise VitdiagError(
        f"Dataset {path} is neither a folder, a .tar of images, nor a known source; give an "
        "image folder, a .tar, 'synthetic[:N]', torch/NAME:ROOT or hfds/NAME."
    )


# ---------------------------------------------------------------------------------------------
# transforms


class EvalTransform:
    """timm's evaluation transform, plus the settings it was built from.

    Calling it is exactly calling ``timm.data.create_transform(is_training=False, ...)``; the
    extra attributes let loaders know the output ``size`` (synthetic data needs it) and let
    results record the preprocessing (``config``).
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], config: dict) -> None:
        self.transform = transform
        self.config = config
        self.size: tuple[int, int] = tuple(config["input_size"][1:])  # type: ignore[assignment]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transform(img)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, {self.transform!r})"


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    vals = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        raise VitdiagError(f"--{what} must be 1 or 3 finite numbers, got {value!r}.")
    return (vals[0], vals[1], vals[2])


def eval_transform(
    data_config: dict,
    size: int | tuple[int, int] | None = None,
    *,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
) -> EvalTransform:
    """The model's own evaluation transform (timm ``data_config``) at ``size``, each overridable.

    ``size`` is an int (square) or ``(height, width)``; None keeps ``data_config['input_size']``.
    """
    if crop_pct is not None and not (math.isfinite(crop_pct) and 0 < crop_pct <= 1):
        # Checked here, not only in the CLI: 0 used to fall through to the default silently.
        raise VitdiagError(
            f"--crop-pct must be a fraction in (0, 1], e.g. 0.875 or 1 for no crop, got {crop_pct}."
        )
    cfg = dict(data_config)
    if size is None:
        if "input_size" not in cfg:
            raise ValueError("data_config has no input_size and no size was given")
        h, w = (int(v) for v in cfg["input_size"][-2:])
    elif isinstance(size, int):
        h = w = size
    else:
        h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise VitdiagError(f"Image size must be positive, got {size!r}; pass --size N or H,W.")
    channels = int(cfg["input_size"][0]) if cfg.get("input_size") else 3
    cfg["input_size"] = (channels, h, w)
    for key, value in (
        ("mean", mean),
        ("std", std),
        ("interpolation", interpolation),
        ("crop_pct", crop_pct),
        ("crop_mode", crop_mode),
    ):
        if value is not None:
            cfg[key] = value
    cfg["mean"] = _triple(cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN), "mean")
    cfg["std"] = _triple(cfg.get("std", timm.data.IMAGENET_DEFAULT_STD), "std")
    if any(s <= 0 for s in cfg["std"]):
        raise VitdiagError(f"--std must be positive, got {cfg['std']}.")
    cfg["interpolation"] = cfg.get("interpolation") or "bicubic"
    if cfg["interpolation"] not in _INTERPOLATIONS:
        raise VitdiagError(
            f"--interpolation {cfg['interpolation']!r} is not one of {', '.join(_INTERPOLATIONS)}."
        )
    cfg["crop_pct"] = float(cfg.get("crop_pct") or timm.data.DEFAULT_CROP_PCT)
    if not cfg["crop_pct"] > 0:
        raise VitdiagError(f"--crop-pct must be positive, got {cfg['crop_pct']}.")
    cfg["crop_mode"] = cfg.get("crop_mode") or timm.data.DEFAULT_CROP_MODE
    if cfg["crop_mode"] not in _CROP_MODES:
        raise VitdiagError(
            f"--crop-mode {cfg['crop_mode']!r} is not one of {', '.join(_CROP_MODES)}."
        )
    transform = timm.data.create_transform(
        input_size=cfg["input_size"],
        is_training=False,
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg["crop_mode"],
    )
    config = {
        k: cfg[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    }
    return EvalTransform(transform, config)


# ---------------------------------------------------------------------------------------------
# loading


@dataclass
class Batch:
    """One batch: images that decoded, their targets (-1 unlabelled), and what was skipped.

    ``n_unreadable`` counts the files skipped since the previous yielded batch (including those of
    wholly unreadable batches, which are not yielded), so summing it over batches gives the exact
    total. ``indices`` are the source indices of ``images``.
    """

    images: torch.Tensor
    targets: torch.Tensor
    n_unreadable: int = 0
    indices: torch.Tensor | None = None
    unreadable: list[str] = field(default_factory=list)


# (image or None when unreadable, target, source index, (name, reason) when unreadable)
_Item = tuple[torch.Tensor | None, int, int, tuple[str, str] | None]


class _Selection(Dataset):
    """The (limited, sharded) view a loader reads; failures come back as values, not raises."""

    def __init__(
        self,
        source: ImageSource,
        indices: list[int],
        transform: Callable | None,
        size: tuple[int, int] | None,
    ) -> None:
        self.source = source
        self.indices = indices
        self.transform = transform
        self.size = size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> _Item:
        index = self.indices[k]
        if isinstance(self.source, _SyntheticSource):
            assert self.size is not None
            return self.source.tensor(index, self.size), -1, index, None
        try:
            img, target = self.source[index]
            tensor = self.transform(img) if self.transform is not None else img
        except UnreadableImageError as exc:
            # Returned, not raised: a raise inside a worker would reach the user wrapped in a
            # multi-line DataLoader traceback, and non-strict runs must go on.
            return None, -1, index, (exc.name, exc.reason)
        return tensor, target, index, None


def _collate(
    items: list[_Item],
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    good = [it for it in items if it[0] is not None]
    failed = [it[3] for it in items if it[3] is not None]
    images = torch.stack([it[0] for it in good]) if good else None
    targets = torch.tensor([it[1] for it in good], dtype=torch.int64)
    indices = torch.tensor([it[2] for it in good], dtype=torch.int64)
    return images, targets, indices, failed  # type: ignore[return-value]


def select_indices(
    n: int,
    *,
    limit: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = False,
    prefix: bool = False,
    targets: list[int] | None = None,
    per_class: int | None = None,
) -> list[int]:
    """Indices a loader reads: seeded shuffle then first ``limit`` (or a prefix), then shard.

    Shards are strided (``rank::world_size``): disjoint, no padding, union = the whole list.
    """
    if limit is not None and limit <= 0:
        raise VitdiagError(f"--limit must be a positive number of images, got {limit}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if per_class is not None:
        # A stated per-class subsample: the first `per_class` of each class in a seeded shuffle.
        if per_class <= 0:
            raise VitdiagError(f"--per-class must be a positive number, got {per_class}.")
        if targets is None:
            raise VitdiagError("--per-class needs labelled data (an ImageFolder or labelled tar).")
        gen = torch.Generator().manual_seed(seed)
        taken: dict[int, int] = {}
        order = []
        for i in torch.randperm(n, generator=gen).tolist():
            if taken.get(targets[i], 0) < per_class:
                taken[targets[i]] = taken.get(targets[i], 0) + 1
                order.append(i)
        if limit is not None:
            order = order[:limit]
        return order[rank::world_size]
    if prefix:
        order = list(range(n if limit is None else min(limit, n)))
    elif limit is not None or shuffle:
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=gen).tolist()
        if limit is not None:
            order = order[:limit]
    else:
        order = list(range(n))
    return order[rank::world_size]


class Loader:
    """A re-iterable stream of ``Batch``; ``len()`` is the number of underlying loader batches
    (an upper bound on what is yielded, since wholly unreadable batches are merged away)."""

    def __init__(self, source: ImageSource, selection: _Selection, loader: DataLoader) -> None:
        self.source = source
        self.indices = selection.indices
        self._loader = loader

    def __len__(self) -> int:
        return len(self._loader)

    @property
    def n_images(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Batch]:
        held: Batch | None = None
        pending: list[tuple[str, str]] = []
        for images, targets, indices, failed in self._loader:
            if failed and self.source.strict:
                raise UnreadableImageError(*failed[0])
            pending.extend(failed)
            if images is None:
                continue
            batch = Batch(images, targets, len(pending), indices, [name for name, _ in pending])
            pending = []
            if held is not None:
                yield held
            held = batch
        if held is not None:
            # Trailing failures join the last batch so every skipped file is counted once.
            held.n_unreadable += len(pending)
            held.unreadable.extend(name for name, _ in pending)
            yield held
        elif pending:
            name, reason = pending[0]
            what = "The only image" if len(pending) == 1 else f"All {len(pending)} images"
            raise VitdiagError(
                f"{what} read from {self.source.source} could not be decoded "
                f"(first: {name}, {reason}); check that they are valid image files."
            )


def make_loader(
    source: ImageSource,
    transform: Callable | None,
    *,
    batch_size: int = 64,
    workers: int = 0,
    limit: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    shuffle: bool = False,
    per_class: int | None = None,
) -> Loader:
    """Batches of transformed images from ``source``.

    ``limit`` takes the first ``limit`` images of a ``seed``-ed shuffle (a fair sample of all
    classes; for synthetic data simply the first ``limit``); without it the order is the
    source's own (sorted) order, or a seeded shuffle with ``shuffle=True``. ``rank`` /
    ``world_size`` take a strided shard of that list with no padding, so sums over ranks equal
    the single-process sums. For synthetic sources the transform is not applied; the size
    comes from ``transform.size`` (an ``EvalTransform``) or else ``source.size``.
    Also records ``limit`` and ``seed`` on the source for ``describe()``.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise VitdiagError(f"--batch-size must be a positive integer, got {batch_size}.")
    if workers < 0:
        raise VitdiagError(f"--workers must be 0 or more, got {workers}.")
    if transform is None and not source.synthetic:
        raise ValueError("a transform is needed to turn images into tensors (see eval_transform)")
    size: tuple[int, int] | None = None
    if source.synthetic:
        size = getattr(transform, "size", None) or source.size
        if size is None:
            raise ValueError(
                "synthetic data needs a size: pass an EvalTransform or set source.size"
            )
        size = (int(size[0]), int(size[1]))
        source.size = size
    indices = select_indices(
        len(source),
        limit=limit,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle=shuffle,
        prefix=source.synthetic,
        targets=getattr(source, "targets", None) if source.labelled else None,
        per_class=per_class,
    )
    source.limit = limit
    if not source.synthetic:  # a synthetic source reports the seed of its pixels instead
        source.seed = seed
    selection = _Selection(source, indices, None if source.synthetic else transform, size)
    loader = DataLoader(
        selection,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=False,
    )
    return Loader(source, selection, loader)
