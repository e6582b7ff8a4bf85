"""Calling the user's code so that it can neither end parity nor hold it forever.

Every call into a ``python`` or ``endpoint_handler`` candidate (its import, the handler's
construction, each ``predict``, its head on the reference embeddings) runs on one worker
thread, the same one call after call, so that what the code sets per thread at import
(``torch.set_grad_enabled(False)``, a CUDA device) holds in its calls as it did in its own
process. The caller waits at most ``timeout`` seconds. ``sys.exit``, ``os._exit`` (from the
user's threads), ``KeyboardInterrupt`` and any other ``BaseException`` end only that call: the
caller gets `Stopped`, which says what the code did. A call past its time is abandoned, still
running, on its own daemon thread (`TimedOut`); the next call gets a fresh worker. The command
line asks `lingering` at the end and leaves without waiting for what the code left running.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["call", "Stopped", "TimedOut", "lingering"]

_real_exit = os._exit
_lock = threading.Lock()
# Every worker (current or abandoned) and every thread the user's code started during a call:
# an os._exit from one of them is the user's, never parity's.
_workers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_started: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_abandoned: list[tuple[threading.Thread, str]] = []
_pid: int | None = None


class Stopped(Exception):
    """The user's code ended its call without returning or raising an ``Exception``; ``str()`` is what it did."""

    def __init__(self, what: str, how: str) -> None:
        super().__init__(f"{what} {how}")
        self.what, self.how = what, how


class TimedOut(Stopped):
    """The call did not return in time: it was abandoned, still running on its own thread."""


class _ExitCalled(BaseException):
    """Raised instead of ``os._exit`` in the user's threads (a BaseException, as ``SystemExit`` is)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _guarded_exit(status: int) -> None:
    thread = threading.current_thread()
    if os.getpid() == _pid and (thread in _workers or thread in _started):
        raise _ExitCalled(status)
    _real_exit(status)  # parity's own, or a forked child's (multiprocessing ends its children with it)


class _Job:
    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        before = set(threading.enumerate())
        try:
            self.value = self.fn(*self.args)
        except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt included: the caller decides
            self.error = e
        finally:
            with _lock:
                _started.update(t for t in threading.enumerate() if t not in before)
            self.done.set()


class _Worker:
    """One daemon thread running jobs in order; once abandoned, it ends after the job it is stuck in."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.abandoned = False
        self.thread = threading.Thread(target=self._loop, name="parity-user-code", daemon=True)
        _workers.add(self.thread)
        self.thread.start()

    def _loop(self) -> None:
        while not self.abandoned:
            self.jobs.get().run()


_worker: _Worker | None = None


def _install() -> None:
    global _pid
    _pid = os.getpid()
    if os._exit is not _guarded_exit:
        os._exit = _guarded_exit


def _abandon(worker: _Worker, what: str) -> None:
    global _worker
    with _lock:
        worker.abandoned = True
        if _worker is worker:
            _worker = None
        _abandoned.append((worker.thread, what))


def _how(error: BaseException) -> str:
    if isinstance(error, _ExitCalled):
        return f"called os._exit({error.status!r})"
    if isinstance(error, SystemExit):
        return f"called sys.exit({'' if error.code is None else repr(error.code)})"
    text = str(error).strip()
    return f"raised {type(error).__name__}" + (f": {text}" if text else "")


def call(fn: Callable[..., Any], *args: Any, timeout: float, what: str) -> Any:
    """``fn(*args)`` on the user-code thread, waited for at most ``timeout`` seconds.

    Args:
        what: the code called, as messages name it (``app:predict``, ``importing handler.py``).

    Returns:
        What ``fn`` returned.

    Raises:
        Exception: whatever ``Exception`` ``fn`` raised, as it raised it.
        Stopped: ``fn`` called ``sys.exit`` or ``os._exit``, or raised ``KeyboardInterrupt`` (or another
            ``BaseException``).
        TimedOut: ``fn`` did not return within ``timeout`` seconds; it goes on running, abandoned.
    """
    global _worker
    with _lock:
        _install()
        if _worker is None:
            _worker = _Worker()
        worker = _worker
    job = _Job(fn, args)
    worker.jobs.put(job)
    try:
        finished = job.done.wait(timeout)
    except BaseException:  # parity itself interrupted (Ctrl-C, an alarm): the call goes on, unowned
        _abandon(worker, what)
        raise
    if not finished:
        _abandon(worker, what)
        raise TimedOut(what, f"did not return within {timeout:g} s ([candidate].timeout): abandoned, still "
                             "running; raise [candidate].timeout if it needs longer")
    error = job.error
    if error is None:
        return job.value
    if isinstance(error, Exception):
        raise error
    raise Stopped(what, _how(error))


def lingering() -> list[str]:
    """What the user's code left running: calls abandoned past their time, non-daemon threads it started."""
    with _lock:
        abandoned, started = list(_abandoned), list(_started)
    left = [f"{what} (abandoned past its time)" for thread, what in abandoned if thread.is_alive()]
    left += [f"thread {t.name!r} (started by the candidate's code)" for t in started if t.is_alive() and not t.daemon]
    return left
