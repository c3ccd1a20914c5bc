"""Dataset sources: folders, tars, timm/torchvision/HF sources and synthetic images, and the
decoding policy (see the package docstring)."""

from __future__ import annotations

import os
import stat
import tarfile
import unicodedata
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import timm.data
import torch
from PIL import Image
from timm.utils.misc import natural_key
from torch.utils.data import Dataset

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
_STREAMING_PREFIXES = ("hfids", "tfds")
# Images are refused (skipped and counted; --strict: an error) before any pixel is decoded when
# larger than PIL's default bomb limit (PIL itself only raises at twice it), or more elongated
# than this: timm resizes the shorter side, so a 1x500 image would become a 248x124000 array.
MAX_IMAGE_PIXELS = 89_478_485
MAX_ASPECT_RATIO = 50


def shown(name: Any) -> str:
    """A path or member name for a one-line message: control characters (a newline in a file
    name) are escaped as repr() would, everything else (spaces, é, 中文, emoji) is kept."""
    return "".join(
        repr(c)[1:-1] if unicodedata.category(c).startswith("C") else c for c in str(name)
    )


class UnreadableImageError(VitdiagError):
    """An image file that PIL cannot decode (raised only for ``strict`` sources)."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name = shown(name)
        self.reason = reason = shown(reason)
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


def _check_size(img: Image.Image) -> None:
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise OSError(
            f"{w}x{h} pixels, above the {MAX_IMAGE_PIXELS:,}-pixel limit for decompression "
            "bombs, not decoded"
        )
    if min(w, h) <= 0 or max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise OSError(f"{w}x{h} pixels, more elongated than {MAX_ASPECT_RATIO}:1, not resized")


def decode_image(fp: Any) -> Image.Image:
    """Open an image file (path or file object) and return it as RGB (``to_rgb``), fully read.

    Refused from the header alone (``OSError``): decompression bombs and extreme aspect ratios
    (``MAX_IMAGE_PIXELS``, ``MAX_ASPECT_RATIO``); only regular files are opened."""
    if isinstance(fp, (str, os.PathLike)) and not stat.S_ISREG(os.stat(fp).st_mode):
        # A FIFO would block open() forever and /dev/zero would never end.
        raise OSError("not a regular file")
    with warnings.catch_warnings():
        # Our own limit is checked below (as an error); PIL's warning would only reach stderr.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
        except Image.DecompressionBombError as exc:
            raise OSError(
                f"above the {MAX_IMAGE_PIXELS:,}-pixel limit for decompression bombs, not decoded"
            ) from exc
    with img:
        _check_size(img)
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
    # Set by the runner's label check (vitdiag.data.labels): target i is output target_map[i].
    target_map: list[int] | None = None
    # Tar members refused for an absolute or '..' path (never read; the runner notes them).
    n_unsafe_members: int = 0

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
            img, target = self._read(index)
        except VitdiagError:
            raise
        except Exception as exc:  # decoders raise many types on bad bytes; all mean unreadable
            raise UnreadableImageError(self.name(index), _short(exc)) from exc
        if self.target_map is not None and target >= 0:
            target = self.target_map[target]
        return img, target

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
        return shown(self.root / self.files[index])

    def _read(self, index: int) -> tuple[Image.Image, int]:
        return decode_image(self.root / self.files[index]), self.targets[index]


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
        return shown(f"{self.path}:{self.members[index].name}")

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
        return decode_image(BytesIO(fobj.read())), self.targets[index]

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
                img = decode_image(fobj)
            finally:
                close = getattr(fobj, "close", None)
                if close is not None:
                    close()
        else:
            img, target = self.dataset[index][:2]
            img = to_rgb(img) if isinstance(img, Image.Image) else img
        return img, -1 if target is None else int(target)


class SyntheticSource(ImageSource):
    """``synthetic:N``: i.i.d. N(0, 1) images in the normalised space, seeded per index."""

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


def _parse_synthetic(text: str, default_count: int, seed: int) -> SyntheticSource | None:
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
    return SyntheticSource(f"synthetic:{count}", count, seed)


def _open_timm(text: str, *, strict: bool, split: str | None) -> _TimmSource | None:
    prefix, sep, rest = text.partition("/")
    prefix = prefix.lower()
    if not sep or prefix not in ("torch", *_STREAMING_PREFIXES):
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
    if root and not Path(root).exists():
        raise VitdiagError(
            f"Dataset root {shown(root)} (from {text!r}) does not exist; check the path "
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


def class_order(names: Any) -> list[str]:
    """Class names in timm's ImageFolder order (`find_images_and_targets`: natural sort, so
    class2 comes before class10), so that class i is the output i of a head trained by timm;
    ties of that key (names differing only in case) fall back to plain order, for determinism."""
    return sorted(names, key=lambda c: (natural_key(c), c))


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)  # follows symlinks; dangling ones: False
    except OSError:
        return False


def _walk_images(top: Path) -> list[str]:
    """Image files under ``top`` (recursively, hidden entries skipped), sorted, relative.

    Symlinked folders are followed, each real folder once (a link to itself or a parent would
    loop forever); only regular files (or links to them) count, never FIFOs or devices."""
    found: list[str] = []
    seen: set[str] = set()
    top_real = os.path.realpath(top)

    def loops(path: str) -> bool:
        real = os.path.realpath(path)
        return real in seen or top_real == real or top_real.startswith(real.rstrip(os.sep) + os.sep)

    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        seen.add(os.path.realpath(dirpath))
        dirnames[:] = sorted(
            d for d in dirnames if not _is_hidden(d) and not loops(os.path.join(dirpath, d))
        )
        rel = os.path.relpath(dirpath, top)
        for f in sorted(filenames):
            if _is_image_name(f) and _is_regular(os.path.join(dirpath, f)):
                found.append(f if rel == "." else os.path.join(rel, f))
    return sorted(found)


def _resolve_split(root: Path, split: str) -> Path:
    candidates = _SPLIT_SYNONYMS.get(split.lower(), (split,))
    for cand in (split, *candidates):
        if (root / cand).is_dir():
            return root / cand
    raise VitdiagError(
        f"Dataset folder {shown(root)} has no {split!r} split folder (looked for "
        f"{', '.join(dict.fromkeys((split, *candidates)))}); check --split or point at the folder."
    )


def _open_dir(text: str, root: Path, *, strict: bool, split: str | None) -> _FileSource:
    if split:
        root = _resolve_split(root, split)
    entries = [e for e in os.scandir(root) if not _is_hidden(e.name)]
    if not entries:
        raise VitdiagError(
            f"Dataset folder {shown(root)} is empty; put images ({_EXT_TEXT}) in it, "
            "or one sub-folder of images per class."
        )
    loose = sorted(e.name for e in entries if e.is_file() and _is_image_name(e.name))
    subdirs = sorted(e.name for e in entries if e.is_dir())
    per_class = {d: _walk_images(root / d) for d in subdirs}
    per_class = {d: files for d, files in per_class.items() if files}

    if not loose and not per_class:
        raise VitdiagError(
            f"Dataset folder {shown(root)} contains no images; accepted extensions are {_EXT_TEXT} "
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
            f"Dataset folder {shown(root)} holds split folders "
            f"({shown(', '.join(per_class))}) rather than "
            f"classes; pass --split {next(iter(per_class))} or point at one split's folder."
        )
    if len(per_class) >= 2:
        if loose:
            raise VitdiagError(
                f"Dataset folder {shown(root)} mixes {len(per_class)} class folders with "
                f"{len(loose)} "
                f"loose images (e.g. {shown(loose[0])}); move the loose images into a class folder "
                "or remove them."
            )
        classes = class_order(per_class)
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
            f"--split does not apply to the tar archive {shown(path)}; pack one split per .tar "
            "and pass that file."
        )
    try:
        with tarfile.open(path, "r:") as tf:
            all_members = tf.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise VitdiagError(
            f"Dataset {shown(path)} is not a readable uncompressed tar archive ({_short(exc)}); "
            "re-create it with `tar -cf` (decompress .tar.gz first)."
        ) from exc
    members: list[tarfile.TarInfo] = []
    parents: list[str] = []
    unsafe = 0
    for ti in all_members:
        if not ti.isfile():
            continue
        parts = [p for p in ti.name.split("/") if p not in ("", ".")]
        if not parts or any(_is_hidden(p) for p in parts) or not _is_image_name(parts[-1]):
            continue
        if ti.name.startswith("/") or ".." in parts:
            # Never extracted, but such a name would make "../x" a class: refused, counted.
            unsafe += 1
            continue
        members.append(ti)
        parents.append("/".join(parts[:-1]))
    if not members:
        raise VitdiagError(
            f"Tar archive {shown(path)} contains no images; accepted extensions are {_EXT_TEXT} "
            "(hidden members, and absolute or '..' member paths, are ignored)."
        )
    order = sorted(range(len(members)), key=lambda i: members[i].name)
    members = [members[i] for i in order]
    parents = [parents[i] for i in order]
    distinct = sorted(set(parents))
    if len(distinct) < 2:
        out = _TarSource(text, path, members, [-1] * len(members), None, strict=strict)
        out.n_unsafe_members = unsafe
        return out
    # Show the folder name; fall back to the full parent path when two folders share a name.
    short = {p: p.rsplit("/", 1)[-1] for p in distinct}
    label = short if len(set(short.values())) == len(distinct) else {p: p for p in distinct}
    classes = class_order(set(label.values()))
    index = {c: i for i, c in enumerate(classes)}
    targets = [index[label[p]] for p in parents]
    out = _TarSource(text, path, members, targets, classes, strict=strict)
    out.n_unsafe_members = unsafe
    return out


def open_local(
    source: str | Path,
    *,
    strict: bool = False,
    split: str | None = None,
    synthetic_count: int = 256,
    seed: int = 0,
) -> ImageSource:
    """Open a folder, a ``.tar``, ``torch/NAME:ROOT``, ``hfds/NAME`` or ``synthetic[:N]``.

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
            f"Dataset path {shown(path)} does not exist; give an image folder, a .tar of images, "
            "'synthetic[:N]', torch/NAME:ROOT or hfds/NAME."
        )
    if path.is_dir():
        return _open_dir(text, path, strict=strict, split=split)
    lower = path.name.lower()
    if lower.endswith(".tar"):
        return _open_tar(text, path, strict=strict, split=split)
    if lower.endswith(_COMPRESSED_TAR):
        raise VitdiagError(
            f"Dataset {shown(path)} is a compressed tar, which cannot be read image by image; "
            "decompress it to a plain .tar first."
        )
    if _is_image_name(path.name):
        raise VitdiagError(
            f"Dataset {shown(path)} is a single image; put it (and others) in a folder and pass "
            "the folder."
        )
    raise VitdiagError(
        f"Dataset {shown(path)} is neither a folder, a .tar of images, nor a known source; give an "
        "image folder, a .tar, 'synthetic[:N]', torch/NAME:ROOT or hfds/NAME."
    )
