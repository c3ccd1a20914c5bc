"""Hugging Face hub names and timm pretrained tags, resolved to a local snapshot folder.

`fetch("hf-hub:ORG/NAME[@REV]")` or `fetch("arch.tag")` returns the folder of huggingface_hub's
cache that holds the repo's config and weights, downloading only when the user is online and the
files are not cached. Loading the folder is the caller's job (it is a timm, transformers or
open_clip folder, told by `HubSnapshot.kind`).

huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE / HF_HOME once, at import; this module reads
them from `os.environ` on every call and passes them explicitly, so a setting made after import
(a test's monkeypatch, a notebook cell) is honoured.

Heavy imports (timm, huggingface_hub) happen inside functions: `vitdiag --help` stays instant.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitdiag.errors import VitdiagError

HUB_PREFIXES = ("hf-hub:", "hf_hub:")  # timm accepts both spellings

# Small files fetched first: they tell which weights file the repo's format needs.
CONFIG_FILES = ("config.json", "open_clip_config.json", "preprocessor_config.json")

# Weights each format reads, best first. An index file means sharded weights.
WEIGHTS_BY_KIND: dict[str, tuple[str, ...]] = {
    "timm-hub": ("model.safetensors", "pytorch_model.bin"),
    "open_clip-hub": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    "transformers-hub": (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ),
}

# A "name.ext" with these endings is a missing file, not a pretrained tag.
_FILE_SUFFIXES = {"pth", "pt", "bin", "safetensors", "ckpt", "npz", "json", "tar", "pkl", "onnx"}
_REPO_ID = re.compile(r"^(?:[\w.\-]+/)?[\w.\-]+$")
_TAG_NAME = re.compile(r"^(?P<arch>[A-Za-z0-9_]+)\.(?P<tag>[A-Za-z0-9_.\-]+)$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "on", "yes", "true"}
_TOKEN_FIX = (
    "give a token with HF_TOKEN=<token> or `hf auth login` (older: `huggingface-cli login`)"
)


@dataclass(frozen=True)
class HubSnapshot:
    """A repo snapshot in the local Hugging Face cache.

    `revision` is the resolved commit hash (the snapshot folder's name); `ref` is what the user
    asked for ("main" by default). `arch` is the timm architecture (pretrained tags, and hub repos
    in timm format); `pretrained_cfg` is the tag's timm pretrained cfg (class count, mean/std,
    input_size, crop_pct, interpolation), None for `hf-hub:` names, whose config.json carries
    their own.
    """

    name: str
    folder: Path
    repo_id: str
    revision: str
    ref: str
    kind: str
    weights: Path
    arch: str | None = None
    pretrained_cfg: dict[str, Any] | None = None


@dataclass(frozen=True)
class _HubEnv:
    """The hub settings as the environment has them now (not as at import)."""

    cache_dir: Path
    offline: bool
    endpoint: str | None

    @classmethod
    def from_environ(cls) -> _HubEnv:
        env = os.environ
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
        if not cache:
            home = env.get("HF_HOME") or os.path.join(
                env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
            )
            cache = os.path.join(home, "hub")
        cache_dir = Path(os.path.expandvars(cache)).expanduser()
        offline = any(
            (env.get(k) or "").strip().lower() in _TRUE
            for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        )
        # huggingface_hub fixed its own flag at import; if that said offline, its HTTP session
        # refuses every request, so treat the process as offline too (and say so)
        offline = offline or _hub_constants_offline()
        return cls(cache_dir=cache_dir, offline=offline, endpoint=env.get("HF_ENDPOINT") or None)

    def settings(self) -> str:
        mode = (
            "offline mode (HF_HUB_OFFLINE=1) is on"
            if self.offline
            else "the Hub could not be reached"
        )
        return (
            f"{mode}; the cache searched is {self.cache_dir} (set HF_HUB_CACHE or HF_HOME to the "
            "cache that holds it, or unset HF_HUB_OFFLINE and go online to download it)"
        )


def _hub_constants_offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


@dataclass(frozen=True)
class _HubRef:
    repo_id: str
    ref: str
    arch: str | None = None
    pretrained_cfg: dict[str, Any] | None = None
    filename: str | None = None  # a tag's hf_hub_filename: the one weights file timm reads


def is_hub_name(text: str) -> bool:
    """True for `hf-hub:ORG/NAME[@REV]` and `arch.tag` of a registered timm architecture,
    unless a local file or folder of that name exists (a local path always wins)."""
    text = (text or "").strip()
    if not text or _local_path_exists(text):
        return False
    if text.startswith(HUB_PREFIXES):
        return True
    return _split_tag_name(text) is not None


def fetch(text: str) -> HubSnapshot:
    """The local snapshot folder for a hub name or pretrained tag, downloading it if needed."""
    env = _HubEnv.from_environ()
    ref = _parse(text.strip())
    folder = _snapshot(ref.repo_id, ref.ref, list(CONFIG_FILES), env)
    _check_links(folder, ref.repo_id)
    kind, weights = _find_weights(folder, ref, env)
    _check_links(folder, ref.repo_id)
    config = _read_json(folder / "config.json")
    arch = ref.arch or (config.get("architecture") if kind == "timm-hub" else None)
    return HubSnapshot(
        name=text,
        folder=folder,
        repo_id=ref.repo_id,
        revision=folder.name,  # snapshot folders are named by commit hash
        ref=ref.ref,
        kind=kind,
        weights=weights,
        arch=arch,
        pretrained_cfg=ref.pretrained_cfg,
    )


# --- names ------------------------------------------------------------------------------------


def _local_path_exists(text: str) -> bool:
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError):
        return False


def _split_tag_name(text: str) -> tuple[str, str] | None:
    """(arch, tag) when text looks like a timm pretrained tag of a registered architecture."""
    match = _TAG_NAME.match(text)
    if not match or match["tag"].rsplit(".", 1)[-1].lower() in _FILE_SUFFIXES:
        return None
    import timm

    if not timm.is_model(match["arch"]):
        return None
    return match["arch"], match["tag"]


def _parse(text: str) -> _HubRef:
    if text.startswith(HUB_PREFIXES):
        repo_id, _, revision = text.split(":", 1)[1].partition("@")
        if not _REPO_ID.match(repo_id) or "@" in revision:
            raise VitdiagError(
                f"'{text}' is not a hub name: write hf-hub:ORG/NAME, optionally with @REVISION."
            )
        return _HubRef(repo_id=repo_id, ref=revision or "main")
    split = _split_tag_name(text)
    if split is None:
        raise VitdiagError(
            f"'{text}' is neither hf-hub:ORG/NAME nor a timm pretrained tag such as "
            "vit_small_patch16_224.augreg_in21k_ft_in1k."
        )
    return _tag_ref(text, *split)


def _tag_ref(text: str, arch: str, tag: str) -> _HubRef:
    import timm
    from timm.models import get_pretrained_cfg

    known = timm.list_pretrained(f"{arch}.*")
    if text not in known:
        close = difflib.get_close_matches(text, known, n=5, cutoff=0.6) or known[:8]
        hint = f"close matches: {', '.join(close)}" if close else f"{arch} has no pretrained tags"
        raise VitdiagError(
            f"'{tag}' is not a pretrained tag of {arch} in timm {timm.__version__} ({hint})."
        )
    cfg = get_pretrained_cfg(text)
    if not cfg.hf_hub_id:
        raise VitdiagError(
            f"{text} has no Hugging Face hub copy (only {cfg.url}): download that file and pass "
            "its path instead."
        )
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    return _HubRef(
        repo_id=repo_id,
        ref=revision or "main",
        arch=arch,
        pretrained_cfg=cfg.to_dict(),
        filename=cfg.hf_hub_filename,
    )


# --- cache and download -----------------------------------------------------------------------


def _snapshot(repo_id: str, revision: str, patterns: list[str], env: _HubEnv) -> Path:
    """huggingface_hub's snapshot folder for these files, with its errors made one clear line."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            cache_dir=str(env.cache_dir),
            local_files_only=env.offline,
            endpoint=env.endpoint,
            library_name="vitdiag",
        )
    except Exception as error:  # noqa: BLE001 - translated below or re-raised
        raise _explain(error, repo_id, revision, env) from error
    return Path(path)


