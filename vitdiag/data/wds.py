"""WebDataset shards (a brace pattern, a list, wds/PATTERN, a folder of shards) as a
random-access source.

The engine shards images by index (a strided rule across loader workers and processes), so
the shards are indexed once: each tar's member list (names and offsets) is read, members are
grouped into samples by webdataset's own key rule (`base_plus_ext`, consecutive members with
one key), and each sample's image is later read at its offset. Nothing is extracted to disk,
so member names with ``..`` or a leading ``/`` stay names.

What is recognised (anything else is left to the other sources):

- ``wds/SPEC``: SPEC is a pattern, a list, one ``.tar`` or a folder of ``.tar`` files;
- a brace pattern ``shards-{000000..000009}.tar`` and a ``::`` or comma list of ``.tar`` paths,
  expanded by webdataset's ``expand_urls`` (so the shard list is the one a webdataset
  pipeline reads);
- a folder holding nothing but ``.tar`` files (hidden files and timm's ``_info.*`` aside);
- a single ``.tar`` whose first members include a ``.cls`` label; any other ``.tar`` stays an
  image tar (labels from parent folders).

The image of a sample is its first member among ``_IMAGE_KEYS``; the label is ``.cls`` (an
integer as text), used as the model's output index. A sample without an image is kept and read
as unreadable (skipped and counted, or refused under --strict).
"""

from __future__ import annotations

import importlib.util
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image
from timm.utils.misc import natural_key

from vitdiag.data.sources import ImageSource, decode_image
from vitdiag.errors import VitdiagError

# timm's wds reader reads jpg;png;webp; the others are the image types vitdiag reads elsewhere.
_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
_LABEL_KEY = "cls"
_PREFIX = "wds/"
_INFO_FILES = ("_info.json", "_info.yaml", "_info.yml")  # timm's shard metadata, not a shard
_SNIFF_MEMBERS = 64  # members of a lone .tar read to tell a WebDataset shard from an image tar
_OPEN_SHARDS = 8  # tar handles kept open per process (reads are mostly shard by shard)
_SHOWN_SHARDS = 32  # shards listed in describe(); more are counted only
_BRACE = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")
# webdataset's tar_file_iterator skips these metadata members.
_META = re.compile(r"__[^/]*__($|/)")


def _ends_tar(name: str) -> bool:
    return name.lower().endswith(".tar")


