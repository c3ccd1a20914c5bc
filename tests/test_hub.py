"""Hub names and pretrained tags resolve from an emulated Hugging Face cache, with no network."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
from conftest import save_tiny_vit

from vitdiag.errors import VitdiagError
from vitdiag.loading.hub import HubSnapshot, fetch, is_hub_name

REV = "0123456789abcdef0123456789abcdef01234567"
OLD_REV = "fedcba9876543210fedcba9876543210fedcba98"
TAG = "vit_tiny_patch16_224.augreg_in21k"


def cache_repo(
    cache: Path, repo_id: str, rev: str, num_classes: int = 5, ref: str = "main"
) -> Path:
    """Lay out one repo exactly as huggingface_hub's cache does (files live directly in the
    snapshot folder; real caches symlink them to blobs/, which readers do not depend on)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = save_tiny_vit(repo / "snapshots" / rev, num_classes=num_classes)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(rev)
    return snapshot


_REAL_CONNECT = socket.socket.connect
_REAL_CREATE_CONNECTION = socket.create_connection
_REAL_GETADDRINFO = socket.getaddrinfo


class NetworkGuard:
    """Records every connection or DNS attempt and refuses it; nothing leaves the machine.
    Only a test's own server on 127.0.0.1 (`local_port`) is let through."""

    def __init__(self) -> None:
        self.attempts: list = []
        self.allowed = False  # a test of the online-but-unreachable path sets this
        self.local_port: int | None = None

    def _local(self, address) -> bool:
        return (
            self.local_port is not None
            and isinstance(address, tuple)
            and address[:2] in {("127.0.0.1", self.local_port), ("localhost", self.local_port)}
        )

    def connect(self, sock, address, *args):
        if self._local(address):
            return _REAL_CONNECT(sock, address, *args)
        self.refuse(address)

    def create_connection(self, address, *args, **kwargs):
        if self._local(address):
            return _REAL_CREATE_CONNECTION(address, *args, **kwargs)
        self.refuse(address)

    def getaddrinfo(self, host, port, *args, **kwargs):
        if self._local((host, port)):
            return _REAL_GETADDRINFO(host, port, *args, **kwargs)
        self.refuse((host, port))

    def refuse(self, address):
        self.attempts.append(address)
        raise ConnectionRefusedError("blocked by the test's network guard")


@pytest.fixture
def no_network(monkeypatch):
    guard = NetworkGuard()
    monkeypatch.setattr(
        socket.socket, "connect", lambda self, address, *a: guard.connect(self, address, *a)
    )
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: guard.refuse(address))
    monkeypatch.setattr(socket, "create_connection", guard.create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", guard.getaddrinfo)
    yield guard
    # a refused connection can be swallowed by a retry or fallback, so check the record too
    assert guard.allowed or guard.attempts == [], f"test touched the network: {guard.attempts}"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, no_network):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    return cache


def test_socket_guard_really_blocks(no_network):
    no_network.allowed = True
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(ConnectionRefusedError):
        socket.socket().connect(("127.0.0.1", 9))
    assert len(no_network.attempts) == 2


def test_hf_hub_name_resolves_to_cached_snapshot(hub_cache, no_network):
    folder = cache_repo(hub_cache, "timm/tiny_test", REV)

    snap = fetch("hf-hub:timm/tiny_test")

    assert isinstance(snap, HubSnapshot)
    assert snap.folder.resolve() == folder.resolve()
    assert snap.repo_id == "timm/tiny_test"
    assert snap.revision == REV
    assert snap.kind == "timm-hub"
    assert snap.arch == "vit_tiny_patch16_224"
    assert snap.weights.name == "model.safetensors"
    assert (snap.folder / "config.json").is_file()
    assert (snap.folder / "model.safetensors").is_file()
    assert no_network.attempts == []


def test_revision_suffix_picks_that_snapshot(hub_cache):
    cache_repo(hub_cache, "timm/tiny_test", REV, num_classes=5)
    old = cache_repo(hub_cache, "timm/tiny_test", OLD_REV, num_classes=7, ref="v1")
    # refs/main must still point at the newer revision
    (hub_cache / "models--timm--tiny_test" / "refs" / "main").write_text(REV)

    by_hash = fetch(f"hf-hub:timm/tiny_test@{OLD_REV}")
    by_ref = fetch("hf-hub:timm/tiny_test@v1")

    assert by_hash.folder.resolve() == old.resolve()
    assert by_hash.revision == OLD_REV
    assert by_ref.folder.resolve() == old.resolve()
    assert json.loads((by_ref.folder / "config.json").read_text())["num_classes"] == 7


def test_underscore_prefix_is_accepted_like_timm(hub_cache):
    cache_repo(hub_cache, "timm/tiny_test", REV)
    assert fetch("hf_hub:timm/tiny_test").revision == REV


