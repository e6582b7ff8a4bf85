"""pytest plugin: ``--parity-*`` options and fixtures that run the gate once per session.

pytest imports this plugin in every session of an environment that has parity, so nothing heavy is
imported at plugin import time: the commands (scipy), the judge and the renderers (rich) load in the
hooks and fixtures that use them, and torch and timm inside the fixtures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from parity.errors import DriftError
from parity.results import Status
from parity.spec import load_spec, select_candidate
from parity.store.shards import parse_shard

_REPORT_KEY = pytest.StashKey[object]()
_MATRIX_KEY = pytest.StashKey[object]()
# The reports of the gates that ran when the session gates several specs or candidates, by gate id.
_REPORTS_KEY = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("parity", "training-inference parity gate")
    group.addoption("--parity-spec", dest="parity_spec", default=None, metavar="SPEC",
                    help="TOML spec of the candidate inference path (default: ini parity_spec)")
    group.addoption("--parity-fixtures", dest="parity_fixtures", default=None, metavar="DIR",
                    help="fixture directory (default: the spec's `fixtures` field)")
    group.addoption("--parity-device", dest="parity_device", default=None, metavar="DEVICE",
                    help="override the spec's [runtime].device (cpu, cuda, cuda:N)")
    group.addoption("--parity-report", dest="parity_report", default=None, metavar="DIR",
                    help="write report.json, report.md, report.html and junit.xml of the session's parity run into "
                         "DIR (a matrix run into DIR/matrix when both ran)")
    group.addoption("--parity-shard", dest="parity_shard", default=None, metavar="I/N",
                    help="gate shard I of N of the samples (by content hash); with --parity-report the report is "
                         "a partial one for `parity merge`")
    parser.addini("parity_spec", "default spec(s) for --parity-spec, relative to the rootdir: one per line",
                  type="linelist", default=[])


def _shard(config: pytest.Config) -> tuple[int, int] | None:
    """``--parity-shard I/N`` as ``(I, N)``, or None for every sample."""
    if config.option.parity_shard is None:
        return None

    return parse_shard(config.option.parity_shard)


def _spec_paths(config: pytest.Config) -> list[Path]:
    """``--parity-spec``, else every line of the ``parity_spec`` ini value (relative to the rootdir)."""
    if config.option.parity_spec:
        return [Path(config.option.parity_spec)]
    return [config.rootpath / line for line in config.getini("parity_spec")]


def _spec_path(config: pytest.Config) -> Path | None:
    """The session's first spec (the one the session-wide fixtures gate)."""
    paths = _spec_paths(config)
    return paths[0] if paths else None


@pytest.fixture(scope="session")
def parity_spec(request: pytest.FixtureRequest):
    """The parsed spec named by ``--parity-spec`` (or the ``parity_spec`` ini value)."""
    path = _spec_path(request.config)
    if path is None:
        pytest.skip("no parity spec: pass --parity-spec SPEC or set parity_spec in the pytest ini")
    return load_spec(path)


@pytest.fixture(scope="session")
def parity_device(request: pytest.FixtureRequest, parity_spec) -> str:
    """The device the gate runs on; CUDA requests skip with a reason on a CPU-only machine."""
    device = request.config.option.parity_device or parity_spec.runtime.device
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip(f"--parity-device {device}: CUDA is not available on this machine")
    return device


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per matrix cell, with the cell's readable id (``pre_logits-bicubic-pil-cpu-float32``);
    one per gate stage for a test that uses ``parity_gate`` (``clip_dnn-pixels``, ..., ``clip_dnn-gate``)."""
    if "parity_gate" in metafunc.fixturenames:
        _parametrize_gate(metafunc)
    if "parity_cell" not in metafunc.fixturenames:
        return
    path = _spec_path(metafunc.config)
    if path is None:
        metafunc.parametrize("parity_cell", [pytest.param(None, marks=pytest.mark.skip(
            reason="no parity spec: pass --parity-spec SPEC or set parity_spec in the pytest ini"))], ids=["no-spec"])
        return
    # deferred: a command loads only in a session that gates (check pulls in scipy; module docstring)
    from parity.commands.matrix import expand_matrix, unsupported

    spec = load_spec(path)
    reason = unsupported(spec)
    if reason is not None:
        metafunc.parametrize("parity_cell", [pytest.param(None, marks=pytest.mark.skip(reason=reason))],
                             ids=["no-matrix"])
        return
    cells = expand_matrix(spec, device=metafunc.config.option.parity_device)
    metafunc.parametrize("parity_cell", cells, ids=[cell.id for cell in cells])


@pytest.fixture(scope="session")
def parity_matrix(request: pytest.FixtureRequest, parity_spec):
    """Run the spec's matrix once for the session (shared trunk passes) and share the `MatrixReport`."""
    # deferred: a command loads only in a session that gates (check pulls in scipy; module docstring)
    from parity.commands.matrix import run_matrix

    report = run_matrix(parity_spec, fixtures=request.config.option.parity_fixtures,
                        device=request.config.option.parity_device, shard=_shard(request.config))
    request.config.stash[_MATRIX_KEY] = report
    return report


@pytest.fixture(scope="session")
def parity_report(request: pytest.FixtureRequest, parity_spec, parity_device):
    """Run the gate once for the session and share the `Report` between tests."""
    # deferred: a command loads only in a session that gates (check pulls in scipy; module docstring)
    from parity.commands.check import run_check

    report = run_check(parity_spec, fixtures=request.config.option.parity_fixtures, device=parity_device,
                       shard=_shard(request.config))
    request.config.stash[_REPORT_KEY] = report
    return report