def _explain(error: Exception, repo_id: str, revision: str, env: _HubEnv) -> Exception:
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        return VitdiagError(
            f"{repo_id} is a gated repo: accept its terms on https://huggingface.co/{repo_id} "
            f"and {_TOKEN_FIX}."
        )
    if isinstance(error, RepositoryNotFoundError) or _status(error) == 401:
        return VitdiagError(
            f"{repo_id} was not found on the Hugging Face hub, or it is private: check the name, "
            f"or {_TOKEN_FIX}."
        )
    if isinstance(error, RevisionNotFoundError):
        return VitdiagError(
            f"{repo_id} has no revision '{revision}' on the Hugging Face hub: use a branch, tag "
            "or commit hash that exists (or drop @REVISION for main)."
        )
    if isinstance(error, HFValidationError):
        return VitdiagError(f"'{repo_id}' is not a valid hub repo id: write hf-hub:ORG/NAME.")
    if isinstance(error, LocalEntryNotFoundError):
        return _not_cached(repo_id, revision, env)
    if isinstance(error, (HfHubHTTPError, OSError, ConnectionError)) or _is_http_error(error):
        return VitdiagError(
            f"could not download {repo_id} ({type(error).__name__}: {_first_line(error)}): "
            f"{env.settings()}."
        )
    return error


def _not_cached(repo_id: str, revision: str, env: _HubEnv) -> VitdiagError:
    repo_dir = env.cache_dir / ("models--" + repo_id.replace("/", "--"))
    cached = _cached_revisions(repo_dir)
    dangling = _dangling_ref(repo_dir, revision)
    if dangling is not None:
        return VitdiagError(
            f"{repo_dir / 'refs' / revision} names snapshot {dangling}, which is missing from "
            f"{repo_dir / 'snapshots'}; the cache is incomplete, so download {repo_id} again "
            "(unset HF_HUB_OFFLINE and go online)."
        )
    if cached:
        return VitdiagError(
            f"revision '{revision}' of {repo_id} is not in the cache at {env.cache_dir} (cached: "
            f"{', '.join(cached)}): pick one of those, or go online (unset HF_HUB_OFFLINE) to "
            "download it."
        )
    return VitdiagError(f"{repo_id} is not in the Hugging Face cache: {env.settings()}.")


