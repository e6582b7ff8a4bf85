"""Exception hierarchy: every parity error is a `ParityError` and also a builtin."""

from __future__ import annotations

__all__ = [
    "ParityError",
    "SpecError",
    "FixtureError",
    "FixtureChangedError",
    "CheckpointError",
    "DeployError",
    "DriftError",
    "ReportError",
]


class ParityError(Exception):
    """Root of every error parity raises on purpose."""


class SpecError(ParityError, ValueError):
    """The spec file is missing, malformed, or asks for something impossible."""


class FixtureError(ParityError, OSError):
    """Fixture data is missing, inconsistent, or fails its checksum."""


class FixtureChangedError(FixtureError):
    """A fixture was regenerated or edited while it was being read: run again, nothing is mixed."""


class CheckpointError(ParityError, RuntimeError):
    """A checkpoint cannot be read, or does not load with ``strict=True``."""


class DriftError(ParityError, AssertionError):
    """The candidate pipeline does not reproduce the reference."""


class ReportError(ParityError, ValueError):
    """A saved report.json cannot be read or was written by an unknown schema version."""


class DeployError(ParityError, RuntimeError):
    """A module cannot be deployed to the runtime asked for: refused for this device, precision or
    quantization, the runtime is not installed, or its export or compilation failed."""
