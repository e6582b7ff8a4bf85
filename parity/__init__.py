"""parity: a training-inference parity gate for CLIP backbone -> embedding -> DNN head pipelines.

The public API loads lazily, so ``import parity`` (and the pytest plugin) stays cheap
until something that needs torch is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

import parity.libraries  # noqa: F401 - registers the built-in library adapters, whose vocabulary specs use
from parity.errors import CheckpointError, DriftError, FixtureError, ParityError, SpecError

__version__ = "0.1.0"
__all__ = [
    "ParityError",
    "SpecError",
    "FixtureError",
    "CheckpointError",
    "DriftError",
    "load_spec",
    "build_pipeline",
    "run_check",
    "run_matrix",
    "diagnose",
    "diagnose_logged",
    "calibrate",
    "capture",
    "capture_pipeline",
    "explain_preprocess",
    "load_fixture",
    "init_spec",
]

_LAZY = {
    "load_spec": "parity.spec",
    "build_pipeline": "parity.model.pipeline",
    "run_check": "parity.commands.check",
    "run_matrix": "parity.commands.matrix",
    "diagnose": "parity.commands.diagnose",
    "diagnose_logged": "parity.commands.diagnose",
    "calibrate": "parity.commands.calibrate",
    "capture": "parity.commands.capture",
    "capture_pipeline": "parity.commands.capture",
    "load_fixture": "parity.store.fixtures",
    "init_spec": "parity.commands.init",
}


def explain_preprocess(a, b, *, images=(), transform=None):
    """`parity.preprocess.diff.explain_preprocess`, measuring ``images`` with the registered libraries'
    transforms (`parity.libraries.create_transform`) unless ``transform`` is given."""
    # deferred: the public API loads on first use, so `import parity` (and the pytest plugin) stays cheap
    from parity.preprocess.diff import explain_preprocess as explain

    return explain(a, b, images=images, transform=transform or parity.libraries.create_transform)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'parity' has no attribute {name!r}")
