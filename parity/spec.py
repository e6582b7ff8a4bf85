"""The spec: a declarative TOML description of the candidate inference pipeline."""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.errors import SpecError
from parity.preprocess import CHANNEL_ORDERS, RESIZE_BACKENDS, VALUE_SCALES
from parity.results import Tolerance

__all__ = [
    "EXTRACT_MODES",
    "INTERPOLATIONS",
    "CROP_MODES",
    "CHECKPOINT_FORMATS",
    "DTYPES",
    "STAGES",
    "BackboneSpec",
    "PreprocessSpec",
    "HeadSpec",
    "RuntimeSpec",
    "Spec",
    "load_spec",
    "default_tolerance",
]

EXTRACT_MODES = ("pre_logits", "forward", "cls", "mean_tokens")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")
CHECKPOINT_FORMATS = ("timm", "open_clip")
_VARIANT_FIELDS = ("resize_backend", "channel_order", "value_scale")
_DECODE_FIELDS = ("exif_transpose",)
NORMALIZE = ("none", "l2")
DTYPES = ("float32", "float64", "float16", "bfloat16")
STAGES = ("pixels", "embedding", "head", "outputs")

# In the spirit of torch.testing.assert_close's per-dtype defaults; half precision is
# looser because a whole network, not one op, sits between input and output.
_DEFAULT_ATOL_RTOL = {
    "float64": (1e-7, 1e-7),
    "float32": (1e-5, 1.3e-6),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
_DEFAULT_MIN_COSINE = {"float64": 0.999999, "float32": 0.99999, "float16": 0.9995, "bfloat16": 0.999}


def default_tolerance(stage: str, dtype: str) -> Tolerance:
    """The tolerance used for ``stage`` at ``dtype`` when the spec sets none."""
    atol, rtol = _DEFAULT_ATOL_RTOL[dtype]
    if stage == "pixels":
        # Preprocessing runs in float32 on the CPU whatever the model dtype.
        atol, rtol = _DEFAULT_ATOL_RTOL["float32"]
    cosine = _DEFAULT_MIN_COSINE[dtype] if stage == "embedding" else None
    return Tolerance(atol=atol, rtol=rtol, min_cosine=cosine, origin=f"default for {dtype}")


@dataclass(frozen=True)
class BackboneSpec:
    model: str
    library: str = "timm"
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    checkpoint_format: str = "timm"
    extract: str = "pre_logits"
    normalize: str = "none"
    state_dict_key: str | None = None
    key_map: Mapping[str, str] = field(default_factory=dict)
    drop_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreprocessSpec:
    """Explicit preprocessing fields; ``None`` means "resolve from the model's pretrained_cfg"."""

    input_size: tuple[int, int, int] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    crop_mode: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize_backend: str = "pil"
    channel_order: str = "rgb"
    value_scale: str = "unit"
    exif_transpose: bool = True

    def overrides(self) -> dict[str, Any]:
        """The fields that go into timm's data config (the rest select the transform's variant)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None and k not in _VARIANT_FIELDS + _DECODE_FIELDS}

    def variant(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in _VARIANT_FIELDS}


@dataclass(frozen=True)
class HeadSpec:
    class_path: str
    weights: Path
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    state_dict_key: str | None = None
    key_map: Mapping[str, str] = field(default_factory=dict)
    drop_keys: tuple[str, ...] = ()
    input_biases_order: tuple[int, ...] | None = None


@dataclass(frozen=True)
class RuntimeSpec:
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8


@dataclass(frozen=True)
class Spec:
    """A parsed, validated spec. Paths are absolute (resolved against the spec's folder)."""

    path: Path
    name: str
    backbone: BackboneSpec
    head: HeadSpec
    preprocess: PreprocessSpec = PreprocessSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    fixtures: Path | None = None
    tolerances: Mapping[str, Tolerance] = field(default_factory=dict)
    matrix: Mapping[str, tuple] = field(default_factory=dict)
    threshold: float | None = None

    def fixture_root(self, override: str | Path | None = None) -> Path:
        """``override`` (a ``--fixtures`` value) or the spec's own ``fixtures`` field.

        Raises:
            SpecError: neither is set.
        """
        root = Path(override) if override is not None else self.fixtures
        if root is None:
            raise SpecError(f"{self.path}: no fixtures to compare with; pass --fixtures DIR or set "
                            f"fixtures = \"DIR\" in the spec")
        return root

    def replace(self, **sections: Any) -> Spec:
        """A copy with whole sections or fields of sections replaced.

        ``spec.replace(preprocess={"interpolation": "bilinear"})`` changes one field.
        """
        changes: dict[str, Any] = {}
        for name, value in sections.items():
            current = getattr(self, name)
            if isinstance(value, Mapping) and dataclasses.is_dataclass(current):
                value = dataclasses.replace(current, **value)
            changes[name] = value
        return dataclasses.replace(self, **changes)


_REQUIRED = object()


class _Table:
    """Reads one TOML table, checking types and refusing unknown keys."""

    def __init__(self, data: Any, where: str, path: Path) -> None:
        if not isinstance(data, dict):
            raise SpecError(f"{path}: {where} must be a table, got {type(data).__name__}")
        self.data, self.where, self.path, self.seen = data, where, path, set()

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _REQUIRED,
            *, choices: tuple[str, ...] | None = None) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                raise SpecError(f"{self.path}: missing required field {self._name(key)}")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML booleans are ints to Python; never accept one where a number is meant.
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            expected = " or ".join(k.__name__ for k in kinds)
            raise SpecError(
                f"{self.path}: {self._name(key)} must be {expected}, got {value!r} ({type(value).__name__})"
            )
        if choices is not None and value not in choices:
            raise SpecError(
                f"{self.path}: {self._name(key)} = {value!r} is not accepted. "
                f"Accepted values: {', '.join(choices)}"
            )
        return value

    def number(self, key: str, default: Any = _REQUIRED, *, low: float = 0.0,
               high: float = math.inf, open_low: bool = False) -> Any:
        present = key in self.data
        value = self.get(key, (int, float), default)
        if not present:
            return value
        if not (low < value if open_low else low <= value) or value > high or not math.isfinite(value):
            bound = f"{'>' if open_low else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
            raise SpecError(f"{self.path}: {self._name(key)} = {value!r} is impossible; it must be {bound}")
        return float(value)

    def table(self, key: str) -> _Table:
        self.seen.add(key)
        return _Table(self.data.get(key, {}), self._name(key) if self.where else f"[{key}]", self.path)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, sorted(self.seen), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise SpecError(
                f"{self.path}: unknown field {self._name(key)}.{hint} "
                f"Accepted fields{' in ' + self.where if self.where else ''}: {', '.join(sorted(self.seen))}"
            )


def _triple(table: _Table, key: str) -> tuple[float, float, float] | None:
    value = table.get(key, list, None)
    if value is None:
        return None
    if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise SpecError(f"{table.path}: {table._name(key)} must be 3 numbers (one per RGB channel), got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _input_size(table: _Table) -> tuple[int, int, int] | None:
    value = table.get("input_size", (int, list), None)
    if value is None:
        return None
    size = [3, value, value] if isinstance(value, int) else value
    if len(size) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size) \
            or size[0] != 3:
        raise SpecError(
            f"{table.path}: {table._name('input_size')} must be a positive int or [3, H, W], got {value!r}"
        )
    return tuple(size)  # type: ignore[return-value]


def _loading(table: _Table) -> dict[str, Any]:
    """The explicit checkpoint-loading fields shared by [backbone] and [head]."""
    key_map = table.get("key_map", dict, {})
    if not all(isinstance(v, str) for v in key_map.values()):
        raise SpecError(f"{table.path}: {table._name('key_map')} must map checkpoint prefixes to strings, got {key_map!r}")
    drop = table.get("drop_keys", list, [])
    if not all(isinstance(k, str) for k in drop):
        raise SpecError(f"{table.path}: {table._name('drop_keys')} must be a list of key names, got {drop!r}")
    return {"state_dict_key": table.get("state_dict_key", str, None), "key_map": key_map, "drop_keys": tuple(drop)}


def _permutation(table: _Table, key: str) -> tuple[int, ...] | None:
    value = table.get(key, list, None)
    if value is None:
        return None
    if not all(type(v) is int for v in value) or sorted(value) != list(range(len(value))):
        raise SpecError(f"{table.path}: {table._name(key)} must be a permutation of 0..N-1, got {value!r}")
    return tuple(value)


def _path(base: Path, value: str | None) -> Path | None:
    return None if value is None else (base / value).resolve()


def _tolerance(table: _Table, stage: str, dtype: str) -> Tolerance | None:
    if not table.data:
        table.finish()
        return None
    default = default_tolerance(stage, dtype)
    tol = Tolerance(
        atol=table.number("atol", default.atol),
        rtol=table.number("rtol", default.rtol),
        min_cosine=table.number("min_cosine", default.min_cosine, low=-1.0, high=1.0),
        origin="spec",
    )
    table.finish()
    return tol


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file.

    Raises:
        SpecError: the file is missing, is not valid TOML, or has an unknown,
            mistyped or impossible field (the message names it).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise SpecError(f"spec file not found: {path}. Pass an existing TOML file with --spec.") from e
    except OSError as e:
        raise SpecError(f"cannot read spec file {path}: {e}") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from e
    return parse_spec(data, path=path)


def parse_spec(data: Mapping[str, Any], *, path: Path) -> Spec:
    """Validate an already-parsed TOML document (see `load_spec`)."""
    base = path.resolve().parent
    root = _Table(dict(data), "", path)
    name = root.get("name", str, path.stem)
    fixtures = _path(base, root.get("fixtures", str, None))

    bb = root.table("backbone")
    backbone = BackboneSpec(
        library=bb.get("library", str, "timm", choices=("timm",)),
        model=bb.get("model", str),
        kwargs=bb.get("kwargs", dict, {}),
        checkpoint=_path(base, bb.get("checkpoint", str, None)),
        checkpoint_format=bb.get("checkpoint_format", str, "timm", choices=CHECKPOINT_FORMATS),
        extract=bb.get("extract", str, "pre_logits", choices=EXTRACT_MODES),
        normalize=bb.get("normalize", str, "none", choices=NORMALIZE),
        **_loading(bb),
    )
    bb.finish()

    pp = root.table("preprocess")
    preprocess = PreprocessSpec(
        input_size=_input_size(pp),
        interpolation=pp.get("interpolation", str, None, choices=INTERPOLATIONS),
        crop_pct=pp.number("crop_pct", None, low=0.0, high=1.0, open_low=True),
        crop_mode=pp.get("crop_mode", str, None, choices=CROP_MODES),
        mean=_triple(pp, "mean"),
        std=_triple(pp, "std"),
        resize_backend=pp.get("resize_backend", str, "pil", choices=RESIZE_BACKENDS),
        channel_order=pp.get("channel_order", str, "rgb", choices=CHANNEL_ORDERS),
        value_scale=pp.get("value_scale", str, "unit", choices=VALUE_SCALES),
        exif_transpose=pp.get("exif_transpose", bool, True),
    )
    pp.finish()
    if preprocess.std is not None and min(preprocess.std) <= 0:
        raise SpecError(f"{path}: [preprocess].std must be positive, got {list(preprocess.std)}")

    hd = root.table("head")
    head = HeadSpec(
        class_path=hd.get("class", str),
        weights=_path(base, hd.get("weights", str)),  # type: ignore[arg-type]
        kwargs=hd.get("kwargs", dict, {}),
        input_biases_order=_permutation(hd, "input_biases_order"),
        **_loading(hd),
    )
    hd.finish()
    if ":" not in head.class_path:
        raise SpecError(
            f"{path}: [head].class must be 'package.module:ClassName', got {head.class_path!r}"
        )

    rt = root.table("runtime")
    device = rt.get("device", str, "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise SpecError(f"{path}: [runtime].device = {device!r} is not accepted. Accepted values: cpu, cuda, cuda:N")
    runtime = RuntimeSpec(
        device=device,
        dtype=rt.get("dtype", str, "float32", choices=DTYPES),
        batch_size=rt.get("batch_size", int, 8),
    )
    rt.finish()
    if runtime.batch_size < 1:
        raise SpecError(f"{path}: [runtime].batch_size = {runtime.batch_size} is impossible; it must be >= 1")

    tol_table = root.table("tolerance")
    tolerances = {}
    for stage in STAGES:
        tol = _tolerance(tol_table.table(stage), stage, runtime.dtype)
        if tol is not None:
            tolerances[stage] = tol
    tol_table.finish()
    decisions = root.table("decisions")
    threshold = decisions.get("threshold", (int, float), None)
    if threshold is not None and (isinstance(threshold, bool) or not math.isfinite(threshold)):
        raise SpecError(f"{path}: [decisions].threshold must be a finite number, got {threshold!r}")
    decisions.finish()
    root.seen.add("matrix")
    from parity.variants import parse_axes  # variants builds on spec; the import is deferred

    matrix = parse_axes(root.get("matrix", dict, {}), where=f"{path}: [matrix]")
    root.finish()
    return Spec(
        path=path.resolve(),
        name=name,
        backbone=backbone,
        head=head,
        preprocess=preprocess,
        runtime=runtime,
        fixtures=fixtures,
        tolerances=tolerances,
        matrix=matrix,
        threshold=None if threshold is None else float(threshold),
    )
