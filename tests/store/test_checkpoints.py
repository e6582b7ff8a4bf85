"""Checkpoints are read without running pickled code and load with strict=True or not at all."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from parity.store.checkpoints import StrictLoadError, load_state_dict_strict, read_state_dict
from parity.errors import CheckpointError, ParityError


class Settings:
    """Stands in for the argparse Namespace or config object old training scripts pickle."""

    def __init__(self) -> None:
        self.lr = 3e-3


class Touch:
    """Unpickling this calls Path.touch(target): the file appears only if pickled code runs."""

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def _head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _head().state_dict().items()}


def _assert_same(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_reads_safetensors(tmp_path):
    save_file(_state(), tmp_path / "head.safetensors")
    _assert_same(read_state_dict(tmp_path / "head.safetensors"), _state())


def test_reads_a_plain_pth_state_dict(tmp_path):
    torch.save(_state(), tmp_path / "head.pth")
    _assert_same(read_state_dict(tmp_path / "head.pth"), _state())


def test_nested_checkpoint_names_the_entry_to_use(tmp_path):
    torch.save({"state_dict": _state(), "epoch": 7}, tmp_path / "best.pth")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "best.pth")
    message = str(info.value)
    assert "nested checkpoint" in message and "under ['state_dict']" in message
    assert 'Fix: set state_dict_key = "state_dict"' in message
    _assert_same(read_state_dict(tmp_path / "best.pth", key="state_dict"), _state())


def test_pickled_custom_object_is_refused(tmp_path):
    torch.save({**_state(), "args": Settings()}, tmp_path / "best.pth")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "best.pth")
    assert f"{tmp_path / 'best.pth'} cannot be read with torch.load(weights_only=True)" in str(info.value)
    assert "parity never runs pickled code" in str(info.value)


def test_refusal_names_the_refused_global(tmp_path):
    torch.save({**_state(), "args": Settings()}, tmp_path / "best.pth")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "best.pth")
    assert "\x1b[" not in str(info.value)
    assert "Settings" in str(info.value)


def test_pickled_code_never_runs(tmp_path):
    target = tmp_path / "pwned"
    torch.save({**_state(), "payload": Touch(target)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(tmp_path / "evil.pth")
    assert not target.exists()


def test_the_payload_would_run_if_unpickled(tmp_path):
    """Control: an unsafe load does create the file, so the test above can fail."""
    target = tmp_path / "pwned"
    torch.save({"payload": Touch(target)}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert target.exists()


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: "):
        read_state_dict(tmp_path / "nope.pth")


def test_checkpoint_error_is_a_runtime_error():
    assert issubclass(CheckpointError, RuntimeError)
    assert issubclass(CheckpointError, ParityError)
    assert issubclass(StrictLoadError, CheckpointError)


def test_strict_load_success():
    module = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    state = _state()
    diff = load_state_dict_strict(module, state, target="Head", source="head.pth")
    assert diff.loads
    assert (diff.missing, diff.unexpected, diff.shape_mismatches) == ((), (), ())
    _assert_same(module.state_dict(), state)


def test_strict_load_lists_exactly_the_mismatches():
    module = _head()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    state = _state()
    del state["2.bias"]
    state["2.scale"] = torch.ones(2)
    state["0.weight"] = torch.zeros(5, 4)
    with pytest.raises(StrictLoadError) as info:
        load_state_dict_strict(module, state, target="Head", source="head.pth")
    diff = info.value.key_diff
    assert (diff.missing, diff.unexpected) == (("2.bias",), ("2.scale",))
    assert diff.shape_mismatches == (("0.weight", (3, 4), (5, 4)),)
    assert not diff.loads
    message = str(info.value)
    assert message.startswith("head.pth does not load into Head with strict=True")
    # One section per kind of difference, each with its count and its keys on the lines below.
    assert re.search(r"Missing key\(s\)[^\n]*\(1\):\n\s+2\.bias\n", message), message
    assert re.search(r"Unexpected key\(s\)[^\n]*\(1\):\n\s+2\.scale\n", message), message
    assert re.search(r"Size mismatch\(es\)[^\n]*\(1\):\n\s+0\.weight: \[3, 4\] vs \[5, 4\]", message), message
    _assert_same(module.state_dict(), before)  # nothing was half-loaded
