"""The url runner's request deadlines: one watchdog thread cuts off every request at its own time."""

from __future__ import annotations

import os
import threading
import time

import pytest

import parity.runners.http as http_runner
from tests.support.paths import EXAMPLE_FIXTURES
from tests.support.http_service import answer, stdlib_service, trickling_service

IMAGE = EXAMPLE_FIXTURES / "images" / "astronaut.png"
WATCHDOG = "parity-http-deadlines"


def _timed_out(url: str, timeout: float) -> float:
    """Seconds until a request to ``url`` with ``timeout`` failed on its deadline."""
    started = time.monotonic()
    with pytest.raises(http_runner.ServiceError, match=rf"no answer within {timeout:g} s \(timeout\)"):
        http_runner.post_sample(url, IMAGE, (0, 1), timeout=timeout, retries=0)
    return time.monotonic() - started


def test_many_requests_share_one_watchdog_thread():
    def respond(handler, _body):
        answer(handler, 200, b'{"outputs": [0, 1, 2]}')

    with stdlib_service(respond) as url:
        for _ in range(20):
            http_runner.post_sample(url, IMAGE, (0, 1), timeout=5.0)
        names = [t.name for t in threading.enumerate()]
    assert names.count(WATCHDOG) == 1
    assert not any(isinstance(t, threading.Timer) for t in threading.enumerate())


def test_a_shorter_deadline_set_while_a_longer_one_waits_is_kept():
    """A request with 1 s started while one with 20 s is pending ends at its own 1 s, not the other's."""
    def pending(url: str) -> None:
        with pytest.raises(http_runner.ServiceError):  # cut off when the service stops at the test's end
            http_runner.post_sample(url, IMAGE, (0, 1), timeout=20.0, retries=0)

    with trickling_service(0.5, limit=25) as slow:
        long_one = threading.Thread(target=pending, args=(slow,), daemon=True)
        long_one.start()
        time.sleep(0.3)  # the watchdog now waits for the 20 s deadline
        assert _timed_out(slow, 1.0) < 4.0
        assert long_one.is_alive()  # the longer request is still within its time
    long_one.join(timeout=10)


def test_deadlines_hold_in_a_forked_child():
    with trickling_service(0.5, limit=10) as slow:
        _timed_out(slow, 0.5)  # the parent's watchdog exists before the fork
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if its own request is cut off in time
            try:
                status = 0 if _timed_out(slow, 1.0) < 4.0 else 1
            except BaseException:  # noqa: BLE001 - whatever happens, the child must not return into pytest
                status = 2
            os._exit(status)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