def _top_level_split(text: str, sep: str) -> list[str]:
    """`text` split at `sep` outside braces (a brace's own commas are alternatives)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _pieces(spec: str) -> list[str]:
    """The ``::`` / comma separated parts of `spec` (commas only when every part is a .tar)."""
    out = []
    for part in spec.split("::"):
        commas = _top_level_split(part, ",")
        out.extend(commas if len(commas) > 1 and all(map(_ends_tar, commas)) else [part])
    return [p.strip() for p in out if p.strip()]


def _folder_shards(folder: Path) -> list[str] | None:
    """The .tar files of `folder` in natural order, or None when it holds anything else."""
    names = []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.startswith(".") or e.name in _INFO_FILES:
                continue
            if not (_ends_tar(e.name) and e.is_file()):
                return None  # at the first other entry: image folders can be large
            names.append(e.name)
    if not names:
        return None
    return [str(folder / n) for n in sorted(names, key=lambda n: (natural_key(n), n))]


def _has_cls_member(path: Path) -> bool:
    """Whether one of the first members of the tar at `path` is a ``.cls`` label."""
    if importlib.util.find_spec("webdataset") is None:
        return False  # without webdataset a lone .tar is an image tar, as it always was
    from webdataset.tariterators import base_plus_ext

    try:
        with tarfile.open(path, "r:") as tf:
            for _ in range(_SNIFF_MEMBERS):
                ti = tf.next()
                if ti is None:
                    return False
                if ti.isreg() and (base_plus_ext(ti.name)[1] or "").lower() == _LABEL_KEY:
                    return True
    except (tarfile.TarError, OSError, EOFError):
        return False  # the tar source reports what is wrong with it
    return False


def _recognise(text: str) -> tuple[str, list[str] | None] | None:
    """(the shard spec, the shards when already listed) for WebDataset text, else None."""
    prefixed = text[: len(_PREFIX)].lower() == _PREFIX
    spec = text[len(_PREFIX) :] if prefixed else text
    if prefixed and not spec.strip():
        raise VitdiagError(
            f"Dataset {text!r} names no shards; write wds/PATTERN, e.g. "
            "wds/shards-{000000..000009}.tar, or wds/FOLDER."
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        shards = _folder_shards(path)
        if shards is None and prefixed:
            raise VitdiagError(
                f"Folder {spec} (from {text!r}) holds other files than .tar shards, or none; "
                "point wds/ at a folder of .tar shards only, or at a shard pattern."
            )
        return (spec, shards) if shards is not None else None
    if path.is_file():
        if prefixed or (_ends_tar(spec) and _has_cls_member(path)):
            return spec, [spec]
        return None
    if prefixed or "::" in spec or _BRACE.search(spec) or len(_pieces(spec)) > 1:
        pieces = _pieces(spec)
        if prefixed or all(_ends_tar(p) or _BRACE.search(p) for p in pieces):
            return spec, None
    return None


def _expand(text: str, spec: str) -> list[str]:
    from webdataset.shardlists import expand_urls

    shards = [s for piece in _pieces(spec) for s in expand_urls(piece)]
    remote = next((s for s in shards if "://" in s or s.startswith("pipe:")), None)
    if remote is not None:
        raise VitdiagError(
            f"Shard {remote} (from {text!r}) is not a local file; vitdiag reads shards by "
            "offset, so download them and pass their paths."
        )
    seen: set[str] = set()
    for s in shards:
        if s in seen:
            raise VitdiagError(
                f"Shard {s} is listed twice in {text!r}; list each shard once (every sample "
                "is counted once)."
            )
        seen.add(s)
    missing = [s for s in shards if not Path(s).expanduser().is_file()]
    if missing and len(shards) == 1:
        raise VitdiagError(
            f"Shard {missing[0]} (from {text!r}) does not exist; check the path, or give a "
            "pattern such as DIR/shard-{000000..000009}.tar."
        )
    if missing:
        raise VitdiagError(
            f"{len(missing)} of the {len(shards)} shards of {text!r} are missing (first: "
            f"{missing[0]}); check the pattern and the folder."
        )
    return shards


class _Index:
    """Samples of a list of shards: where each one's image is, its label, its key."""

    def __init__(self) -> None:
        self.shard: list[int] = []
        self.keys: list[str] = []
        self.images: list[tarfile.TarInfo | None] = []
        self.targets: list[int | None] = []
        self.found: list[str] = []  # a sample's member extensions, for one without image

    def add(self, shard: int, key: str, members: dict[str, tarfile.TarInfo], target: int | None):
        image = next((members[k] for k in _IMAGE_KEYS if k in members), None)
        self.shard.append(shard)
        self.keys.append(key)
        self.images.append(image)
        self.targets.append(target)
        self.found.append("" if image is not None else ", ".join(f".{k}" for k in members))


