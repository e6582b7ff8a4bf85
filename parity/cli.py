"""Command line: ``parity check``, ``matrix``, ``diagnose``, ``calibrate``, ``inspect``, ``diff-structure``,
``explain-preprocess``.

Exit 0 on parity (or a checkpoint that loads, or identical preprocessing), 1 on drift (or one
that does not load, or preprocessing that differs), 2 on a usage or configuration error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

__all__ = ["main", "EXIT_PASS", "EXIT_DRIFT", "EXIT_USAGE"]

EXIT_PASS, EXIT_DRIFT, EXIT_USAGE = 0, 1, 2


def _spec_options(parser: argparse.ArgumentParser, *, spec_help: str, device: bool = True,
                  json_help: str | None = None) -> None:
    """The options every spec-driven command shares."""
    parser.add_argument("--spec", required=True, type=Path, help=spec_help)
    parser.add_argument("--fixtures", type=Path, default=None,
                        help="fixture directory (default: the spec's `fixtures` field)")
    if device:
        parser.add_argument("--device", default=None, help="override [runtime].device (cpu, cuda, cuda:N)")
    if json_help:
        parser.add_argument("--json", type=Path, default=None, dest="json_path", metavar="PATH", help=json_help)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parity", description="Training-inference parity gate for CLIP + head pipelines.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser("check", help="run the parity gate: candidate pipeline vs frozen fixtures",
                                description="Run the candidate pipeline described by SPEC and compare it, stage by "
                                            "stage, with the frozen reference fixtures.")
    _spec_options(check, spec_help="TOML spec of the candidate inference path",
                  json_help="also write the full report as JSON")
    check.add_argument("--sample", type=int, default=None, metavar="K",
                       help="gate a deterministic stratified subset of K samples (every label and input-bias "
                            "value, image mode, EXIF orientation and aspect ratio present is covered); the "
                            "decisions stage states its flip-rate bound")
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
    matrix.add_argument("--axis", action="append", default=[], metavar="NAME=V1,V2",
                        help="replace one axis of the spec's matrix, e.g. --axis extract=pre_logits,forward")
    diagnose = commands.add_parser(
        "diagnose", help="find the cause of a drift and the spec change that fixes it",
        description="Run the gate, then rank the causes of any drift: fields that differ from what the fixture "
                    "recorded and a search over single spec changes, probed on the samples that drift most and "
                    "confirmed by a full check. Exit 0 when there is no drift, 1 when there is.")
    _spec_options(diagnose, spec_help="TOML spec of the candidate", json_help="also write the diagnosis as JSON")
    diagnose.add_argument("--samples", type=int, default=4, help="samples each probe runs on (default 4)")
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


def _matrix(args: argparse.Namespace, console: Console, errors: Console) -> int:
    from rich.progress import Progress

    from parity.errors import SpecError
    from parity.report import render_matrix, write_json
    from parity.spec import load_spec
    from parity.variants import parse_axes, run_matrix

    spec = load_spec(args.spec)
    axes = dict(spec.matrix)
    for item in args.axis:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise SpecError(f"--axis {item!r}: expected NAME=V1,V2")
        axes.update(parse_axes({name: _axis_values(values)}, where="--axis"))
    with Progress(console=errors, transient=True, disable=not errors.is_terminal) as progress:
        task = progress.add_task("matrix over images", total=None)
        report = run_matrix(spec, fixtures=args.fixtures, axes=axes, device=args.device,
                            progress=lambda done, total: progress.update(task, completed=done, total=total))
    render_matrix(report, console)
    if args.json_path is not None:
        write_json(report, args.json_path)
    return EXIT_PASS if report.passed else EXIT_DRIFT


def _diagnose(args: argparse.Namespace, console: Console, errors: Console) -> int:
    from parity.diagnose import diagnose
    from parity.errors import SpecError
    from parity.report import render_diagnosis, write_json
    from parity.spec import load_spec

    if args.samples < 1:
        raise SpecError(f"--samples must be >= 1, got {args.samples}")
    spec = load_spec(args.spec)
    with errors.status("diagnosing") as status:
        if args.logged is not None:
            from parity.diagnose import diagnose_logged

            result = diagnose_logged(spec, args.logged, device=args.device, samples=max(args.samples, 8),
                                     progress=lambda message: status.update(message))
        else:
            result = diagnose(spec, fixtures=args.fixtures, device=args.device, samples=args.samples,
                              progress=lambda message: status.update(message))
    render_diagnosis(result, console)
    if args.json_path is not None:
        write_json(result, args.json_path)
    drift = not result.matches if args.logged is not None else result.drift
    return EXIT_DRIFT if drift else EXIT_PASS


def _calibrate(args: argparse.Namespace, console: Console, errors: Console) -> int:
    from rich.progress import Progress
    from rich.table import Table

    from parity.calibrate import calibrate, calibrated_tolerance
    from parity.spec import load_spec

    spec = load_spec(args.spec)
    with Progress(console=errors, transient=True, disable=not errors.is_terminal) as progress:
        task = progress.add_task("calibration runs", total=None)
        result = calibrate(spec, fixtures=args.fixtures, margin=args.margin, write=not args.dry_run,
                           progress=lambda done, total: progress.update(task, completed=done, total=total))
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
    console.print("dry run: nothing written" if args.dry_run else "budgets written to the fixture manifest", highlight=False)
    return EXIT_PASS


def _diff_structure(args: argparse.Namespace, console: Console) -> int:
    from parity.fixtures import load_fixture
    from parity.forensics import diff_structure, summarize_structure
    from parity.pipeline import create_backbone, create_head
    from parity.report import render_config_diffs
    from parity.spec import load_spec

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

    from parity.checkpoints import read_checkpoint
    from parity.errors import SpecError
    from parity.forensics import diagnose_load, summarize_checkpoint
    from parity.report import render_inspection

    if args.checkpoint.is_dir():  # a save_pretrained directory
        from parity.backbones import weights_file

        args.checkpoint = weights_file(args.checkpoint)
    checkpoint = read_checkpoint(args.checkpoint)
    summary = summarize_checkpoint(checkpoint, path=str(args.checkpoint), key=args.key)
    if args.against is None and args.class_path is None:
        render_inspection(summary, console)
        return EXIT_PASS
    loading: dict = {}
    if args.class_path is not None:
        from parity.pipeline import import_object

        try:
            kwargs = json.loads(args.kwargs)
        except json.JSONDecodeError as e:
            raise SpecError(f"--kwargs is not valid JSON: {e}") from e
        module, section, target = import_object(args.class_path)(**kwargs), "head", args.class_path
    else:
        from parity.backbones import backbone_weights, checkpoint_converter
        from parity.pipeline import create_backbone, create_head
        from parity.spec import load_spec

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
    from parity.errors import SpecError
    from parity.preprocess_config import describe_record, resolve_source

    path = Path(text)
    if path.suffix == ".toml":
        from parity.pipeline import create_backbone, preprocess_record, resolve_preprocess
        from parity.spec import load_spec

        spec = load_spec(path)
        # Shapes only: the preprocessing needs the model's configuration, never its weights.
        backbone = create_backbone(spec, meta=spec.backbone.library != "open_clip")
        _, config = resolve_preprocess(spec, backbone)
        return describe_record(preprocess_record(spec, config), source=str(path)), []
    if path.is_dir() and (path / "manifest.json").is_file():
        from parity.fixtures import load_fixture

        fixture = load_fixture(path)
        record = fixture.pipeline.get("preprocess")
        if not record:
            raise SpecError(f"fixture {path} records no preprocessing")
        return describe_record(record, source=f"fixture {path}"), [row.image for row in fixture.rows]
    return resolve_source(text), []


def _image_files(paths: Sequence[Path]) -> list[Path]:
    from parity.errors import SpecError

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
    from parity.errors import FixtureError
    from parity.images import decode_image
    from parity.preprocess_diff import explain_preprocess
    from parity.report import render_preprocess_explanation, write_json

    (a, images_a), (b, images_b) = _preprocess_source(args.a), _preprocess_source(args.b)
    files = _image_files(args.images) if args.images is not None else images_a or images_b
    images = []
    for file in files:
        try:
            images.append((file.name, decode_image(file)[0]))
        except FixtureError as e:
            console.print(f"skipped {file}: {e}", style="yellow", highlight=False)
    explanation = explain_preprocess(a, b, images=images)
    render_preprocess_explanation(explanation, console)
    if args.json_path is not None:
        write_json(explanation, args.json_path)
    return EXIT_PASS if explanation else EXIT_DRIFT


def _check(args: argparse.Namespace, console: Console, errors: Console) -> int:
    from rich.progress import Progress

    from parity.check import run_check
    from parity.report import render_report, write_json
    from parity.spec import load_spec

    spec = load_spec(args.spec)
    with Progress(console=errors, transient=True, disable=not errors.is_terminal) as progress:
        task = progress.add_task("embedding images", total=None)
        report = run_check(spec, fixtures=args.fixtures, device=args.device, sample=args.sample,
                           progress=lambda done, total: progress.update(task, completed=done, total=total))
    render_report(report, console)
    verdict = None
    if args.referee is not None:  # informative: the gate's exit status is unchanged
        from parity.referee import referee
        from parity.report import render_referee

        verdict = referee(spec, fixtures=args.fixtures, device=args.device)
        render_referee(verdict, console)
    if args.json_path is not None:
        write_json(report, args.json_path)
        if verdict is not None:
            import json

            from parity.report import to_json

            data = json.loads(args.json_path.read_text(encoding="utf-8"))
            args.json_path.write_text(json.dumps({**data, "referee": to_json(verdict)}, indent=2) + "\n", encoding="utf-8")
        console.print(f"report written to {args.json_path}", highlight=False)
    return EXIT_PASS if report.passed else EXIT_DRIFT


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Logs (CI) are not terminals: give tables room instead of rich's 80-column fallback.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    errors = Console(stderr=True)
    from parity.errors import ParityError

    try:
        if args.command in ("check", "matrix", "diagnose", "calibrate"):
            handler = {"check": _check, "matrix": _matrix, "diagnose": _diagnose, "calibrate": _calibrate}
            return handler[args.command](args, console, errors)
        return {"inspect": _inspect, "diff-structure": _diff_structure,
                "explain-preprocess": _explain_preprocess}[args.command](args, console)
    except ParityError as e:
        errors.print(f"[bold red]error:[/] {type(e).__name__}: ", end="")
        errors.print(str(e), markup=False, highlight=False, soft_wrap=True)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
