"""Command line: ``parity init``, ``check``, ``matrix``, ``diagnose``, ``calibrate``, ``inspect``, ``diff-structure``,
``explain-preprocess``, ``report``.

Exit 0 on parity (or a checkpoint that loads, or identical preprocessing, or a spec ``init`` wrote
complete), 1 on drift (or one that does not load, or preprocessing that differs, or a spec written
with TODOs left to set), 2 on a usage or configuration error, 3 on an
internal error: an exception parity did not raise on purpose (a defect, never drift). It is
reported in one line; ``parity --debug COMMAND ...`` prints its traceback as well. 130 when
interrupted (Ctrl-C). A candidate's code never sets the status: it cannot exit parity.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

from parity.errors import FixtureError, ParityError, ReportError, SpecError
from parity.judge.tolerance import calibrated_tolerance
from parity.libraries import (backbone_weights, checkpoint_converter, create_backbone, create_transform,
                              describe_record, get as library, resolve_preprocess, resolve_source, weights_file)
from parity.model import ray_engine
from parity.model.pipeline import construct_module, create_head, preprocess_record
from parity.numerics.referee import referee
from parity.preprocess.diff import explain_preprocess
from parity.progress import Progress
from parity.report.console import (format_stage, render_config_diffs, render_diagnosis, render_inspection,
                                   render_choice, render_matrix, render_preprocess_explanation, render_referee, render_report, to_json,
                                   write_json)
from parity.report.files import FILES, load_document, render_saved, write_html, write_reports
from parity.results import Diagnosis, MatrixReport, ServiceDiagnosis, StageResult, Status
from parity.spec import REFERENCE_NUMERICS, check_ray_address, load_spec, select_candidate
from parity.store.checkpoints import read_checkpoint
from parity.store.fixtures import load_fixture
from parity.store.forensics import diagnose_load, diff_structure, summarize_checkpoint, summarize_structure
from parity.store.images import decode_image
from parity.store.shards import parse_shard

__all__ = ["main", "EXIT_PASS", "EXIT_DRIFT", "EXIT_USAGE", "EXIT_INTERNAL", "EXIT_INTERRUPTED"]

EXIT_PASS, EXIT_DRIFT, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C (128 + SIGINT)
# Columns of a log (stdout not a terminal): room for the widest table, the matrix's with its costs.
LOG_WIDTH = 200


def _spec_options(parser: argparse.ArgumentParser, *, spec_help: str, device: bool = True,
                  json_help: str | None = None, candidate: bool = False) -> None:
    """The options every spec-driven command shares."""
    parser.add_argument("--spec", required=True, type=Path, help=spec_help)
    if candidate:
        parser.add_argument("--candidate", default=None, metavar="NAME|KIND:TARGET",
                            help="gate what ships instead of the spec's [candidate]: the NAME of a [candidates.NAME] "
                                 "table, or KIND:TARGET (paths relative to the current directory; the options of the "
                                 "spec's matching candidate table apply): python:app:predict, "
                                 "python:deploy/app.py:predict, endpoint_handler:handler.py, onnx:model.onnx, "
                                 "url:http://127.0.0.1:8000/predict, logged:requests.jsonl")
    parser.add_argument("--fixtures", type=Path, default=None,
                        help="fixture directory (default: the spec's `fixtures` field)")
    if device:
        parser.add_argument("--device", default=None, help="override [runtime].device (cpu, cuda, cuda:N)")
    if json_help:
        parser.add_argument("--json", type=Path, default=None, dest="json_path", metavar="PATH", help=json_help)


def _shard_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run shard I of N (1 <= I <= N) of the samples, chosen by content hash (adding a sample "
                             "moves no other); --json writes a partial report for `parity merge`")


def _engine_options(parser: argparse.ArgumentParser) -> None:
    """--engine and --ray-address: who runs the pipeline's batches (override [runtime])."""
    parser.add_argument("--engine", choices=("local", "ray"), default=None,
                        help="override [runtime].engine: run the batches in this process (local) or on a Ray "
                             "cluster with Ray Data (ray; pip install 'parity[ray]')")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="override [runtime].ray_address: the Ray cluster to join (auto, HOST:PORT, "
                             "ray://HOST:PORT); default: the spec's, else start a local Ray instance")


def _apply_engine(spec, args: argparse.Namespace):
    """The spec with --engine / --ray-address applied; checks that Ray is installed when it is used.

    Raises:
        SpecError: --ray-address without the Ray engine, a bad address, or Ray not installed.
    """
    import dataclasses

    engine = getattr(args, "engine", None) or spec.runtime.engine
    address = getattr(args, "ray_address", None)
    if address is not None:
        address = check_ray_address(address, where="--ray-address")
        if engine != "ray":
            raise SpecError(f"--ray-address {address} needs the Ray engine: add --engine ray "
                            f"([runtime].engine is {spec.runtime.engine!r})")
    elif engine != "ray":
        address = None  # --engine local: a spec's ray_address no longer applies
    else:
        address = spec.runtime.ray_address
    if engine == "ray":
        ray_engine.import_ray()  # fail before building any model
    runtime = dataclasses.replace(spec.runtime, engine=engine, ray_address=address)
    return dataclasses.replace(spec, runtime=runtime) if runtime != spec.runtime else spec


