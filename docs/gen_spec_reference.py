"""The spec reference page, generated from what the spec parser accepts (`parity.spec.spec_fields`).

mkdocs runs this file as a hook (``hooks:`` in mkdocs.yml): ``spec-reference.md`` is built in memory on
every build and never written into docs/. ``python docs/gen_spec_reference.py`` prints the page.
Every accepted field needs a line in `FIELDS` below: a field without one stops the build with
`UndocumentedFields` (and tests/test_docs.py fails), so the reference cannot fall behind the parser.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

if importlib.util.find_spec("parity") is None:  # mkdocs run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parity.spec import (  # noqa: E402 - after the path fix above
    CANDIDATE_INPUTS,
    CANDIDATE_KINDS,
    MEAN_STD_PRESETS,
    POSTPROCESSES,
    STAGES,
    SpecField,
    library_names,
    spec_fields,
)

PAGE = "spec-reference.md"

# One line per table: what it is for.
TABLES: dict[str, str] = {
    "": "Fields outside any table.",
    "backbone": "The CLIP vision backbone: who builds it, from which checkpoint, and where the embedding is taken.",
    "preprocess": "The eval preprocessing. Each field is optional; timm fields left out come from the model's "
                  "`pretrained_cfg`, then timm's defaults (see [Libraries](libraries.md)).",
    "head": "The DNN head, called as `head(embedding (B, D), input_biases (B, K) long)`, or `head(embedding)` "
            "when the fixture's samples carry no `input_biases`.",
    "runtime": "Where and how the spec-built pipeline runs.",
    "tolerance.STAGE": "Per-stage budgets: explicit ones always win; unset stages use a calibration at the "
                       "candidate's dtype, then the reference precision's defaults (shown: float32). "
                       "See [Numerics](numerics.md).",
    "decisions": "Optional: the decisions the service makes, checked for flips (see "
                 "[Numerics and decisions](numerics.md#decisions-near-ties-versus-flips)).",
    "candidate": "What ships instead of the spec-built pipeline (see [Gating the code that ships](candidates.md)). "
                 "`[candidate]` names at most one kind of "
                 + ", ".join(f"`{kind}`" for kind in CANDIDATE_KINDS)
                 + " (none: options only, for `--candidate KIND:TARGET`); each `[candidates.NAME]` names exactly "
                 "one, and `--candidate NAME` gates it. `field`, `form` and `headers` are for `url` candidates "
                 "only, `batch` for `python` ones.",
    "reference": "How the reference was made, where a fixture frozen from existing artifacts cannot record it.",
    "matrix": "Optional: the variant matrix of [`parity matrix`](commands/matrix.md); each axis is a list of "
              "values, every combination a cell.",
}

# Which line of FIELDS documents a table's fields: tables read by the same code share one.
_SHARED = {"candidates.NAME": "candidate", **{f"tolerance.{stage}": "tolerance.STAGE" for stage in STAGES}}

# "TABLE.FIELD" (no table for top-level fields) -> its meaning, or (meaning, the default in words) where
# the default depends on something else (the spec's file name, the library, the reference's precision).
FIELDS: dict[str, str | tuple[str, str]] = {
    "name": ("The spec's name, shown in reports and pytest ids.", "the file's name without `.toml`"),
    "fixtures": "The fixture directory to compare with, relative to the spec; default for `--fixtures`.",

    "backbone.library": "Who builds the backbone.",
    "backbone.model": "timm: a model name; transformers: `CLIPVisionModel` or `CLIPVisionModelWithProjection`; "
                      "open_clip: a model config name, e.g. `ViT-B-32-quickgelu`.",
    "backbone.kwargs": "Overrides: `timm.create_model` / open_clip keyword arguments, or transformers config fields.",
    "backbone.checkpoint": "`.safetensors`, or `.pth`/`.pt`/`.bin`; a transformers `save_pretrained` directory. "
                           "Unset: no backbone weights are loaded, and the report says so.",
    "backbone.checkpoint_format": ("The key layout the checkpoint was saved in: `open_clip` (OpenAI keys) or "
                                   "`transformers`, converted on load.", "the backbone's library"),
    "backbone.extract": ("Where the embedding is taken, in the library's own words.", "the library's first"),
    "backbone.normalize": "`l2`: L2-normalise the embedding before the head.",
    "backbone.state_dict_key": "Take this entry of a nested training checkpoint.",
    "backbone.key_map": "Longest matching checkpoint prefix -> module prefix, e.g. `{ \"module.\" = \"\" }`.",
    "backbone.drop_keys": "Wrapper bookkeeping that is not a weight, e.g. `[\"n_averaged\"]`.",

    "preprocess.library": ("Whose eval preprocessing runs.", "the backbone's library"),
    "preprocess.processor": ("transformers only: `fast` (torchvision) or `slow` (PIL) image processor.",
                             "`\"fast\"` (transformers)"),
    "preprocess.config": ("transformers only: the `preprocessor_config.json` to read.",
                          "the backbone directory's"),
    "preprocess.input_size": "timm data config: `[3, H, W]` (or one int for a square); each side at most 1024.",
    "preprocess.interpolation": "timm data config: the resize filter.",
    "preprocess.crop_pct": "timm data config: the crop's share of the resized image.",
    "preprocess.crop_mode": "timm data config: how the crop is taken.",
    "preprocess.mean": "timm data config: 3 finite numbers, one per RGB channel.",
    "preprocess.std": "timm data config: 3 positive numbers, one per RGB channel.",
    "preprocess.resize_backend": "`pil`: the transform on PIL images; `tensor`: torchvision on uint8 tensors with "
                                 "antialias; `tensor_noaa`: antialias off.",
    "preprocess.channel_order": "`bgr`: channels reversed, as an OpenCV decode gives them.",
    "preprocess.value_scale": "`unit`: values 0-1; `byte`: 0-255.",
    "preprocess.exif_transpose": "Apply the EXIF orientation when decoding.",

    "head.class": "Import path `package.module:ClassName`, resolved from the spec's folder; the module runs: "
                  "name only code you trust.",
    "head.weights": "The head checkpoint, loaded with `strict=True`.",
    "head.kwargs": "The head class's constructor arguments.",
    "head.state_dict_key": "Take this entry of a nested training checkpoint.",
    "head.key_map": "Longest matching checkpoint prefix -> module prefix, e.g. `{ \"module.\" = \"\" }`.",
    "head.drop_keys": "Wrapper bookkeeping that is not a weight, e.g. `[\"n_averaged\"]`.",
    "head.input_biases_order": "The column order the service passes `input_biases` in: a permutation of 0..K-1.",

    "runtime.device": "`cpu`, `cuda` or `cuda:N`.",
    "runtime.dtype": "The precision the pipeline runs in.",
    "runtime.batch_size": "Rows per batch, at least 1.",
    "runtime.engine": "Who runs decode -> preprocess -> backbone: this process, or Ray Data "
                      "(the `ray` extra; see [Scale](scale.md#running-on-ray)).",
    "runtime.ray_address": ("With `engine = \"ray\"`: `auto`, `HOST:PORT` or `ray://HOST:PORT`.",
                            "unset: start a local Ray instance"),

    "tolerance.STAGE.atol": "Absolute tolerance: an element passes when abs(a - b) <= atol + rtol·abs(b).",
    "tolerance.STAGE.rtol": "Relative tolerance.",
    "tolerance.STAGE.min_cosine": "Per-row cosine floor.",

    "decisions.threshold": "Multi-label: each output above it is a positive decision.",
    "decisions.argmax": "Classification: the top-1 class.",
    "decisions.verification_threshold": "Pairs: two samples are the same identity when their embeddings' cosine "
                                        "reaches it.",
    "decisions.gate": "`outputs`: every stage must pass; `decisions`: drift that flips no decision passes.",
    "decisions.max_flip_rate": "Fail when the 95 % Clopper–Pearson bound on the rate of changed decisions "
                               "exceeds it.",

    "candidate.python": "A python candidate: `module:function`, or a file `path/to/app.py:function`.",
    "candidate.endpoint_handler": "A Hugging Face Inference Endpoints `handler.py`.",
    "candidate.onnx": "An ONNX export, relative to the spec.",
    "candidate.url": "A running HTTP service (`http` or `https`).",
    "candidate.logged": "A service log to replay (`.jsonl` or `.csv`).",
    "candidate.oip": "A model served over the Open Inference Protocol V2 (KServe, Triton, MLServer, Seldon): "
                     "`http://HOST:PORT/v2/models/NAME`.",
    "candidate.mlflow_model": "An MLflow pyfunc model folder (holding `MLmodel`), loaded in process.",
    "candidate.gradio": "A running Gradio app, called through `gradio_client`: `http://HOST:PORT/`.",
    "candidate.gradio_app": "A Gradio `Blocks`/`Interface` launched on 127.0.0.1 for the run: `app.py:demo` or "
                            "`module:demo`.",
    "candidate.api_name": "gradio, gradio_app: the endpoint to call, e.g. `/predict` (default: the app's only one).",
    "candidate.input_name": "oip: the input tensor to send (default: the one declared input that fits `send`).",
    "candidate.output_name": "oip: the output tensor holding the outputs (default: the one not named `embedding`).",
    "candidate.format": "url: `mlflow` speaks the MLflow scoring server's `/invocations` protocol.",
    "candidate.python_path": ("Put first on `sys.path` to import a python candidate.", "the spec's folder"),
    "candidate.inputs": "A python function's positional arguments, in order: "
                        + ", ".join(f"`{name}`" for name in CANDIDATE_INPUTS) + ".",
    "candidate.output_key": "Where a returned mapping or JSON answer holds the outputs: a dotted path "
                            "(integer parts index lists).",
    "candidate.labels": "The output order of an answer given by label.",
    "candidate.batch": "python: the function takes lists of `[runtime].batch_size` images (and `input_biases`).",
    "candidate.send": "How an image travels: endpoint_handler `pil` or `bytes` (the file's bytes as `inputs`); "
                      "url `multipart` (default) or `json`.",
    "candidate.timeout": "Seconds: each request of a url candidate; the import, construction and each call of a "
                         "python or endpoint_handler candidate.",
    "candidate.retries": "url: retries of a refused connection, a timeout or a 5xx (0 to 10).",
    "candidate.field": "url: the file field (the JSON key with `send = \"json\"`), e.g. FastAPI's `file`.",
    "candidate.form": "url: request fields instead of `input_biases`, each `\"input_biases\"` or "
                      "`\"input_biases.N\"`.",
    "candidate.headers": "url: request headers; a value `\"env:NAME\"` is read from the environment and never shown.",
    "candidate.postprocess": "What the shipped code does after the head: "
                             + ", ".join(f"`{name}`" for name in POSTPROCESSES)
                             + ", or `\"module:function\"` (your own, on an (N, L) float64 array).",

    "reference.numerics": ("The numerics the reference was made with (plain float32, TF32 convolutions and "
                           "matmuls, TF32 convolutions only, or autocast).", "as probed on the machine that freezes"),

    "matrix.extract": "Extraction modes (timm's).",
    "matrix.interpolation": "Resize filters.",
    "matrix.resize_backend": "`pil` (timm transform on PIL), `tensor` (torchvision on uint8 tensors, antialias), "
                             "`tensor_noaa` (antialias off).",
    "matrix.crop_pct": "Numbers in [0.05, 1].",
    "matrix.mean_std": "Mean/std presets: " + ", ".join(f"`{name}`" for name in MEAN_STD_PRESETS) + ".",
    "matrix.channel_order": "`rgb`, `bgr` (what an OpenCV decode gives).",
    "matrix.value_scale": "`unit` (0-1), `byte` (0-255).",
    "matrix.device": "`cuda` cells skip with a reason where CUDA is absent.",
    "matrix.dtype": "Precisions, autocast included.",
    "matrix.batch_size": "Images per backbone call, whole numbers in [1, 4096]; each cell is also compared with the "
                         "batch-size-1 run of its configuration, so an output that depends on its batch-mates fails "
                         "naming batch dependence.",
    "matrix.tf32": "CUDA matmul and cuDNN TF32.",
    "matrix.sdpa": "The attention kernel.",
    "matrix.runtime": "How the backbone is deployed: `eager` (the module), `compile` (`torch.compile`), `onnxruntime` "
                      "(exported to ONNX by parity), `openvino` (the same ONNX file, OpenVINO on CPU); a runtime that "
                      "cannot run a cell here skips it with the reason.",
    "matrix.quantize": "`none`, `dynamic_int8` (torch's dynamic quantization of every `nn.Linear` of backbone and "
                       "head; CPU float32 cells, runtime eager or compile), `int8` (onnxruntime's static quantization of the exported graph, calibrated on the "
                       "fixture's images; runtime onnxruntime or openvino).",
    "matrix.threads": "Intra-op threads (torch's, onnxruntime's, OpenVINO's), whole numbers in [1, 1024] (default: "
                      "this process's torch threads).",
}


class UndocumentedFields(ValueError):
    """Fields the spec parser accepts that have no line in `FIELDS`."""


def _doc_key(table: str, field: str) -> str:
    table = _SHARED.get(table, table)
    return f"{table}.{field}" if table else field


def _toml(value: Any) -> str:
    """A value as it is written in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def _types(field: SpecField) -> str:
    if set(field.types) == {"integer", "float"}:
        return "number"
    return " or ".join(field.types)


