"""MLflow pyfunc models gated as they ship: loaded in process (``mlflow_model``) and served by a real
``mlflow models serve --env-manager local`` (``url`` with ``format = "mlflow"``), started and stopped here.

The model is the style tagger of `tests.support.mlflow_models` (a models-from-code ``PythonModel``
written apart from the bundled examples); each bug is a text replacement in a copy of its code, the
only change between the clean and the injected model. One spec holds both candidates.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlflow")

from parity.cli import EXIT_DRIFT, EXIT_PASS, main  # noqa: E402
from parity.errors import SpecError  # noqa: E402
from parity.runners.http import RequestMap, ServiceError, read_outputs  # noqa: E402
from parity.runners.mlflow_protocol import payload, served_predictions  # noqa: E402
from parity.spec import load_spec  # noqa: E402
from tests.shipped.findings import findings  # noqa: E402
from tests.support.mlflow_models import BUGS, STYLES, build_style_reference, save_style_model, served  # noqa: E402

# MLflow's advice at save time is not what these tests are about (its advice on type hints it shows whatever
# the filters say: MLflow sets its own for UserWarning around the calls that give it).
pytestmark = pytest.mark.filterwarnings("ignore:.*An input example was not provided:UserWarning")
INNER_STAGES = ("weights", "decode", "pixels", "embedding", "head", "outputs", "decisions")
# How the style tagger's requests and answers map: the source id in its own column, scores by style after a sigmoid.
OPTIONS = ('form = { source = "input_biases.0" }\n'
           f"labels = {json.dumps(list(STYLES))}\n"
           'postprocess = "sigmoid"\n')


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="module")
def style(tmp_path_factory):
    return build_style_reference(tmp_path_factory.mktemp("style_tags"))


@pytest.fixture(scope="module")
def models(style, tmp_path_factory) -> dict[str, Path]:
    """The clean model and one model per bug, each saved by mlflow.pyfunc.save_model from its own copy of the code."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        return {name: save_style_model(style, tmp_path_factory.mktemp(name), BUGS.get(name))
                for name in ("clean", *BUGS)}


def _spec(style, folder: Path, models: dict[str, Path], name: str, urls: dict[str, str] | None = None) -> Path:
    """One spec, two candidates: the model in process and (when served) the same model behind its server."""
    text = style.spec_text() + f'\n[candidates.in_process]\nmlflow_model = "{models[name]}"\n{OPTIONS}'
    if urls and name in urls:
        text += f'\n[candidates.served]\nurl = "{urls[name]}"\nformat = "mlflow"\nretries = 0\n{OPTIONS}'
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "parity.toml").write_text(text)
    return folder / "parity.toml"


def _check(spec: Path, candidate: str, out: Path, *extra: str) -> tuple[int, dict]:
    status = main(["check", "--spec", str(spec), "--candidate", candidate, "--json", str(out), *extra])
    return status, json.loads(out.read_text()) if out.is_file() else {}


def _stages(report: dict) -> dict[str, dict]:
    return {s["stage"]: s for s in report["stages"]}


def _finding_text(report: dict, stage: str) -> str:
    return " ".join(f"{f['detector']} {f['cause']} {f['fix']}" for f in findings(report) if f["stage"] == stage)


# -- in process: mlflow.pyfunc.load_model, hooks on the PythonModel's torch modules -------------------

def test_the_clean_model_in_process_passes_with_every_inner_stage_observed(style, models, tmp_path):
    status, report = _check(_spec(style, tmp_path, models, "clean"), "in_process", tmp_path / "check.json")
    assert status == EXIT_PASS and report["passed"] is True
    stages = _stages(report)
    for stage in INNER_STAGES:
        assert stages[stage]["status"] == "PASS", f"{stage}: {stages[stage]['headline']}"
    assert "bit-identical" in stages["weights"]["headline"]


@pytest.mark.parametrize("bug,first,words", [
    ("bgr", "pixels", ("BGR",)),
    ("softmax", "outputs", ("softmax",)),
    ("columns_reversed", "outputs", ()),
])
def test_a_bug_in_the_model_code_fails_in_process_at_its_stage(style, models, tmp_path, bug, first, words):
    status, report = _check(_spec(style, tmp_path, models, bug), "in_process", tmp_path / "check.json")
    assert status == EXIT_DRIFT and report["first_failure"] == first
    stages = _stages(report)
    assert stages["weights"]["status"] == "PASS"
    if first == "outputs":  # the head itself, on the reference embeddings, is the trained one
        assert stages["head"]["status"] == "PASS" and stages["embedding"]["status"] == "PASS"
    text = _finding_text(report, first)
    for word in words:
        assert word in text, text