def test_uncached_name_offline_names_repo_and_settings(hub_cache):
    with pytest.raises(VitdiagError) as err:
        fetch("hf-hub:someone/not_cached")
    msg = str(err.value)
    assert "someone/not_cached" in msg
    for setting in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_HOME"):
        assert setting in msg
    assert str(hub_cache) in msg
    assert "\n" not in msg


def test_revision_not_in_cache_says_so(hub_cache):
    cache_repo(hub_cache, "timm/tiny_test", REV)
    with pytest.raises(VitdiagError) as err:
        fetch("hf-hub:timm/tiny_test@v9")
    msg = str(err.value)
    assert "revision 'v9'" in msg
    assert "timm/tiny_test" in msg
    assert "main" in msg  # the revisions that are cached


def test_cached_snapshot_without_weights_is_a_clear_error(hub_cache):
    folder = cache_repo(hub_cache, "timm/tiny_test", REV)
    (folder / "model.safetensors").unlink()
    with pytest.raises(VitdiagError, match=r"timm/tiny_test.*model\.safetensors"):
        fetch("hf-hub:timm/tiny_test")


def test_bad_repo_id_is_a_clear_error(hub_cache):
    with pytest.raises(VitdiagError, match="ORG/NAME"):
        fetch("hf-hub:a/b/c")


def test_pretrained_tag_resolves_through_its_hf_hub_id(hub_cache, no_network):
    # The real weights (timm/vit_tiny_patch16_224.augreg_in21k, ~40 MB) are too big for a test:
    # a tiny model of the same architecture stands in for them under the same repo name, with the
    # tag's class count (21843) so that its head agrees with the tag's pretrained cfg.
    folder = cache_repo(hub_cache, f"timm/{TAG}", REV, num_classes=21843)

    snap = fetch(TAG)

    assert snap.folder.resolve() == folder.resolve()
    assert snap.repo_id == f"timm/{TAG}"
    assert snap.revision == REV
    assert snap.kind == "timm-hub"
    assert snap.arch == "vit_tiny_patch16_224"
    cfg = snap.pretrained_cfg
    assert cfg["num_classes"] == 21843
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5)
    assert tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert tuple(cfg["input_size"]) == (3, 224, 224)
    assert cfg["crop_pct"] == pytest.approx(0.9)
    assert cfg["interpolation"] == "bicubic"
    assert no_network.attempts == []


def test_unknown_pretrained_tag_lists_close_matches(hub_cache):
    with pytest.raises(VitdiagError) as err:
        fetch("vit_tiny_patch16_224.augreg_in21")
    msg = str(err.value)
    assert "vit_tiny_patch16_224.augreg_in21k" in msg
    assert "vit_tiny_patch16_224.augreg_in21k_ft_in1k" in msg


def test_is_hub_name():
    assert is_hub_name("hf-hub:timm/tiny_test")
    assert is_hub_name("hf-hub:timm/tiny_test@main")
    assert is_hub_name(TAG)
    assert is_hub_name("vit_small_patch16_224.augreg_in21k_ft_in1k")
    # an unknown tag of a known architecture is still meant as a tag (and fetch explains it)
    assert is_hub_name("vit_tiny_patch16_224.no_such_tag")
    assert not is_hub_name("vit_tiny_patch16_224")  # a bare architecture is --arch's job
    assert not is_hub_name("not_a_model.some_tag")
    assert not is_hub_name("vit_tiny_patch16_224.pth")  # a missing weights file, not a tag
    assert not is_hub_name("random words")
    assert not is_hub_name("")
    assert not is_hub_name("checkpoints/model.safetensors")


def test_local_path_wins_over_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / TAG).mkdir()
    (tmp_path / "hf-hub:timm").mkdir()
    (tmp_path / "hf-hub:timm" / "tiny_test").write_text("x")
    assert not is_hub_name(TAG)
    assert not is_hub_name("hf-hub:timm/tiny_test")
    assert not is_hub_name(str(tmp_path / TAG))


def test_cache_found_through_hf_home(tmp_path, monkeypatch, no_network):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = cache_repo(tmp_path / "home" / "hub", "timm/tiny_test", REV)
    assert fetch("hf-hub:timm/tiny_test").folder.resolve() == folder.resolve()


def test_fetched_folder_loads_in_plain_timm(hub_cache):
    import timm
    import torch

    cache_repo(hub_cache, "timm/tiny_test", REV, num_classes=5)
    snap = fetch("hf-hub:timm/tiny_test")

    model = timm.create_model("local-dir:" + str(snap.folder), pretrained=True).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert tuple(out.shape) == (2, 5)
    assert torch.isfinite(out).all()
    # pretrained=True really loaded the cached weights, not a fresh random init
    from safetensors.torch import load_file

    saved = load_file(str(snap.weights))
    assert torch.equal(model.state_dict()["head.weight"], saved["head.weight"])


