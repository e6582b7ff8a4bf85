"""Gradio candidates gated as the Space ships: a running app through gradio_client, and the Blocks launched for the run.

The Space and its reference (`tests.support.gradio_apps`) are written apart from the bundled
examples; each injected run differs from the clean one by the bug's line in app.py alone.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from parity.commands.check import run_check
from parity.cli import EXIT_PASS, EXIT_USAGE, main
from parity.results import Status
from parity.spec import load_spec
from tests.support.gradio_apps import (BGR, DOUBLE_SIGMOID, LABEL_ORDER, OPTIONS, Reference, build_reference, serve,
                                       write_app)
from tests.support.http_service import free_port

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

OUTPUTS_ONLY = ("weights", "pixels", "embedding", "head")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return build_reference(tmp_path_factory.mktemp("photo_labels"))


def _remote(url: str) -> str:
    return f'gradio = "{url}"\napi_name = "/predict"\n' + OPTIONS


# -- gradio_app = "app.py:demo": launched for the run, observed stage by stage -------------------------

def test_the_launched_space_passes_with_every_stage_observed(reference, tmp_path):
    report = run_check(load_spec(write_app(reference, tmp_path / "clean")))
    assert report.passed, report.first_failure
    for stage in ("weights", "decode", "pixels", "embedding", "head", "outputs", "decisions"):
        assert report.stage(stage).status is Status.PASS, report.stage(stage)
    assert report.stage("outputs").comparison.total == 10 * 4


@pytest.mark.parametrize("bug, stage", [(BGR, "pixels"), (DOUBLE_SIGMOID, "outputs")], ids=["bgr", "double_sigmoid"])
def test_a_bug_in_the_launched_space_fails_at_its_stage(reference, tmp_path, bug, stage):
    report = run_check(load_spec(write_app(reference, tmp_path / "bug", bug)))
    assert report.first_failure.stage == stage, report.first_failure
    assert report.stage("decode").status is Status.PASS  # every sample answered
    if stage == "outputs":  # the head is right; what the app does after it is not
        assert report.stage("head").status is Status.PASS


def test_kind_target_on_the_command_line_launches_a_space_that_launches_itself(reference, tmp_path, monkeypatch,
                                                                              capsys):
    """``--candidate gradio_app:app.py:demo`` with the options of a [candidate] table; the app.py as Spaces
    ship it, ending with an unguarded demo.launch()."""
    unguarded = {'if __name__ == "__main__":\n    demo.launch()': "demo.launch()"}
    spec = write_app(reference, tmp_path, unguarded, candidate=OPTIONS)
    monkeypatch.chdir(tmp_path)
    assert main(["check", "--spec", str(spec), "--candidate", "gradio_app:app.py:demo"]) == EXIT_PASS, \
        capsys.readouterr().err


def test_a_space_that_hangs_costs_a_few_timeouts_not_the_run(reference, tmp_path):
    """Each call past [candidate].timeout is cancelled; after three unanswered samples the rest are not sent."""
    hang = {"    pixels = prepare(image)": "    time.sleep(30)\n    pixels = prepare(image)",
            "import json\n": "import json\nimport time\n"}
    spec = write_app(reference, tmp_path, hang,
                     candidate='gradio_app = "app.py:demo"\n' + OPTIONS.replace("timeout = 60.0", "timeout = 1.0"))
    started = time.monotonic()
    report = run_check(load_spec(spec))
    assert time.monotonic() - started < 45  # import, three 1 s timeouts, closing; never the 30 s sleeps
    errors = [message for _, message in report.stage("decode").sample_errors]
    assert len(errors) == 10 and report.first_failure.stage == "decode"
    assert all("no answer within 1 s (cancelled)" in m for m in errors[:3]), errors[:3]
    assert all("not sent: the app at http://127.0.0.1:" in m for m in errors[3:]), errors[3:]


# -- gradio = URL: a running app, its answers only -------------------------------------------------------

def test_a_running_space_passes_on_its_answers(reference, tmp_path):
    folder = tmp_path / "clean"
    write_app(reference, folder)
    with serve(folder) as url:
        report = run_check(load_spec(write_app(reference, folder, candidate=_remote(url))))
    assert report.passed, report.first_failure
    assert report.stage("outputs").status is Status.PASS
    assert report.stage("outputs").comparison.total == 10 * 4
    for stage in OUTPUTS_ONLY:
        assert report.stage(stage).headline.startswith("not observable: a Gradio app reached at a URL"), stage


@pytest.mark.parametrize("bug", [BGR, LABEL_ORDER], ids=["bgr", "label_order"])
def test_a_bug_in_a_running_space_fails_at_outputs(reference, tmp_path, bug):
    folder = tmp_path / "bug"
    write_app(reference, folder, bug)
    with serve(folder) as url:
        report = run_check(load_spec(write_app(reference, folder, bug, candidate=_remote(url))))
    assert report.first_failure.stage == "outputs"
    assert report.stage("decode").status is Status.PASS


# -- what to change when the spec does not fit the app -------------------------------------------------

def test_an_endpoint_or_inputs_that_do_not_fit_the_app_are_usage_errors(reference, tmp_path, capsys):
    folder = tmp_path / "app"
    write_app(reference, folder)
    with serve(folder) as url:
        spec = write_app(reference, folder, candidate=_remote(url).replace('"/predict"', '"/classify"'))
        assert main(["check", "--spec", str(spec)]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "no such endpoint" in err and "/predict" in err and "Traceback" not in err, err

        # The default inputs (image, input_biases) are two; the app takes three: the fix is proposed.
        spec = write_app(reference, folder, candidate=f'gradio = "{url}"\nlabels = ["a", "b", "c", "d"]\n')
        assert main(["check", "--spec", str(spec)]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert 'inputs = ["image", "input_biases.0", "input_biases.1"]' in err, err


def test_an_app_that_is_not_there_fails_to_load_and_a_missing_extra_is_named(reference, tmp_path, monkeypatch,
                                                                             capsys):
    spec = write_app(reference, tmp_path, candidate=_remote(f"http://127.0.0.1:{free_port()}/"))
    report = run_check(load_spec(spec))
    assert report.first_failure.stage == "load"
    assert report.stage("load").headline.startswith("cannot connect to the Gradio app at http://127.0.0.1:")

    # A private Space's token, read from the environment: unset, the variable is named (never a value).
    monkeypatch.delenv("PARITY_TEST_SPACE_TOKEN", raising=False)
    token = write_app(reference, tmp_path / "private", candidate=_remote("https://owner-space.hf.space/")
                      + 'headers = { Authorization = "env:PARITY_TEST_SPACE_TOKEN" }\n')
    assert main(["check", "--spec", str(token)]) == EXIT_USAGE
    assert "PARITY_TEST_SPACE_TOKEN" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "gradio_client", None)  # as if not installed
    assert main(["check", "--spec", str(spec)]) == EXIT_USAGE
    assert "parity[gradio]" in capsys.readouterr().err


def test_gradio_fields_are_checked_when_the_spec_loads(reference, tmp_path: Path):
    from parity.errors import SpecError

    for candidate, says in [('url = "http://127.0.0.1:9/"\napi_name = "/predict"\n', "a url candidate has not"),
                            ('gradio = "http://127.0.0.1:9/"\napi_name = "predict"\n', "leading slash"),
                            ('python = "app:label"\ninputs = ["image", "input_biases.0"]\n', "each entry"),
                            ('gradio_app = "app.py"\n', "'module:demo' or 'path/to/app.py:demo'")]:
        spec = tmp_path / "spec.toml"
        spec.write_text(reference.spec_text(candidate))
        with pytest.raises(SpecError, match=says):
            load_spec(spec)