def _engine_session(spec, *, used: bool = True):
    """One Ray session for the whole command when the spec-built pipeline runs on Ray (a diagnosis
    runs several checks); a no-op otherwise."""
    import contextlib

    if not used or spec.runtime.engine != "ray" or spec.candidate.kind != "spec":
        return contextlib.nullcontext()
    return ray_engine.ray_session(spec.runtime.ray_address)


def _report_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", type=Path, default=None, dest="report_dir", metavar="DIR",
                        help="write report.json, report.md, report.html and junit.xml into DIR (report.md is also "
                             "appended to $GITHUB_STEP_SUMMARY when set)")


def _write_reports(result, args: argparse.Namespace, console: Console) -> None:
    """The report files, when --report was given."""
    if args.report_dir is None:
        return

    paths = write_reports(result, args.report_dir)
    console.print(f"reports written to {args.report_dir}: {', '.join(p.name for p in paths.values())}",
                  highlight=False, soft_wrap=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parity", description="Training-inference parity gate for CLIP + head pipelines.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    init = commands.add_parser(
        "init", help="scaffold a spec from what a repository holds (checkpoints, head class, metadata, deploy code)",
        description="Write a spec for the repository DIR: the backbone checkpoint and the model that loads it, the head "
                    "checkpoint and the class that loads it strictly, the extraction point of the stored embeddings, "
                    "and a [candidates.NAME] table per deploy entry point found (a predict function, handler.py, a "
                    "FastAPI or Gradio app). Each value is commented with where it came from; what cannot be "
                    "inferred is a \"TODO: ...\" value that check refuses by name. Prints the freeze and check "
                    "commands to run next. Sources are read, not run; the head's module is imported to verify it "
                    "(--no-verify: not). Exit 0 complete, 1 written with TODOs left, 2 nothing written.")
    init.add_argument("directory", nargs="?", type=Path, default=Path("."), metavar="DIR",
                      help="the repository to scaffold a spec for (default: the current directory)")
    init.add_argument("--out", type=Path, default=None, metavar="SPEC.toml",
                      help="where to write the spec (default: DIR/parity.toml, where the repository's imports resolve)")
    init.add_argument("--force", action="store_true", help="replace an existing --out spec")
    init.add_argument("--no-verify", dest="verify", action="store_false",
                      help="do not import the head's module to check that its checkpoint loads strictly")
    check = commands.add_parser("check", help="run the parity gate: candidate pipeline vs frozen fixtures",
                                description="Run the candidate pipeline described by SPEC and compare it, stage by "
                                            "stage, with the frozen reference fixtures.")
    _spec_options(check, spec_help="TOML spec of the candidate inference path",
                  json_help="also write the full report as JSON", candidate=True)
    _report_option(check)
    _engine_options(check)
    check.add_argument("--sample", type=int, default=None, metavar="K",
                       help="gate a deterministic stratified subset of K samples (every label and input-bias "
                            "value, image mode, EXIF orientation and aspect ratio present is covered); the "
                            "decisions stage states its flip-rate bound")
    _shard_option(check)
    check.add_argument("--referee", choices=("float64",), default=None,
                       help="also run the candidate pipeline in float64 on a few probe samples and say whether a "
                            "difference is rounding (either side) or a change of computation")
    inspect = commands.add_parser(
        "inspect", help="show what a checkpoint holds and why it does (not) load",
        description="Print a checkpoint's nesting, tensors grouped by module, total parameters and the "
                    "architecture inferred from its tensors. With --against or --class, also the strict-load "
                    "key diff, its recognised cause and the spec change that fixes it.")
    inspect.add_argument("checkpoint", type=Path,
                         help=".safetensors, .pth, .pt or .bin file, or a transformers save_pretrained directory")
    inspect.add_argument("--key", default=None, help="entry of a nested checkpoint to show (default: the main one)")
    target = inspect.add_mutually_exclusive_group()
    target.add_argument("--against", type=Path, default=None, metavar="SPEC",
                        help="compare with the module the spec builds (and its loading fields)")
    target.add_argument("--class", dest="class_path", default=None, metavar="PKG.MODULE:NAME",
                        help="compare with this class (code you trust: it is imported)")
    inspect.add_argument("--kwargs", default="{}", help="JSON constructor kwargs for --class")
    inspect.add_argument("--part", choices=("head", "backbone"), default=None,
                         help="with --against: which spec section the checkpoint is for (default: by path)")
    matrix = commands.add_parser(
        "matrix", help="run the variant matrix and print the sensitivity table",
        description="Run every cell of the spec's [matrix] (or the --axis overrides) against the reference "
                    "embeddings. Exit 0 when every deployment cell reproduces the reference.")
    _spec_options(matrix, spec_help="TOML spec of the candidate", json_help="also write the matrix report as JSON")
    _report_option(matrix)
    _shard_option(matrix)
    _engine_options(matrix)
    matrix.add_argument("--axis", action="append", default=[], metavar="NAME=V1,V2",
                        help="replace one axis of the spec's matrix, e.g. --axis extract=pre_logits,forward")
    matrix.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="timed passes per cell for its cost (default 1); timing never changes a verdict")
    choose = commands.add_parser(
        "choose", help="name the fastest deployment configuration that still passes, per device",
        description="Run the deployment matrix (device, dtype, batch size: the spec's [matrix] deployment axes, else "
                    "float32/bfloat16 (float16 on cuda) at batch sizes 1 and 8), judge every cell as `parity matrix` "
                    "does, and name per device the passing cell with the lowest per-image p50 latency, with the "
                    "Pareto table (latency vs max abs vs verdict). Exit 0 when a cell passes, 1 when none does, "
                    "2 on bad input.")
    _spec_options(choose, spec_help="TOML spec of the candidate", json_help="also write the choice as JSON")
    choose.add_argument("--budget-ms", type=float, default=None, metavar="X",
                        help="choose only cells whose per-image p50 latency is at most X ms")
    choose.add_argument("--repeat", type=int, default=1, metavar="N", help="timed passes per cell (default 1)")
    choose.add_argument("--html", type=Path, default=None, dest="html_path", metavar="OUT",
                        help="also write the choice as an HTML page to OUT, with the Pareto plot (latency p50 vs "
                             "max abs per cell, the chosen cell per device named)")
    _report_option(choose)
    choose.add_argument("--repair", action="store_true",
                        help="for a CPU float16/bfloat16 (or dynamic_int8, or onnxruntime int8) cell that drifts, "
                             "find the modules to keep in float32 (or unquantized: int8's nodes_to_exclude) so it "
                             "passes (bisection over module groups, confirmed by re-running the cell)")
    merge = commands.add_parser(
        "merge", help="merge the partial reports of `check --shard I/N` into the whole run's report",
        description="Merge the partial JSON reports of every shard (`parity check --shard I/N --json PART.json`) "
                    "into the report the unsharded run gives: verdict, per-stage statistics, worst samples, "
                    "sample errors and decisions. Exit 0 on parity, 1 on drift, 2 when a shard is missing.")
    merge.add_argument("parts", nargs="+", type=Path, metavar="PART.json", help="one partial report per shard")
    merge.add_argument("--json", type=Path, default=None, dest="json_path", metavar="PATH",
                       help="write the merged report as JSON")
    _report_option(merge)
    diagnose = commands.add_parser(
        "diagnose", help="find the cause of a drift and the spec change that fixes it",
        description="Run the gate, then rank the causes of any drift: fields that differ from what the fixture "
                    "recorded and a search over single spec changes, probed on the samples that drift most and "
                    "confirmed by a full check. Exit 0 when there is no drift, 1 when there is.")
    _spec_options(diagnose, spec_help="TOML spec of the candidate", json_help="also write the diagnosis as JSON",
                  candidate=True)
    _report_option(diagnose)
    _engine_options(diagnose)
    diagnose.add_argument("--samples", type=int, default=4, help="samples each probe runs on (default 4)")
    _shard_option(diagnose)
    diagnose.add_argument("--logged", type=Path, default=None, metavar="FILE",
                          help="a service's logged samples (JSONL or CSV: image, input_biases, embedding and/or "
                               "outputs): does the service match the spec's pipeline, and if not, which variant does")
    calibrate = commands.add_parser(
        "calibrate", help="measure the reference pipeline's own noise and store budgets in the fixture",
        description="Re-run the spec's pipeline (the reference configuration) with batch size 1, the spec's "
                    "batch size, shuffled batches and one thread versus all, compare each run with the fixture, "
                    "and store the worst error per stage in the manifest. Gates then use noise x margin (with a "
                    "floor) unless the spec sets explicit tolerances. Run it with another [runtime].dtype to "
                    "declare that precision acceptable.")
    _spec_options(calibrate, spec_help="TOML spec of the reference configuration", device=False)
    _report_option(calibrate)
    calibrate.add_argument("--margin", type=float, default=4.0, help="safety factor on the measured noise (default 4)")
    calibrate.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    structure = commands.add_parser(
        "diff-structure", help="compare the candidate's module structure with the reference's",
        description="Build the spec's backbone and head (no weights, no images) and list every module class "
                    "and parameter shape that differs from what the fixture recorded: what strict loading "
                    "cannot see (QuickGELU vs GELU, ReLU vs GELU in the head).")
    _spec_options(structure, spec_help="TOML spec of the candidate", device=False)
    explain = commands.add_parser(
        "explain-preprocess", help="show field by field how two preprocessing pipelines differ",
        description="Describe two eval preprocessings in one comparable form (resize size and rounding, crop "
                    "size and offset rounding, resample filter, antialias, resize backend, mean/std...) and "
                    "name every field that differs with what it does to the pixels. With images, run both "
                    "real transforms and measure the pixel gap and the predicted crop shift per image. "
                    "Exit 0 when identical, 1 when they differ.")
    for name in ("a", "b"):
        explain.add_argument(name, metavar=name.upper(),
                             help="timm:MODEL, open_clip:MODEL[@TAG], hf:PATH (fast processor), hf-slow:PATH, "
                                  "a spec .toml, or a fixture directory (its recorded preprocessing)")
    explain.add_argument("--images", nargs="+", type=Path, default=None, metavar="PATH",
                         help="images or folders of images to measure on (default: a fixture source's images)")
    explain.add_argument("--json", type=Path, default=None, dest="json_path", metavar="PATH",
                         help="also write the explanation as JSON")
    freeze = commands.add_parser(
        "freeze", help="turn existing training artifacts (embeddings, metadata, checkpoints) into a fixture",
        description="Check that SPEC's pipeline made the stored embeddings by re-embedding a few golden images, "
                    "then write the embeddings, metadata, images, head outputs and checkpoint references as a "
                    "fixture. When the golden images do not reproduce, nothing is written and the single spec "
                    "change that reproduces them is named. Exit 0 written, 1 the claim does not hold, 2 usage.")
    freeze.add_argument("--spec", required=True, type=Path, help="TOML spec of the training-time pipeline")
    freeze.add_argument("--embeddings", required=True, type=Path, help="the stored embeddings, (N, 1, D) or (N, D) .npy")
    freeze.add_argument("--metadata", required=True, type=Path,
                        help="one entry per embedding row: a JSON list of objects (or an object holding one), or CSV")
    freeze.add_argument("--images", required=True, type=Path, help="folder the metadata's image paths are relative to")
    freeze.add_argument("--out", required=True, type=Path, help="the fixture directory to write")
    freeze.add_argument("--map", action="append", default=[], dest="field_map", metavar="ROLE=FIELD[,FIELD...]",
                        help="which metadata fields hold image=FIELD, input_biases=F1,F2,... and labels=F1,... "
                             "(default: fields named image, input_biases, labels)")
    freeze.add_argument("--outputs", type=Path, default=None,
                        help="the head's outputs (N, L) .npy (default: the spec's head on the embeddings, eval mode)")
    freeze.add_argument("--golden", type=int, default=4, metavar="K",
                        help="images re-embedded to check the claim, their pixels kept in the fixture (default 4)")
    freeze.add_argument("--copy-checkpoints", action="store_true",
                        help="copy the checkpoints into the fixture (default: reference them by path and sha256)")
    freeze.add_argument("--force", action="store_true", help="replace an existing --out fixture")
    freeze.add_argument("--numerics", choices=REFERENCE_NUMERICS, default=None,
                        help="the numerics the embeddings were made with, e.g. tf32 for a GPU with TF32 on (default: "
                             "the spec's [reference].numerics, else as probed here); recorded in the fixture, the "
                             "gate's budget then comes from emulating it")
    freeze.add_argument("--device", default=None, help="override [runtime].device (cpu, cuda, cuda:N)")
    report = commands.add_parser(
        "report", help="re-render a saved report.json as Markdown, HTML or JUnit",
        description="Render the report.json that --report wrote into the other formats, without running "
                    "anything: the files are the same as --report wrote. Without an output option, print the "
                    "Markdown.")
    report.add_argument("json_file", type=Path, metavar="REPORT_JSON", help="report.json written by --report")
    report.add_argument("--md", type=Path, default=None, metavar="OUT", help="write the Markdown to OUT")
    report.add_argument("--html", type=Path, default=None, metavar="OUT", help="write the HTML page to OUT")
    report.add_argument("--junit", type=Path, default=None, metavar="OUT", help="write the JUnit XML to OUT")
    return parser