def _report_dirs(config: pytest.Config) -> dict[object, Path]:
    """Where --parity-report puts each report that ran: DIR, with a matrix under DIR/matrix when both ran."""
    if not config.option.parity_report:
        return {}
    root = Path(config.option.parity_report)
    ran = [key for key in (_REPORT_KEY, _MATRIX_KEY) if config.stash.get(key, None) is not None]
    return {key: root / "matrix" if key is _MATRIX_KEY and len(ran) > 1 else root for key in ran}


def _targets(config: pytest.Config) -> list[tuple[Path, str | None, str]]:
    """What the session gates: ``(spec path, candidate name or None, id prefix)``, one per candidate of
    each spec: its ``[candidates.NAME]`` tables (ids ``SPEC-NAME``), else its ``[candidate]`` (id ``SPEC``)."""
    targets = []
    for path in _spec_paths(config):
        spec = load_spec(path)
        if spec.candidates:
            targets += [(path, name, f"{spec.name}-{name}") for name in spec.candidates]
        else:
            targets.append((path, None, spec.name))
    return targets


def _parametrize_gate(metafunc: pytest.Metafunc) -> None:
    # deferred: the judge loads only for a parity_gate test (module docstring)
    from parity.judge.stages import STAGE_ORDER

    targets = _targets(metafunc.config)
    if not targets:
        metafunc.parametrize("parity_gate", [pytest.param(None, marks=pytest.mark.skip(
            reason="no parity spec: pass --parity-spec SPEC or set parity_spec in the pytest ini"))],
            ids=["no-spec"], indirect=True)
        return
    steps = (*STAGE_ORDER, "gate")
    single = len(targets) == 1 and targets[0][1] is None
    params = [(None if single else (path, name, prefix), step) for path, name, prefix in targets for step in steps]
    metafunc.parametrize("parity_gate", params, ids=[f"{prefix}-{step}" for _, _, prefix in targets for step in steps],
                         indirect=True)


class ParityGate:
    """One stage of the gate (or the overall verdict, ``gate``) for the spec the session runs.

    `assert_parity` decides the outcome inside parity: a stage that was not run or cannot be
    observed skips with the reason; drift that the decisions gate accepts (no decision flipped)
    is an expected failure; any other drift fails with the stage's text and its fixes.
    """

    def __init__(self, report, stage: str) -> None:
        self.report, self.stage = report, stage

    def assert_parity(self) -> None:
        # deferred: the renderers pull in rich, only for a session that gated (module docstring)
        from parity.report.console import format_stage, verdict_line

        __tracebackhide__ = True
        if self.stage == "gate":
            if not self.report.passed:
                raise DriftError(verdict_line(self.report))
            return
        result = self.report.stage(self.stage)
        if result.status is Status.SKIP:
            pytest.skip(f"{self.stage}: {result.headline}")
        if result.status is Status.FAIL:
            if self.report.passed:  # [decisions].gate = "decisions" and no decision flipped
                pytest.xfail(f"{self.stage} drifted; accepted because no decision flipped:\n{format_stage(result)}")
            raise DriftError(format_stage(result))


@pytest.fixture
def parity_gate(request: pytest.FixtureRequest) -> ParityGate:
    """The gate in a user's own repository, one test line: ``def test_parity(parity_gate): parity_gate.assert_parity()``.

    Each test is parametrized per stage; the ids name the spec and the stage. The spec is
    ``--parity-spec`` or the ``parity_spec`` ini value; the gate runs once per session.
    """
    target, stage = request.param
    report = request.getfixturevalue("parity_report") if target is None else _gate_report(request, *target)
    return ParityGate(report, stage)


def _gate_report(request: pytest.FixtureRequest, path: Path, candidate: str | None, prefix: str):
    """The gate of one spec and candidate, run once per session (several specs or candidates)."""
    reports = request.config.stash.setdefault(_REPORTS_KEY, {})
    if prefix not in reports:
        # deferred: a command loads only in a session that gates (check pulls in scipy; module docstring)
        from parity.commands.check import run_check

        spec = load_spec(path)
        if candidate is not None:
            spec = select_candidate(spec, candidate, base=Path.cwd())
        device = request.config.option.parity_device or spec.runtime.device
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                pytest.skip(f"--parity-device {device}: CUDA is not available on this machine")
        reports[prefix] = run_check(spec, fixtures=request.config.option.parity_fixtures, device=device,
                                    shard=_shard(request.config))
    return reports[prefix]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    directories = _report_dirs(config)
    shown = [(config.stash.get(key, None), title, directories.get(key))
             for key, title in ((_REPORT_KEY, "parity report"), (_MATRIX_KEY, "parity matrix"))]
    root = Path(config.option.parity_report) if config.option.parity_report else None
    shown += [(report, f"parity report {prefix}", root / prefix if root else None)
              for prefix, report in config.stash.get(_REPORTS_KEY, {}).items()]
    for report, title, directory in shown:
        if report is not None:
            # deferred: the renderers pull in rich, only for a session that gated (module docstring)
            from parity.report.console import render_text

            terminalreporter.write_sep("=", title)
            terminalreporter.write(render_text(report))
            if directory is not None:
                # deferred: the renderers pull in rich, only for a session that gated (module docstring)
                from parity.report.files import write_reports

                paths = write_reports(report, directory)
                terminalreporter.write_line(f"{title} files: {', '.join(str(p) for p in paths.values())}")
