"""The spec: a declarative TOML description of the candidate inference pipeline.

The spec owns its vocabulary (accepted values of every field, the ``[matrix]`` grammar) and
imports only errors, results and the default budgets. What each library accepts is registered
by its adapter in `parity.libraries` (`LibraryVocabulary`): no library is named here but the
default, `DEFAULT_LIBRARY`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.errors import SpecError
from parity.results import PRECISION_AXES, Tolerance

__all__ = [
    "LibraryVocabulary",
    "register_vocabulary",
    "unregister_vocabulary",
    "vocabulary",
    "library_names",
    "INTERPOLATIONS",
    "CROP_MODES",
    "RESIZE_BACKENDS",
    "CHANNEL_ORDERS",
    "VALUE_SCALES",
    "MEAN_STD_PRESETS",
    "DTYPES",
    "ENGINES",
    "check_ray_address",
    "STAGES",
    "BackboneSpec",
    "PreprocessSpec",
    "HeadSpec",
    "RuntimeSpec",
    "DecisionsSpec",
    "CandidateSpec",
    "CANDIDATE_KINDS",
    "CANDIDATE_FORMATS",
    "MLFLOW_SEND",
    "GRADIO_KINDS",
    "ReferenceSpec",
    "REFERENCE_NUMERICS",
    "parse_candidate",
    "select_candidate",
    "POSTPROCESSES",
    "Spec",
    "load_spec",
    "default_tolerance",
    "check_device",
    "MAX_INPUT_SIDE",
    "AXES",
    "PRECISION_AXES",
    "parse_axes",
    "SpecField",
    "spec_fields",
]

DEFAULT_LIBRARY = "timm"
GATES = ("outputs", "decisions")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")
RESIZE_BACKENDS = ("pil", "tensor", "tensor_noaa")
CHANNEL_ORDERS = ("rgb", "bgr")
VALUE_SCALES = ("unit", "byte")
MEAN_STD_PRESETS = {
    "openai_clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
_VARIANT_FIELDS = ("resize_backend", "channel_order", "value_scale")
_DECODE_FIELDS = ("exif_transpose",)
_LIBRARY_FIELDS = ("library", "processor", "config")
# Geometry and normalisation fields a spec may pin; which of them a library takes is in its vocabulary.
_GEOMETRY_FIELDS = ("interpolation", "crop_pct", "crop_mode", "mean", "std", "input_size")
NORMALIZE = ("none", "l2")
DTYPES = ("float32", "float64", "float16", "bfloat16")
# Who runs the pipeline's batches (`RuntimeSpec.engine`).
ENGINES = ("local", "ray")
# Above this a ViT's attention alone needs gigabytes per image; no CLIP backbone is trained at such sizes.
MAX_INPUT_SIDE = 1024
# timm's crop_pct: below this the resize before the crop is more than 20x the input size.
MIN_CROP_PCT = 0.05
_CLASS_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_DEVICE = re.compile(r"cpu|cuda(:\d{1,3})?")


# In the spirit of torch.testing.assert_close's per-dtype defaults; half precision is
# looser because a whole network, not one op, sits between input and output.
DEFAULT_ATOL_RTOL = {
    "float64": (1e-7, 1e-7),
    "float32": (1e-5, 1.3e-6),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
DEFAULT_MIN_COSINE = {"float64": 0.999999, "float32": 0.99999, "float16": 0.9995, "bfloat16": 0.999}

def default_tolerance(stage: str, dtype: str) -> Tolerance:
    """The tolerance used for ``stage`` at ``dtype`` when the spec sets none."""
    atol, rtol = DEFAULT_ATOL_RTOL[dtype]
    if stage == "pixels":
        # Preprocessing runs in float32 on the CPU whatever the model dtype.
        atol, rtol = DEFAULT_ATOL_RTOL["float32"]
    cosine = DEFAULT_MIN_COSINE[dtype] if stage == "embedding" else None
    return Tolerance(atol=atol, rtol=rtol, min_cosine=cosine, origin=f"default for {dtype}")



def check_device(device: object, *, where: str = "device") -> str:
    """``device`` if it is ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        SpecError: anything else.
    """
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise SpecError(f"{where} = {device!r} is not accepted. Accepted values: cpu, cuda, cuda:N")
    return device


def check_ray_address(address: object, *, where: str = "ray_address") -> str | None:
    """``address`` if it is None (start a local Ray instance), ``auto`` (the running cluster this machine
    belongs to), ``local`` or an address such as ``HOST:PORT`` or ``ray://HOST:PORT``.

    Raises:
        SpecError: an empty or blank string, or one with whitespace in it.
    """
    if address is None:
        return None
    if not isinstance(address, str) or not address.strip() or any(c.isspace() for c in address):
        raise SpecError(f"{where} = {address!r} is not an address. Accepted values: auto, local, HOST:PORT, "
                        "ray://HOST:PORT (or leave it unset to start a local Ray instance)")
    return address


STAGES = ("pixels", "embedding", "head", "outputs")


@dataclass(frozen=True)
class LibraryVocabulary:
    """What a spec may say about one library; its adapter (`parity.libraries`) registers it.

    Attributes:
        name: the ``[backbone].library`` / ``[preprocess].library`` value.
        extract_modes: the library's own extraction points, in its own words (the first is the default).
        preprocess_fields: the geometry/normalisation fields of `_GEOMETRY_FIELDS` its preprocessing takes
            from ``[preprocess]``, and ``preprocess_fields_name`` what they are (for messages).
        preprocess_source: where its preprocessing reads geometry and mean/std otherwise (for messages).
        processors: accepted ``[preprocess].processor`` values (empty: the field and ``config`` are refused).
        matrix: whether the variant matrix's shared passes (``forward_features``, per-pixel variants) apply.
    """

    name: str
    extract_modes: tuple[str, ...]
    preprocess_fields: tuple[str, ...] = ()
    preprocess_fields_name: str = ""
    preprocess_source: str = ""
    processors: tuple[str, ...] = ()
    matrix: bool = False

    @property
    def default_extract(self) -> str:
        return self.extract_modes[0]


_VOCABULARIES: dict[str, LibraryVocabulary] = {}


def register_vocabulary(entry: LibraryVocabulary) -> None:
    """Accept ``entry.name`` as a library in specs from now on (a second registration replaces the first)."""
    _VOCABULARIES[entry.name] = entry


def unregister_vocabulary(name: str) -> None:
    _VOCABULARIES.pop(name, None)


def library_names() -> tuple[str, ...]:
    return tuple(_VOCABULARIES)


def vocabulary(library: str) -> LibraryVocabulary:
    """The registered vocabulary of ``library``.

    Raises:
        SpecError: no adapter registered that library.
    """
    try:
        return _VOCABULARIES[library]
    except KeyError:
        raise SpecError(f"unknown library {library!r}. Accepted values: {', '.join(library_names())}") from None


@dataclass(frozen=True)
class BackboneSpec:
    model: str
    library: str = DEFAULT_LIBRARY
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    checkpoint_format: str = DEFAULT_LIBRARY
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

    library: str = DEFAULT_LIBRARY
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
    """Where and how the pipeline runs.

    ``engine``: who runs decode → preprocess → backbone: this process (``local``) or a Ray cluster
    (``ray``, the ``parity[ray]`` extra) at ``ray_address`` (None: start a local Ray instance).
    """

    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8
    engine: str = "local"
    ray_address: str | None = None


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


CANDIDATE_KINDS = ("python", "endpoint_handler", "onnx", "url", "oip", "logged", "mlflow_model", "gradio", "gradio_app")
# A Gradio app called through gradio_client: running at a URL, or launched from the user's Blocks for the run.
GRADIO_KINDS = ("gradio", "gradio_app")
# The numerics a reference may be declared made with ([reference].numerics, `parity freeze --numerics`):
# plain float32; TF32 convolutions and matmuls (allow_tf32 on a GPU of compute capability >= 8.0); TF32
# convolutions only (cuDNN's default there); float16 or bfloat16 autocast.
REFERENCE_NUMERICS = ("float32", "tf32", "tf32_conv", "autocast_float16", "autocast_bfloat16")
# What a python candidate's positional arguments are, in order (docs/candidates.md).
CANDIDATE_INPUTS = ("image", "input_biases", "image_bytes", "image_path")
# The MLflow scoring server's request formats (an mlflow_model, or a url with format = "mlflow").
MLFLOW_SEND = ("dataframe_split", "dataframe_records", "instances", "inputs")
CANDIDATE_SEND = ("pil", "bytes", "multipart", "json", "pixels") + MLFLOW_SEND
# How a url candidate's requests and answers are written: the scoring server's own protocol (None: parity's plain
# multipart/JSON request and answer, `parity.runners.http`).
CANDIDATE_FORMATS = ("mlflow",)
# What the shipped code does after the head ([candidate].postprocess), by the names the outputs
# detectors use (`parity.explain.detectors.outputs.POSTPROCESSES`); or "module:function" of the user's own.
POSTPROCESSES = ("none", "sigmoid", "softmax", "log_softmax")
# A [candidates.NAME] name: it becomes part of a pytest id and a --candidate value.
_CANDIDATE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class CandidateSpec:
    """What ships, when it is not the spec-built pipeline: ``[candidate]`` or ``--candidate KIND:TARGET``.

    ``kind`` is ``spec`` (the pipeline this spec builds) or one of `CANDIDATE_KINDS`; ``target`` is
    ``module:function`` (python), ``module:demo`` (gradio_app), a path (endpoint_handler, onnx, logged,
    mlflow_model) or a URL (url, oip, gradio). Paths are absolute. ``inputs`` maps a python function's positional
    arguments; ``output_key`` reads the
    outputs from a returned mapping; ``send`` is how an image travels (endpoint: ``pil`` or ``bytes``;
    url: ``multipart`` or ``json``; oip: ``bytes`` or ``pixels``; an MLflow request: one of `MLFLOW_SEND`);
    ``timeout`` (seconds) bounds each request of a url or oip candidate and the import, construction and each
    call of a python, endpoint_handler or mlflow_model candidate (its load included); ``retries`` applies to a
    url or oip candidate.
    ``python_path`` is put first on ``sys.path`` to import a python candidate (default: the spec's folder).
    ``batch``: the python function takes a batch: each argument is a list of ``[runtime].batch_size``
    rows' values (PIL images, ``input_biases`` lists) and it returns one output row per image (an
    mlflow_model: each request holds ``[runtime].batch_size`` rows).
    ``postprocess``: what the shipped code does after the head (one of `POSTPROCESSES`, or
    ``module:function`` imported from ``python_path``), applied to the reference's outputs before
    comparing. ``name``: the ``[candidates.NAME]`` table it came from ("" for ``[candidate]``).
    ``api_name``: a Gradio candidate's endpoint (``/predict``; None: the app's only named endpoint);
    its ``inputs`` may also name one bias, ``input_biases.N``, per input component.
    """

    kind: str = "spec"
    target: str = ""
    inputs: tuple[str, ...] | None = None
    output_key: str | None = None
    send: str | None = None
    timeout: float = 30.0
    retries: int = 2
    python_path: Path | None = None
    batch: bool = False
    # How answers and requests map, declared rather than coded (`parity.runners.outputs`, `parity.runners.http`):
    # ``labels``: the output order of scores given by label; ``field``: a url candidate's multipart file
    # field (an MLflow request's image column); ``form``: request field (an MLflow request's column) ->
    # ``input_biases`` or ``input_biases.N`` (replaces the default ``input_biases`` field); ``headers``: request
    # headers, a value ``env:NAME`` read from the environment; ``format``: a url candidate's protocol, one of
    # `CANDIDATE_FORMATS` (None: parity's plain one).
    labels: tuple[str, ...] | None = None
    field: str = "image"
    form: Mapping[str, str] | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # An oip candidate's tensors by name (`parity.runners.oip`); None: as the model's metadata declares them.
    input_name: str | None = None
    output_name: str | None = None
    postprocess: str = "none"
    name: str = ""
    format: str | None = None
    api_name: str | None = None


@dataclass(frozen=True)
class ReferenceSpec:
    """How the reference was made, where a fixture frozen from existing artifacts cannot record it.

    ``numerics``: one of `REFERENCE_NUMERICS` (None: as probed on the machine that freezes).
    """

    numerics: str | None = None


@dataclass(frozen=True)
class Spec:
    """A parsed, validated spec. Paths are absolute (resolved against the spec's folder).

    ``candidate`` is what is gated (``[candidate]``, or the one `select_candidate` picked);
    ``candidates`` the ``[candidates.NAME]`` tables by name, and ``candidate_tables`` every candidate
    table's raw fields ("" for ``[candidate]``), whose options ``--candidate KIND:TARGET`` takes.
    """

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
    reference: ReferenceSpec = ReferenceSpec()
    candidates: Mapping[str, CandidateSpec] = field(default_factory=dict)
    # The tables as written, for `select_candidate` to pass their options on; what they mean is in the fields above.
    candidate_tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, compare=False)

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
# While `spec_fields` probes the parser: table -> field -> how it was read (None outside a probe).
_READS: contextvars.ContextVar[dict[str, dict[str, dict[str, Any]]] | None] = contextvars.ContextVar(
    "_READS", default=None)
# A value `parity init` could not infer: the user sets it (`parity.commands.init`).
_TODO = re.compile(r"TODO\b")


def _refuse_todo(value: Any, name: str, path: Path) -> None:
    """Refuse a value (or one inside a table or list) still reading ``TODO...``, naming the field.

    Raises:
        SpecError: the first such value, with its dotted name and its text.
    """
    if isinstance(value, str) and _TODO.match(value):
        raise SpecError(f"{path}: {name} is still a TODO: {value!r}.\nFix: replace it with the value it asks for; "
                        "`parity init` left it because the repository does not show it.")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        _refuse_todo(inner, f"{name}.{key}" if isinstance(key, str) else f"{name}[{key}]", path)


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
        reads = _READS.get()
        if reads is not None:
            reads.setdefault(self.where, {})[key] = {
                "kinds": kind if isinstance(kind, tuple) else (kind,), "default": default, "choices": choices}
        if key not in self.data:
            if default is _REQUIRED:
                raise SpecError(f"{self.path}: missing required field {self._name(key)}")
            return default
        value = self.data[key]
        _refuse_todo(value, self._name(key), self.path)
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
        reads = _READS.get()
        if reads is not None:
            reads[self.where][key].update(low=low, high=high, open_low=open_low)
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
        reads = _READS.get()
        if reads is not None:  # fields accepted without a typed read (the candidate kinds not named)
            for key in self.seen:
                reads.setdefault(self.where, {}).setdefault(key, {})
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
    if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  for v in value):
        raise SpecError(f"{table.path}: {table._name(key)} must be 3 finite numbers (one per RGB channel), "
                        f"got {value!r}")
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
    if max(size[1:]) > MAX_INPUT_SIDE:
        raise SpecError(f"{table.path}: {table._name('input_size')} = {value!r} is too large; each side must be "
                        f"<= {MAX_INPUT_SIDE} pixels")
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
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text ({e}); save the spec as UTF-8") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from e
    except RecursionError as e:
        raise SpecError(f"{path}: nests too deeply to be a spec") from e
    spec = parse_spec(data, path=path)
    _import_from(spec.path.parent)
    return spec


def _import_from(folder: Path) -> None:
    """Let the spec's import paths (``[head].class``, a python candidate, a postprocess) resolve from
    its folder, as they do with ``python -m`` run there; appended, so an installed package still wins."""
    import sys

    if str(folder) not in sys.path:
        sys.path.append(str(folder))


def parse_spec(data: Mapping[str, Any], *, path: Path) -> Spec:
    """Validate an already-parsed TOML document (see `load_spec`)."""
    base = path.resolve().parent
    root = _Table(dict(data), "", path)
    name = root.get("name", str, path.stem)
    fixtures = _path(base, root.get("fixtures", str, None))

    bb = root.table("backbone")
    library = bb.get("library", str, DEFAULT_LIBRARY, choices=library_names())
    modes = vocabulary(library).extract_modes
    backbone = BackboneSpec(
        library=library,
        model=bb.get("model", str),
        kwargs=bb.get("kwargs", dict, {}),
        checkpoint=_path(base, bb.get("checkpoint", str, None)),
        checkpoint_format=bb.get("checkpoint_format", str, library, choices=library_names()),
        extract=bb.get("extract", str, modes[0], choices=modes),
        normalize=bb.get("normalize", str, "none", choices=NORMALIZE),
        **_loading(bb),
    )
    bb.finish()

    pp = root.table("preprocess")
    pre_library = pp.get("library", str, library, choices=library_names())
    own = vocabulary(pre_library)
    pinned = [k for k in _GEOMETRY_FIELDS if k in pp.data and k not in own.preprocess_fields]
    if pinned:
        owner = next((v for v in _VOCABULARIES.values() if pinned[0] in v.preprocess_fields), own)
        raise SpecError(f"{path}: [preprocess].{pinned[0]} is a {owner.preprocess_fields_name} field; with "
                        f"[preprocess].library = {pre_library!r} the geometry and mean/std come from "
                        f"{own.preprocess_source}. Remove the field or set library = \"{owner.name}\".")
    config = _path(base, pp.get("config", str, None))
    if not own.processors and ("processor" in pp.data or config is not None):
        takes = [v.name for v in _VOCABULARIES.values() if v.processors]
        raise SpecError(f"{path}: [preprocess].processor and .config are for library = "
                        f"{' or '.join(repr(n) for n in takes)} (an image processor), not {pre_library!r}")
    processor = pp.get("processor", str, own.processors[0] if own.processors else "fast",
                       choices=own.processors or None)
    preprocess = PreprocessSpec(
        library=pre_library,
        processor=processor,
        config=config,
        input_size=_input_size(pp),
        interpolation=pp.get("interpolation", str, None, choices=INTERPOLATIONS),
        crop_pct=pp.number("crop_pct", None, low=MIN_CROP_PCT, high=1.0),
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
    if not _CLASS_PATH.fullmatch(head.class_path):
        raise SpecError(
            f"{path}: [head].class must be 'package.module:ClassName' (an absolute module path and a name), "
            f"got {head.class_path!r}"
        )

    rt = root.table("runtime")
    device = check_device(rt.get("device", str, "cpu"), where=f"{path}: [runtime].device")
    runtime = RuntimeSpec(
        device=device,
        dtype=rt.get("dtype", str, "float32", choices=DTYPES),
        batch_size=rt.get("batch_size", int, 8),
        engine=rt.get("engine", str, "local", choices=ENGINES),
        ray_address=check_ray_address(rt.get("ray_address", str, None), where=f"{path}: [runtime].ray_address"),
    )
    rt.finish()
    if runtime.batch_size < 1:
        raise SpecError(f"{path}: [runtime].batch_size = {runtime.batch_size} is impossible; it must be >= 1")
    if runtime.ray_address is not None and runtime.engine != "ray":
        raise SpecError(f"{path}: [runtime].ray_address is set but [runtime].engine = {runtime.engine!r}; "
                        "set engine = \"ray\" or remove ray_address")

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
    candidate, candidates, candidate_tables = _candidates(root, base)
    rf = root.table("reference")
    reference = ReferenceSpec(numerics=rf.get("numerics", str, None, choices=REFERENCE_NUMERICS))
    rf.finish()
    root.seen.add("matrix")
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
        reference=reference,
        candidates=candidates,
        candidate_tables=candidate_tables,
    )


def _candidate(table: _Table, base: Path, *, name: str = "") -> CandidateSpec:
    """One ``[candidate]`` / ``[candidates.NAME]`` table: a kind key and its target, and options.

    A table without a kind key holds only options: for ``--candidate KIND:TARGET`` (`select_candidate`).
    """
    where = table.where
    named = [kind for kind in CANDIDATE_KINDS if kind in table.data]
    if len(named) > 1:
        raise SpecError(f"{table.path}: {where} names {' and '.join(named)}; name exactly one of "
                        f"{', '.join(CANDIDATE_KINDS)}")
    kind = named[0] if named else "spec"
    target = table.get(kind, str) if named else ""
    for other in CANDIDATE_KINDS:  # accepted as fields, so that an unknown field's message lists them
        table.seen.add(other)
    inputs = table.get("inputs", list, None)
    gradio = kind in GRADIO_KINDS + ("spec",)  # a table of options only may be for --candidate gradio:URL
    if inputs is not None:
        unknown = [entry for entry in inputs if entry not in CANDIDATE_INPUTS
                   and not (gradio and isinstance(entry, str) and _FORM_SOURCE.fullmatch(entry))]
        if unknown or not inputs:
            raise SpecError(f"{table.path}: {where}.inputs = {inputs!r}: each entry must be one of "
                            f"{', '.join(CANDIDATE_INPUTS + (('input_biases.N',) if gradio else ()))}")
    api_name = table.get("api_name", str, None)
    if api_name is not None and (kind not in GRADIO_KINDS + ("spec",) or not api_name.startswith("/")):
        raise SpecError(f"{table.path}: {where}.api_name = {api_name!r}: " + (
            f"it names a Gradio app's endpoint, which a {kind} candidate has not; remove it" if kind not in GRADIO_KINDS
            else 'expected the endpoint\'s name with its leading slash, e.g. "/predict"'))
    python_path = _path(base, table.get("python_path", str, "."))
    candidate = CandidateSpec(
        kind=kind,
        target=_target(kind, target, base, python_path, where=f"{table.path}: {where}.{kind}"),
        inputs=None if inputs is None else tuple(inputs),
        output_key=table.get("output_key", str, None),
        send=table.get("send", str, None, choices=CANDIDATE_SEND),
        timeout=table.number("timeout", 30.0, low=0.0, high=3600.0, open_low=True),
        retries=table.get("retries", int, 2),
        python_path=python_path,
        batch=table.get("batch", bool, False),
        **_mapping_fields(table, kind),
        postprocess=_postprocess(table),
        name=name,
        format=table.get("format", str, None, choices=CANDIDATE_FORMATS),
        api_name=api_name,
    )
    table.finish()
    if kind in ("python", "gradio_app") and python_path is not None:
        candidate = dataclasses.replace(candidate, python_path=_python_root(candidate.target, python_path))
    if candidate.batch and kind not in ("python", "spec", "mlflow_model"):
        raise SpecError(f"{table.path}: {where}.batch = true is for a python function or an MLflow model that takes "
                        f"a batch; a {kind} candidate is called one sample at a time. Remove batch.")
    if candidate.format is not None and kind not in ("url", "spec"):
        raise SpecError(f"{table.path}: {where}.format = {candidate.format!r} is the protocol of a url candidate; a "
                        f"{kind} candidate is not reached over HTTP. Remove format.")
    if not 0 <= candidate.retries <= 10:
        raise SpecError(f"{table.path}: {where}.retries = {candidate.retries}: expected 0 to 10")
    return candidate


_FORM_SOURCE = re.compile(r"input_biases(\.(0|[1-9][0-9]*))?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token


def _mapping_fields(table: _Table, kind: str) -> dict[str, Any]:
    """``labels``, ``field``, ``form`` and ``headers``: how a candidate's answers and requests map."""
    name = table._name
    labels = table.get("labels", list, None)
    if labels is not None and (not labels or not all(isinstance(v, str) and v for v in labels)
                               or len(set(labels)) != len(labels)):
        raise SpecError(f"{table.path}: {name('labels')} must be a list of distinct, non-empty label names in "
                        f"the order of the head's outputs, got {labels!r}")
    # An MLflow model in process takes the scoring server's request: its columns, but no HTTP headers; a Gradio
    # app reached at a URL takes headers (a private Space's token).
    allowed = {"url": ("field", "form", "headers"), "oip": ("headers",), "mlflow_model": ("field", "form"),
               "gradio": ("headers",)}.get(kind, ())
    found = [key for key in ("field", "form", "headers") if key in table.data and key not in allowed]
    if found:
        raise SpecError(f"{table.path}: {', '.join(name(k) for k in found)} shape{'s' if len(found) == 1 else ''} "
                        f"the HTTP request of a url candidate; {_a(kind)} candidate sends "
                        f"{'typed tensors' if kind == 'oip' else 'none'}. Remove {'it' if len(found) == 1 else 'them'}.")
    tensors = {key: table.get(key, str, None) for key in ("input_name", "output_name")}
    for key, value in tensors.items():
        if value is not None and (kind != "oip" or not value):
            raise SpecError(f"{table.path}: {name(key)} names a tensor of a model served over the Open Inference "
                            "Protocol (an oip candidate) by its non-empty name; "
                            + ("remove it or give the name." if kind == "oip" else f"{_a(kind)} candidate has none. "
                               "Remove it."))
    upload = table.get("field", str, "image")
    if not upload or not _HEADER_NAME.fullmatch(upload):
        raise SpecError(f"{table.path}: {name('field')} = {upload!r}: expected the name of the service's file "
                        "field, such as \"file\" or \"image\"")
    form = table.get("form", dict, None)
    if form is not None:
        bad = {k: v for k, v in form.items() if not isinstance(v, str) or not _FORM_SOURCE.fullmatch(v)}
        if bad or upload in form:
            raise SpecError(f"{table.path}: {name('form')} maps each request field to \"input_biases\" (all, as a "
                            "JSON array) or \"input_biases.N\" (the N-th, 0-based), and not the file field "
                            f"{upload!r}; got {bad or {upload: form[upload]}!r}")
    headers = table.get("headers", dict, {})
    for key, value in headers.items():
        if not _HEADER_NAME.fullmatch(key) or not isinstance(value, str) or "\n" in value or "\r" in value:
            raise SpecError(f"{table.path}: {name('headers')}.{key}: expected a header name and a one-line "
                            "string value (\"env:NAME\" reads it from the environment)")
        if value.startswith("env:") and not _ENV_NAME.fullmatch(value[4:]):
            raise SpecError(f"{table.path}: {name('headers')}.{key} = {value!r}: after env: comes the name of an "
                            "environment variable, such as env:HF_TOKEN")
    return {"labels": None if labels is None else tuple(labels), "field": upload,
            "form": None if form is None else dict(form), "headers": dict(headers), **tensors}


def _a(kind: str) -> str:
    """``kind`` with its article, as said aloud: an oip, an onnx, a url, a python."""
    return f"an {kind}" if kind[:1] in "aeio" else f"a {kind}"


def _postprocess(table: _Table) -> str:
    value = table.get("postprocess", str, "none")
    if value not in POSTPROCESSES and not _CLASS_PATH.fullmatch(value):
        raise SpecError(f"{table.path}: {table._name('postprocess')} = {value!r} is not accepted. Accepted values: "
                        f"{', '.join(POSTPROCESSES)}, or 'module:function' (your own, called on the reference's "
                        "outputs as an (N, L) float64 array)")
    return value


def _target(kind: str, target: str, base: Path, python_path: Path | None, *, where: str) -> str:
    """The target as the runner takes it: a URL as is; a path made absolute; a python (gradio_app) target
    ``module:function`` (``module:demo``) as is, or ``path/to/app.py:function`` made ``/abs/app.py:function``,
    which the runner imports from ``python_path`` (the file's folder when it lies outside it)."""
    if kind in ("spec", "url", "oip", "gradio"):
        return target
    if kind not in ("python", "gradio_app"):
        return str(_path(base, target))
    module, sep, function = target.rpartition(":")
    if not sep or not module or not function.isidentifier():
        name = "demo" if kind == "gradio_app" else "function"
        raise SpecError(f"{where} must be 'module:{name}' or 'path/to/app.py:{name}', got {target!r}")
    if not module.endswith(".py") and "/" not in module and "\\" not in module:
        return target
    file = (base / module).resolve()
    if file.suffix != ".py" or not file.is_file():
        raise SpecError(f"{where} = {target!r}: no Python file {file}")
    return f"{file}:{function}"


def _python_root(target: str, python_path: Path) -> Path:
    """Where a file target (``/abs/app.py:function``) is imported from: ``python_path`` when the file
    lies under it, else the file's own folder."""
    module = target.rpartition(":")[0]
    if not module.endswith(".py"):
        return python_path
    file = Path(module)
    return python_path if file.is_relative_to(python_path) else file.parent


def _candidates(root: _Table, base: Path) -> tuple[CandidateSpec, dict[str, CandidateSpec], dict[str, dict]]:
    """``[candidate]``, the ``[candidates.NAME]`` tables, and every table's raw fields (for `select_candidate`)."""
    default = root.table("candidate")
    candidate = _candidate(default, base)
    tables: dict[str, dict] = {"": dict(default.data)}
    named: dict[str, CandidateSpec] = {}
    group = root.table("candidates")
    for name in group.data:
        group.seen.add(name)
        if not _CANDIDATE_NAME.fullmatch(name) or name in CANDIDATE_KINDS:
            raise SpecError(f"{root.path}: [candidates.{name}]: a candidate's name is letters, digits, '_', '.' and "
                            f"'-', and not a kind ({', '.join(CANDIDATE_KINDS)})")
        table = _Table(group.data[name], f"[candidates.{name}]", root.path)
        named[name] = _candidate(table, base, name=name)
        if named[name].kind == "spec":
            raise SpecError(f"{root.path}: [candidates.{name}] names no kind; set exactly one of "
                            f"{', '.join(CANDIDATE_KINDS)} (e.g. python = \"app:predict\")")
        tables[name] = dict(table.data)
    group.finish()
    return candidate, named, tables


def parse_candidate(text: str, *, base: Path, options: Mapping[str, Any] | None = None) -> CandidateSpec:
    """``KIND:TARGET`` from the command line (paths relative to ``base``), e.g. ``python:app:predict``,
    with ``options`` (a ``[candidate]`` table's other fields, paths absolute) if given."""
    kind, sep, target = text.partition(":")
    if not sep or kind not in CANDIDATE_KINDS or not target:
        raise SpecError(f"--candidate {text!r}: expected KIND:TARGET with KIND one of {', '.join(CANDIDATE_KINDS)} "
                        "(e.g. python:app:predict, python:deploy/app.py:predict, endpoint_handler:handler.py, "
                        "onnx:model.onnx, url:http://127.0.0.1:8000/predict, "
                        "oip:http://127.0.0.1:8080/v2/models/NAME, logged:requests.jsonl, mlflow_model:path/to/model, "
                        "gradio:http://127.0.0.1:7860/, gradio_app:app.py:demo), "
                        "or the NAME of a [candidates.NAME] table")
    fields = {k: v for k, v in (options or {}).items() if k not in CANDIDATE_KINDS}
    return _candidate(_Table({**fields, kind: target}, "--candidate", base / "--candidate"), base)


def select_candidate(spec: Spec, text: str, *, base: Path) -> Spec:
    """``spec`` gating ``text``: the NAME of a ``[candidates.NAME]`` table, or ``KIND:TARGET`` (paths
    relative to ``base``) with the options of the table it matches: one of the same kind (the same
    target first), else a ``[candidate]`` with only options.

    Raises:
        SpecError: an unknown name, a malformed KIND:TARGET, or several tables of that kind to take options from.
    """
    if text in spec.candidates:
        return dataclasses.replace(spec, candidate=spec.candidates[text])
    kind, sep, target = text.partition(":")
    if not sep or kind not in CANDIDATE_KINDS:
        names = ", ".join(spec.candidates) or "(the spec has no [candidates.NAME] table)"
        raise SpecError(f"--candidate {text!r}: no candidate of that name in {spec.path}. Accepted values: {names}; "
                        f"or KIND:TARGET with KIND one of {', '.join(CANDIDATE_KINDS)}")
    bare = parse_candidate(text, base=base)
    tables = {name: data for name, data in spec.candidate_tables.items()}
    chosen = {"": spec.candidate, **spec.candidates}
    same_kind = [name for name in tables if chosen[name].kind == kind]
    exact = [name for name in same_kind if chosen[name].target == bare.target]
    if exact:
        match = exact[0]
    elif len(same_kind) == 1:
        match = same_kind[0]
    elif same_kind:
        listed = ", ".join(f"[candidates.{n}]" if n else "[candidate]" for n in same_kind)
        raise SpecError(f"--candidate {text!r}: {listed} are all {kind} candidates; say which one's options to take "
                        f"with --candidate NAME ({', '.join(n for n in same_kind if n)})")
    elif chosen[""].kind == "spec" and tables.get(""):
        match = ""
    else:
        return dataclasses.replace(spec, candidate=bare)
    options = dict(tables[match])
    # The table's own paths stay relative to the spec's folder; the target, to ``base``.
    options["python_path"] = str(chosen[match].python_path if "python_path" in options else
                                 bare.python_path)
    candidate = parse_candidate(text, base=base, options=options)
    return dataclasses.replace(spec, candidate=dataclasses.replace(candidate, name=match))


# -- the matrix grammar ([matrix] and `parity matrix --axis`) --------------------------------------

PRECISIONS = DTYPES + ("autocast_float16", "autocast_bfloat16")
SDPA_BACKENDS = ("default", "math", "flash", "efficient")
# ``dynamic_int8``: torch.ao's quantize_dynamic over every nn.Linear of backbone and head (CPU);
# ``int8``: static int8 through onnxruntime.quantization (the onnxruntime runtime's).
QUANTIZE_MODES = ("none", "dynamic_int8", "int8")
# Axis name → accepted values (None: any number in (0, 1]). Order is the order in cell ids. The
# extract axis takes the extraction modes of the libraries whose vocabulary allows the matrix.
AXES: dict[str, tuple | None] = {
    "extract": (),
    "interpolation": INTERPOLATIONS,
    "resize_backend": RESIZE_BACKENDS,
    "crop_pct": None,
    "mean_std": tuple(MEAN_STD_PRESETS),
    "channel_order": CHANNEL_ORDERS,
    "value_scale": VALUE_SCALES,
    "device": ("cpu", "cuda"),
    "dtype": PRECISIONS,
    "tf32": (False, True),
    "sdpa": SDPA_BACKENDS,
    "quantize": QUANTIZE_MODES,
    "batch_size": None,
}
MAX_MATRIX_BATCH = 4096


def _axis_choices(axis: str) -> tuple | None:
    if axis == "extract":
        return tuple(dict.fromkeys(m for v in _VOCABULARIES.values() if v.matrix for m in v.extract_modes))
    return AXES[axis]


def _check_value(axis: str, value: Any, where: str) -> Any:
    choices = _axis_choices(axis)
    if axis == "batch_size":  # images per backbone call; a command-line value arrives as a float
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
                or not 1 <= value <= MAX_MATRIX_BATCH:
            raise SpecError(f"{where}: batch_size values must be whole numbers in [1, {MAX_MATRIX_BATCH}], "
                            f"got {value!r}")
        return int(value)
    if choices is None:  # crop_pct, within the bounds [preprocess].crop_pct has
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not MIN_CROP_PCT <= value <= 1:
            raise SpecError(f"{where}: {axis} values must be numbers in [{MIN_CROP_PCT:g}, 1] (below {MIN_CROP_PCT:g} "
                            f"the resize before the crop is more than 20x the input size), got {value!r}")
        return float(value)
    if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
        raise SpecError(f"{where}: {axis} = {value!r} is not accepted. Accepted values: "
                        + ", ".join(map(str, choices)))
    return value


def parse_axes(table: Mapping[str, Any], *, where: str) -> dict[str, tuple]:
    """Validate a ``[matrix]`` table (or command-line axes): known axes, lists of accepted values."""
    axes = {}
    for axis, values in table.items():
        if axis not in AXES:
            raise SpecError(f"{where}: unknown matrix axis {axis!r}. Accepted axes: {', '.join(AXES)}")
        if not isinstance(values, list) or not values:
            raise SpecError(f"{where}: matrix axis {axis} must be a non-empty list, got {values!r}")
        axes[axis] = tuple(dict.fromkeys(_check_value(axis, v, where) for v in values))
    return axes


# -- the accepted fields, as the parser reads them (the docs' spec reference is generated from it) --

_TOML_TYPES = {str: "string", int: "integer", float: "float", bool: "boolean", list: "array", dict: "table"}


@dataclass(frozen=True)
class SpecField:
    """One field a spec table accepts, as `parse_spec` reads it.

    ``types``: the TOML types it takes (empty where the parser only accepts the name: a candidate kind
    read in another table); ``required``: no default; ``default``: the value when unset (None: unset);
    ``choices``: the values the parser accepts, when it checks a list; ``bounds``: ``(low, high,
    low_excluded)`` for a number.
    """

    name: str
    types: tuple[str, ...] = ()
    required: bool = False
    default: Any = None
    choices: tuple | None = None
    bounds: tuple[float, float, bool] | None = None


def _probe_document(library: str) -> dict[str, Any]:
    """A spec that makes the parser read every table it knows: each tolerance stage, each candidate kind."""
    targets = {"python": "probe:predict", "url": "http://127.0.0.1/probe", "oip": "http://127.0.0.1/v2/models/probe",
               "gradio": "http://127.0.0.1/", "gradio_app": "probe:demo"}
    return {
        "backbone": {"library": library, "model": "probe"},
        "head": {"class": "probe:Probe", "weights": "probe.pth"},
        "tolerance": {stage: {"atol": 0.0} for stage in STAGES},
        "candidates": {f"probe-{kind}": {kind: targets.get(kind, "probe")} for kind in CANDIDATE_KINDS},
    }


def _table_name(where: str) -> str:
    """``[tolerance].pixels`` -> ``tolerance.pixels``; every ``[candidates.X]`` -> ``candidates.NAME``."""
    name = where.replace("[", "").replace("]", "")
    return "candidates.NAME" if name.startswith("candidates.") else name


def spec_fields(library: str = DEFAULT_LIBRARY) -> dict[str, dict[str, SpecField]]:
    """Every field a spec accepts, by table, read off `parse_spec` itself with ``[backbone].library = library``.

    Tables are named as in TOML without brackets: ``""`` (top level), ``backbone``, ``preprocess``, ``head``,
    ``runtime``, ``tolerance.STAGE`` for each of `STAGES`, ``decisions``, ``candidate``, ``candidates.NAME``,
    ``reference`` and ``matrix`` (its axes, `AXES`). Defaults and choices that depend on the library (the
    extraction points, the image processors) are ``library``'s.

    Raises:
        SpecError: ``library`` is not registered.
    """
    vocabulary(library)
    reads: dict[str, dict[str, dict[str, Any]]] = {}
    token = _READS.set(reads)
    try:
        parse_spec(_probe_document(library), path=Path("probe.toml"))
    finally:
        _READS.reset(token)
    merged: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for where, fields in reads.items():
        for key, read in fields.items():
            merged.setdefault(_table_name(where), {}).setdefault(key, []).append(read)
    tables = {name.split(".")[0] for name in merged if name}
    result: dict[str, dict[str, SpecField]] = {}
    for table, fields in merged.items():
        if table in ("tolerance", "candidates"):  # holders of tables only
            continue
        result[table] = {}
        for key, found in fields.items():
            if table == "" and key in tables | {"matrix"}:
                continue
            typed = [r for r in found if "kinds" in r]
            if not typed:
                result[table][key] = SpecField(key)
                continue
            read = typed[0]
            default = read["default"]
            bounds = (read["low"], read["high"], read["open_low"]) if "low" in read else None
            result[table][key] = SpecField(
                key, tuple(_TOML_TYPES[k] for k in read["kinds"]),
                required=len(typed) == len(found) and all(r["default"] is _REQUIRED for r in typed),
                default=None if default is _REQUIRED else default, choices=read["choices"], bounds=bounds)
    result["matrix"] = {axis: SpecField(axis, ("array",), choices=_axis_choices(axis),
                                        bounds=None if _axis_choices(axis) else
                                        (1, MAX_MATRIX_BATCH, False) if axis == "batch_size" else (MIN_CROP_PCT, 1.0, False))
                        for axis in AXES}
    return result