def _axis_values(text: str) -> list:
    values: list = []
    for raw in text.split(","):
        raw = raw.strip()
        if raw in ("true", "false"):
            values.append(raw == "true")
        else:
            try:
                values.append(float(raw))
            except ValueError:
                values.append(raw)
    return values


def _load_spec(args: argparse.Namespace):
    """The spec, with ``--candidate`` (when given) replacing its [candidate]."""
    spec = load_spec(args.spec)
    if getattr(args, "candidate", None):
        spec = select_candidate(spec, args.candidate, base=Path.cwd())
    return _apply_engine(spec, args)


def _matrix(args: argparse.Namespace, console: Console, errors: Console) -> int:
    # deferred: a command's module loads when the command runs (`parity --help` never loads scipy)
    from parity.commands.matrix import parse_axes, run_matrix

    spec = _apply_engine(load_spec(args.spec), args)
    axes = dict(spec.matrix)
    for item in args.axis:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise SpecError(f"--axis {item!r}: expected NAME=V1,V2")
        axes.update(parse_axes({name: _axis_values(values)}, where="--axis"))
    if spec.runtime.engine == "ray":  # its cells share decoded images and forwards, in this process
        errors.print("note: the variant matrix runs in this process, not on Ray: its cells share each image's decode, "
                     "geometry and one backbone pass per device and precision, which Ray workers would each redo; "
                     "--engine ray applies to check and diagnose",
                     highlight=False)
    with Progress(errors) as progress:
        progress.phase("matrix over images")
        report = run_matrix(spec, fixtures=args.fixtures, axes=axes, device=args.device, progress=progress.update,
                            shard=_shard(args), repeat=args.repeat)
    render_matrix(report, console)
    if args.json_path is not None:
        write_json(report, args.json_path)
    _write_reports(report, args, console)
    return EXIT_PASS if report.passed else EXIT_DRIFT