def test_the_model_named_on_the_command_line_takes_its_tables_options(style, models, tmp_path, monkeypatch):
    """``--candidate mlflow_model:PATH`` (relative to the working directory) with [candidates.in_process]'s options."""
    spec = _spec(style, tmp_path / "spec", models, "clean")
    monkeypatch.chdir(models["clean"].parent)
    status, report = _check(spec, "mlflow_model:model", tmp_path / "check.json")
    assert status == EXIT_PASS, report.get("first_failure")


def test_a_batch_of_rows_per_predict_passes_too(style, models, tmp_path):
    spec = _spec(style, tmp_path, models, "clean")
    spec.write_text(spec.read_text().replace('mlflow_model = "', 'batch = true\nmlflow_model = "'))
    status, report = _check(spec, "in_process", tmp_path / "check.json")
    assert status == EXIT_PASS, report.get("first_failure")


def test_instances_requests_reach_predict_as_the_server_gives_them(style, models, tmp_path):
    """For ``instances`` MLflow leaves a binary column as its base64 text: the model cannot open it, as served."""
    spec = _spec(style, tmp_path, models, "clean")
    spec.write_text(spec.read_text().replace('mlflow_model = "', 'send = "instances"\nmlflow_model = "'))
    status, report = _check(spec, "in_process", tmp_path / "check.json")
    assert status == EXIT_DRIFT and report["first_failure"] == "decode"
    errors = dict(_stages(report)["decode"]["sample_errors"])
    assert len(errors) == len(style.images)
    assert all("raised UnidentifiedImageError" in message for message in errors.values()), errors


# -- served: mlflow models serve --env-manager local on free 127.0.0.1 ports ------------------------

SERVED = ("clean", "bgr", "columns_reversed")
# Three servers start together (each the CLI and its uvicorn, importing MLflow and torch): most of this file's
# time, hence the served tests' slow mark.


@pytest.fixture(scope="module", autouse=True)
def servers(request, tmp_path_factory):
    """The clean model and two bugged ones, each behind its own server for the whole module, started before the
    module's first test when any selected test needs them (they start while the in-process tests run)."""
    if not any("urls" in item.fixturenames for item in request.session.items):
        yield None
        return
    models = request.getfixturevalue("models")
    with served([models[name] for name in SERVED], tmp_path_factory.mktemp("serve-logs")) as ready:
        yield ready


@pytest.fixture(scope="module")
def urls(servers) -> dict[str, str]:
    return dict(zip(SERVED, servers()))


@pytest.mark.slow
def test_the_clean_model_served_passes_and_shows_its_outputs_only(style, models, urls, tmp_path):
    status, report = _check(_spec(style, tmp_path, models, "clean", urls), "served", tmp_path / "check.json")
    assert status == EXIT_PASS and report["passed"] is True
    stages = _stages(report)
    assert stages["outputs"]["status"] == "PASS" and stages["decisions"]["status"] == "PASS"
    for stage in ("weights", "pixels", "head"):
        assert stages[stage]["status"] == "SKIP" and "not observable" in stages[stage]["headline"]


@pytest.mark.slow
@pytest.mark.parametrize("bug", ["bgr", "columns_reversed"])
def test_a_bug_in_the_served_model_fails_at_outputs(style, models, urls, tmp_path, bug):
    status, report = _check(_spec(style, tmp_path, models, bug, urls), "served", tmp_path / "check.json")
    assert status == EXIT_DRIFT and report["first_failure"] == "outputs"
    assert _stages(report)["decode"]["status"] == "PASS"  # every request answered


@pytest.mark.slow
def test_the_server_refuses_what_the_model_in_process_raised_on(style, models, urls, tmp_path):
    """The same ``instances`` request served: MLflow answers HTTP 400 for every sample, each named."""
    spec = _spec(style, tmp_path, models, "clean", urls)
    spec.write_text(spec.read_text().replace('format = "mlflow"', 'format = "mlflow"\nsend = "instances"'))
    status, report = _check(spec, "served", tmp_path / "check.json")
    assert status == EXIT_DRIFT and report["first_failure"] == "decode"
    errors = dict(_stages(report)["decode"]["sample_errors"])
    assert len(errors) == len(style.images)
    assert all("HTTP 400" in message for message in errors.values()), errors


# -- the request and answer formats --------------------------------------------------------------------

