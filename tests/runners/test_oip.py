"""The oip runner against a real KServe ModelServer on 127.0.0.1, serving a user's model written here.

The user's repository (`tests.support.oip_server`) has its own BatchNorm head and a KServe server
script; the clean script and two copies with one bug each are served at once, on free loopback ports,
and stopped when the module's tests are done. The injected runs differ from the clean one by the bug alone.
"""

from __future__ import annotations

import base64
import difflib
import json
import time

import numpy as np
import pytest

import parity.runners.http as http_runner
from parity.commands.check import run_check
from parity.cli import EXIT_DRIFT, EXIT_PASS, EXIT_USAGE, main
from parity.errors import SpecError
from parity.results import Status
from parity.runners.oip import ModelMetadata, Plan, Tensor, model_url, plan, read_answer
from parity.runners.http import ServiceError
from parity.spec import load_spec
from tests.support.http_service import free_port
from tests.support.oip_server import (MODEL, PIXELS_MODEL, freeze, quality_spec, served, stub_model, user_repo,
                                      write_server)

UNSEEN = ("load", "weights", "head")


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(http_runner, "BACKOFF", 0.01)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """The user's repository, and its clean, BGR and softmax servers (ready), stopped after the module."""
    pytest.importorskip("kserve")
    repo = user_repo(tmp_path_factory.mktemp("quality_repo"))
    modules = [write_server(repo), write_server(repo, "bgr"), write_server(repo, "softmax")]
    with served(repo, *modules, meanwhile=lambda: freeze(repo)) as servers:
        yield repo, dict(zip(("clean", "bgr", "softmax"), servers))


def _check(repo, url: str, extra: str = ""):
    return run_check(load_spec(quality_spec(repo, f'oip = "{url}"\n{extra}', name="gate.toml")))


def test_the_served_model_passes_and_each_bug_fails_at_its_stage(deployment):
    repo, servers = deployment
    report = _check(repo, servers["clean"].model())
    assert report.passed, [(s.stage, s.status, s.headline) for s in report.stages]
    assert report.stage("outputs").comparison.total == 8 * 5
    assert report.stage("embedding").status is Status.PASS  # the model declares an 'embedding' output
    assert report.stage("decisions").status is Status.PASS
    for stage in UNSEEN + ("pixels",):
        assert report.stage(stage).status is Status.SKIP
        assert report.stage(stage).headline.startswith("not observable: a model served over the Open Inference")

    # The server decodes to BGR: its embeddings drift, the first stage it shows.
    report = _check(repo, servers["bgr"].model())
    assert report.stage("decode").status is Status.PASS
    assert report.first_failure.stage == "embedding"

    # The server applies a softmax the head does not: the embeddings match, the outputs do not, and
    # the explainer says what the server does after the head.
    report = _check(repo, servers["softmax"].model())
    assert report.stage("embedding").status is Status.PASS
    assert report.first_failure.stage == "outputs"
    findings = [f for f in report.stage("outputs").findings if f.detector == "outputs.softmax"]
    assert findings and 'postprocess = "softmax"' in findings[0].spec_fix
    # Declared as what the shipped server does, the same server passes.
    assert _check(repo, servers["softmax"].model(), 'postprocess = "softmax"\n').passed

    # Nothing but the bug differs between the clean script and each injected one.
    clean = (repo / "serve" / "scorer.py").read_text().splitlines()
    for bug in ("bgr", "softmax"):
        changed = [line for line in difflib.unified_diff(clean, (repo / "serve" / f"scorer_{bug}.py").read_text()
                                                         .splitlines(), lineterm="", n=0)
                   if line[:1] in "+-" and line[:3] not in ("+++", "---")]
        assert len(changed) == 2, changed


def test_pixels_go_as_fp32_to_a_model_that_takes_them(deployment):
    repo, servers = deployment
    report = _check(repo, servers["clean"].model(PIXELS_MODEL), 'send = "pixels"\n')
    assert report.passed, [(s.stage, s.status, s.headline) for s in report.stages]
    assert report.stage("pixels").status is Status.PASS  # the spec's pixels, as sent, against the golden ones
    assert report.stage("outputs").comparison.total == 8 * 5