def _choose(args: argparse.Namespace, console: Console, errors: Console) -> int:
    # deferred: a command's module loads when the command runs
    from parity.commands.choose import choose

    spec = load_spec(args.spec)
    with Progress(errors) as progress:
        progress.phase("deployment matrix over images")
        choice = choose(spec, fixtures=args.fixtures, device=args.device, budget_ms=args.budget_ms,
                        repeat=args.repeat, repair=args.repair, progress=progress.update)
    render_choice(choice, console)
    if args.json_path is not None:
        write_json(choice, args.json_path)
    if args.html_path is not None:
        write_html(choice, args.html_path)
        console.print(f"wrote {args.html_path}", highlight=False, soft_wrap=True)
    _write_reports(choice, args, console)
    return EXIT_PASS if choice.passed else EXIT_DRIFT


def _diagnose(args: argparse.Namespace, console: Console, errors: Console) -> int:
    # deferred: a command's module loads when the command runs (`parity --help` never loads scipy)
    from parity.commands.diagnose import diagnose, diagnose_logged

    if args.samples < 1:
        raise SpecError(f"--samples must be >= 1, got {args.samples}")
    if args.logged is not None and args.shard is not None:
        raise SpecError("diagnose --logged does not take --shard: gate the log in shards with "
                        "`parity check --candidate logged:FILE --shard I/N --json PART.json` and `parity merge`, "
                        "then diagnose the whole log")
    spec = _load_spec(args)
    with _engine_session(spec, used=args.logged is None), Progress(errors) as progress:
        progress.phase("diagnosing")
        if args.logged is not None:
            result = diagnose_logged(spec, args.logged, device=args.device, samples=max(args.samples, 8),
                                     progress=progress.phase)
        else:  # the spec's pipeline, shipped code, or a service observed from outside (url, logged)
            result = diagnose(spec, fixtures=args.fixtures, device=args.device, samples=args.samples,
                              progress=progress.phase, shard=_shard(args))
    render_diagnosis(result, console)
    if args.json_path is not None:
        write_json(result, args.json_path)
    _write_reports(result, args, console)
    if isinstance(result, ServiceDiagnosis):  # the gate's verdict on the service decides ([decisions].gate included)
        drift = not result.report.passed if result.report is not None else not result.passed
    else:
        drift = result.drift
    return EXIT_DRIFT if drift else EXIT_PASS