def _check_links(folder: Path, repo_id: str) -> None:
    """A snapshot file whose blob is gone (an interrupted download, a pruned cache) is named,
    rather than taken for a file the repo does not have."""
    names = {*CONFIG_FILES, *(n for files in WEIGHTS_BY_KIND.values() for n in files)}
    for name in sorted(names):
        path = folder / name
        if path.is_symlink() and not path.exists():
            raise VitdiagError(
                f"{path} in the cached snapshot of {repo_id} links to a blob that is missing; "
                "the cache is incomplete, so download it again (unset HF_HUB_OFFLINE, or run "
                f"`hf download {repo_id}` online)."
            )


def _dangling_ref(repo_dir: Path, revision: str) -> str | None:
    """The commit a cached ref names when its snapshot folder is missing."""
    ref = repo_dir / "refs" / revision
    if not ref.is_file():
        return None
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return "?"
    return None if (repo_dir / "snapshots" / commit).is_dir() else commit


def _cached_revisions(repo_dir: Path) -> list[str]:
    refs = sorted(p.name for p in (repo_dir / "refs").glob("*") if p.is_file())
    snapshots = sorted(p.name for p in (repo_dir / "snapshots").glob("*") if p.is_dir())
    return refs + [s for s in snapshots if s not in refs]


def _status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _is_http_error(error: Exception) -> bool:
    # httpx / requests errors are not OSError; they still mean "the Hub could not be reached"
    return type(error).__module__.split(".")[0] in {"httpx", "httpx2", "requests", "urllib3"}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"


# --- which weights ----------------------------------------------------------------------------


def _kinds(folder: Path) -> list[str]:
    """Formats the snapshot's configs allow, most specific first."""
    config = _read_json(folder / "config.json")
    kinds = []
    if "architecture" in config:
        kinds.append("timm-hub")
    if (folder / "open_clip_config.json").is_file():
        kinds.append("open_clip-hub")
    if "model_type" in config:
        kinds.append("transformers-hub")
    return kinds


def _find_weights(folder: Path, ref: _HubRef, env: _HubEnv) -> tuple[str, Path]:
    kinds = _kinds(folder)
    if not kinds:
        raise VitdiagError(
            f"{ref.repo_id} has neither a config.json with 'architecture' (timm) or 'model_type' "
            "(transformers) nor an open_clip_config.json, so vitdiag cannot tell how to load it."
        )
    wanted = [(k, (ref.filename,) if ref.filename else WEIGHTS_BY_KIND[k]) for k in kinds]
    found = _first_present(folder, wanted)
    if found is None and not env.offline:
        listing = _list_files(ref.repo_id, folder.name, env)
        chosen = _first_listed(listing, wanted)
        if chosen is not None:
            folder = _snapshot(ref.repo_id, folder.name, [chosen[1]], env)
            # shard names are known only once the index is here
            if chosen[1].endswith(".index.json"):
                folder = _snapshot(ref.repo_id, folder.name, _shards(folder / chosen[1]), env)
            found = _first_present(folder, wanted)
    if found is None:
        names = sorted({name for _, files in wanted for name in files})
        where = "in the cache" if env.offline else "in the repo"
        raise VitdiagError(
            f"{ref.repo_id} (revision {folder.name}) has no weights file vitdiag reads {where} "
            f"(looked for {', '.join(names)})"
            + (": unset HF_HUB_OFFLINE and go online to download them." if env.offline else ".")
        )
    return found


def _first_present(folder: Path, wanted: list[tuple[str, tuple[str, ...]]]):
    for kind, files in wanted:
        for name in files:
            path = folder / name
            if path.is_file() and (
                not name.endswith(".index.json")
                or all((folder / s).is_file() for s in _shards(path))
            ):
                return kind, path
    return None


def _first_listed(listing: set[str], wanted: list[tuple[str, tuple[str, ...]]]):
    for kind, files in wanted:
        for name in files:
            if name in listing:
                return kind, name
    return None


def _shards(index: Path) -> list[str]:
    weight_map = _read_json(index).get("weight_map", {})
    return sorted(set(weight_map.values()))


def _list_files(repo_id: str, revision: str, env: _HubEnv) -> set[str]:
    from huggingface_hub import HfApi

    try:
        return set(HfApi(endpoint=env.endpoint).list_repo_files(repo_id, revision=revision))
    except Exception as error:  # noqa: BLE001 - translated below or re-raised
        raise _explain(error, repo_id, revision, env) from error


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise VitdiagError(f"{path} is not valid JSON ({error}): re-download the repo.") from error
    return data if isinstance(data, dict) else {}