@pytest.mark.parametrize("extra, said", [
    ('input_name = "image"\n', ["input_name = 'image'", "photo (BYTES [-1])", "context (INT64 [-1, 2])"]),
    ('output_name = "scores"\n', ["output_name = 'scores'", "quality (FP32 [-1, 5])", "embedding (FP32 [-1, 64])"]),
    ('send = "pixels"\n', ["take FP32 pixels", "photo (BYTES [-1])", "input_name"]),
])
def test_a_tensor_the_model_does_not_declare_is_exit_2_naming_what_it_declares(deployment, extra, said, capsys):
    repo, servers = deployment
    spec = quality_spec(repo, f'oip = "{servers["clean"].model()}"\n{extra}', name="names.toml")
    assert main(["check", "--spec", str(spec)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert all(text in err for text in said), err
    assert "Traceback" not in err


def test_an_unknown_model_is_exit_2_with_the_servers_answer(deployment, capsys):
    repo, servers = deployment
    spec = quality_spec(repo, f'oip = "{servers["clean"].model("nope")}"\n', name="unknown.toml")
    assert main(["check", "--spec", str(spec)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "cannot read the model's metadata" in err and "HTTP 404" in err and "nope" in err, err


def test_a_server_that_is_down_is_a_clear_error_in_bounded_time(deployment, capsys):
    repo, _ = deployment
    url = f"http://127.0.0.1:{free_port()}/v2/models/{MODEL}"  # nothing listens there
    spec = quality_spec(repo, f'oip = "{url}"\ntimeout = 2\n', name="down.toml")
    started = time.monotonic()
    assert main(["check", "--spec", str(spec)]) == EXIT_USAGE
    assert time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert "cannot read the model's metadata" in err and "cannot reach" in err and "Is the server running" in err
    assert "Traceback" not in err


def test_kind_target_on_the_command_line_takes_the_tables_options(deployment, monkeypatch):
    repo, servers = deployment
    url = servers["clean"].model()
    spec = quality_spec(repo, "", name="cli.toml")
    spec.write_text(spec.read_text() + '\n[candidates.served]\noip = "http://127.0.0.1:9/v2/models/x"\n'
                    'output_name = "quality"\ntimeout = 20\n')
    monkeypatch.chdir(repo)
    assert main(["check", "--spec", "cli.toml", "--candidate", f"oip:{url}"]) == EXIT_PASS
    assert main(["check", "--spec", "cli.toml", "--candidate", f"oip:{servers['softmax'].model()}"]) == EXIT_DRIFT
    assert main(["check", "--spec", "cli.toml", "--candidate", "served"]) == EXIT_USAGE  # its own URL: port 9


# -- what KServe will not do: a stand-in server answering the fixture's own outputs ---------------

def _fixture_answers(repo, *, fail: str | None = None, token: str | None = None, width: int = 5,
                     seen: list | None = None):
    """``infer`` for `stub_model`: the fixture's outputs for the sample the request's id names (``seen``
    collects the requests)."""
    from parity.store.fixtures import load_fixture

    fixture = load_fixture(repo / "fixtures" / "quality")
    by_name = {row.name: (row, fixture.outputs[i]) for i, row in enumerate(fixture.rows)}

    def infer(request, headers):
        if token is not None and headers.get("Authorization") != token:
            return 401, {"error": f"bad token {headers.get('Authorization')}"}
        if seen is not None:
            seen.append(request)
        row, outputs = by_name[request["id"]]
        photo, *context = request["inputs"]
        assert photo["datatype"] == "BYTES" and photo["shape"] == [1]
        assert base64.b64decode(photo["data"][0]) == row.image.read_bytes()
        assert context in ([], [{"name": "context", "shape": [1, 2], "datatype": "INT32",
                                 "data": list(row.input_biases)}])
        if request["id"] == fail:
            return 500, {"error": "CUDA out of memory"}
        return 200, {"model_name": "stub", "outputs": [
            {"name": "scores", "shape": [1, width], "datatype": "FP64", "data": outputs.tolist()[:width]}]}
    return infer


STUB = {"name": "stub", "platform": "",
        "inputs": [{"name": "photo", "datatype": "BYTES", "shape": [-1]},
                   {"name": "context", "datatype": "INT32", "shape": [-1, 2]}],
        "outputs": [{"name": "scores", "datatype": "FP64", "shape": [-1, 5]}]}


def test_headers_from_the_environment_reach_the_server_and_are_never_shown(deployment, monkeypatch):
    repo, _ = deployment
    monkeypatch.setenv("OIP_TOKEN", "Bearer s3cret-value")
    headers = 'headers = { Authorization = "env:OIP_TOKEN" }\n'
    with stub_model(STUB, _fixture_answers(repo, token="Bearer s3cret-value")) as url:
        report = _check(repo, url, headers)
        assert report.passed, [(s.stage, s.status, s.headline) for s in report.stages]
        assert report.stage("embedding").status is Status.SKIP  # no 'embedding' output declared
        monkeypatch.setenv("OIP_TOKEN", "Bearer wrong-s3cret-value")  # the server echoes it back
        report = _check(repo, url, headers + "retries = 0\n")
    message = report.stage("decode").sample_errors[0][1]
    assert "HTTP 401" in message and "s3cret" not in message, message


def test_a_sample_the_server_fails_on_is_named_and_the_others_are_compared(deployment):
    repo, _ = deployment
    with stub_model(STUB, _fixture_answers(repo, fail="rocket.jpg")) as url:
        report = _check(repo, url, "retries = 0\n")
    assert dict(report.stage("decode").sample_errors) == {
        "rocket.jpg": f"{url}/infer: the service answered HTTP 500 Internal Server Error: "
                      '{"error": "CUDA out of memory"}'}
    assert report.stage("outputs").status is Status.PASS and report.stage("outputs").comparison.total == 7 * 5


def test_a_model_declaring_no_tensors_is_sent_under_input_name(deployment):
    repo, _ = deployment
    bare = {"name": "stub", "platform": "", "inputs": [], "outputs": []}
    seen: list[dict] = []
    with stub_model(bare, _fixture_answers(repo, seen=seen)) as url:
        with pytest.raises(SpecError, match="declares no inputs"):
            _check(repo, url)
        report = _check(repo, url, 'input_name = "photo"\n')
    assert report.passed, [(s.stage, s.status, s.headline) for s in report.stages]
    # The image alone: no input is declared for the input_biases.
    assert [[t["name"] for t in r["inputs"]] for r in seen] == [["photo"]] * 8


def test_a_model_giving_another_number_of_outputs_is_exit_2(deployment, capsys):
    repo, _ = deployment
    six = {**STUB, "outputs": [{"name": "scores", "datatype": "FP64", "shape": [-1, 6]}]}
    with stub_model(six, _fixture_answers(repo)) as url:
        spec = quality_spec(repo, f'oip = "{url}"\n', name="six.toml")
        assert main(["check", "--spec", str(spec)]) == EXIT_USAGE
    assert "gives 6 values per sample; the fixture has 5" in capsys.readouterr().err


# -- the protocol's parts, without a server ----------------------------------------------------

@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/predict", "http://127.0.0.1:8080/v2/models",
                                 "http://127.0.0.1:8080/v2/models/m/infer", "ftp://127.0.0.1/v2/models/m"])
def test_only_a_models_address_is_accepted(url):
    with pytest.raises(SpecError, match=r"/v2/models/NAME"):
        model_url(url)


def test_a_models_address_may_carry_a_version_and_a_prefix():
    assert model_url("http://h:1/v2/models/m/versions/3/") == "http://h:1/v2/models/m/versions/3"
    assert model_url("https://h/seldon/ns/m/v2/models/m") == "https://h/seldon/ns/m/v2/models/m"


METADATA = ModelMetadata("m", (Tensor("photo", "BYTES", (-1,)), Tensor("pixels", "FP32", (-1, 3, 224, 224))),
                         (Tensor("scores", "FP32", (-1, 3)),))


def test_a_plan_picks_the_input_the_send_mode_takes():
    chosen = plan(ModelMetadata("m", METADATA.inputs[:1], METADATA.outputs), send="bytes", input_name=None,
                  output_name=None, biases=0)
    assert (chosen.image, chosen.biases, chosen.output, chosen.embedding) == ("photo", None, "scores", None)
    chosen = plan(ModelMetadata("m", METADATA.inputs[1:], METADATA.outputs), send="pixels", input_name=None,
                  output_name=None, biases=0)
    assert (chosen.image, chosen.image_datatype) == ("pixels", "FP32")
    # The input that is not the image gets the input_biases: a second image input cannot take them.
    with pytest.raises(SpecError, match=r"takes pixels \(FP32 \[-1, 3, 224, 224\]\) besides the image, but the "
                                        "fixture's rows carry 2 input_biases each"):
        plan(METADATA, send="bytes", input_name=None, output_name=None, biases=2)
    with pytest.raises(SpecError, match="input photo \\(BYTES \\[-1\\]\\) .* set send = \"bytes\""):
        plan(METADATA, send="pixels", input_name="photo", output_name=None, biases=0)


def test_a_model_with_no_declared_tensors_needs_input_name():
    bare = ModelMetadata("m", (), ())
    with pytest.raises(SpecError, match="declares no inputs .* set \\[candidate\\].input_name"):
        plan(bare, send="bytes", input_name=None, output_name=None, biases=0)
    assert plan(bare, send="pixels", input_name="x", output_name=None, biases=0) == Plan("x", "FP32")


def _answer(*outputs) -> bytes:
    return json.dumps({"model_name": "m", "outputs": list(outputs)}).encode()


def test_an_answer_is_read_by_name_and_shape():
    chosen = Plan("photo", "BYTES", output="scores", embedding="embedding")
    nested = {"name": "scores", "shape": [1, 3], "datatype": "FP32", "data": [[0.5, -1, 2]]}
    values, embedding = read_answer(_answer({"name": "embedding", "shape": [2], "datatype": "FP64",
                                             "data": [1, 2]}, nested), chosen)
    np.testing.assert_array_equal(values, np.float32([0.5, -1, 2]))
    np.testing.assert_array_equal(embedding, np.float32([1, 2]))


@pytest.mark.parametrize("output, said", [
    ({"name": "other", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}, "no output 'scores' (outputs: other)"),
    ({"name": "scores", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}, "holds 3 values for its shape"),
    ({"name": "scores", "shape": [2, 3], "datatype": "FP32", "data": [0] * 6}, "expected one sample's vector"),
    ({"name": "scores", "shape": [1], "datatype": "BYTES", "data": ["high"]}, "is BYTES, not numbers"),
    ({"name": "scores", "shape": [2], "datatype": "FP32", "data": [1, None]}, "non-finite"),
    ({"name": "scores", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": 12}},
     "binary tensor data is not read"),
])
def test_a_bad_answer_is_a_service_error_saying_what(output, said):
    with pytest.raises(ServiceError, match=said.replace("(", r"\(").replace(")", r"\)")):
        read_answer(_answer(output), Plan("photo", "BYTES", output="scores"))


def test_url_only_fields_are_refused_on_an_oip_candidate(deployment):
    repo, _ = deployment
    spec = quality_spec(repo, 'oip = "http://127.0.0.1:9/v2/models/m"\nfield = "file"\n', name="fields.toml")
    with pytest.raises(SpecError, match="shapes the HTTP request of a url candidate; an oip candidate sends typed"):
        load_spec(spec)
    spec = quality_spec(repo, 'oip = "http://127.0.0.1:9/v2/models/m"\noutput_key = "scores"\n', name="key.toml")
    with pytest.raises(SpecError, match="output_key reads a JSON answer of a url candidate.* output_name"):
        run_check(load_spec(spec))  # refused before any request


def test_tensor_names_are_refused_on_other_kinds(tmp_path):
    spec = quality_spec(tmp_path, 'url = "http://127.0.0.1:9/predict"\ninput_name = "photo"\n', name="url.toml")
    with pytest.raises(SpecError, match="input_name names a tensor .* a url candidate has none"):
        load_spec(spec)
