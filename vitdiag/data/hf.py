"""Hugging Face `datasets` as a random-access source: a ``save_to_disk`` folder, a folder of
Parquet files, or ``hfds/NAME[:CACHE_DIR]`` (a dataset in the local hub cache).

What is recognised (anything else is left to the other sources):

- a folder holding ``dataset_dict.json`` (a ``DatasetDict``) or ``state.json`` and
  ``dataset_info.json`` (one ``Dataset``), written by ``save_to_disk``: ``load_from_disk``;
- a folder holding ``.parquet`` files (at most three levels down, and no images beside them):
  split names follow the hub's file-name rules (``data/validation-00000-of-00001.parquet``,
  ``test/0000.parquet``, ``train.parquet``; a lone file is ``train``); only the split read is
  converted (``Dataset.from_parquet``), its Arrow copy going to the datasets cache
  (HF_DATASETS_CACHE), never into the data folder;
- ``hfds/NAME`` (timm's spelling): the snapshot of dataset repo NAME in the local hub cache
  (HF_HUB_CACHE / HF_HOME, or the CACHE_DIR given), read as a Parquet folder. Nothing is ever
  downloaded: a dataset not in the cache is refused with the command that fetches it.

The split is ``--split`` (``val`` also finds ``validation``...), else validation, else test,
else the only one. The image column is the one ``datasets.Image`` column, the label column the
one ``ClassLabel`` column (none: unlabelled); ``--image-column`` (an Image or binary column) and
``--label-column`` (a ClassLabel, or an integer column read as the model's output index) choose
others. Images are read as raw bytes and decoded by vitdiag's policy (``decode_image``), so an
unreadable one is skipped and counted, or refused under --strict. Class names are the
ClassLabel's ``names``, which ``data.labels`` matches with the model's label names.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image

from vitdiag.data.sources import IMAGE_EXTENSIONS, ImageSource, decode_image
from vitdiag.errors import VitdiagError

_PREFIX = "hfds/"
_DEFAULT_SPLITS = ("validation", "valid", "val", "test")
_SYNONYMS = (
    ("validation", "valid", "val", "eval", "evaluation", "dev"),
    ("test", "testing"),
    ("train", "training"),
)
_PARQUET_DEPTH = 3  # data/x.parquet, CONFIG/SPLIT/0000.parquet
_SHOWN = 32  # files listed in describe(); more are counted only
_INSTALL = "install it with `pip install 'vitdiag[hf]'`"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0].rstrip(":") if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _parquet_files(folder: Path) -> list[Path]:
    """The .parquet files under `folder` (hidden entries skipped), or [] when it holds images
    beside them (an image folder is not a Parquet dataset, whatever else it holds)."""
    found: list[Path] = []
    todo = [(folder, 0)]
    while todo:
        here, depth = todo.pop()
        with os.scandir(here) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                suffix = os.path.splitext(e.name)[1].lower()
                if e.is_dir():
                    if depth < _PARQUET_DEPTH:
                        todo.append((Path(e.path), depth + 1))
                elif suffix in IMAGE_EXTENSIONS:
                    return []
                elif suffix == ".parquet":
                    found.append(Path(e.path))
    return sorted(found)


def _folder_format(folder: Path) -> str | None:
    if (folder / "dataset_dict.json").is_file():
        return "save_to_disk"
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return "save_to_disk"
    return "parquet" if _parquet_files(folder) else None


def _need_datasets(text: str) -> None:
    if importlib.util.find_spec("datasets") is None:
        raise VitdiagError(
            f"Dataset {text!r} is a Hugging Face dataset, which needs the 'datasets' package; "
            f"{_INSTALL}."
        )


@contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars from datasets while vitdiag opens a dataset (its own bar follows)."""
    from datasets.utils.tqdm import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            enable_progress_bars()


def _unreadable_disk(text: str, folder: Path, exc: BaseException) -> VitdiagError:
    return VitdiagError(
        f"Could not read the save_to_disk folder {folder} (from {text!r}; {_one_line(exc)}); "
        "re-create it with Dataset.save_to_disk or DatasetDict.save_to_disk."
    )


