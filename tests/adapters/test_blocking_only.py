"""What only the blocking flavour's service has: one loop in the serving thread, Ctrl-C.

The cross-flavour scenarios live in the other files of this directory.
Here :meth:`Service.serve_forever` runs in the main thread, as a program
that calls it would, and is interrupted the way Ctrl-C does it: a signal
handler raises ``KeyboardInterrupt``.  The directory's conftest checks
descriptors, children and zombies around each test.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from execproto.adapters import UnixListener
from execproto.adapters import _procedures as proc
from execproto.adapters._common import ServiceConfig
from execproto.adapters.blocking import Service, _Loop

from .flavours import children, connect_raw, guard, read_reply, sh_script, wait_for_file

REQUEST = b"VERSION\tscript\t4\t0\n-\n\n"


@pytest.fixture
def interrupts() -> Iterator[list[float]]:
    """SIGALRM raises KeyboardInterrupt in the main thread; the times it fired are listed."""
    fired: list[float] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        fired.append(time.monotonic())
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        yield fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _interrupt_when(path: Path, *, then: float | None = None) -> threading.Thread:
    """Once *path* exists, interrupt the main thread; again *then* seconds later."""
    main = threading.main_thread().ident
    assert main is not None

    def body() -> None:
        if wait_for_file(path):
            signal.pthread_kill(main, signal.SIGALRM)
            if then is not None:
                time.sleep(then)
                signal.pthread_kill(main, signal.SIGALRM)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def _client(address: str, replies: list[tuple[bytes, str]]) -> threading.Thread:
    def body() -> None:
        with connect_raw(address) as sock:
            sock.sendall(REQUEST)
            replies.append(read_reply(sock, timeout=20.0))

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def _serve_interrupted(tmp_path: Path, body: str, *,
                       then: float | None = None) -> list[tuple[bytes, str]]:
    """Serve a script (*body* after it says it started) to one client, in this thread.

    Interrupt once the script runs, and again *then* seconds later; the
    interrupt must leave serve_forever().  The client's reply is returned.
    """
    started = tmp_path / "started"
    script = sh_script(tmp_path, "script", f": > {started}\n{body}")
    service = Service([UnixListener(str(tmp_path / "s"))], ServiceConfig(script=script, grace=20.0))
    replies: list[tuple[bytes, str]] = []
    client = _client(str(tmp_path / "s"), replies)
    interrupter = _interrupt_when(started, then=then)
    with guard(30.0, "serve_forever()"), pytest.raises(KeyboardInterrupt):
        service.serve_forever()
    client.join(10.0)
    interrupter.join(10.0)
    assert not (tmp_path / "s").exists()
    return replies


def test_an_interrupt_stops_the_service_gently(tmp_path: Path,
                                               interrupts: list[float]) -> None:
    # The running script finishes and is answered; then the interrupt is raised.
    replies = _serve_interrupted(tmp_path, "/bin/sleep 0.5\necho done\n")
    assert len(interrupts) == 1
    assert replies == [(b"done\n+\n", "eof")]


def test_a_second_interrupt_ends_every_connection_at_once(tmp_path: Path,
                                                          interrupts: list[float]) -> None:
    replies = _serve_interrupted(tmp_path, "exec /bin/sleep 30\n", then=0.3)
    assert len(interrupts) == 2
    assert time.monotonic() - interrupts[1] < 5.0  # not the 20 s grace
    assert replies == [(b"", "eof")]  # closed without a result code
    assert not children()  # the script was killed and reaped


def test_connections_are_served_without_a_thread_each(tmp_path: Path) -> None:
    started = tmp_path / "started"
    script = sh_script(tmp_path, "slow", f"echo >> {started}\n/bin/sleep 1\n")
    service = Service([UnixListener(str(tmp_path / "s"))],
                      ServiceConfig(script=script, max_connections=64))
    before = threading.active_count()
    serving = threading.Thread(target=service.serve_forever, daemon=True)
    serving.start()
    socks = [connect_raw(str(tmp_path / "s")) for _ in range(40)]
    try:
        for sock in socks:
            sock.sendall(REQUEST)
        deadline = time.monotonic() + 10.0
        while (not started.exists() or started.read_bytes().count(b"\n") < 40) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(children()) == 40  # all 40 scripts run at once...
        assert threading.active_count() == before + 1  # ...served by one thread
        assert [read_reply(sock) for sock in socks] == [(b"+\n", "eof")] * 40
    finally:
        for sock in socks:
            sock.close()
        service.stop()
        serving.join(10.0)
    assert not serving.is_alive()


# --- the loop itself ---------------------------------------------------------------------


def _waits(fd: int, times: int, timeout: float | None) -> proc.Procedure[None]:
    for _ in range(times):
        assert (yield proc.Wait(read=(fd,), timeout=timeout))


def _registered(loop: _Loop) -> dict[int, int]:
    return dict(loop._armed)


def test_loop_sweeps_the_timers_of_waits_that_ended_early() -> None:
    # Each wait ends at once (the fd is readable) long before its 60 s timer:
    # the heap must not keep one entry per wait ever made.
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        loop = _Loop({})
        results: list[object] = []
        loop.start(_waits(r, 5000, 60.0), results.append)
        try:
            loop.run()
        finally:
            loop.close()
        assert results == [None]
        # Without the sweep: 5,000 entries, every one due in a minute.
        assert len(loop._timers) <= 2 * 256 + 1, len(loop._timers)
    finally:
        os.close(r)
        os.close(w)


def test_loop_keeps_kept_fds_registered_and_drops_them_when_idle() -> None:
    r, w = os.pipe()
    other_r, other_w = os.pipe()
    try:
        loop = _Loop({})
        loop.keep([r])
        loop.start(_waits(r, 3, None), lambda _: None)
        loop._step(*loop._ready.popleft())
        assert _registered(loop) == {r: select.POLLIN}
        os.write(w, b"x")
        loop.run()  # three waits, the fd registered once throughout
        assert _registered(loop) == {r: select.POLLIN}
        # Readable with nobody waiting: unregistered, not reported forever.
        loop.start(_waits(other_r, 1, 0.05), lambda _: None)
        started = time.monotonic()
        with pytest.raises(AssertionError):  # the wait on the other pipe times out
            loop.run()
        assert time.monotonic() - started < 5.0
        assert r not in _registered(loop)
        loop.release([r])
        loop.close()
    finally:
        for fd in (r, w, other_r, other_w):
            os.close(fd)
