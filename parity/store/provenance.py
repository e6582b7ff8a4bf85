"""Provenance: the git revision of the code that made or checks a fixture."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["git_revision", "known_revision"]


def git_revision(path: str | Path) -> str | None:
    """``git rev-parse HEAD`` of the repository holding ``path`` (``+dirty`` with uncommitted changes)."""
    folder = Path(path).resolve()
    folder = folder if folder.is_dir() else folder.parent
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def known_revision(revision: str | None) -> dict[str, str]:
    """``{"git_revision": revision}`` when it is known: code outside git has no revision to drift from."""
    return {} if revision is None else {"git_revision": revision}
