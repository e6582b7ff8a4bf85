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
from parity.preprocess import CHANNEL_ORDERS, HF_PROCESSORS, RESIZE_BACKENDS, VALUE_SCALES
from parity.results import Tolerance

__all__ = [
    "LIBRARIES",
    "EXTRACT_MODES",
    "DEFAULT_EXTRACT",
    "INTERPOLATIONS",
    "CROP_MODES",
    "CHECKPOINT_FORMATS",
    "DTYPES",
    "STAGES",
    "BackboneSpec",
    "PreprocessSpec",
    "HeadSpec",
    "RuntimeSpec",
    "DecisionsSpec",
    "CandidateSpec",
    "CANDIDATE_KINDS",
    "parse_candidate",
    "Spec",
    "load_spec",
    "default_tolerance",
]

LIBRARIES = ("timm", "open_clip", "transformers")
# Each library's own extraction points. timm: forward() is the CLIP projection, pre_logits the pooled
# feature before it. transformers: pooler_output is post_layernorm CLS, cls is last_hidden_state[:, 0]
# (before post_layernorm), image_embeds the projection. open_clip: encode_image is the projection,
# pooled the feature before `proj`.
EXTRACT_MODES_BY_LIBRARY = {
    "timm": ("pre_logits", "forward", "cls", "mean_tokens"),
    "transformers": ("pooler_output", "cls", "image_embeds"),
    "open_clip": ("encode_image", "pooled"),
}
EXTRACT_MODES = EXTRACT_MODES_BY_LIBRARY["timm"]
DEFAULT_EXTRACT = {"timm": "pre_logits", "transformers": "pooler_output", "open_clip": "encode_image"}
GATES = ("outputs", "decisions")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")
CHECKPOINT_FORMATS = ("timm", "open_clip", "transformers")
_VARIANT_FIELDS = ("resize_backend", "channel_order", "value_scale")
_DECODE_FIELDS = ("exif_transpose",)
_LIBRARY_FIELDS = ("library", "processor", "config")
# Geometry and normalisation fields that only timm's data config takes; the other libraries read
# them from their own configuration (open_clip's model config, HF's preprocessor_config.json).
_TIMM_ONLY_FIELDS = ("interpolation", "crop_pct", "crop_mode", "mean", "std", "input_size")
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
    """Explicit preprocessing fields; ``None`` means "resolve from the model's pretrained_cfg".

    ``library`` names whose eval preprocessing runs: timm's data config, open_clip's transform
    for the backbone's model config, or the transformers image processor read from ``config``
    (a preprocessor_config.json; by default the one in the backbone's checkpoint directory).
    """

    library: str = "timm"
    processor: str = "fast"
    config: Path | None = None
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
                if v is not None and k not in _VARIANT_FIELDS + _DECODE_FIELDS + _LIBRARY_FIELDS}

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
class DecisionsSpec:
    """The decisions a service makes from the outputs, checked for flips.

    ``threshold``: each output above it is a positive (multi-label). ``argmax``: the top-1 class
    (classification). ``verification_threshold``: two samples are the same identity when their
    embeddings' cosine reaches it. ``gate = "decisions"`` accepts drift that flips no decision.
    ``max_flip_rate``: the decisions stage fails when the upper 95 % Clopper–Pearson bound on the
    rate of changed decisions exceeds it (too many flips, or too few samples to rule the rate out).
    """

    threshold: float | None = None
    argmax: bool = False
    verification_threshold: float | None = None
    gate: str = "outputs"
    max_flip_rate: float | None = None

    @property
    def any(self) -> bool:
        return self.threshold is not None or self.argmax or self.verification_threshold is not None


CANDIDATE_KINDS = ("python", "endpoint_handler", "onnx", "url", "logged")
# What a python candidate's positional arguments are, in order (see README "Gating the code that ships").
CANDIDATE_INPUTS = ("image", "input_biases", "image_bytes", "image_path")
CANDIDATE_SEND = ("pil", "bytes", "multipart", "json")


