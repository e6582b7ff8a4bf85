"""Bad inputs, round two: the url runner, the Ray engine, merge, `parity report`, the hash cache, service
logs and output targets. Each ends in a clear error with the right exit status, within a bounded time,
without destroying what parity did not make.

The command-line cases run in one process (`tests.support.bad_input_runner`, each under an alarm);
services they talk to run in this process on 127.0.0.1 and are stopped by the test. The readers of
JSON that users or services hand to parity are property-tested on arbitrary values in process.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import parity.runners.http as http_runner
from parity.errors import ReportError, SpecError
from tests.support.paths import EXAMPLE_FIXTURES
from tests.support.specs import write_spec
from tests.support.corpus import Case, run_corpus, unwritable_directory
from tests.support.http_service import answer, free_port, stdlib_service, trickling_service, url_spec

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=16)
DEEP = b"[" * 100_000 + b"]" * 100_000
BIG_INT = b"1" * 5000
TIMEOUT = 2.0  # [candidate].timeout of the trickle test in process; the command line's is shorter
CLI_TIMEOUT = 1.0


# -- builders ----------------------------------------------------------------------------------

def _fixture(tmp: Path) -> Path:
    return Path(shutil.copytree(EXAMPLE_FIXTURES, tmp / "fixture"))


def _spec(tmp: Path, replacements: dict[str, str] | None = None) -> Path:
    return write_spec(tmp, replacements)


def _log(tmp: Path, *, biases: str = "keep", outside: bool = False) -> Path:
    """A log of the fixture's samples with their recorded outputs; ``biases``: keep, drop or empty;
    ``outside``: the images copied under other names (the fixture does not hold them)."""
    from parity.store.fixtures import load_fixture

    fixture = load_fixture(EXAMPLE_FIXTURES)
    lines = []
    for i, row in enumerate(fixture.rows[:6]):
        image = row.image
        if outside:
            image = Path(shutil.copy(row.image, tmp / f"other{i}.png"))
        line = {"image": str(Path(image).resolve()), "outputs": fixture.outputs[i].tolist()}
        if biases == "keep":
            line["input_biases"] = list(row.input_biases)
        elif biases == "empty":
            line["input_biases"] = []
        lines.append(line)
    path = tmp / "service.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _copy(source: Path, tmp: Path, name: str | None = None) -> Path:
    return Path(shutil.copy(source, tmp / (name or source.name)))


def _edited(source: Path, tmp: Path, edit, name: str = "edited.json") -> Path:
    data = json.loads(source.read_text())
    edit(data)
    path = tmp / name
    path.write_text(json.dumps(data))
    return path


def _raw(tmp: Path, content: bytes, name: str = "part.json") -> Path:
    path = tmp / name
    path.write_bytes(content)
    return path


# -- services and partial reports, made once for the module ---------------------------------------

def _answers(handler, _body: bytes) -> None:
    """Answers by URL path: numeric strings, deep nesting, a 5000-digit integer, one beyond float."""
    bodies = {"/strings": json.dumps({"outputs": ["0.12", "0.5", "0.1", "0.2", "0.3"]}).encode(),
              "/nested": DEEP, "/bigint": b'{"outputs": [' + BIG_INT + b", 0, 0, 0, 0]}",
              "/overflow": b'{"outputs": [' + b"9" * 400 + b", 0, 0, 0, 0]}"}
    answer(handler, 200, bodies[handler.path])


@pytest.fixture(scope="module")
def services() -> Iterator[dict[str, str]]:
    with stdlib_service(_answers) as url, trickling_service(0.5) as slow:
        base = url.rsplit("/", 1)[0]
        yield {"trickle": slow, **{name: f"{base}/{name}" for name in ("strings", "nested", "bigint", "overflow")}}


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """Two shards' partial reports (with the embeddings pair decisions need), the second also made
    after the spec file was edited, and the first with NaN embeddings its stages do not report."""
    from parity.commands.check import run_check
    from parity.report.console import write_json
    from parity.spec import load_spec

    root = tmp_path_factory.mktemp("parts")
    spec = _spec(root, {"threshold = 0.0": "threshold = 0.0\nverification_threshold = 0.9"})
    paths = {"spec": spec}
    for index in (1, 2):
        paths[f"p{index}"] = root / f"p{index}.json"
        write_json(run_check(load_spec(spec), shard=(index, 2)), paths[f"p{index}"])
    spec.write_text(spec.read_text() + "\n# a comment added between the shards' runs\n")
    paths["p2_edited"] = root / "p2_edited.json"
    write_json(run_check(load_spec(spec), shard=(2, 2)), paths["p2_edited"])

    def nan_vectors(data):
        vectors = data["shard"]["vectors"]
        count = len(vectors["names"]) * vectors["width"]
        vectors["candidate"] = base64.b64encode(np.full(count, np.nan, "<f4").tobytes()).decode()

    paths["p1_nan"] = _edited(paths["p1"], root, nan_vectors, "p1_nan.json")
    return paths


# -- the command-line corpus ------------------------------------------------------------------

def _url_cases(services: dict[str, str]) -> list[Case]:
    def check(url: str, extra: str = "retries = 0\n"):
        return lambda t: ["check", "--spec", str(url_spec(t, url, extra))]

    # Three samples time out, then the rest are not sent (GIVE_UP_AFTER): ~3 timeouts, never 17 or unbounded.
    trickle_limit = int(http_runner.GIVE_UP_AFTER * CLI_TIMEOUT * 2 + 20)
    return [
        Case("url trickling one byte every 0.5 s",
             check(services["trickle"], f"timeout = {CLI_TIMEOUT}\nretries = 0\n"), expect=(1,),
             says=(f"no answer within {CLI_TIMEOUT:g} s (timeout)", "not sent"), seconds=trickle_limit),
        Case("url answers numeric strings", check(services["strings"]), expect=(1,),
             says=("is not a list of numbers (JSON numbers, not strings",)),
        Case("url answer nested 100000 deep", check(services["nested"]), expect=(1,), says=("nests too deeply",)),
        Case("url answer with a 5000-digit integer", check(services["bigint"]), expect=(1,),
             says=("an integer of more than",)),
        Case("url answer with a 400-digit integer", check(services["overflow"]), expect=(1,),
             says=("non-finite values",)),
    ]


def _ray_cases() -> list[Case]:
    client = importlib.util.find_spec("grpc") is not None
    return [
        Case("--ray-address 127.0.0.1:1 (nothing listens)", lambda t: [
            "check", "--spec", str(_spec(t)), "--engine", "ray", "--ray-address", "127.0.0.1:1"],
             says=("cannot reach the Ray cluster at 127.0.0.1:1",), seconds=45),
        Case("--ray-address ray://127.0.0.1:1", lambda t: [
            "check", "--spec", str(_spec(t)), "--engine", "ray", "--ray-address", "ray://127.0.0.1:1"],
             says=("127.0.0.1:1",) if client else ("ray[client]", "pip install"), seconds=45),
    ]


LOG_CASES = [
    Case("logged candidate without input_biases", lambda t: [
        "check", "--spec", str(_spec(t)), "--candidate", f"logged:{_log(t, biases='drop')}"],
         says=("no input_biases", "service.jsonl")),
    Case("logged candidate with input_biases []", lambda t: [
        "check", "--spec", str(_spec(t)), "--candidate", f"logged:{_log(t, biases='empty')}"],
         says=("no input_biases",)),
    Case("diagnose --logged without input_biases", lambda t: [
        "diagnose", "--spec", str(_spec(t)), "--logged", str(_log(t, biases="drop"))], says=("no input_biases",)),
    Case("logged images outside the fixture, without input_biases", lambda t: [
        "check", "--spec", str(_spec(t)), "--candidate", f"logged:{_log(t, biases='drop', outside=True)}"],
         says=("log each request's input_biases",)),
]


def _target_cases(parts: dict[str, Path]) -> list[Case]:
    def merge(t: Path, *extra: str) -> list[str]:
        return ["merge", str(_copy(parts["p1"], t)), str(_copy(parts["p2"], t)), *extra]

    def linked(t: Path) -> Path:
        victim = t / "victim.txt"
        victim.write_text("a file parity did not make\n")
        (t / "r.json").symlink_to(victim)
        return t / "r.json"

    def dangling(t: Path) -> Path:
        (t / "r.json").symlink_to(t / "created-through-the-link.json")
        return t / "r.json"

    def to_stream(t: Path) -> Path:
        (t / "out.md").symlink_to(os.devnull)
        return t / "out.md"

    def report_dir_with_link(t: Path) -> Path:
        (t / "reports").mkdir()
        victim = t / "victim.txt"
        victim.write_text("a file parity did not make\n")
        (t / "reports" / "report.md").symlink_to(victim)
        return t / "reports"

    commands = {
        "check": lambda t: ["check", "--spec", str(_spec(t))],
        "matrix": lambda t: ["matrix", "--spec", str(_spec(t))],
        "diagnose": lambda t: ["diagnose", "--spec", str(_spec(t))],
        "merge": merge,
    }
    cases = []
    for name, command in commands.items():
        cases += [
            Case(f"{name} --json into an unwritable directory",
                 lambda t, c=command: [*c(t), "--json", str(unwritable_directory(t) / "r.json")], says=("not writable",),
                 refused=True),
            Case(f"{name} --report into an unwritable directory",
                 lambda t, c=command: [*c(t), "--report", str(unwritable_directory(t) / "reports")], says=("not writable",),
                 refused=True),
        ]
    return cases + [
        Case("--json over the fixture's manifest.json", lambda t: [
            "check", "--spec", str(_spec(t)), "--fixtures", str(_fixture(t)), "--json",
            str(t / "fixture" / "manifest.json")], says=("inside the fixture directory",), refused=True),
        Case("--report into the fixture", lambda t: [
            "check", "--spec", str(_spec(t)), "--fixtures", str(_fixture(t)), "--report", str(t / "fixture")],
             says=("inside the fixture directory",), refused=True),
        Case("calibrate --report into the fixture", lambda t: [
            "calibrate", "--spec", str(_spec(t)), "--fixtures", str(_fixture(t)), "--report", str(t / "fixture" / "r")],
             says=("inside the fixture directory",), refused=True),
        Case("--json over the spec", lambda t: ["check", "--spec", str(_spec(t)), "--json", str(t / "candidate.toml")],
             says=("is the spec",), refused=True),
        Case("--json through a symbolic link", lambda t: ["check", "--spec", str(_spec(t)), "--json", str(linked(t))],
             says=("symbolic link",), refused=True),
        Case("--json through a link to nothing yet", lambda t: [
            "check", "--spec", str(_spec(t)), "--json", str(dangling(t))], says=("symbolic link",), refused=True),
        Case("report --md through a link to a stream (/dev/null), which writes no file", lambda t: [
            "report", str(_copy(parts["p1"], t, "report.json")), "--md", str(to_stream(t))], expect=(0,)),
        Case("--report with report.md a symbolic link", lambda t: [
            "check", "--spec", str(_spec(t)), "--report", str(report_dir_with_link(t))], says=("symbolic link",),
             refused=True),
        Case("merge --json over one of its parts", lambda t: merge(t, "--json", str(t / "p1.json")),
             says=("is a partial report",), refused=True),
        Case("report --md over the report it renders", lambda t: [
            "report", str(_copy(parts["p1"], t, "report.json")), "--md", str(t / "report.json")],
             says=("is the report being rendered",), refused=True),
    ]


def _reader_cases(parts: dict[str, Path]) -> list[Case]:
    def report(path_of):
        return lambda t: ["report", str(path_of(t))]

    def merge_with(path_of):
        return lambda t: ["merge", str(path_of(t)), str(_copy(parts["p2"], t))]

    return [
        Case("report nested 100000 deep", report(lambda t: _raw(t, DEEP)), says=("nests too deeply",)),
        Case("report not UTF-8", report(lambda t: _raw(t, b'{"schema_version": 1, "kind": "check\xff\xfe"}')),
             says=("not a JSON report",)),
        Case("report with a 5000-digit integer", report(lambda t: _raw(t, b'{"schema_version": ' + BIG_INT + b"}")),
             says=("not a JSON report",)),
        Case("report body of a check under kind matrix", report(
            lambda t: _edited(parts["p1"], t, lambda d: d.update(kind="matrix"))),
             says=("does not match its kind 'matrix'", "'cells'")),
        Case("report --html of a body whose stages are a string", lambda t: [
            "report", str(_edited(parts["p1"], t, lambda d: d.update(stages="all fine"))), "--html", str(t / "r.html")],
             says=("does not match its kind 'check'",)),
        Case("report --junit of a body whose stages are numbers", lambda t: [
            "report", str(_edited(parts["p1"], t, lambda d: d.update(stages=[1, 2]))), "--junit", str(t / "j.xml")],
             says=("does not match its kind",)),
        Case("merge part nested 100000 deep", merge_with(lambda t: _raw(t, DEEP)),
             says=("part.json", "nests too deeply")),
        Case("merge part not UTF-8", merge_with(lambda t: _raw(t, b'{"kind": "\xff"}')),
             says=("part.json", "not a JSON report")),
        Case("merge parts of different spec contents at one path", lambda t: [
            "merge", str(_copy(parts["p1"], t)), str(_copy(parts["p2_edited"], t))],
             says=("different spec contents", "p1.json", "p2_edited.json")),
        Case("merge part with NaN embeddings", lambda t: [
            "merge", str(_copy(parts["p1_nan"], t)), str(_copy(parts["p2"], t))], says=("p1_nan.json", "NaN")),
    ]


@pytest.mark.parametrize("group", ["url+ray+logs", "targets+readers"])
def test_every_bad_input_ends_in_a_clear_error(group, services, parts, tmp_path):
    cases = (_url_cases(services) + _ray_cases() + LOG_CASES if group == "url+ray+logs"
             else _target_cases(parts) + _reader_cases(parts))
    problems = run_corpus(cases, tmp_path)
    assert not problems, "\n\n".join(problems)


# -- hangs, in process ---------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [True, False], ids=["headers-trickle", "body-trickles"])
def test_a_trickling_service_is_cut_off_at_the_request_deadline(headers):
    image = EXAMPLE_FIXTURES / "images" / "astronaut.png"
    with trickling_service(0.5, headers=headers) as url:
        started = time.monotonic()
        with pytest.raises(http_runner.ServiceError, match=r"no answer within 2 s \(timeout\)"):
            http_runner.post_sample(url, image, (0, 1), timeout=TIMEOUT, retries=0)
        elapsed = time.monotonic() - started
    assert elapsed < 2 * TIMEOUT, f"{elapsed:.1f} s for a {TIMEOUT} s timeout"


def test_an_address_nothing_listens_on_is_refused_after_bounded_tries():
    from parity.model.ray_engine import CONNECT_ATTEMPTS, CONNECT_BACKOFF, CONNECT_TIMEOUT, check_reachable

    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(SpecError, match=f"cannot reach the Ray cluster at {address}.*{CONNECT_ATTEMPTS} attempts"):
        check_reachable(address)
    bound = CONNECT_ATTEMPTS * CONNECT_TIMEOUT + CONNECT_BACKOFF * 2 ** CONNECT_ATTEMPTS
    assert time.monotonic() - started < bound
    check_reachable("auto")  # Ray resolves these itself, at once
    check_reachable(None)


# -- property tests: every JSON reader gives a valid value or its own error ------------------------

def _as_bytes(value) -> bytes:
    return json.dumps(value).encode()


@FUZZ
@given(value=JSON, key=st.sampled_from([None, "outputs", "scores"]))
def test_any_url_answer_is_outputs_or_a_service_error(value, key):
    for body in (_as_bytes(value), _as_bytes({key or "outputs": value})):
        try:
            outputs, embedding = http_runner.read_outputs(body, key)
        except http_runner.ServiceError:
            continue
        for array in (outputs, embedding):
            if array is not None:
                assert array.dtype == np.float32 and array.ndim == 1 and array.size and np.isfinite(array).all()


@pytest.mark.parametrize("body, says", [
    (DEEP, "nests too deeply"), (b"[" + BIG_INT + b"]", "an integer of more than"),
    (b'["0.12", "0.5"]', "not strings"), (b'{"outputs": [0.1], "embedding": ["1"]}', "'embedding' is not a list"),
    (b"[1e400]", "non-finite"), (b"[[1, 2], [3, 4]]", "one list of numbers per sample"), (b"\xff\xfe", "not JSON"),
])
def test_url_answers_that_are_not_outputs_are_named(body, says):
    with pytest.raises(http_runner.ServiceError, match=says.replace("(", r"\(")):
        http_runner.read_outputs(body, None)


@FUZZ
@given(content=JSON.map(_as_bytes) | st.binary(max_size=64) | st.just(DEEP)
       | st.just(b'{"format": 1, "entries": ' + DEEP + b"}"), stored=JSON, when=JSON)
def test_any_hash_cache_is_used_or_ignored_never_an_error(tmp_path_factory, content, stored, when):
    from parity.store.hashcache import CACHE_FILE, _key, cached

    directory = tmp_path_factory.mktemp("cache")
    target = directory / "weights.bin"
    target.write_bytes(b"weights")
    past = time.time_ns() - 60 * 10**9
    os.utime(target, ns=(past, past))

    def check(value) -> bool:  # raises on what is not a string, as a careless check would
        return len(value) == 5 and value[0] == "f"

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PARITY_CACHE_DIR", str(directory))
        patch.delenv("PARITY_HASH_CACHE", raising=False)
        (directory / CACHE_FILE).write_bytes(content)
        assert cached(target, "sha256", lambda: "fresh", valid=check) == "fresh"
        # This file's own entry, holding anything, stored at any time: used only when it passes the check.
        key = _key("sha256", str(target.resolve()), target.resolve().stat(), None)
        entries = {key: {"value": stored, "stored": when}, "other": {"value": 1, "stored": when}}
        (directory / CACHE_FILE).write_text(json.dumps({"format": 1, "entries": entries}))
        value = cached(target, "sha256", lambda: "fresh", valid=check)
        assert value == "fresh" or value == stored and check(stored)


@pytest.fixture(scope="module")
def documents(parts) -> list[dict]:
    """Saved report documents of every kind this module can make quickly: a check part, a diagnosis-free
    synthetic drift with samples, a calibration."""
    from parity.commands.calibrate import Calibration, Run
    from parity.report.console import document

    noise = {"embedding": {"max_abs": 2e-7, "min_cosine": 0.99999999}}
    calibration = Calibration("cpu", "float32", (Run(1, 1),), 4.0, noise)
    return [json.loads(parts["p1"].read_text()), json.loads(json.dumps(document(_drift_with_names(["a.png"])))),
            json.loads(json.dumps(document(calibration)))]


def _paths(value, prefix=()) -> list[tuple]:
    """Every path to a value inside nested dicts and lists."""
    found = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for i, inner in enumerate(value[:3]):
            found += _paths(inner, (*prefix, i))
    return found


def _mutate(data, path: tuple, value, remove: bool):
    data = copy.deepcopy(data)
    if not path:
        return value
    holder = data
    for key in path[:-1]:
        holder = holder[key]
    if remove:
        del holder[path[-1]]
    else:
        holder[path[-1]] = value
    return data


@FUZZ
@given(which=st.integers(0, 2), where=st.integers(0, 10**6), value=JSON, remove=st.booleans())
def test_any_edit_of_a_saved_report_renders_or_is_a_report_error(documents, tmp_path_factory, which, where, value,
                                                                  remove):
    from parity.report.files import load_document, render_saved

    original = documents[which]
    paths = _paths(original)
    path = paths[where % len(paths)]
    edited = _mutate(original, path, value, remove and bool(path))
    file = tmp_path_factory.mktemp("doc") / "report.json"
    file.write_text(json.dumps(edited))
    try:
        data = load_document(file)
        for fmt in ("md", "junit"):
            assert isinstance(render_saved(data, fmt, source=str(file)), str)
    except ReportError:
        pass


@FUZZ
@given(value=JSON)
def test_any_json_given_to_parity_report_renders_or_is_a_report_error(tmp_path_factory, value):
    from parity.report.files import load_document, render_saved
    from parity.report.console import SCHEMA_VERSION

    file = tmp_path_factory.mktemp("doc") / "report.json"
    for data in (value, {"schema_version": SCHEMA_VERSION, "kind": "check", "body": value},
                 {**(value if isinstance(value, dict) else {}), "schema_version": SCHEMA_VERSION, "kind": "diagnosis"}):
        file.write_text(json.dumps(data))
        try:
            render_saved(load_document(file), "md", source=str(file))
        except ReportError:
            pass


@FUZZ
@given(where=st.integers(0, 10**6), value=JSON, remove=st.booleans())
def test_any_edit_of_a_partial_report_merges_or_is_a_spec_error(parts, tmp_path_factory, where, value, remove):
    from rich.console import Console

    from parity.commands.merge import load_partial, merge_reports
    from parity.report.console import render_report, to_json

    original = json.loads(parts["p1"].read_text())
    paths = _paths(original)
    path = paths[where % len(paths)]
    file = tmp_path_factory.mktemp("part") / "p1.json"
    file.write_text(json.dumps(_mutate(original, path, value, remove and bool(path))))
    try:
        merged = merge_reports([load_partial(file), load_partial(parts["p2"])], sources=[file, parts["p2"]])
    except SpecError:
        return
    render_report(merged, Console(file=io.StringIO(), width=120))
    json.dumps(to_json(merged))


# -- report.md shows names as written ---------------------------------------------------------------

HOSTILE = ["<img src=x onerror=alert(1)>.png", "[click](javascript:alert(1)).png", "![x](https://e.invalid/p.png)",
           "a`b``c.png", "*bold*_em_.png", "</details><script>alert(1)</script>.png", "line\nbreak|pipe.png"]


def _drift_with_names(names: list[str]):
    from parity.judge.arrays import compare_arrays
    from parity.results import Report, StageResult, Status, Tolerance

    reference = np.zeros((len(names), 4), np.float32)
    comparison = compare_arrays(reference + 1.0, reference, tolerance=Tolerance(1e-5, 0.0), names=names)
    stages = (StageResult("load", Status.PASS, "ok"),
              StageResult("outputs", Status.FAIL, f"moved on {names[0]} ```\n</details>", comparison=comparison))
    return Report(f"{names[0]}.toml", f"fixtures/{names[-1]}", "cpu", "float32", stages)


def test_report_md_shows_hostile_sample_names_as_text_never_as_html_or_links(tmp_path):
    from markdown_it import MarkdownIt

    from parity.report.files import write_reports

    paths = write_reports(_drift_with_names(HOSTILE), tmp_path / "report", summary=False)
    text = paths["md"].read_text()
    rendered = MarkdownIt("commonmark", {"html": True}).enable("table").render(text)
    assert "<img" not in rendered and "<script" not in rendered and "<a " not in rendered
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in rendered
    assert "*bold*_em_.png" in rendered  # shown as written, not emphasised
    assert rendered.count("<details>") == rendered.count("</details>") == 1  # nothing closed it early
    assert rendered.count("<pre>") == 1  # the stage text's fence was not broken out of
