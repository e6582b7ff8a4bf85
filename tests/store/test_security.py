"""No pickled code ever runs: a checkpoint whose unpickling would create a file is refused first."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parity.store.checkpoints import read_checkpoint
from parity.errors import CheckpointError


class Payload:
    """Unpickling this calls open(target, "w"): a file appears if pickled code runs."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def _malicious(tmp_path: Path, name: str) -> tuple[Path, Path]:
    target = tmp_path / f"{name}.created"
    path = tmp_path / f"{name}.pth"
    torch.save({"weight": torch.zeros(2), "payload": Payload(target)}, path)
    return path, target


def test_the_payload_is_real(tmp_path):
    """Control: an unsafe load does create the file, so the refusal below is meaningful."""
    path, target = _malicious(tmp_path, "control")
    torch.load(path, weights_only=False)
    assert target.exists()


def test_malicious_pickle_is_refused_without_running(tmp_path):
    path, target = _malicious(tmp_path, "evil")
    with pytest.raises(CheckpointError, match="parity never runs pickled code"):
        read_checkpoint(path)
    assert not target.exists()


def test_malicious_pickle_through_the_cli_is_refused(tmp_path, capsys):
    from parity.cli import main

    path, target = _malicious(tmp_path, "evil_cli")
    assert main(["inspect", str(path)]) == 2
    assert "cannot be read with torch.load(weights_only=True)" in " ".join(capsys.readouterr().err.split())
    assert not target.exists()