def _label(tf: tarfile.TarFile, ti: tarfile.TarInfo, where: str) -> int:
    fobj = tf.extractfile(ti)
    raw = fobj.read(64) if fobj is not None else b""
    try:
        value = int(raw.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        value = -1
    if value < 0:
        raise VitdiagError(
            f"Label {where} holds {raw[:20]!r}, not a class index; write each .cls as a "
            "non-negative integer (the model's output index)."
        )
    return value


def _index_shard(index: _Index, no: int, path: str, split_key: Callable) -> None:
    try:
        tf = tarfile.open(os.path.expanduser(path), "r:")  # noqa: SIM115 - `with` below
    except (tarfile.TarError, OSError, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(":")
        raise VitdiagError(
            f"Shard {path} is not a readable uncompressed tar archive ({first}); re-create it "
            "with webdataset.TarWriter or `tar -cf` (decompress .tar.gz shards first)."
        ) from exc
    with tf:
        key: str | None = None
        members: dict[str, tarfile.TarInfo] = {}
        for ti in tf.getmembers():
            if not ti.isreg() or _META.match(ti.name):
                continue
            prefix, ext = split_key(ti.name)
            if prefix is None:
                continue
            ext = ext.lower()
            if prefix != key:
                if key is not None:
                    _close_sample(index, no, path, key, members, tf)
                key, members = prefix, {}
            if ext in members:
                raise VitdiagError(
                    f"Shard {path} has two .{ext} members for sample {prefix!r} "
                    f"({members[ext].name}, {ti.name}); give each sample one member per "
                    "extension, as webdataset requires."
                )
            members[ext] = ti
        if key is not None:
            _close_sample(index, no, path, key, members, tf)


def _close_sample(index: _Index, no: int, path: str, key: str, members: dict, tf) -> None:
    label = members.get(_LABEL_KEY)
    target = None if label is None else _label(tf, label, f"{path}:{label.name}")
    index.add(no, key, members, target)


class WdsSource(ImageSource):
    """WebDataset shards read by index (see the module docstring)."""

    kind = "wds"

    def __init__(self, source: str, shards: list[str], index: _Index, *, strict: bool) -> None:
        super().__init__(source, strict=strict)
        self.shards = shards
        self.sample_shard = index.shard
        self.keys = index.keys
        self.members = index.images
        self._found = index.found
        self.labelled = index.targets[0] is not None
        self.targets = [-1 if t is None else t for t in index.targets]
        # No class names: a label is the model's output index (data.labels is not consulted).
        self.classes = None
        self._handles: OrderedDict[int, tarfile.TarFile] = OrderedDict()
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def name(self, index: int) -> str:
        member = self.members[index]
        where = member.name if member is not None else self.keys[index]
        return f"{self.shards[self.sample_shard[index]]}:{where}"

    def describe(self) -> dict[str, Any]:
        shown = self.shards if len(self.shards) <= _SHOWN_SHARDS else None
        return {
            **super().describe(),
            "path": self.source,
            "resolved_path": str(Path(self.shards[0]).expanduser().resolve().parent),
            "n_shards": len(self.shards),
            "shards": shown,
            "labels": _LABEL_KEY if self.labelled else None,
            "n_classes": len(set(self.targets)) if self.labelled else None,
            "n_without_image": sum(m is None for m in self.members),
            "counted": "samples counted from the shards' tar headers",
        }

    def _handle(self, shard: int) -> tarfile.TarFile:
        # One handle per shard and process: forked workers would otherwise share file offsets.
        if self._pid != os.getpid():
            self._handles, self._pid = OrderedDict(), os.getpid()
        tf = self._handles.get(shard)
        if tf is None:
            path = os.path.expanduser(self.shards[shard])
            tf = tarfile.open(path, "r:")  # noqa: SIM115 - kept open for reuse
            self._handles[shard] = tf
            if len(self._handles) > _OPEN_SHARDS:
                self._handles.popitem(last=False)[1].close()
        self._handles.move_to_end(shard)
        return tf

    def _read(self, index: int) -> tuple[Image.Image, int]:
        member = self.members[index]
        if member is None:
            raise OSError(f"sample has no image member (has {self._found[index] or 'nothing'})")
        fobj = self._handle(self.sample_shard[index]).extractfile(member)
        if fobj is None:
            raise OSError("not a regular file")
        return decode_image(BytesIO(fobj.read())), self.targets[index]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        state["_pid"] = None
        return state

    def __del__(self) -> None:
        # getattr: __del__ also runs on objects whose __init__ did not finish.
        try:
            if getattr(self, "_pid", None) == os.getpid():
                for tf in getattr(self, "_handles", {}).values():
                    tf.close()
        except Exception:  # at interpreter exit `os` may be gone already
            pass


def open_wds(text: str, *, strict: bool, split: str | None) -> ImageSource | None:
    """The WebDataset shards `text` names, or None when `text` is not one."""
    found = _recognise(text)
    if found is None:
        return None
    if importlib.util.find_spec("webdataset") is None:
        raise VitdiagError(
            f"Dataset {text!r} is WebDataset shards, which need the 'webdataset' package; "
            "install it with `pip install 'vitdiag[wds]'`."
        )
    spec, shards = found
    if split:
        raise VitdiagError(
            f"--split does not apply to the WebDataset shards {text!r}; name the split's shards "
            "instead, e.g. DIR/val-{000000..000009}.tar."
        )
    shards = _expand(text, spec) if shards is None else shards
    from webdataset.tariterators import base_plus_ext

    index = _Index()
    for no, path in enumerate(shards):
        _index_shard(index, no, path, base_plus_ext)
    if not index.keys:
        raise VitdiagError(
            f"The {len(shards)} shard(s) of {text!r} hold no samples; write samples with "
            "webdataset.TarWriter (members KEY.jpg, KEY.cls)."
        )
    unlabelled = [i for i, t in enumerate(index.targets) if t is None]
    if unlabelled and len(unlabelled) < len(index.keys):
        i = unlabelled[0]
        raise VitdiagError(
            f"{len(unlabelled)} of the {len(index.keys)} samples of {text!r} have no .cls label "
            f"(first: {shards[index.shard[i]]}:{index.keys[i]}); label every sample or none."
        )
    return WdsSource(text, shards, index, strict=strict)
