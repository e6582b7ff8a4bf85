"""Progress while a command works: plain lines at most once per interval in a log, a rich bar on a terminal."""

from __future__ import annotations

import io
import re

from parity.progress import Progress


def test_progress_lines_are_printed_while_embedding_when_stderr_is_a_file(runs):
    log = runs["passing"][2]
    lines = log.splitlines()
    assert lines[0] == "parity: embedding images"
    # batch_size 8 over 17 images: two lines during the phase (interval 0 here), one at its end.
    assert re.fullmatch(r"parity: embedding images: 8/17 \([0-9.e+]+/s, ETA \d+ s\)", lines[1]), lines
    assert re.fullmatch(r"parity: embedding images: 16/17 \(.*\)", lines[2]), lines
    assert re.fullmatch(r"parity: embedding images: 17/17 done in \d+ s", lines[3]), lines
    assert "\x1b[" not in log  # no bar redraws, no colour codes in a log


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_come_at_most_once_per_interval():
    from rich.console import Console

    buffer, clock = io.StringIO(), _Clock()
    with Progress(Console(file=buffer, width=200), interval=10.0, clock=clock) as progress:
        progress.phase("matrix over images")
        for done in range(1, 61):
            clock.now = float(done)
            progress.update(done, 60)
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "parity: matrix over images"
    assert lines[1] == "parity: matrix over images: 10/60 (1/s, ETA 50 s)"
    assert [line.split(": ")[2].split(" ")[0] for line in lines[1:-1]] == ["10/60", "20/60", "30/60", "40/60", "50/60"]
    assert lines[-1] == "parity: matrix over images: 60/60 done in 1 min 00 s"


def test_progress_on_a_terminal_is_rich_bar_not_lines():
    from rich.console import Console

    buffer = io.StringIO()
    with Progress(Console(file=buffer, force_terminal=True, width=100), interval=0.0) as progress:
        progress.phase("calibration runs")
        progress.update(1, 4)
        progress.phase("second phase")
        progress.update(4, 4)
    assert "parity: " not in buffer.getvalue()


def test_progress_keeps_a_log_alive_between_rare_updates():
    import time

    from rich.console import Console

    buffer = io.StringIO()
    with Progress(Console(file=buffer, width=200), interval=0.2) as progress:
        progress.phase("probing 22 changes on 4 samples")
        time.sleep(0.7)
        progress.update(0, 17)
        time.sleep(0.5)
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "parity: probing 22 changes on 4 samples"
    assert "parity: probing 22 changes on 4 samples: working, 0 s so far" in lines
    assert any(re.fullmatch(r"parity: probing 22 changes on 4 samples: 0/17 \(0/s\)", line) for line in lines), lines
    # At most one line per interval: 1.2 s of work at 0.2 s gives the phase line and no more than 7 others.
    assert len(lines) <= 8