def _calibrate(args: argparse.Namespace, console: Console, errors: Console) -> int:
    from rich.table import Table

    # deferred: a command's module loads when the command runs (`parity --help` never loads scipy)
    from parity.commands.calibrate import calibrate

    spec = load_spec(args.spec)
    if spec.runtime.engine == "ray":  # the noise measured is this machine's: it cannot be measured elsewhere
        errors.print("note: calibration runs in this process, not on Ray: it measures the noise of the machine the "
                     "gate runs on (threads, batch sizes, numerics here)", highlight=False)
    with Progress(errors) as progress:
        progress.phase("calibration runs")
        result = calibrate(spec, fixtures=args.fixtures, margin=args.margin, write=not args.dry_run,
                           progress=progress.update)
    table = Table(title=f"calibration on {result.device}/{result.dtype}, x{result.margin:g} margin", title_justify="left")
    for column in ("stage", "max abs noise", "min cosine", "budget"):
        table.add_column(column)
    manifest = {"calibration": result.to_manifest()}
    for stage, noise in result.noise.items():
        budget = calibrated_tolerance(manifest, stage, result.dtype)
        cosine = noise.get("min_cosine")
        table.add_row(stage, f"{noise['max_abs']:.3g}", "-" if cosine is None else f"{cosine:.8f}", budget.describe())
    console.print(table)
    for run in result.runs:
        console.print(f"  run: {run.describe()}", highlight=False)
    for stage, noise in result.noise.items():  # what the budgets absorb, and why it is noise
        line = f"absorbed ({stage}): at most {noise['max_abs']:.3g} from the fixture"
        if "offset" in noise:
            line += (f"; the same in every run (offset of the runs' mean) {noise['offset']:.3g}, between runs "
                     f"(spread) {noise['spread']:.3g}")
        judged = noise.get("referee")
        if judged:
            rounding = ", ".join(f"{label} {error:.2e}" for label, error in judged["rounding"].items())
            line += (f"; float64 referee on {judged['samples']} samples: rounding ({judged['explained_by']}: fixture "
                     f"RMSE {judged['reference_rmse']:.2e}; {rounding})")
        console.print(line, highlight=False, soft_wrap=True)
    console.print("dry run: nothing written" if args.dry_run else "budgets written to the fixture manifest", highlight=False)
    _write_reports(result, args, console)
    return EXIT_PASS


def _diff_structure(args: argparse.Namespace, console: Console) -> int:
    spec = load_spec(args.spec)
    recorded = load_fixture(spec.fixture_root(args.fixtures)).pipeline
    diffs = ()
    for section, module in (("backbone", create_backbone(spec)), ("head", create_head(spec))):
        reference = recorded.get(section, {}).get("structure")
        if reference is None:
            console.print(f"{section}: the fixture records no structure", style="yellow")
            continue
        diffs += diff_structure(reference, summarize_structure(module), prefix=f"{section}.")
    render_config_diffs(diffs, console, title="Structure differences (reference -> candidate):")
    if not diffs:
        console.print(Text("The candidate's modules have the reference's structure.", style="bold green"))
    return EXIT_DRIFT if diffs else EXIT_PASS