def _values(field: SpecField) -> str:
    if field.choices:
        return ", ".join(f"`{_toml(c)}`" for c in field.choices)
    if field.bounds:
        low, high, open_low = field.bounds
        lower = f"{'>' if open_low else '≥'} {low:g}"
        return lower if math.isinf(high) else f"{lower} and ≤ {high:g}"
    return ""


def _default(field: SpecField) -> str:
    if field.required:
        return "**required**"
    return "unset" if field.default is None else f"`{_toml(field.default)}`"


def _cell(column: Callable[[SpecField], str], found: Mapping[tuple[str, str], SpecField]) -> str:
    """One cell for a field read in several libraries and tables: the value if they agree, else each labelled
    by what it depends on (the library, the table); an empty value (nothing known there) agrees with any."""
    values = {key: column(field) for key, field in found.items()}

    def varies(axis: int) -> bool:
        others = {key[1 - axis] for key in values}
        return any(len({v for k, v in values.items() if k[1 - axis] == other and v}) > 1 for other in others)

    by_library, by_table = varies(0), varies(1)
    cells: dict[str, str] = {}
    for (library, table), value in values.items():
        label = " ".join(part for part, shown in ((library, by_library), (table.rpartition(".")[2], by_table))
                         if shown)
        if not cells.get(label):
            cells[label] = value
    distinct = list(dict.fromkeys(v for v in cells.values() if v))
    if len(distinct) <= 1:
        text = distinct[0] if distinct else ""
    else:
        text = "; ".join(f"{', '.join(k for k, v in cells.items() if v == value)}: {value}" for value in distinct)
    return _escape(text)


