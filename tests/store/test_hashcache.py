"""The hash cache: a file is hashed once while it keeps its identity, and again as soon as it changes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

import parity.store.fixtures
import parity.model.pipeline
from parity.store.fixtures import cached_sha256, sha256_file
from parity.store.hashcache import CACHE_FILE, cache_dir
from parity.model.pipeline import load_weights


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("PARITY_CACHE_DIR", str(directory))
    monkeypatch.delenv("PARITY_HASH_CACHE", raising=False)
    return directory


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every full read of a file for its sha256."""
    seen: list[Path] = []

    def counting(path):
        seen.append(Path(path))
        return sha256_file(path)

    monkeypatch.setattr(parity.store.fixtures, "sha256_file", counting)
    return seen


def settled(path: Path, content: bytes, age: float = 60.0) -> Path:
    """Write ``content`` and date the file ``age`` seconds back, as a checkpoint that sat on disk."""
    path.write_bytes(content)
    past = time.time_ns() - int(age * 1e9)
    os.utime(path, ns=(past, past))
    return path


def test_second_run_does_not_read_the_file(tmp_path, cache, reads):
    ckpt = settled(tmp_path / "w.bin", os.urandom(4096))
    first = cached_sha256(ckpt)
    second = cached_sha256(ckpt)
    assert first == second == sha256_file(ckpt)
    assert reads == [ckpt]
    assert (cache / CACHE_FILE).is_file()


def test_same_size_new_content_is_hashed_again(tmp_path, cache, reads):
    ckpt = settled(tmp_path / "w.bin", b"a" * 4096)
    before = cached_sha256(ckpt)
    settled(ckpt, b"b" * 4096, age=30.0)  # same size, a different mtime
    after = cached_sha256(ckpt)
    assert after != before and after == sha256_file(ckpt)
    assert len(reads) == 2


def test_touched_file_is_hashed_again(tmp_path, cache, reads):
    ckpt = settled(tmp_path / "w.bin", os.urandom(1024))
    cached_sha256(ckpt)
    later = time.time_ns() - int(10e9)
    os.utime(ckpt, ns=(later, later))
    assert cached_sha256(ckpt) == sha256_file(ckpt)
    assert len(reads) == 2


def test_a_freshly_written_file_is_not_stored(tmp_path, cache, reads):
    """Within the filesystem's timestamp tick a rewrite could keep the same identity: hash it every time."""
    ckpt = tmp_path / "w.bin"
    ckpt.write_bytes(os.urandom(512))
    cached_sha256(ckpt)
    cached_sha256(ckpt)
    assert len(reads) == 2


@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2, 3]", b"\xff\xfe\x00",
                                    b'{"format": 1, "entries": {"k": 3}}'])
def test_corrupt_cache_is_ignored_and_replaced(tmp_path, cache, reads, damage):
    ckpt = settled(tmp_path / "w.bin", os.urandom(1024))
    cache.mkdir()
    (cache / CACHE_FILE).write_bytes(damage)
    assert cached_sha256(ckpt) == sha256_file(ckpt)
    assert cached_sha256(ckpt) == sha256_file(ckpt)
    assert len(reads) == 1  # the damaged file was replaced by a good one
    assert json.loads((cache / CACHE_FILE).read_text())["format"] == 1


def test_a_wrong_value_in_the_cache_is_not_trusted(tmp_path, cache, reads):
    ckpt = settled(tmp_path / "w.bin", os.urandom(1024))
    cached_sha256(ckpt)
    data = json.loads((cache / CACHE_FILE).read_text())
    for entry in data["entries"].values():
        entry["value"] = "not a digest"
    (cache / CACHE_FILE).write_text(json.dumps(data))
    assert cached_sha256(ckpt) == sha256_file(ckpt)
    assert len(reads) == 2