def _inspect(args: argparse.Namespace, console: Console) -> int:
    import json

    if args.checkpoint.is_dir():  # a save_pretrained directory

        args.checkpoint = weights_file(args.checkpoint)
    checkpoint = read_checkpoint(args.checkpoint)
    summary = summarize_checkpoint(checkpoint, path=str(args.checkpoint), key=args.key)
    if args.against is None and args.class_path is None:
        render_inspection(summary, console)
        return EXIT_PASS
    loading: dict = {}
    if args.class_path is not None:
        try:
            kwargs = json.loads(args.kwargs)
        except json.JSONDecodeError as e:
            raise SpecError(f"--kwargs is not valid JSON: {e}") from e
        module, section, target = construct_module(args.class_path, kwargs, where="--"), "head", \
            args.class_path
    else:
        spec = load_spec(args.against)
        section = args.part or ("backbone" if backbone_weights(spec) == args.checkpoint.resolve() else "head")
        part = getattr(spec, section)
        loading = {"state_dict_key": part.state_dict_key, "key_map": part.key_map, "drop_keys": part.drop_keys}
        if section == "backbone":
            loading["convert"] = checkpoint_converter(spec)
        module = create_backbone(spec) if section == "backbone" else create_head(spec)
        target = spec.backbone.model if section == "backbone" else spec.head.class_path
    _, diff = diagnose_load(checkpoint, module, section=section, target=target,
                            source=f"{section} checkpoint {args.checkpoint}", **loading)
    render_inspection(summary, console, key_diff=diff)
    return EXIT_PASS if diff.loads else EXIT_DRIFT


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _preprocess_source(text: str):
    """A preprocessing description from a library source, a spec file or a fixture directory."""
    path = Path(text)
    if path.suffix == ".toml":
        spec = load_spec(path)
        # Shapes only: the preprocessing needs the model's configuration, never its weights.
        backbone = create_backbone(spec, meta=library(spec.backbone.library).meta_create)
        _, config = resolve_preprocess(spec, backbone)
        return describe_record(preprocess_record(spec, config), source=str(path)), []
    if path.is_dir() and (path / "manifest.json").is_file():
        fixture = load_fixture(path)
        record = fixture.pipeline.get("preprocess")
        if not record:
            raise SpecError(f"fixture {path} records no preprocessing")
        return describe_record(record, source=f"fixture {path}"), [row.image for row in fixture.rows]
    return resolve_source(text), []


def _image_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise SpecError(f"--images: {path} does not exist")
    return files


def _explain_preprocess(args: argparse.Namespace, console: Console) -> int:
    (a, images_a), (b, images_b) = _preprocess_source(args.a), _preprocess_source(args.b)
    files = _image_files(args.images) if args.images is not None else images_a or images_b
    images = []
    for file in files:
        try:
            images.append((file.name, decode_image(file)[0]))
        except FixtureError as e:
            console.print(f"skipped {file}: {e}", style="yellow", highlight=False)
    explanation = explain_preprocess(a, b, images=images, transform=create_transform)
    render_preprocess_explanation(explanation, console)
    if args.json_path is not None:
        write_json(explanation, args.json_path)
    return EXIT_PASS if explanation else EXIT_DRIFT


def _check(args: argparse.Namespace, console: Console, errors: Console) -> int:
    # deferred: a command's module loads when the command runs (`parity --help` never loads scipy)
    from parity.commands.check import run_check

    spec = _load_spec(args)
    with _engine_session(spec), Progress(errors) as progress:
        progress.phase("embedding images")
        report = run_check(spec, fixtures=args.fixtures, device=args.device, sample=args.sample,
                           progress=progress.update, shard=_shard(args))
    render_report(report, console)
    verdict = None
    if args.referee is not None:  # informative: the gate's exit status is unchanged
        verdict = referee(spec, fixtures=args.fixtures, device=args.device)
        render_referee(verdict, console)
    if args.json_path is not None:
        write_json(report, args.json_path)
        if verdict is not None:
            import json

            data = json.loads(args.json_path.read_text(encoding="utf-8"))
            args.json_path.write_text(json.dumps({**data, "referee": to_json(verdict)}, indent=2) + "\n", encoding="utf-8")
        console.print(f"report written to {args.json_path}", highlight=False)
    _write_reports(report, args, console)
    return EXIT_PASS if report.passed else EXIT_DRIFT


def _shard(args: argparse.Namespace) -> tuple[int, int] | None:
    return parse_shard(args.shard) if getattr(args, "shard", None) is not None else None


def _merge(args: argparse.Namespace, console: Console) -> int:
    # deferred: a command's module loads when the command runs (`parity --help` never loads scipy)
    from parity.commands.merge import load_partial, merge_reports

    report = merge_reports([load_partial(path) for path in args.parts], sources=args.parts)
    render = render_matrix if isinstance(report, MatrixReport) else render_diagnosis if isinstance(report, Diagnosis) \
        else render_report
    render(report, console)
    if args.json_path is not None:
        write_json(report, args.json_path)
        console.print(f"report written to {args.json_path}", highlight=False)
    _write_reports(report, args, console)
    passed = not report.drift if isinstance(report, Diagnosis) else report.passed
    return EXIT_PASS if passed else EXIT_DRIFT


