"""Reading checkpoints safely and loading them with ``strict=True`` only."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping
from pathlib import Path

from parity.errors import CheckpointError, ParityError
from parity.store.fixtures import Fixture, verify_pinned_checkpoint
from parity.results import KeyDiff

__all__ = [
    "StrictLoadError",
    "read_checkpoint",
    "nested_entries",
    "select_state_dict",
    "remap_keys",
    "read_state_dict",
    "trained_shapes",
    "fingerprint",
    "diff_state_dict",
    "load_state_dict_strict",
    "explain_key_diff",
]
_SHOWN_KEYS = 12


class StrictLoadError(CheckpointError):
    """A state_dict does not match a module; ``key_diff`` says exactly how."""

    def __init__(self, message: str, key_diff: KeyDiff) -> None:
        super().__init__(message)
        self.key_diff = key_diff


def read_checkpoint(path: str | Path) -> Mapping:
    """Read a checkpoint file as it is (possibly nested) without executing pickled code.

    safetensors files (by their bytes, whatever their name) go through safetensors; anything else
    through ``torch.load(weights_only=True)``, which refuses pickles that need arbitrary code.
    A file a loaded fixture records is checked against its sha256 (`parity.store.fixtures.verify_pinned_checkpoint`).

    Raises:
        CheckpointError: missing or unreadable file, or a pickle that needs arbitrary code.
        FixtureChangedError: the file holds other bytes than the fixture loaded last records for it.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _check_declared_sizes(path)
    try:
        if path.suffix == ".safetensors" or _is_safetensors(path):  # the bytes decide, not the name
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours its message for terminals
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line or "WeightsUnpickler" in line),
                      lines[0] if lines else type(e).__name__)
        raise CheckpointError(
            f"{path} cannot be read with torch.load(weights_only=True): it pickles objects other "
            f"than tensors and plain containers ({reason}).\n"
            "Why: since torch 2.6 torch.load defaults to weights_only=True; older checkpoints often "
            "pickle numpy scalars, argparse Namespaces or whole modules, which would run code to load.\n"
            "Note: parity never runs pickled code. If you trust the file, convert it once, in a "
            "separate process: load it with weights_only disabled, take its state_dict (or the module's "
            ".state_dict()), and save that with safetensors.torch.save_file(sd, 'weights.safetensors')."
        ) from e
    except Exception as e:  # safetensors and torch raise a variety of types on corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a state_dict.\n"
            "Note: save module.state_dict(), not the module."
        )
    verify_pinned_checkpoint(path)  # after the read: a file replaced before or during it is seen
    return state


