"""A model served over the Open Inference Protocol V2 as the candidate (KServe, Triton, Seldon MLServer).

``[candidate] oip = "http://127.0.0.1:8080/v2/models/NAME"`` (``/versions/V`` may follow). Before
any sample is sent, the model's metadata (``GET`` that URL) says which tensors it takes and gives;
the ones parity would send and read must be among them, else the run stops with an error naming
what the model declares. Each fixture sample is then one ``POST {url}/infer`` in the V2 JSON form:

- the image, in the input ``[candidate].input_name`` (default: the one declared input of the type
  ``send`` needs): ``send = "bytes"`` (default) sends the file's own bytes as a ``BYTES`` tensor of
  shape ``[1]``, base64 in JSON (``parameters.content_type = "base64"``, MLServer's name for it), so
  that the server's decoding and preprocessing are under test; ``send = "pixels"`` sends the spec's
  preprocessed pixels as ``FP32`` ``[1, 3, H, W]``, for a server that takes tensors;
- the sample's ``input_biases`` as ``[1, K]`` when the model declares one more input (in its declared
  datatype).

The outputs are read from the output ``[candidate].output_name`` (default: the one declared output
not named ``embedding``) and reshaped by its ``shape``; an output named ``embedding`` is compared as
its own stage. A model whose metadata declares no tensors is sent its image under ``input_name``
and read from ``output_name`` (or the first output it answers) unchecked.

Requests go through the url runner's plumbing (`parity.runners.http`): ``[candidate].timeout`` per
request, ``retries`` with backoff, ``headers`` with ``env:NAME`` values never shown. A sample that
fails is a per-sample error; after a few consecutive unanswered samples the rest are not sent.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from parity.model.batches import Decoded, decoded_batches
from parity.model.fast_pixels import recorded_pixels
from parity.model.pipeline import assemble_pipeline, load_backbone, preprocess_record, resolve_device
from parity.errors import SpecError
from parity.store.fixtures import Fixture
from parity.results import CandidateRun
from parity.runners.http import GIVE_UP_AFTER, Request, ServiceError, check_url, exchange, resolve_headers
from parity.spec import Spec

__all__ = ["run", "Tensor", "ModelMetadata", "Plan", "model_url", "read_metadata", "plan", "infer_request",
           "read_answer"]

Progress = Callable[[int, int], None]

SENDS = ("bytes", "pixels")
EMBEDDING_OUTPUTS = ("embedding", "embeddings")
# V2 datatypes whose JSON data are numbers (FP16 and BF16 travel only in the binary extension).
NUMBERS = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
           "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32,
           "FP64": np.float64}
INTEGERS = ("INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8")
PIXELS = ("FP32", "FP64")
UNOBSERVABLE = "a model served over the Open Inference Protocol shows its outputs only"
_MODEL_PATH = re.compile(r"(/.*)?/v2/models/[^/]+(/versions/[^/]+)?")
EXAMPLE = "http://127.0.0.1:8080/v2/models/NAME"


@dataclass(frozen=True)
class Tensor:
    """One tensor as a model's metadata declares it (``-1``: a dimension of any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.name} ({self.datatype} {list(self.shape)})"


@dataclass(frozen=True)
class ModelMetadata:
    """A model's metadata answer: its name and the tensors it takes and gives."""

    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


@dataclass(frozen=True)
class Plan:
    """What parity sends and reads: tensor names and datatypes (``output`` None: the first one answered)."""

    image: str
    image_datatype: str
    biases: str | None = None
    biases_datatype: str = "INT64"
    output: str | None = None
    embedding: str | None = None


def model_url(url: str) -> str:
    """``url`` without a trailing slash, if it names a model (``.../v2/models/NAME[/versions/V]``).

    Raises:
        SpecError: not an http(s) URL, or not a model's address.
    """
    check_url(url, field="oip", example=EXAMPLE)
    url = url.rstrip("/")
    path = url.split("://", 1)[1].partition("/")[2].partition("?")[0]
    if "?" in url or not _MODEL_PATH.fullmatch("/" + path):
        raise SpecError(f"[candidate].oip = {url!r}: expected the model's address in the Open Inference Protocol, "
                        f"which ends in /v2/models/NAME (or /v2/models/NAME/versions/V), e.g. {EXAMPLE}")
    return url