def test_online_but_unreachable_falls_back_to_cache_then_names_repo(
    hub_cache, monkeypatch, no_network
):
    # Online mode against a hub that cannot be reached: the guard refuses the connection, so this
    # exercises huggingface_hub's real fallback with nothing leaving the machine.
    import huggingface_hub.constants

    no_network.allowed = True
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # an earlier test may have imported huggingface_hub while HF_HUB_OFFLINE=1 was set
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    folder = cache_repo(hub_cache, "timm/tiny_test", REV)

    assert fetch("hf-hub:timm/tiny_test").folder.resolve() == folder.resolve()
    with pytest.raises(VitdiagError) as err:
        fetch("hf-hub:someone/not_cached")
    msg = str(err.value)
    assert "someone/not_cached" in msg and "could not be reached" in msg
    assert "HF_HUB_CACHE" in msg and "\n" not in msg
    assert no_network.attempts, "online mode should have tried the (blocked) hub"


class _RefusingHub(http.server.BaseHTTPRequestHandler):
    """A stand-in Hub on 127.0.0.1 that answers every request as the real one does for a gated
    or a private repo (status and X-Error-Code header), so huggingface_hub raises its own errors."""

    answer: tuple[int, str] = (401, "GatedRepo")

    def _reply(self):
        status, code = self.answer
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", "Access to this repo is restricted.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _reply

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_hub(hub_cache, monkeypatch, no_network):
    import huggingface_hub.constants

    server = http.server.HTTPServer(("127.0.0.1", 0), _RefusingHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    no_network.local_port = server.server_port
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "")
    yield _RefusingHub
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ((401, "GatedRepo"), "gated"),
        ((401, "RepoNotFound"), "private"),
        ((404, "RepoNotFound"), "private"),
    ],
)
def test_gated_or_private_repo_says_how_to_give_a_token(
    refusing_hub, monkeypatch, answer, expected
):
    monkeypatch.setattr(refusing_hub, "answer", answer)
    with pytest.raises(VitdiagError) as err:
        fetch("hf-hub:someorg/locked_model")
    msg = str(err.value)
    assert "someorg/locked_model" in msg
    assert expected in msg
    assert "HF_TOKEN=" in msg and "hf auth login" in msg
    assert "\n" not in msg


# --- reliability v2: damaged caches, offline; the API and the CLI say the same line ---------


def _api_and_cli_error(source: str) -> str:
    """The VitdiagError `vitdiag.load` raises, checked to be what `vitdiag info` prints."""
    from typer.testing import CliRunner

    import vitdiag
    from vitdiag.cli import app

    with pytest.raises(VitdiagError) as info:
        vitdiag.load(source)
    msg = str(info.value)
    assert "\n" not in msg
    result = CliRunner().invoke(app, ["info", source])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.strip() == f"error: {msg}"
    return msg


def _dangle(path: Path) -> None:
    """What an interrupted download or a pruned cache leaves: a link to a blob that is gone."""
    path.unlink()
    path.symlink_to(Path("..") / ".." / "blobs" / ("0" * 64))


def test_offline_empty_cache_says_how_to_fetch(hub_cache):
    msg = _api_and_cli_error("hf-hub:timm/never_downloaded")
    assert "timm/never_downloaded is not in the Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE" in msg and str(hub_cache) in msg


def test_offline_complete_snapshot_loads_in_api_and_cli(hub_cache, no_network):
    from typer.testing import CliRunner

    import vitdiag
    from vitdiag.cli import app

    folder = cache_repo(hub_cache, "timm/tiny_test", REV)
    loaded = vitdiag.load("hf-hub:timm/tiny_test")
    assert loaded.provenance["hub"]["revision"] == REV
    assert loaded.num_classes == 5
    result = CliRunner().invoke(app, ["info", "hf-hub:timm/tiny_test"])
    assert result.exit_code == 0, result.output
    assert no_network.attempts == []
    assert (folder / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_snapshot_file_with_missing_blob_is_named(hub_cache, no_network, name):
    folder = cache_repo(hub_cache, "timm/tiny_test", REV)
    _dangle(folder / name)
    msg = _api_and_cli_error("hf-hub:timm/tiny_test")
    assert str(folder / name) in msg and "missing" in msg
    assert "download it again" in msg and "hf download timm/tiny_test" in msg
    assert no_network.attempts == []


def test_ref_naming_a_missing_snapshot_is_named(hub_cache, no_network):
    import shutil

    folder = cache_repo(hub_cache, "timm/tiny_test", REV)
    shutil.rmtree(folder)
    msg = _api_and_cli_error("hf-hub:timm/tiny_test")
    assert "refs/main names snapshot " + REV in msg and "missing" in msg
    assert "download timm/tiny_test again" in msg
    assert no_network.attempts == []
