"""Command line: ``parity check``. Exit 0 on parity, 1 on drift, 2 on a usage or config error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

__all__ = ["main", "EXIT_PASS", "EXIT_DRIFT", "EXIT_USAGE"]

EXIT_PASS, EXIT_DRIFT, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parity", description="Training-inference parity gate for CLIP + head pipelines.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser("check", help="run the parity gate: candidate pipeline vs frozen fixtures",
                                description="Run the candidate pipeline described by SPEC and compare it, stage by "
                                            "stage, with the frozen reference fixtures.")
    check.add_argument("--spec", required=True, type=Path, help="TOML spec of the candidate inference path")
    check.add_argument("--fixtures", type=Path, default=None,
                       help="fixture directory (default: the spec's `fixtures` field)")
    check.add_argument("--device", default=None, help="override [runtime].device (cpu, cuda, cuda:N)")
    check.add_argument("--json", type=Path, default=None, dest="json_path", metavar="PATH",
                       help="also write the full report as JSON")
    return parser


def _check(args: argparse.Namespace, console: Console, errors: Console) -> int:
    from rich.progress import Progress

    from parity.check import run_check
    from parity.report import render_report, write_json
    from parity.spec import load_spec

    spec = load_spec(args.spec)
    with Progress(console=errors, transient=True, disable=not errors.is_terminal) as progress:
        task = progress.add_task("embedding images", total=None)
        report = run_check(spec, fixtures=args.fixtures, device=args.device,
                           progress=lambda done, total: progress.update(task, completed=done, total=total))
    render_report(report, console)
    if args.json_path is not None:
        write_json(report, args.json_path)
        console.print(f"report written to {args.json_path}", highlight=False)
    return EXIT_PASS if report.passed else EXIT_DRIFT


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console, errors = Console(), Console(stderr=True)
    from parity.errors import ParityError

    try:
        return _check(args, console, errors)
    except ParityError as e:
        errors.print(f"[bold red]error:[/] {type(e).__name__}: ", end="")
        errors.print(str(e), markup=False, highlight=False, soft_wrap=True)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