def _freeze(args: argparse.Namespace, console: Console) -> int:
    # deferred: a command's module loads when the command runs (`parity --help` never loads scipy)
    from parity.commands.freeze import freeze, parse_field_map

    spec = load_spec(args.spec)
    result = freeze(spec, embeddings=args.embeddings, metadata=args.metadata, images=args.images, out=args.out,
                    field_map=parse_field_map(args.field_map), outputs=args.outputs, golden=args.golden,
                    copy_checkpoints=args.copy_checkpoints, force=args.force, device=args.device,
                    numerics=args.numerics)
    say = lambda text, **style: console.print(text, highlight=False, markup=False, soft_wrap=True, **style)  # noqa: E731
    golden = ", ".join(result.golden)
    if result.embedding:
        say(f"golden images re-embedded by the spec's pipeline: {golden}: within tolerance "
            f"({result.embedding.tolerance.describe()}, max abs {result.embedding.max_abs:.2e})")
    else:
        say(f"REFUSED: the spec's pipeline does not reproduce {args.embeddings} on the golden images ({golden})",
            style="bold red")
        say(format_stage(StageResult("embedding", Status.FAIL, "", comparison=result.embedding)))
        for cause in result.causes:
            verdict = "reproduces the stored embeddings" if cause.reproduces else "comes closest"
            say(f"  {cause.words} [{verdict}]")
        if result.reproducing:
            change = result.reproducing[0].change
            say(f"Fix: set {change.toml()} in {args.spec}: the stored embeddings were made with it. Then freeze "
                "again. The TOML to paste:")
            say(change.toml_text())
            for removal in change.removals():
                say(f"and {removal}")
        elif result.numerics_signature:
            name = result.numerics_signature
            c = result.embedding
            say(f"The embeddings look made in reduced precision ({name.upper()}?): the residual (max abs "
                f"{c.max_abs:.2e}, min cosine {c.min_cosine:.6f}) is small everywhere and within the spread of a "
                f"{name.upper()} emulation on the golden images. Pass --numerics {name} (or set [reference] numerics = "
                f"\"{name}\" in {args.spec}) and freeze again: the fixture then records it and the gate budgets "
                "for it.")
        else:
            say("No single spec change reproduces the stored embeddings: the spec does not describe how they "
                "were made (check the backbone checkpoint, the extraction point and the preprocessing library).")
    if result.head is not None and not result.head:
        say(f"REFUSED: the spec's head on the stored embeddings does not reproduce {args.outputs}", style="bold red")
        say(format_stage(StageResult("head", Status.FAIL, "", comparison=result.head)))
        say("Fix: point [head] at the class, kwargs and weights that produced the outputs, or leave --outputs out "
            "to freeze what the spec's head computes.")
    if not result:
        say(f"Nothing was written ({args.out} is untouched).")
        return EXIT_DRIFT
    if result.numerics:
        say(f"reference numerics: {result.numerics} (recorded; budget {result.embedding.tolerance.describe()}, "
            f"{result.embedding.tolerance.origin})")
    say(f"{result.samples} samples; outputs {result.outputs}")
    for part, held in result.checkpoints:
        say(f"{part} checkpoint: {held}")
    say(f"provenance: git revision {result.git_revision or 'unknown (the spec is not in a git repository)'}")
    say(Text(f"FROZEN: {result.out}", style="bold green"))
    return EXIT_PASS


def _init(args: argparse.Namespace, console: Console) -> int:
    import shlex

    # deferred: a command's module loads when the command runs (`parity --help` never loads scipy)
    from parity.commands.init import init_spec

    result = init_spec(args.directory, out=args.out, force=args.force, verify=args.verify)
    say = lambda text, **style: console.print(text, highlight=False, markup=False, soft_wrap=True, **style)  # noqa: E731
    for line in result.found:
        say(f"found {line}")
    for line in result.notes:
        say(f"note: {line}", style="yellow")
    say(Text(f"WROTE: {result.spec}", style="bold green"))
    if result.todos:
        say(f"{len(result.todos)} value(s) to set in {result.spec} (parity check refuses the spec until then):",
            style="bold yellow")
        for todo in result.todos:
            say(f"  {todo}")
    for line in result.missing:
        say(f"missing for freeze: {line}", style="yellow")
    say("Next:" if not result.todos else "Then:")
    say(f"  {shlex.join(result.freeze)}")
    say(f"  {shlex.join(result.check)}")
    return EXIT_PASS if result.complete else EXIT_DRIFT