def test_cache_off(tmp_path, cache, reads, monkeypatch):
    monkeypatch.setenv("PARITY_HASH_CACHE", "0")
    ckpt = settled(tmp_path / "w.bin", os.urandom(1024))
    cached_sha256(ckpt)
    cached_sha256(ckpt)
    assert len(reads) == 2
    assert not cache.exists()


def test_unwritable_cache_is_no_error(tmp_path, reads, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PARITY_CACHE_DIR", str(blocker / "cache"))  # a directory below a file
    ckpt = settled(tmp_path / "w.bin", os.urandom(1024))
    assert cached_sha256(ckpt) == cached_sha256(ckpt) == sha256_file(ckpt)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("PARITY_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "parity"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "parity"


class _Head(torch.nn.Module):
    """Written here, not one of the bundled heads: BatchNorm buffers and a 0-dim counter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 4)
        self.bn = torch.nn.BatchNorm1d(4)


def _load(module, path: Path, **settings) -> dict[str, str]:
    loading = dict(section="head", target="_Head", state_dict_key=None, key_map={}, drop_keys=())
    loading.update(settings)
    return load_weights(module, path, **loading)


def test_fingerprints_cached_per_file_and_loading_settings(tmp_path, cache, monkeypatch):
    torch.manual_seed(0)
    source = _Head()
    ckpt = tmp_path / "head.pth"
    torch.save({"model": {f"net.{k}": v for k, v in source.state_dict().items()}}, ckpt)
    settled(ckpt, ckpt.read_bytes())
    calls = []
    real = parity.model.pipeline.fingerprint
    monkeypatch.setattr(parity.model.pipeline, "fingerprint", lambda sd: calls.append(1) or real(sd))

    settings = dict(state_dict_key="model", key_map={"net.": ""})
    first = _load(_Head(), ckpt, **settings)
    module = _Head()
    second = _load(module, ckpt, **settings)
    assert first == second == real(module.state_dict()) == real(source.state_dict())
    assert len(calls) == 1

    # The same file loaded into a float64 module gives other tensors: its own entry, not the float32 one.
    wide = _Head().double()
    assert _load(wide, ckpt, **settings) == real(wide.state_dict()) != first
    # Other loading settings are another entry too: here the BatchNorm is dropped, into a module without one.
    narrow = _Head()
    del narrow.bn
    bn_keys = tuple(f"net.bn.{k}" for k in source.bn.state_dict())
    dropped = _load(narrow, ckpt, drop_keys=bn_keys, **settings)
    assert dropped == real(narrow.state_dict()) == {k: v for k, v in first.items() if k.startswith("fc.")}
    assert len(calls) == 3


def test_a_tampered_referenced_checkpoint_is_caught_after_it_was_cached(tmp_path, cache, reads):
    """Same size, same mtime put back, same inode: the ctime still tells the cache the file changed."""
    import numpy as np

    from parity.errors import FixtureError
    from parity.store.fixtures import Fixture, verify_referenced_checkpoints

    ckpt = settled(tmp_path / "head.pth", b"\x01" * 2048)
    entry = {"referenced": True, "file": "head.pth", "sha256": sha256_file(ckpt), "bytes": 2048}
    fixture = Fixture(root=tmp_path, manifest={"weights": {"head": entry}}, rows=(),
                      embeddings=np.zeros((0, 4), np.float32), outputs=np.zeros((0, 2), np.float32))
    verify_referenced_checkpoints(fixture)
    verify_referenced_checkpoints(fixture)
    assert len(reads) == 1
    old = ckpt.stat()
    time.sleep(0.05)  # a later ctime than the write the cache saw, on any clock granularity in use
    with open(ckpt, "r+b") as f:
        f.write(b"\x02")
    os.utime(ckpt, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert ckpt.stat().st_size == old.st_size and ckpt.stat().st_mtime_ns == old.st_mtime_ns
    with pytest.raises(FixtureError, match="has changed since it was frozen"):
        verify_referenced_checkpoints(fixture)