def _escape(text: str) -> str:
    """A table cell's text: a pipe would end the cell."""
    return text.replace("|", "\\|")


def _groups(tables: Iterable[str]) -> list[list[str]]:
    """Tables read by the same code render as one section, in the order of `TABLES`."""
    groups: dict[str, list[str]] = {}
    for table in tables:
        groups.setdefault(_SHARED.get(table, table), []).append(table)
    order = list(TABLES)
    return [groups[k] for k in sorted(groups, key=lambda k: order.index(k) if k in order else len(order))]


def _heading(group: list[str]) -> str:
    if group == [""]:
        return "Top level"
    return ", ".join(f"`[{table}]`" for table in group)


def render(fields_by_library: Mapping[str, Mapping[str, Mapping[str, SpecField]]] | None = None) -> str:
    """The reference page in Markdown.

    Args:
        fields_by_library: `spec_fields` of each library (default: every registered library's).

    Raises:
        UndocumentedFields: a field or a table without a line in `FIELDS` / `TABLES`.
    """
    if fields_by_library is None:
        fields_by_library = {library: spec_fields(library) for library in library_names()}
    default = next(iter(fields_by_library.values()))
    missing = sorted({_doc_key(table, name) for fields_of in fields_by_library.values()
                      for table, fields in fields_of.items() for name in fields} - set(FIELDS))
    missing += sorted(f"[{table}] (TABLES)" for table in default if _SHARED.get(table, table) not in TABLES)
    if missing:
        raise UndocumentedFields("spec fields without a line in docs/gen_spec_reference.py: " + ", ".join(missing))
    lines = [
        "# Spec reference",
        "",
        "Every field the spec parser accepts, generated from the parser itself on each docs build. A spec is "
        "TOML; paths are relative to the spec file. Unknown fields, wrong types and impossible values are "
        "refused (exit 2) with the field named and the accepted values listed. An annotated example is in "
        "[Getting started](guide.md#the-spec-toml).",
        "",
        "Where a default or the accepted values depend on the library (`[backbone].library`), each library's "
        "is listed.",
    ]
    order = list(FIELDS)
    for group in _groups(default):
        lines += ["", f"## {_heading(group)}", "", TABLES[_SHARED.get(group[0], group[0])], "",
                  "| field | type | default | accepted values | meaning |", "|---|---|---|---|---|"]
        names = sorted(dict.fromkeys(name for table in group for name in default[table]),
                       key=lambda name: order.index(_doc_key(group[0], name)))
        for name in names:
            found = {(library, table): fields[table][name] for library, fields in fields_by_library.items()
                     for table in group if name in fields.get(table, {})}
            doc = FIELDS[_doc_key(group[0], name)]
            meaning, default_text = (doc, None) if isinstance(doc, str) else doc
            default_cell = default_text if default_text is not None else _cell(_default, found)
            if default_text is not None and any(f.required for f in found.values()):
                default_cell = "**required**"
            lines.append(f"| `{name}` | {_cell(_types, found)} | {default_cell} | {_cell(_values, found)} "
                         f"| {_escape(meaning)} |")
    return "\n".join(lines) + "\n"


def on_files(files: Any, config: Any) -> Any:
    """mkdocs hook: add the generated page to the build."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


if __name__ == "__main__":
    sys.stdout.write(render())
