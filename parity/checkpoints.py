"""Reading checkpoints safely and loading them with ``strict=True`` only."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

from parity.errors import CheckpointError
from parity.results import KeyDiff

__all__ = ["StrictLoadError", "read_state_dict", "diff_state_dict", "load_state_dict_strict", "explain_key_diff"]

_NESTING_KEYS = ("state_dict", "model", "model_state_dict", "module", "ema", "state_dict_ema", "model_ema")
_SHOWN_KEYS = 12


class StrictLoadError(CheckpointError):
    """A state_dict does not match a module; ``key_diff`` says exactly how."""

    def __init__(self, message: str, key_diff: KeyDiff) -> None:
        super().__init__(message)
        self.key_diff = key_diff


def read_state_dict(path: str | Path) -> dict:
    """Read a flat ``{name: tensor}`` state_dict without executing pickled code.

    ``.safetensors`` files go through safetensors; anything else through
    ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: missing file, a pickle that needs arbitrary code, or a nested checkpoint.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} cannot be read with torch.load(weights_only=True): it pickles objects other "
            f"than tensors ({str(e).splitlines()[0]}).\n"
            "Note: parity never runs pickled code. If you trust the file, convert it once in a "
            "separate process: sd = torch.load(path, weights_only=False)['state_dict' or ...]; "
            "safetensors.torch.save_file(sd, 'weights.safetensors')."
        ) from e
    except Exception as e:  # safetensors and torch raise a variety of types on corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state_dict")
    nested = [k for k in _NESTING_KEYS if isinstance(state.get(k), Mapping)]
    if nested or not all(isinstance(v, torch.Tensor) for v in state.values()):
        where = f" under {nested!r}" if nested else ""
        raise CheckpointError(
            f"{path} is a nested checkpoint{where}, not a flat state_dict "
            f"(top-level keys: {sorted(state)[:_SHOWN_KEYS]}).\n"
            "Note: save the module's state_dict() itself, e.g. torch.save(ckpt['state_dict'], path)."
        )
    return dict(state)


def diff_state_dict(module, state_dict: Mapping, *, target: str, source: str) -> KeyDiff:
    """Compare a module's expected keys and shapes with a state_dict's."""
    expected = module.state_dict()
    shapes = tuple(
        (k, tuple(expected[k].shape), tuple(state_dict[k].shape))
        for k in expected
        if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)
    )
    return KeyDiff(
        target=target,
        source=source,
        missing=tuple(k for k in expected if k not in state_dict),
        unexpected=tuple(k for k in state_dict if k not in expected),
        shape_mismatches=shapes,
    )


def load_state_dict_strict(module, state_dict: Mapping, *, target: str, source: str) -> KeyDiff:
    """``module.load_state_dict(state_dict, strict=True)``, explaining any mismatch first.

    Raises:
        StrictLoadError: keys are missing or unexpected, or shapes differ.
    """
    diff = diff_state_dict(module, state_dict, target=target, source=source)
    if not diff.loads:
        raise StrictLoadError(explain_key_diff(diff), diff)
    module.load_state_dict(state_dict, strict=True)
    return diff


def explain_key_diff(diff: KeyDiff) -> str:
    """The message for a state_dict that does not load: what, the keys, and the fix."""

    def listing(title: str, keys: tuple[str, ...]) -> list[str]:
        if not keys:
            return []
        shown = [f"    {k}" for k in keys[:_SHOWN_KEYS]]
        more = [f"    ... and {len(keys) - _SHOWN_KEYS} more"] if len(keys) > _SHOWN_KEYS else []
        return [f"  {title} ({len(keys)}):", *shown, *more]

    lines = [f"{diff.source} does not load into {diff.target} with strict=True"]
    lines += listing("Missing key(s): in the module, not in the checkpoint", diff.missing)
    lines += listing("Unexpected key(s): in the checkpoint, not in the module", diff.unexpected)
    lines += listing(
        "Size mismatch(es): module vs checkpoint",
        tuple(f"{k}: {list(m)} vs {list(c)}" for k, m, c in diff.shape_mismatches),
    )
    lines.append(
        "Fix: build the module the weights were trained with ([head].class and kwargs, or "
        "[backbone].model and kwargs); strict=False would leave these layers randomly initialised."
    )
    return "\n".join(lines)