def _load_saved(text: str, folder: Path) -> tuple[str | None, Any]:
    """(recorded split, Dataset) of one save_to_disk Dataset folder; [] for one of no rows
    (which save_to_disk writes without a shard, and load_from_disk cannot read back)."""
    import datasets

    try:
        state = json.loads((folder / "state.json").read_text())
        if not state.get("_data_files"):
            return state.get("_split"), []
        with _quiet():
            found = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets raises FileNotFound, JSON and Arrow errors here
        raise _unreadable_disk(text, folder, exc) from exc
    return state.get("_split"), found


def _load_disk(text: str, folder: Path) -> dict[str | None, Any]:
    if not (folder / "dataset_dict.json").is_file():
        split, found = _load_saved(text, folder)
        return {split: found}
    try:
        names = json.loads((folder / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _unreadable_disk(text, folder, exc) from exc
    return {str(n): _load_saved(text, folder / str(n))[1] for n in names}


@dataclass(frozen=True)
class _ParquetSplit:
    """A split's Parquet files, converted to Arrow only when it is the one read."""

    files: tuple[str, ...]
    rows: int

    def __len__(self) -> int:
        return self.rows


def _unreadable_parquet(text: str, folder: Path, exc: BaseException) -> VitdiagError:
    return VitdiagError(
        f"Could not read the Parquet files of {folder} (from {text!r}; {_one_line(exc)}); "
        "check that they are Parquet files written by datasets or pyarrow."
    )


def _parquet_splits(text: str, folder: Path) -> dict[str | None, Any]:
    """The splits of a Parquet folder by the hub's file-name rules, with their row counts."""
    import pyarrow.parquet as pq
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(folder))
        found = DataFilesDict.from_patterns(patterns, base_path=str(folder))
        files = {
            k: [str(f) for f in v if str(f).lower().endswith(".parquet")] for k, v in found.items()
        }
        # datasets refuses a split of no rows; it is kept so that picking it says so.
        return {
            k: _ParquetSplit(tuple(v), sum(pq.read_metadata(f).num_rows for f in v))
            for k, v in files.items()
            if v
        }
    except Exception as exc:  # pyarrow and datasets raise many types on bad files
        raise _unreadable_parquet(text, folder, exc) from exc


def _read_parquet(text: str, folder: Path, split: str, files: tuple[str, ...]) -> Any:
    """One split as memory-mapped Arrow. Dataset.from_parquet, not load_dataset: the latter
    pings the network to count downloads even for local files."""
    import datasets

    # The Arrow copy goes to the datasets cache as the environment names it now.
    cache = os.environ.get("HF_DATASETS_CACHE") or None
    try:
        with _quiet():
            return datasets.Dataset.from_parquet({split: list(files)}, split=split, cache_dir=cache)
    except Exception as exc:  # pyarrow and datasets raise many types on bad files
        raise _unreadable_parquet(text, folder, exc) from exc


def _hub_cache(explicit: str) -> Path:
    """The hub cache to search: CACHE_DIR, else HF_HUB_CACHE / HF_HOME as set now."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
        )
        cache = os.path.join(home, "hub")
    return Path(os.path.expandvars(cache)).expanduser()


def _hub_snapshot(text: str) -> tuple[Path, str, str]:
    """(snapshot folder, repo id, revision) of hfds/NAME[:CACHE_DIR] in the local hub cache."""
    name, _, cache_text = text[len(_PREFIX) :].partition(":")
    name = name.strip().strip("/")
    if not name:
        raise VitdiagError(
            f"Dataset {text!r} names no dataset; write hfds/OWNER/NAME (or hfds/NAME:CACHE_DIR)."
        )
    cache = _hub_cache(cache_text.strip())
    if cache_text and not cache.is_dir():
        raise VitdiagError(
            f"Cache folder {cache} (from {text!r}) does not exist; give the hub cache that holds "
            "the dataset (the folder with datasets--OWNER--NAME in it)."
        )
    # HF_HOME-style folders keep the hub cache in hub/.
    roots = [cache, cache / "hub"] if cache_text else [cache]
    repo = "datasets--" + name.replace("/", "--")
    for root in roots:
        ref = root / repo / "refs" / "main"
        if ref.is_file():
            rev = ref.read_text().strip()
            snapshot = root / repo / "snapshots" / rev
            if snapshot.is_dir():
                return snapshot, name, rev
    raise VitdiagError(
        f"Dataset {name} is not in the local Hugging Face hub cache ({cache}) and vitdiag never "
        f"downloads; fetch it beforehand with `hf download {name} --repo-type dataset` (or set "
        "HF_HUB_CACHE / HF_HOME, or write hfds/NAME:CACHE_DIR)."
    )


def _split_key(name: str | None) -> str:
    low = (name or "").lower()
    return next((group[0] for group in _SYNONYMS if low in group), low)


def _pick_split(text: str, splits: dict[str | None, Any], split: str | None) -> str | None:
    names = list(splits)
    shown = ", ".join(str(n) for n in names)
    if split:
        for same in (
            lambda n: n == split,
            lambda n: (n or "").lower() == split.lower(),
            lambda n: n is not None and _split_key(n) == _split_key(split),
        ):
            hit = [n for n in names if same(n)]
            if len(hit) == 1:
                return hit[0]
        if names == [None]:
            raise VitdiagError(
                f"Dataset {text!r} is a single Dataset whose split is not recorded, so --split "
                f"{split} cannot be checked; drop --split, or save the DatasetDict instead."
            )
        raise VitdiagError(
            f"Dataset {text!r} has no split {split!r}; its splits are {shown} (pass one with "
            "--split)."
        )
    for want in _DEFAULT_SPLITS:
        if want in splits:
            return want
    if len(names) == 1:
        return names[0]
    raise VitdiagError(
        f"Dataset {text!r} has no validation or test split; pick one of its splits ({shown}) "
        "with --split."
    )


def _columns_text(features: Any) -> str:
    return ", ".join(f"{k} ({type(f).__name__})" for k, f in features.items())


def _is_binary(feature: Any) -> bool:
    return type(feature).__name__ == "Value" and feature.dtype in ("binary", "large_binary")


def _is_int(feature: Any) -> bool:
    return type(feature).__name__ == "Value" and feature.dtype.startswith(("int", "uint"))


def _column(text: str, features: Any, given: str | None, kind: str, ok: Any) -> str | None:
    """The column of `kind` (given, else the only one); None when there is none."""
    import datasets

    flag = "--image-column" if kind == "image" else "--label-column"
    wanted = datasets.Image if kind == "image" else datasets.ClassLabel
    if given is not None:
        if given not in features:
            raise VitdiagError(
                f"Dataset {text!r} has no column {given!r}; its columns are "
                f"{_columns_text(features)} (pass one with {flag})."
            )
        if not ok(features[given]):
            what = "an Image or binary" if kind == "image" else "a ClassLabel or integer"
            raise VitdiagError(
                f"Column {given!r} of {text!r} is {type(features[given]).__name__}, not {what} "
                f"column; its columns are {_columns_text(features)} (pass another with {flag})."
            )
        return given
    found = [k for k, f in features.items() if isinstance(f, wanted)]
    if len(found) > 1:
        raise VitdiagError(
            f"Dataset {text!r} has {len(found)} {wanted.__name__} columns ({', '.join(found)}); "
            f"name the one to read with {flag}."
        )
    if not found and kind == "image":
        raise VitdiagError(
            f"Dataset {text!r} has no Image column; its columns are {_columns_text(features)} "
            f"(name the image column with {flag})."
        )
    return found[0] if found else None


class HfSource(ImageSource):
    """One split of a Hugging Face dataset, read by index (see the module docstring)."""

    kind = "hf"

    def __init__(
        self,
        source: str,
        dataset: Any,
        image_column: str,
        label_column: str | None,
        *,
        strict: bool,
        split: str | None,
        provenance: dict[str, Any],
    ) -> None:
        super().__init__(source, strict=strict, split=split)
        import datasets

        feature = dataset.features[image_column]
        labels = dataset.features[label_column] if label_column else None
        targets = dataset.data.column(label_column).to_pylist() if label_column else None
        self.classes = list(labels.names) if isinstance(labels, datasets.ClassLabel) else None
        self.labelled = targets is not None and any(t is not None and t >= 0 for t in targets)
        self.targets = [-1 if t is None else int(t) for t in targets or [-1] * len(dataset)]
        # Only the image column, memory-mapped Arrow: the object pickles small to workers.
        one = dataset.select_columns([image_column])
        if isinstance(feature, datasets.Image):
            one = one.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = one
        self.image_column = image_column
        self.label_column = label_column
        self.provenance = provenance

    def __len__(self) -> int:
        return len(self.targets)

    def name(self, index: int) -> str:
        return f"{self.source} [{self.split}][{index}]"

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            **self.provenance,
            "image_column": self.image_column,
            "label_column": self.label_column,
            "labels": None
            if not self.labelled
            else ("ClassLabel names" if self.classes is not None else "output index"),
        }

    def _read(self, index: int) -> tuple[Image.Image, int]:
        value = self.dataset[index][self.image_column]
        if isinstance(value, dict):
            raw, path = value.get("bytes"), value.get("path")
            if raw is None:
                if not path:
                    raise OSError("the example holds no image bytes")
                return decode_image(path), self.targets[index]
            value = raw
        if value is None:
            raise OSError("the example holds no image")
        return decode_image(BytesIO(value)), self.targets[index]


def _recognise(text: str) -> tuple[str, Path] | None:
    """(format, folder) for a Hugging Face dataset, else None."""
    if text[: len(_PREFIX)].lower() == _PREFIX and not Path(text).exists():
        return "hub", Path()
    path = Path(text).expanduser()
    if not path.is_dir():
        return None
    found = _folder_format(path)
    return None if found is None else (found, path)


def _provenance(
    text: str, fmt: str, folder: Path, splits: list, files: list[Path], hub: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {"format": fmt, "splits": [str(s) for s in splits]}
    if not hub:  # a hub snapshot's folder is the user's cache: the name says it all
        out.update(path=text, resolved_path=str(folder.resolve()))
    if files:  # the files of the split read
        rel = [os.path.relpath(os.path.abspath(f), os.path.abspath(folder)) for f in files]
        out.update(n_files=len(rel), files=rel if len(rel) <= _SHOWN else None)
    return out


def open_hf(
    text: str,
    *,
    strict: bool,
    split: str | None,
    image_column: str | None,
    label_column: str | None,
) -> ImageSource | None:
    """The HF dataset `text` names, or None when `text` is not one."""
    found = _recognise(text)
    if found is None:
        return None
    _need_datasets(text)
    fmt, folder = found
    extra: dict[str, Any] = {}
    if fmt == "hub":
        folder, repo, rev = _hub_snapshot(text)
        fmt = "save_to_disk" if (folder / "dataset_dict.json").is_file() else "parquet"
        if fmt == "parquet" and not _parquet_files(folder):
            raise VitdiagError(
                f"The cached snapshot of {repo} ({folder}) holds no Parquet files, which is how "
                "vitdiag reads hub datasets; save it with load_dataset(...).save_to_disk(DIR) "
                "and pass --data DIR."
            )
        extra = {"format": f"hub cache ({fmt})", "repo_id": repo, "revision": rev}
    splits = _load_disk(text, folder) if fmt == "save_to_disk" else _parquet_splits(text, folder)
    chosen = _pick_split(text, splits, split)
    dataset = splits[chosen]
    if len(dataset) == 0:
        raise VitdiagError(
            f"Split {chosen} of {text!r} holds no examples; pick another split with --split."
        )
    files = [Path(f) for f in dataset.files] if isinstance(dataset, _ParquetSplit) else []
    if files:
        dataset = _read_parquet(text, folder, str(chosen), dataset.files)
    features = dataset.features
    image = _column(text, features, image_column, "image", _ok_image)
    label = _column(text, features, label_column, "label", _ok_label)
    hub = bool(extra)
    provenance = {**_provenance(text, fmt, folder, list(splits), files, hub), **extra}
    out = HfSource(text, dataset, image, label, strict=strict, split=chosen, provenance=provenance)
    _check_targets(text, out)
    return out


def _ok_image(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Image) or _is_binary(feature)


def _ok_label(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.ClassLabel) or _is_int(feature)


def _check_targets(text: str, source: HfSource) -> None:
    missing = sum(t < 0 for t in source.targets)
    if source.labelled and missing:
        first = next(i for i, t in enumerate(source.targets) if t < 0)
        raise VitdiagError(
            f"{missing} of the {len(source)} examples of {text!r} (split {source.split}) have no "
            f"label (first: index {first}); label every example or none, or pick another split."
        )
    if not source.labelled:
        source.classes = None  # a split without labels (hub test splits hold -1 everywhere)
