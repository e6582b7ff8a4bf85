"""Life signs for long work: rich's progress bar on a terminal, plain lines in a log.

Without a terminal (CI), each phase prints one line when it starts, then a progress line at
most every `interval` seconds (done / total, rate, ETA) and one when it ends, so a long job
is never silent and a log never fills with bar redraws. Work that reports progress rarely
(a matrix step over many images, a diagnosis probe) still gets a line per interval from a
watcher thread that repeats the last known state with the time elapsed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from types import TracebackType

from rich.console import Console

__all__ = ["Progress", "DEFAULT_INTERVAL", "INTERVAL_ENV"]

DEFAULT_INTERVAL = 10.0
# Seconds between plain progress lines; tests set it to 0 to see every update.
INTERVAL_ENV = "PARITY_PROGRESS_INTERVAL"


def _interval() -> float:
    text = os.environ.get(INTERVAL_ENV)
    try:
        return max(0.0, float(text)) if text else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class Progress:
    """A context manager with `phase` (a named step) and `update` (done of total within it).

    Args:
        console: where to write (the error console: progress never mixes with the report).
        interval: seconds between plain progress lines (default: $PARITY_PROGRESS_INTERVAL or 10).
        clock: monotonic seconds, replaceable in tests.
    """

    def __init__(self, console: Console, *, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._console = console
        self._interval = _interval() if interval is None else interval
        self._clock = clock
        self._bar = None
        self._task = None
        self._phase = ""
        self._start = self._last = 0.0
        self._finished = True
        self._done: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self._console.is_terminal:
            from rich.progress import Progress as Bar

            self._bar = Bar(console=self._console, transient=True)
            self._bar.__enter__()
        elif self._interval > 0:
            self._watcher = threading.Thread(target=self._watch, name="parity-progress", daemon=True)
            self._watcher.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._watcher is not None:
            self._stop.set()
            self._watcher.join()
            self._watcher = None
        if self._bar is not None:
            self._bar.__exit__(kind, error, trace)
            self._bar = None

    def _watch(self) -> None:
        """Between updates, one line per interval: the last known count (or the time elapsed)."""
        while not self._stop.wait(self._interval / 4):
            with self._lock:
                now = self._clock()
                if self._finished or now - self._last < self._interval:
                    continue
                if self._done is not None:
                    self._progress_line(*self._done, now)
                else:
                    self._last = now
                    self._line(f"{self._phase}: working, {_duration(now - self._start)} so far")

    def _line(self, text: str) -> None:
        self._console.print(f"parity: {text}", markup=False, highlight=False, soft_wrap=True)

    def phase(self, description: str) -> None:
        """Start a named step (e.g. ``embedding images``); a message-only caller may call this alone."""
        with self._lock:
            self._phase, self._finished, self._done = description, False, None
            self._start = self._last = self._clock()
            if self._bar is None:
                self._line(description)
            elif self._task is None:
                self._task = self._bar.add_task(description, total=None)
            else:
                self._bar.reset(self._task, description=description, total=None)

    def update(self, done: int, total: int) -> None:
        """``done`` of ``total`` units of the current phase are complete."""
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)
            return
        with self._lock:
            now = self._clock()
            self._done = (done, total)
            if done >= total and not self._finished:
                self._finished = True
                self._line(f"{self._phase}: {done}/{total} done in {_duration(now - self._start)}")
            elif done < total and now - self._last >= self._interval:
                self._progress_line(done, total, now)

    def _progress_line(self, done: int, total: int, now: float) -> None:
        self._last = now
        elapsed = now - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {_duration((total - done) / rate)}" if rate > 0 else ""
        self._line(f"{self._phase}: {done}/{total} ({rate:.3g}/s{eta})")