def _is_safetensors(path: Path) -> bool:
    """Whether the file starts as safetensors files do: an 8-byte little-endian header length, then that
    many bytes of a JSON object, within the file."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _check_declared_sizes(path: Path) -> None:
    """Refuse a zip checkpoint whose members claim more bytes than the file holds, before reading any.

    torch.save stores members uncompressed, so a real checkpoint's declared sizes add up to at
    most its own size; a compressed or lying member would be inflated into memory first.
    """
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: a damaged zip archive ({e})") from e
    size = path.stat().st_size
    declared = sum(m.file_size for m in members)
    packed = [m.filename for m in members if m.compress_type != zipfile.ZIP_STORED]
    if declared > size or packed:
        detail = (f"members {packed[:3]} are compressed" if packed
                  else f"its members declare {declared} bytes but the file has {size}")
        raise CheckpointError(
            f"refusing checkpoint {path}: {detail}; torch.save writes uncompressed members, so this is "
            "not a torch checkpoint (or it is damaged) and reading it would inflate it into memory.\n"
            "Note: re-save the weights with torch.save(state_dict) or safetensors.torch.save_file."
        )


def nested_entries(checkpoint: Mapping) -> list[str]:
    """Top-level keys of a checkpoint whose values are themselves state_dicts."""
    import torch

    return [k for k, v in checkpoint.items()
            if isinstance(v, Mapping) and v and all(isinstance(t, torch.Tensor) for t in v.values())]


def select_state_dict(checkpoint: Mapping, *, key: str | None, source: str) -> dict:
    """The flat ``{name: tensor}`` mapping inside a checkpoint.

    Raises:
        CheckpointError: ``key`` is absent, or the checkpoint is nested and no ``key`` says where.
    """
    import torch

    if key is not None:
        if not isinstance(checkpoint.get(key), Mapping):
            raise CheckpointError(
                f"{source} has no state_dict under {key!r}; nested state_dicts: {nested_entries(checkpoint)}"
            )
        checkpoint = checkpoint[key]
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    nested = nested_entries(checkpoint)
    others = sorted(k for k in checkpoint if k not in nested)
    fix = (f'Fix: set state_dict_key = "{_preferred(nested)}" in the spec section that names this file'
           if nested else "Note: save the module's state_dict() itself.")
    raise CheckpointError(
        f"{source} is a nested checkpoint, not a flat state_dict: state_dicts under {nested}, "
        f"other entries {others[:_SHOWN_KEYS]}.\n{fix}"
    )


def _preferred(nested: list[str]) -> str:
    for name in ("state_dict", "model_state_dict", "model", "module"):
        if name in nested:
            return name
    return nested[0]


def remap_keys(state_dict: Mapping, key_map: Mapping[str, str], drop_keys=(), *, source: str) -> dict:
    """Apply an explicit key mapping: the longest matching checkpoint prefix is replaced.

    Raises:
        CheckpointError: an entry matches no key, or two keys map to the same name.
    """
    out: dict = {}
    used: set[str] = set()
    dropped = set(drop_keys)
    missing_drops = dropped - set(state_dict)
    if missing_drops:
        raise CheckpointError(f"{source}: drop_keys {sorted(missing_drops)} are not in the checkpoint")
    prefixes = sorted(key_map, key=len, reverse=True)
    for key, value in state_dict.items():
        if key in dropped:
            continue
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        name = key if prefix is None else key_map[prefix] + key[len(prefix):]
        if prefix is not None:
            used.add(prefix)
        if name in out:
            raise CheckpointError(f"{source}: key_map sends two checkpoint keys to {name!r}")
        out[name] = value
    unused = [p for p in key_map if p not in used]
    if unused:
        raise CheckpointError(f"{source}: key_map entries {unused} match no checkpoint key")
    return out


def read_state_dict(path: str | Path, *, key: str | None = None, key_map: Mapping[str, str] | None = None,
                    drop_keys=()) -> dict:
    """Read a checkpoint safely and return its flat state_dict, with any explicit key mapping applied.

    Raises:
        CheckpointError: see `read_checkpoint`, `select_state_dict` and `remap_keys`.
    """
    source = str(path)
    state = select_state_dict(read_checkpoint(path), key=key, source=source)
    if key_map or drop_keys:
        state = remap_keys(state, key_map or {}, drop_keys, source=source)
    return state


def trained_shapes(fixture: Fixture, part: str) -> dict[str, tuple[int, ...]]:
    """Shape of each trained tensor of ``part``, in the trained module's order where the fixture keeps a copy of its
    checkpoint (else from its recorded structure, in the manifest's order)."""
    entry = (fixture.manifest.get("weights") or {}).get(part) or {}
    names = list(entry.get("tensors") or ())
    path = fixture.root / entry["file"] if entry.get("file") else None
    if path is not None and path.is_file():
        try:
            state = read_state_dict(path)
        except ParityError:
            state = {}
        wanted = set(names)
        shapes = {n: tuple(t.shape) for n, t in state.items() if n in wanted}  # in the trained module's order
        if len(shapes) == len(names):
            return shapes
    structure = (fixture.pipeline.get(part) or {}).get("structure") or {}
    shapes = {}
    for name in names:
        text = structure.get(name)
        if isinstance(text, str) and text.startswith("[") and text.endswith("]"):
            shapes[name] = tuple(int(x) for x in text[1:-1].split(",") if x.strip())
    return shapes


def fingerprint(state_dict: Mapping) -> dict[str, str]:
    """sha256 per tensor over dtype, shape and bytes: equal fingerprints mean bit-identical weights."""
    import torch

    def one(tensor) -> str:
        t = tensor.detach().cpu().contiguous()
        digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            # view(uint8) refuses 0-dim tensors (BatchNorm's num_batches_tracked, scalar parameters);
            # reshape(-1) of a contiguous tensor is a view with the same bytes.
            digest.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy of the tensor
        return digest.hexdigest()

    # hashlib releases the GIL on large buffers, so threads hash tensors in parallel.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(state_dict, pool.map(one, state_dict.values())))


def diff_state_dict(module, state_dict: Mapping, *, target: str, source: str) -> KeyDiff:
    """Compare a module's expected keys and shapes with a state_dict's."""
    expected = module.state_dict()
    shapes = tuple(
        (k, tuple(expected[k].shape), tuple(state_dict[k].shape))
        for k in expected
        if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)
    )
    dtypes = tuple(
        (k, str(expected[k].dtype).replace("torch.", ""), str(state_dict[k].dtype).replace("torch.", ""))
        for k in expected
        if k in state_dict and expected[k].dtype != state_dict[k].dtype
    )
    return KeyDiff(
        target=target,
        source=source,
        missing=tuple(k for k in expected if k not in state_dict),
        unexpected=tuple(k for k in state_dict if k not in expected),
        shape_mismatches=shapes,
        dtype_mismatches=dtypes,
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
    """The message for a state_dict that does not load: what, the keys, the cause and the fix."""

    def listing(title: str, keys: tuple[str, ...]) -> list[str]:
        if not keys:
            return []
        shown = [f"    {k}" for k in keys[:_SHOWN_KEYS]]
        more = [f"    ... and {len(keys) - _SHOWN_KEYS} more"] if len(keys) > _SHOWN_KEYS else []
        return [f"  {title} ({len(keys)}):", *shown, *more]

    fix = diff.fix
    lines = [f"{diff.source} does not load into {diff.target} with strict=True"]
    lines += [f"  Cause: {cause}" for cause in (fix.causes if fix else ())]
    if fix is not None and fix.verified:
        lines.append(f"  Fix: add to [{diff.section}] in the spec (loading stays strict=True):")
        lines += [f"      {line}" for line in fix.spec_lines]
    else:
        where = "[head].class and kwargs" if diff.section == "head" else "[backbone].model and kwargs"
        lines.append(
            f"  Fix: build the module the weights were trained with ({where}); `parity inspect CHECKPOINT` "
            "prints a class that loads them. A non-strict load would leave these layers randomly initialised."
        )
    if diff.inferred:
        lines.append("  The checkpoint's architecture, inferred from its tensors:")
        lines += [f"      {layer.path or '<root>'}: {layer.call}" for layer in diff.inferred]
    lines += listing("Missing key(s): in the module, not in the checkpoint", diff.missing)
    lines += listing("Unexpected key(s): in the checkpoint, not in the module", diff.unexpected)
    lines += listing(
        "Size mismatch(es): module vs checkpoint",
        tuple(f"{k}: {list(m)} vs {list(c)}" for k, m, c in diff.shape_mismatches),
    )
    lines += listing(
        "Dtype difference(s): module vs checkpoint (cast on load)",
        tuple(f"{k}: {m} vs {c}" for k, m, c in diff.dtype_mismatches),
    )
    return "\n".join(lines)