def test_each_send_writes_the_scoring_servers_json():
    samples = [(b"\x89PNG", [2]), (b"GIF8", [0])]
    mapped = RequestMap(field="photo", form={"source": "input_biases.0"})
    b64 = [base64.b64encode(data).decode() for data, _ in samples]
    assert payload(samples, request=mapped) == {
        "dataframe_split": {"columns": ["photo", "source"], "data": [[b64[0], 2], [b64[1], 0]]}}
    records = [{"photo": b64[0], "source": 2}, {"photo": b64[1], "source": 0}]
    assert payload(samples, send="dataframe_records", request=mapped) == {"dataframe_records": records}
    assert payload(samples, send="instances", request=mapped) == {"instances": records}
    assert payload(samples, send="inputs", request=mapped) == {"inputs": {"photo": b64, "source": [2, 0]}}
    # Without form, the biases travel as one list-valued column, as the plain url request sends them.
    assert payload(samples[:1]) == {"dataframe_split": {"columns": ["image", "input_biases"], "data": [[b64[0], [2]]]}}
    with pytest.raises(SpecError, match="Accepted values: dataframe_split"):
        payload(samples, send="multipart")


@pytest.mark.parametrize("predictions,options,expected", [
    ([[0.1, 0.9]], {}, [0.1, 0.9]),                                   # an ndarray
    ([{"0": 0.1, "1": 0.9}], {}, [0.1, 0.9]),                         # a DataFrame of unnamed columns
    ([{"b": 0.9, "a": 0.1}], {"labels": ("a", "b")}, [0.1, 0.9]),     # a DataFrame named by label
    ([{"scores": [0.1, 0.9]}], {}, [0.1, 0.9]),                       # one list-valued column
    ({"scores": [[0.1, 0.9]], "ids": [7]}, {"key": "scores"}, [0.1, 0.9]),  # a dict of arrays
])
def test_predictions_are_read_as_the_model_returned_them(predictions, options, expected):
    from parity.runners.outputs import OutputMap

    values, embedding = read_outputs(json.dumps({"predictions": predictions}).encode(), OutputMap(**options),
                                     format="mlflow")
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert embedding is None


def test_an_answer_that_is_not_the_scoring_servers_says_so():
    with pytest.raises(ServiceError, match="no 'predictions'.*not an MLflow scoring server's answer"):
        read_outputs(b'{"outputs": [0.1, 0.9]}', None, format="mlflow")
    assert served_predictions({"predictions": [{"0": 1.0}, {"0": 2.0}]}) == [[1.0], [2.0]]


# -- bad input: exit 2 with what to change --------------------------------------------------------------

def test_a_folder_without_an_mlmodel_is_refused(style, tmp_path, capsys):
    spec = style.write_spec(tmp_path, f'mlflow_model = "not_a_model"\n{OPTIONS}')
    (tmp_path / "not_a_model").mkdir()
    assert main(["check", "--spec", str(spec)]) == 2
    assert "no MLmodel file there" in capsys.readouterr().err


def test_a_request_without_the_signatures_columns_is_refused_before_any_call(style, models, tmp_path, capsys):
    spec = style.write_spec(tmp_path, f'mlflow_model = "{models["clean"]}"\nfield = "photo"\n{OPTIONS}')
    assert main(["check", "--spec", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "the model's signature takes the columns image, source" in err and "without image" in err
    assert "Traceback" not in err


def test_without_mlflow_the_extra_is_named(style, models, tmp_path, monkeypatch, capsys):
    spec = style.write_spec(tmp_path, f'mlflow_model = "{models["clean"]}"\n{OPTIONS}')
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: importing it raises ImportError
    assert main(["check", "--spec", str(spec)]) == 2
    assert "pip install 'parity[mlflow]'" in capsys.readouterr().err


@pytest.mark.parametrize("candidate,says", [
    ('python = "app:predict"\nformat = "mlflow"\n', "format = 'mlflow' is the protocol of a url candidate"),
    ('mlflow_model = "model"\nheaders = { Authorization = "env:TOKEN" }\n', "headers shapes the HTTP request"),
    ('url = "http://127.0.0.1:9/invocations"\nformat = "kserve"\n', "Accepted values: mlflow"),
])
def test_fields_that_do_not_apply_are_refused(style, tmp_path, candidate, says):
    spec = style.write_spec(tmp_path, candidate)
    with pytest.raises(SpecError, match=says):
        load_spec(spec)


def test_a_send_that_is_no_mlflow_request_is_refused_before_the_model_loads(style, models, tmp_path, capsys):
    spec = style.write_spec(tmp_path, f'mlflow_model = "{models["clean"]}"\nsend = "pil"\n{OPTIONS}')
    assert main(["check", "--spec", str(spec)]) == 2
    assert "[candidate].send = 'pil' is not an MLflow request. Accepted values: dataframe_split" in \
        capsys.readouterr().err


def test_a_plain_send_on_an_mlflow_url_is_refused(style, tmp_path, capsys):
    spec = style.write_spec(tmp_path, 'url = "http://127.0.0.1:9/invocations"\nformat = "mlflow"\nsend = "multipart"\n')
    assert main(["check", "--spec", str(spec)]) == 2
    assert "does not apply to a url candidate with format = \"mlflow\": use one of dataframe_split" in \
        capsys.readouterr().err