def _inputs(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """What the command reads and must never overwrite: ``(what, path)``; a fixture directory
    protects everything under it (its manifest.json first of all)."""
    found: list[tuple[str, Path | None]] = []
    if getattr(args, "spec", None) is not None:
        spec = load_spec(args.spec)
        candidate = (select_candidate(spec, args.candidate, base=Path.cwd()).candidate
                     if getattr(args, "candidate", None) else spec.candidate)
        found += [("the spec", args.spec), ("the head checkpoint", spec.head.weights),
                  ("the backbone checkpoint", spec.backbone.checkpoint),
                  ("the candidate", Path(candidate.target) if candidate.kind in ("onnx", "logged", "endpoint_handler",
                                                                                "mlflow_model")
                   else None),
                  ("the fixture directory", args.fixtures if args.fixtures is not None else spec.fixtures)]
    found += [("the logged samples", getattr(args, "logged", None))]
    found += [("a partial report", part) for part in getattr(args, "parts", None) or ()]
    if args.command == "report":
        found.append(("the report being rendered", args.json_file))
    if args.command == "explain-preprocess":
        found += [("a preprocessing source", Path(text)) for text in (args.a, args.b)]
    return [(what, path) for what, path in found if path is not None and Path(path).exists()]


def _targets(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """Every file the command will write: ``(option, path)``."""
    targets = [("--json", args.json_path)] if getattr(args, "json_path", None) is not None else []
    if getattr(args, "report_dir", None) is not None:
        targets += [("--report", args.report_dir / name) for name in FILES.values()]
    if getattr(args, "html_path", None) is not None:
        targets.append(("--html", args.html_path))
    if args.command == "report":
        targets += [(f"--{name}", getattr(args, name)) for name in ("md", "html", "junit")
                    if getattr(args, name) is not None]
    return targets


def _writable_directory(directory: Path) -> str:
    """Why files cannot be created in ``directory`` (made with its parents if missing), or "" if they can."""
    import tempfile

    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:  # try it: permission bits do not tell (root, read-only mounts, ACLs)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".parity-write-test.")
    except OSError as e:
        return f"{existing} is not writable ({e.strerror or e})"
    os.close(fd)
    os.unlink(probe)
    return ""


def _check_targets(args: argparse.Namespace) -> None:
    """Refuse output paths that cannot or must not be written, before any work is done (not after a verdict):
    a missing or read-only directory, a directory where a file goes, a symbolic link (parity never writes
    through one), and anything inside the fixture or that is one of the command's own inputs.

    Raises:
        SpecError: the option and path that cannot be written, and why.
    """
    targets = _targets(args)
    if not targets:
        return
    inputs = [(what, Path(path).resolve()) for what, path in _inputs(args)]
    checked: set[Path] = set()
    for option, path in targets:
        shown = f"{option} {path}" if option != "--report" else f"--report {path.parent} ({path.name})"
        # A link to a file (or to nothing yet) would have parity write where the link points; a link to a
        # stream (/dev/stdout) writes no file.
        if path.is_symlink() and (not path.exists() or path.is_file() or path.is_dir()):
            raise SpecError(f"{shown} is a symbolic link (to {os.readlink(path)}): parity does not write through "
                            "links; remove the link or name another path")
        if path.is_dir():
            raise SpecError(f"{shown} is a directory; name a file to write the report to")
        if option == "--json" and not path.parent.is_dir():
            raise SpecError(f"{shown}: directory {path.parent} does not exist; create it or choose another path")
        resolved = path.resolve()
        for what, protected in inputs:
            if resolved == protected or protected.is_dir() and protected in resolved.parents:
                where = "is" if resolved == protected else "is inside"
                raise SpecError(f"{shown} {where} {what} ({protected}): parity never overwrites what it reads; "
                                "write the report elsewhere")
        if path.exists() and not path.is_file():
            continue  # a device or a pipe: nothing to overwrite, and opening a pipe to try it would wait
        if path.exists():
            try:
                with open(path, "ab"):  # appends nothing: only asks whether it may be written
                    pass
            except OSError as e:
                raise SpecError(f"{shown}: not writable ({e.strerror or e})") from e
        elif path.parent not in checked:
            why = _writable_directory(path.parent)
            if why:
                raise SpecError(f"{shown}: cannot be written: {why}")
            checked.add(path.parent)


def _report(args: argparse.Namespace, console: Console) -> int:
    data = load_document(args.json_file)
    outputs = [(path, fmt) for path, fmt in ((args.md, "md"), (args.html, "html"), (args.junit, "junit"))
               if path is not None]
    if not outputs:
        # Markdown as it is, no rich wrapping: it may be piped into a comment.
        sys.stdout.write(render_saved(data, "md", source=str(args.json_file)))
        return EXIT_PASS
    # Every format first: a document that does not render leaves no file half written.
    rendered = [(path, render_saved(data, fmt, source=str(args.json_file))) for path, fmt in outputs]
    for path, text in rendered:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            raise ReportError(f"cannot write {path}: {e.strerror or e}") from e
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)
    return EXIT_PASS


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status (module docstring).

    A candidate's code cannot end parity nor set its status (`parity.runners.guard`). What it left
    running (a call past [candidate].timeout, a non-daemon thread it started) is named, and from
    the command line (``argv`` None) parity leaves without waiting for it, its output flushed.
    """
    parser = _parser()
    parser.add_argument("--debug", action="store_true",
                        help="on an internal error (exit 3), print the traceback too")
    args = parser.parse_args(argv)
    # Logs (CI) are not terminals: give tables room (rich's fallback is $COLUMNS or 80; a matrix or choose table
    # with its cost columns needs about 150).
    console = Console() if sys.stdout.isatty() else Console(width=LOG_WIDTH)
    errors = Console(stderr=True)
    status = _run(args, console, errors)
    guard = sys.modules.get("parity.runners.guard")  # imported only when user code ran
    left = guard.lingering() if guard is not None else []
    if left:
        errors.print(f"note: the candidate's code left running: {'; '.join(left)}; parity does not wait for it",
                     markup=False, highlight=False, soft_wrap=True)
        if argv is None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    return status


def _run(args: argparse.Namespace, console: Console, errors: Console) -> int:
    try:
        _check_targets(args)
        if args.command in ("check", "matrix", "choose", "diagnose", "calibrate"):
            handler = {"check": _check, "matrix": _matrix, "choose": _choose, "diagnose": _diagnose,
                       "calibrate": _calibrate}
            return handler[args.command](args, console, errors)
        return {"init": _init, "inspect": _inspect, "diff-structure": _diff_structure,
                "explain-preprocess": _explain_preprocess, "freeze": _freeze,
                "report": _report, "merge": _merge}[args.command](args, console)
    except ParityError as e:
        errors.print(f"[bold red]error:[/] {type(e).__name__}: ", end="")
        errors.print(str(e), markup=False, highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:  # the user's Ctrl-C (a candidate's own KeyboardInterrupt never gets here)
        errors.print("interrupted", markup=False, highlight=False)
        return EXIT_INTERRUPTED
    except Exception as e:  # not raised on purpose: a defect, which must never read as drift (1)
        if args.debug:
            errors.print_exception()
        first = str(e).strip().splitlines()[0] if str(e).strip() else "(no message)"
        errors.print("[bold red]internal error:[/] ", end="")
        errors.print(f"{type(e).__name__}: {first} (exit 3: a defect, not drift; "
                     f"{'the traceback is above' if args.debug else 'rerun with parity --debug for the traceback'})",
                     markup=False, highlight=False, soft_wrap=True)
        return EXIT_INTERNAL

if __name__ == "__main__":
    sys.exit(main())
