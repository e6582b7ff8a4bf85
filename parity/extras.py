"""The optional libraries (transformers, open_clip, onnxruntime, the service stack, Ray, MLflow, KServe, Gradio, OpenVINO, Polygraphy) and the
extra that installs each."""

from __future__ import annotations

import importlib
from types import ModuleType

from parity.errors import SpecError

__all__ = ["EXTRAS", "require"]

# Module name → the optional extra that installs it, as named in pyproject.toml.
EXTRAS = {"transformers": "hf", "open_clip": "open-clip", "onnxruntime": "onnx", "onnx": "onnx",
          "fastapi": "service", "uvicorn": "service", "ray": "ray", "mlflow": "mlflow", "kserve": "oip",
          "gradio": "gradio", "gradio_client": "gradio", "openvino": "deploy", "polygraphy": "bench"}


def require(library: str, purpose: str | None = None) -> ModuleType:
    """Import an optional library, or say which extra installs it.

    Args:
        library: a module named in `EXTRAS`.
        purpose: what needs it, for the message (default: a ``[backbone].library`` of that name).

    Raises:
        SpecError: the library is not installed.
    """
    try:
        return importlib.import_module(library)
    except ImportError as e:
        needs = purpose or f"[backbone].library = {library!r}"
        raise SpecError(f"{needs} needs the optional extra: pip install 'parity[{EXTRAS[library]}]' ({e})") from e