def _tensors(value: Any, what: str) -> tuple[Tensor, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise ValueError(f"its {what} are not a list of tensors")
    tensors = []
    for t in value:
        name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape", [])
        if not isinstance(name, str) or not name or not isinstance(datatype, str) or not isinstance(shape, list) \
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise ValueError(f"an entry of its {what} is not {{name, datatype, shape}}: {json.dumps(t)[:120]}")
        tensors.append(Tensor(name, datatype.upper(), tuple(shape)))
    return tuple(tensors)


def read_metadata(url: str, *, headers: Mapping[str, str], secrets: Sequence[str] = (), timeout: float = 30.0,
                  retries: int = 2) -> ModelMetadata:
    """``GET url``: the model's metadata.

    Raises:
        SpecError: the server does not answer, answers an error, or answers something else than model metadata.
    """
    def parse(body: bytes) -> ModelMetadata:
        try:
            answer = json.loads(body)
            if not isinstance(answer, dict):
                raise ValueError(f"it is a JSON {type(answer).__name__}")
            return ModelMetadata(str(answer.get("name", "")), _tensors(answer.get("inputs"), "inputs"),
                                 _tensors(answer.get("outputs"), "outputs"))
        except (ValueError, RecursionError) as e:
            raise ServiceError(f"the answer is not a model's metadata ({str(e)[:200]}): "
                               f"{body[:80].decode('utf-8', 'replace')!r}") from e

    request = Request(url, None, {**headers, "Accept": "application/json"}, method="GET")
    try:
        return exchange(request, timeout=timeout, retries=retries, secrets=secrets, read=parse)
    except ServiceError as e:
        hint = (" Is the server running and listening there?" if e.unreachable else
                " Check that [candidate].oip is the model's address, ending in /v2/models/NAME.")
        raise SpecError(f"[candidate].oip: cannot read the model's metadata at {url}: {e}.{hint}") from None


def _declared(tensors: Sequence[Tensor]) -> str:
    return ", ".join(map(str, tensors)) or "none"


def _pick(tensors: Sequence[Tensor], named: str | None, fits: Callable[[Tensor], bool], *, field: str, kind: str,
          want: str, model: str) -> Tensor | None:
    """The tensor ``named`` (which must be declared), else the one that ``fits``; None when none are declared."""
    if not tensors:
        return None
    if named is not None:
        found = next((t for t in tensors if t.name == named), None)
        if found is None:
            raise SpecError(f"[candidate].{field} = {named!r}, but model {model!r} declares no such {kind}; its "
                            f"{kind}s: {_declared(tensors)}. Set {field} to one of them.")
        return found
    fitting = [t for t in tensors if fits(t)]
    if len(fitting) != 1:
        which = "several" if fitting else "no"
        raise SpecError(f"model {model!r} declares {which} {kind}s that {want}; its {kind}s: {_declared(tensors)}. "
                        f"Set [candidate].{field} to the one parity should use.")
    return fitting[0]


def plan(metadata: ModelMetadata, *, send: str, input_name: str | None, output_name: str | None,
         biases: int) -> Plan:
    """Which of the model's declared tensors parity sends and reads (``biases``: columns per fixture row).

    Raises:
        SpecError: a named tensor the model does not declare, none or several that fit, a datatype
            parity cannot send (the message lists what the model declares).
    """
    model = metadata.name or "(unnamed)"
    takes = "BYTES" if send == "bytes" else "FP32"
    want = ("take BYTES (an encoded image)" if send == "bytes" else "take FP32 pixels [N, 3, H, W]")

    def fits(t: Tensor) -> bool:
        return t.datatype == "BYTES" if send == "bytes" else t.datatype in PIXELS and len(t.shape) == 4

    image = _pick(metadata.inputs, input_name, fits, field="input_name", kind="input", want=want, model=model)
    if image is None:
        if input_name is None:
            raise SpecError(f"model {model!r} declares no inputs in its metadata; set [candidate].input_name to the "
                            "input that takes the image")
        image_name, image_type = input_name, takes
    else:
        if not fits(image):
            fix = ('set send = "bytes" (the default)' if image.datatype == "BYTES" else 'set send = "pixels"'
                   if image.datatype in PIXELS and len(image.shape) == 4 else
                   "parity sends the image as BYTES (encoded) or FP32 pixels [1, 3, H, W]")
            raise SpecError(f"input {image} of model {model!r} does not take the image as parity sends it "
                            f"({takes}, send = \"{send}\"): {fix}, or set [candidate].input_name to another of its "
                            f"inputs: {_declared(metadata.inputs)}")
        image_name, image_type = image.name, image.datatype
    rest = [t for t in metadata.inputs if t.name != image_name]
    if len(rest) > 1:
        raise SpecError(f"model {model!r} takes {_declared(rest)} besides the image {image_name!r}; parity sends "
                        "the image and the samples' input_biases (one more input) only")
    extra = rest[0] if rest else None
    if extra is not None:
        if extra.datatype not in NUMBERS or extra.datatype == "BOOL":
            raise SpecError(f"model {model!r} takes {extra} besides the image; parity sends the samples' input_biases "
                            "there, as integers or floats, not as " + extra.datatype)
        if not biases:
            raise SpecError(f"model {model!r} takes {extra} besides the image, and the fixture's rows carry no "
                            "input_biases to send there")
        if extra.shape and extra.shape[-1] not in (-1, biases):
            raise SpecError(f"model {model!r} takes {extra} besides the image, but the fixture's rows carry "
                            f"{biases} input_biases each")
    embedding = next((t.name for t in metadata.outputs if t.name in EMBEDDING_OUTPUTS and t.name != output_name),
                     None)
    output = _pick(metadata.outputs, output_name, lambda t: t.name != embedding, field="output_name", kind="output",
                   want=f"are not {embedding!r}", model=model)
    if output is not None and output.datatype not in NUMBERS:
        raise SpecError(f"output {output} of model {model!r} is not numbers; set [candidate].output_name to the "
                        f"output holding the scores, one of: {_declared(metadata.outputs)}")
    return Plan(image_name, image_type, extra.name if extra else None, extra.datatype if extra else "INT64",
                output.name if output else output_name, embedding)


def infer_request(url: str, the_plan: Plan, sample_id: str, image: bytes | np.ndarray, biases: Sequence[int],
                  headers: Mapping[str, str]) -> Request:
    """``POST {url}/infer`` with the image (encoded bytes or pixels (3, H, W)) and the input_biases, as V2 JSON."""
    if isinstance(image, bytes):
        tensor = json.dumps({"name": the_plan.image, "shape": [1], "datatype": "BYTES",
                             "parameters": {"content_type": "base64"},
                             "data": [base64.b64encode(image).decode("ascii")]})
    else:
        head = json.dumps({"name": the_plan.image, "shape": [1, *image.shape], "datatype": the_plan.image_datatype})
        tensor = f'{head[:-1]}, "data": {_json_numbers(image, the_plan.image_datatype)}}}'
    inputs = [tensor]
    if the_plan.biases is not None:
        cast = int if the_plan.biases_datatype in INTEGERS else float
        inputs.append(json.dumps({"name": the_plan.biases, "shape": [1, len(biases)],
                                  "datatype": the_plan.biases_datatype, "data": [cast(b) for b in biases]}))
    body = f'{{"id": {json.dumps(sample_id)}, "inputs": [{", ".join(inputs)}]}}'.encode()
    return Request(f"{url}/infer", body, {**headers, "Content-Type": "application/json", "Accept": "application/json"})


def _json_numbers(values: np.ndarray, datatype: str) -> str:
    """A JSON array of the finite ``values``, flattened: 9 significant digits give each float32 back exactly
    (17 each float64), in half the text and time of Python's float repr (pixels are 10^5 to 10^6 numbers)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(flat).all():
        raise ServiceError("the spec's preprocessing made non-finite pixels, which JSON cannot carry")
    form = "%.9g" if datatype == "FP32" else "%.17g"
    return "[" + ",".join([form] * flat.size) % tuple(flat.tolist()) + "]"


def _tensor_values(tensor: Any, name: str) -> np.ndarray:
    """One answered tensor's values, one sample's vector: ``shape`` [L] or [1, L]."""
    if not isinstance(tensor, Mapping) or "data" not in tensor:
        raise ServiceError(f"output {name!r} carries no JSON data (binary tensor data is not read: ask the server "
                           "for JSON outputs)")
    datatype, shape = str(tensor.get("datatype", "")).upper(), tensor.get("shape")
    if datatype not in NUMBERS:
        raise ServiceError(f"output {name!r} is {datatype or 'of no datatype'}, not numbers")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ServiceError(f"output {name!r} has no valid shape: {str(shape)[:80]}")
    try:
        values = np.asarray(tensor["data"], dtype=np.float64).ravel()
    except (ValueError, TypeError, OverflowError) as e:
        raise ServiceError(f"output {name!r} is not {datatype} numbers: {str(tensor['data'])[:80]}") from e
    if values.size != math.prod(shape):
        raise ServiceError(f"output {name!r} holds {values.size} values for its shape {shape}")
    values = values.reshape(shape)
    if values.ndim == 2 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 1:
        raise ServiceError(f"output {name!r} has the shape {shape}; expected one sample's vector, [L] or [1, L]")
    with np.errstate(over="ignore"):
        values = values.astype(np.float32)
    if not np.isfinite(values).all():
        raise ServiceError(f"output {name!r} holds non-finite values (NaN, infinity, or a number beyond float32)")
    return values


def read_answer(body: bytes, the_plan: Plan) -> tuple[np.ndarray, np.ndarray | None]:
    """``(outputs, embedding or None)`` from an infer answer's body.

    Raises:
        ServiceError: not a V2 infer answer, no such output, not one vector of finite numbers.
    """
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ServiceError(f"the answer is not JSON ({str(e)[:200]}): {body[:80].decode('utf-8', 'replace')!r}") from e
    outputs = answer.get("outputs") if isinstance(answer, dict) else None
    if not isinstance(outputs, list) or not all(isinstance(o, Mapping) for o in outputs):
        raise ServiceError(f"the answer is not an Open Inference Protocol infer answer (no list of outputs): "
                           f"{body[:80].decode('utf-8', 'replace')!r}")
    by_name = {str(o.get("name")): o for o in outputs}
    name = the_plan.output or next((n for n in by_name if n not in EMBEDDING_OUTPUTS), None)
    if name is None or name not in by_name:
        raise ServiceError(f"the answer has no output {name!r} (outputs: {', '.join(by_name) or 'none'})"
                           if name else "the answer has no output besides an embedding")
    embedding = None
    if the_plan.embedding is not None and the_plan.embedding in by_name:
        embedding = _tensor_values(by_name[the_plan.embedding], the_plan.embedding)
    return _tensor_values(by_name[name], name), embedding


def _fits(declared: Sequence[int], actual: Sequence[int]) -> bool:
    return len(declared) == len(actual) and all(d in (-1, a) for d, a in zip(declared, actual))


def _check_width(output: Tensor | None, width: int, model: str) -> None:
    """Raises SpecError when the model declares a fixed number of outputs that is not the fixture's."""
    if output is not None and output.shape and output.shape[-1] not in (-1, width):
        raise SpecError(f"output {output} of model {model!r} gives {output.shape[-1]} values per sample; the fixture "
                        f"has {width} outputs per sample: is [candidate].oip the model this fixture was frozen for?")


def _check_pixels(image: Tensor | None, pixels: np.ndarray) -> np.ndarray:
    """``pixels`` (3, H, W), if the model's declared pixel input takes them (a batch of one of them).

    Raises:
        SpecError: the model takes another size: the spec's preprocessing is not the one it was built for.
    """
    if image is not None and not _fits(image.shape, (1, *pixels.shape)):
        raise SpecError(f"input {image} takes pixels of another shape than the spec's preprocessing makes "
                        f"({list(pixels.shape)}); set [preprocess] to what the model's clients send")
    return pixels


def _pixel_samples(spec: Spec, fixture: Fixture) -> tuple[Iterator[tuple[int, np.ndarray]], dict[str, Any], Decoded]:
    """Each decodable sample's pixels as the spec's preprocessing makes them, the preprocessing record they
    were made with and the decoding record (`parity.model.batches.Decoded`, filled as the samples are drawn).
    numpy makes them when the spec resolves to the fixture's recorded preprocessing, without torch."""
    source, _ = recorded_pixels(spec, fixture)
    if source is None:
        device = resolve_device("cpu")  # only the preprocessing runs here; the backbone gives its data config
        backbone, _ = load_backbone(spec, device=device, fingerprints=False)
        source = assemble_pipeline(spec, backbone, None, device=device)
        record = preprocess_record(spec, source.data_config)
    else:
        record = source.record
    decoded = Decoded()
    samples = ((i, x if isinstance(x, np.ndarray) else x.numpy())
               for rows, batch in decoded_batches(source, fixture, decoded) for i, x in zip(rows, batch))
    return samples, record, decoded


def run(spec: Spec, fixture: Fixture, *, device: str | None = None, progress: Progress | None = None) -> CandidateRun:
    """Send every fixture sample to the served model and record its outputs (and embedding, when it gives one)."""
    candidate = spec.candidate
    url = model_url(candidate.target)
    send = candidate.send or "bytes"
    if send not in SENDS:
        raise SpecError(f"[candidate].send = {send!r} does not apply to an oip candidate: use one of {', '.join(SENDS)}")
    for field, value in (("output_key", candidate.output_key), ("labels", candidate.labels)):
        if value is not None:
            raise SpecError(f"[candidate].{field} reads a JSON answer of a url candidate; an oip model answers typed "
                            "tensors: name the one holding the outputs with output_name instead. Remove "
                            f"{field}.")
    width = fixture.outputs.shape[1]
    headers, secrets = resolve_headers(candidate.headers)
    metadata = read_metadata(url, headers=headers, secrets=secrets, timeout=candidate.timeout,
                             retries=candidate.retries)
    columns = len(fixture.rows[0].input_biases) if fixture.rows else 0
    chosen = plan(metadata, send=send, input_name=candidate.input_name, output_name=candidate.output_name,
                  biases=columns)
    image_input = next((t for t in metadata.inputs if t.name == chosen.image), None)
    _check_width(next((t for t in metadata.outputs if t.name == chosen.output), None), width, metadata.name)

    errors: dict[int, str] = {}
    description: dict[str, Any] = {}
    conversions: Mapping[str, str] = {}
    pixels: Mapping[str, Any] | None = None
    if send == "pixels":
        samples, description["preprocess"], decoded = _pixel_samples(spec, fixture)
    else:
        samples = ((i, row.image) for i, row in enumerate(fixture.rows))

    rows: list[int] = []
    outputs: list[np.ndarray] = []
    embeddings: list[np.ndarray | None] = []
    silent, done, total = 0, 0, len(fixture.rows)
    for i, image in samples:
        row = fixture.rows[i]
        if silent >= GIVE_UP_AFTER:
            errors[i] = f"not sent: the server at {url} did not answer the {silent} samples before it"
        else:
            try:
                data = image.read_bytes() if send == "bytes" else _check_pixels(image_input, image)
                request = infer_request(url, chosen, row.name, data, row.input_biases, headers)
                values, embedding = exchange(request, timeout=candidate.timeout, retries=candidate.retries,
                                             secrets=secrets, read=lambda body: read_answer(body, chosen))
                if values.shape[0] != width:
                    raise ServiceError(f"{values.shape[0]} outputs, the fixture has {width} per sample")
            except ServiceError as e:
                silent = silent + 1 if e.unreachable else 0
                errors[i] = f"{url}/infer: {e}"
            except OSError as e:  # the fixture image itself cannot be read
                errors[i] = f"cannot read {row.image}: {e}"
            else:
                silent = 0
                rows.append(i)
                outputs.append(values)
                embeddings.append(embedding)
        done += 1
        if progress:
            progress(done, total)
    if send == "pixels":  # what the spec's preprocessing made of each sample, as sent
        index = {row.name: i for i, row in enumerate(fixture.rows)}
        errors.update((index[name], message) for name, message in decoded.sample_errors)
        conversions, pixels = decoded.conversions, decoded.pixels

    hidden = ("load", "weights", "head") + (("pixels",) if send == "bytes" else ())
    unobservable = {stage: UNOBSERVABLE for stage in hidden}
    embedded = np.stack(embeddings) if embeddings and all(e is not None and e.shape == embeddings[0].shape
                                                          for e in embeddings) else None
    if embedded is None:
        unobservable["embedding"] = UNOBSERVABLE + " (declare an output named 'embedding' to compare it)"
    description["candidate"] = {
        "oip": url, "model": metadata.name, "send": send, "input": chosen.image,
        **({"input_biases": chosen.biases} if chosen.biases else {}), "output": chosen.output,
        **({"embedding": chosen.embedding} if chosen.embedding else {}),
        # The headers' names only, never their values.
        **({"headers": sorted(headers)} if headers else {})}
    return CandidateRun(
        "oip", description=description, rows=tuple(rows),
        sample_errors=tuple((fixture.rows[i].name, errors[i]) for i in sorted(errors)),
        outputs=np.stack(outputs) if outputs else np.zeros((0, width), np.float32),
        embeddings=embedded, conversions=conversions, pixels=pixels, unobservable=unobservable,
    )