@dataclass(frozen=True)
class CandidateSpec:
    """What ships, when it is not the spec-built pipeline: ``[candidate]`` or ``--candidate KIND:TARGET``.

    ``kind`` is ``spec`` (the pipeline this spec builds) or one of `CANDIDATE_KINDS`; ``target`` is
    ``module:function`` (python), a path (endpoint_handler, onnx, logged) or a URL (url). Paths are
    absolute. ``inputs`` maps a python function's positional arguments; ``output_key`` reads the
    outputs from a returned mapping; ``send`` is how an image travels (endpoint: ``pil`` or ``bytes``;
    url: ``multipart`` or ``json``); ``timeout`` (seconds) and ``retries`` bound a url candidate.
    ``python_path`` is put first on ``sys.path`` to import a python candidate (default: the spec's folder).
    """

    kind: str = "spec"
    target: str = ""
    inputs: tuple[str, ...] | None = None
    output_key: str | None = None
    send: str | None = None
    timeout: float = 30.0
    retries: int = 2
    python_path: Path | None = None


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
    decisions: DecisionsSpec = DecisionsSpec()
    candidate: CandidateSpec = CandidateSpec()

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
    library = bb.get("library", str, "timm", choices=LIBRARIES)
    backbone = BackboneSpec(
        library=library,
        model=bb.get("model", str),
        kwargs=bb.get("kwargs", dict, {}),
        checkpoint=_path(base, bb.get("checkpoint", str, None)),
        checkpoint_format=bb.get("checkpoint_format", str, library, choices=CHECKPOINT_FORMATS),
        extract=bb.get("extract", str, DEFAULT_EXTRACT[library], choices=EXTRACT_MODES_BY_LIBRARY[library]),
        normalize=bb.get("normalize", str, "none", choices=NORMALIZE),
        **_loading(bb),
    )
    bb.finish()

    pp = root.table("preprocess")
    pre_library = pp.get("library", str, library, choices=LIBRARIES)
    if pre_library != "timm":
        pinned = [k for k in _TIMM_ONLY_FIELDS if k in pp.data]
        if pinned:
            raise SpecError(f"{path}: [preprocess].{pinned[0]} is a timm data-config field; with "
                            f"[preprocess].library = {pre_library!r} the geometry and mean/std come from "
                            + ("the preprocessor_config.json named by [preprocess].config"
                               if pre_library == "transformers" else "open_clip's model config")
                            + ". Remove the field or set library = \"timm\".")
    processor = pp.get("processor", str, "fast", choices=HF_PROCESSORS)
    config = _path(base, pp.get("config", str, None))
    if pre_library != "transformers" and ("processor" in pp.data or config is not None):
        raise SpecError(f"{path}: [preprocess].processor and .config are for library = \"transformers\" "
                        f"(an HF image processor), not {pre_library!r}")
    preprocess = PreprocessSpec(
        library=pre_library,
        processor=processor,
        config=config,
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
    dt = root.table("decisions")
    threshold = dt.get("threshold", (int, float), None)
    if threshold is not None and not math.isfinite(threshold):
        raise SpecError(f"{path}: [decisions].threshold must be a finite number, got {threshold!r}")
    decisions = DecisionsSpec(
        threshold=None if threshold is None else float(threshold),
        argmax=dt.get("argmax", bool, False),
        verification_threshold=dt.number("verification_threshold", None, low=-1.0, high=1.0),
        gate=dt.get("gate", str, "outputs", choices=GATES),
        max_flip_rate=dt.number("max_flip_rate", None, low=0.0, high=1.0),
    )
    dt.finish()
    if decisions.gate == "decisions" and not decisions.any:
        raise SpecError(f"{path}: [decisions].gate = \"decisions\" needs a decision to gate on: set "
                        "threshold, argmax = true or verification_threshold")
    if decisions.max_flip_rate is not None and not decisions.any:
        raise SpecError(f"{path}: [decisions].max_flip_rate needs a decision to count flips of: set "
                        "threshold, argmax = true or verification_threshold")
    candidate = _candidate(root.table("candidate"), base)
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
        decisions=decisions,
        candidate=candidate,
    )


def _candidate(table: _Table, base: Path) -> CandidateSpec:
    named = [kind for kind in CANDIDATE_KINDS if kind in table.data]
    if len(named) > 1:
        raise SpecError(f"{table.path}: [candidate] names {' and '.join(named)}; name exactly one of "
                        f"{', '.join(CANDIDATE_KINDS)}")
    if not named:
        table.finish()
        return CandidateSpec(python_path=base)
    kind = named[0]
    target = table.get(kind, str)
    inputs = table.get("inputs", list, None)
    if inputs is not None:
        unknown = [name for name in inputs if name not in CANDIDATE_INPUTS]
        if unknown or not inputs:
            raise SpecError(f"{table.path}: [candidate].inputs = {inputs!r}: each entry must be one of "
                            f"{', '.join(CANDIDATE_INPUTS)}")
    candidate = CandidateSpec(
        kind=kind,
        target=target if kind in ("python", "url") else str(_path(base, target)),
        inputs=None if inputs is None else tuple(inputs),
        output_key=table.get("output_key", str, None),
        send=table.get("send", str, None, choices=CANDIDATE_SEND),
        timeout=table.number("timeout", 30.0, low=0.0, high=3600.0, open_low=True),
        retries=table.get("retries", int, 2),
        python_path=_path(base, table.get("python_path", str, ".")),
    )
    table.finish()
    if kind == "python" and ":" not in target:
        raise SpecError(f"{table.path}: [candidate].python must be 'module:function', got {target!r}")
    if not 0 <= candidate.retries <= 10:
        raise SpecError(f"{table.path}: [candidate].retries = {candidate.retries}: expected 0 to 10")
    return candidate


def parse_candidate(text: str, *, base: Path) -> CandidateSpec:
    """``KIND:TARGET`` from the command line (paths relative to ``base``), e.g. ``python:app:predict``."""
    kind, sep, target = text.partition(":")
    if not sep or kind not in CANDIDATE_KINDS or not target:
        raise SpecError(f"--candidate {text!r}: expected KIND:TARGET with KIND one of {', '.join(CANDIDATE_KINDS)} "
                        "(e.g. python:app:predict, endpoint_handler:handler.py, onnx:model.onnx, "
                        "url:http://127.0.0.1:8000/predict, logged:requests.jsonl)")
    return _candidate(_Table({kind: target}, "candidate", base / "--candidate"), base)
