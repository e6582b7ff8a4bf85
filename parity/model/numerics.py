"""The numeric environment a pipeline ran in: what decides its rounding, beyond the code itself.

Recorded by `parity.capture` as ``producer.numerics`` and probed again at check time, so a report
lists what differs between where the reference was made (often a GPU, where cuDNN convolutions
run in TF32 by default) and where the gate runs (often a CPU). `reduced_precision` reads a record
and says which reduced-precision arithmetic the reference used, for `parity.numerics.emulate`.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["probe_numerics", "candidate_numerics", "reduced_precision", "describe_reduced"]

_SDPA = ("flash", "mem_efficient", "math", "cudnn")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_numerics(device: Any = "cpu", *, batch_size: int | None = None,
                   autocast_dtype: str | None = None) -> dict[str, Any]:
    """This process's numeric environment for ``device``, as manifests record it.

    ``autocast_dtype`` defaults to the dtype of an autocast region active for the device, if any.
    """
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if autocast_dtype is None and torch.is_autocast_enabled(device.type):
        autocast_dtype = str(torch.get_autocast_dtype(device.type)).replace("torch.", "")
    record: dict[str, Any] = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "sdpa_backends": [name for name in _SDPA if getattr(torch.backends.cuda, f"{name}_sdp_enabled")()],
        "autocast_dtype": autocast_dtype,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    return record


def reduced_precision(numerics: Mapping[str, Any] | None) -> dict[str, str]:
    """Which operations of a recorded environment ran below float32: ``{"conv": "tf32", "matmul": ...,
    "autocast": "bfloat16"}``; empty for plain float32 (or no record).

    TF32 exists on CUDA devices of compute capability 8.0 (Ampere) and later; a record without the
    capability is taken at its flags' word.
    """
    if not numerics:
        return {}
    reduced: dict[str, str] = {}
    if numerics.get("autocast_dtype") in ("float16", "bfloat16"):
        reduced["autocast"] = numerics["autocast_dtype"]
    capability = numerics.get("compute_capability")
    tf32_hardware = numerics.get("device") == "cuda" and (
        capability is None or tuple(int(p) for p in str(capability).split(".")) >= (8, 0))
    if not tf32_hardware:
        return reduced
    if numerics.get("cudnn_allow_tf32"):
        reduced["conv"] = "tf32"
    precision = numerics.get("float32_matmul_precision", "highest")
    if precision == "medium":
        reduced["matmul"] = "bfloat16"  # cuBLAS may use bfloat16 internally at "medium"
    elif numerics.get("matmul_allow_tf32") or precision == "high":
        reduced["matmul"] = "tf32"
    return reduced


def describe_reduced(reduced: Mapping[str, str], numerics: Mapping[str, Any] | None = None) -> str:
    """``reference made on CUDA with cuDNN TF32`` (the words budgets and reports use)."""
    parts = []
    if "conv" in reduced:
        parts.append("cuDNN TF32")
    if "matmul" in reduced:
        parts.append(f"cuBLAS {reduced['matmul'].upper() if reduced['matmul'] == 'tf32' else reduced['matmul']}")
    if "autocast" in reduced:
        parts.append(f"{reduced['autocast']} autocast")
    where = "CUDA" if (numerics or {}).get("device") == "cuda" else str((numerics or {}).get("device", "?"))
    return f"reference made on {where} with {' and '.join(parts) if parts else 'float32'}"


def candidate_numerics(run, spec) -> dict[str, Any]:
    """The environment the candidate of ``spec`` ran in (this process, its device and batch size)."""
    device = run.description.get("runtime", {}).get("device", spec.runtime.device)
    try:
        return probe_numerics(device, batch_size=spec.runtime.batch_size)
    except (RuntimeError, ValueError):  # a device this process cannot query: the flags still describe it
        return probe_numerics("cpu", batch_size=spec.runtime.batch_size) | {"device": str(device)}
