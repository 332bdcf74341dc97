"""A script misbehaves: each fault ends in its documented outcome, in bounded time.

Every test runs once per flavour (the service and the client are the same
flavour; ``fork`` runs the script in the client).  Each prints one
``FAULT`` line with the outcome and how long it took (``pytest -s``).

| fault | outcome |
| --- | --- |
| exits non-zero | FAILURE (``-``); fork: FAILURE, returncode 3 |
| dies by a signal | FAILURE (``-``); fork: INTERNAL_FAILURE/IO, returncode -9 |
| closes stdout, keeps running | the result comes when the script exits; ``alarm=N`` ends it |
| never reads its stdin | SUCCESS even for a large payload: the service drains it (Q8) |
| writes forever | RUN_TIMEOUT; its next write fails, so the script ends at once |
| silent after its client left | not noticed: it runs until it exits, ``alarm=N`` or stop |
| ignores SIGTERM | SIGKILL ``kill_timeout`` after the SIGTERM (alarm and stop) |
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from execproto import ErrorKind, Status
from execproto.adapters import Listener, TcpListener, UnixListener

from ..adapters.flavours import (
    ALL_DRIVERS,
    SOCKET_DRIVERS,
    Address,
    Flavour,
    LogCapture,
    connect_raw,
    endpoint,
    exchange,
    py_script,
    read_reply,
    sh_script,
    target_of,
)
from .helpers import note, read_pid, reaped_within, say, timed

V = b"VERSION\tscript\t4\t0\n"
#: Any single client call here must end well within this.
BOUND = 10.0


def _line(driver: str, text: str) -> bytes:
    """What the client outputs for one line written with :func:`say`."""
    return text.encode() if driver == "tcp" else text.encode() + b"\n"


@contextlib.contextmanager
def _service(flavour: Flavour, driver: str, directory: Path, script: str,
             **options: Any) -> Iterator[tuple[Address, LogCapture]]:
    log = LogCapture()
    listener: Listener = UnixListener(str(directory / "sock")) if driver == "unix" else \
        TcpListener("127.0.0.1", 0)
    with flavour.serving([listener], script, logger=log.logger, **options) as addresses:
        yield addresses[0], log


def _alive(flavour: Flavour, address: Address) -> None:
    """The service still answers (run with an ``alive`` first argument)."""
    result = flavour.run(target_of(address), ["alive"], timeout=BOUND, limit=BOUND)
    assert result.status is Status.SUCCESS, result


# --- the script's own end ------------------------------------------------------------


@ALL_DRIVERS
def test_script_exits_non_zero(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """``exit 3``: FAILURE with the output; the service writes ``-`` (fork: returncode 3)."""
    script = sh_script(tmp_path, "exit3", say(driver, "bye") + "exit 3\n")
    with endpoint(flavour, driver, tmp_path, script) as target, timed() as clock:
        result = flavour.run(target, timeout=BOUND)
    note(f"exit 3 / {flavour.name} {driver}: {result.status.name} in {clock.seconds:.2f} s")
    assert result.status is Status.FAILURE, result
    assert result.kind is ErrorKind.NONE, result
    assert result.output == _line(driver, "bye")
    if driver == "fork":
        assert result.returncode == 3
        assert result.detail == "terminated with non-zero exit code 3"
    assert clock.seconds < 5.0


@ALL_DRIVERS
def test_script_dies_by_signal(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """SIGKILL: the service answers ``-`` (FAILURE); fork: INTERNAL_FAILURE/IO, -9."""
    script = sh_script(tmp_path, "killed", say(driver, "last words") + "kill -KILL $$\n")
    with endpoint(flavour, driver, tmp_path, script) as target, timed() as clock:
        result = flavour.run(target, timeout=BOUND)
    note(f"killed by SIGKILL / {flavour.name} {driver}: {result.status.name} "
         f"{result.kind.name} in {clock.seconds:.2f} s")
    assert result.output == _line(driver, "last words")
    if driver == "fork":
        assert result.status is Status.INTERNAL_FAILURE, result
        assert result.kind is ErrorKind.IO
        assert result.returncode == -9
        assert result.detail == "terminated abnormally with signal 9"
    else:
        assert result.status is Status.FAILURE, result
        assert result.kind is ErrorKind.NONE
    assert clock.seconds < 5.0


@ALL_DRIVERS
def test_script_closes_stdout_and_keeps_running(flavour: Flavour, driver: str,
                                                tmp_path: Path) -> None:
    """Closing stdout early ends nothing: the result comes when the script exits.

    The service still holds the connection (it writes the result code), and
    the fork client waits for the child after the pipe's EOF.
    """
    script = sh_script(tmp_path, "closer", say(driver, "early")
                       + "exec 0<&- 1>&-\n/bin/sleep 0.8\nexit 0\n")
    with endpoint(flavour, driver, tmp_path, script) as target, timed() as clock:
        result = flavour.run(target, timeout=BOUND)
    note(f"stdout closed, exit 0 after 0.8 s / {flavour.name} {driver}: "
         f"{result.status.name} in {clock.seconds:.2f} s")
    assert result.status is Status.SUCCESS, result
    assert result.output == _line(driver, "early")
    assert 0.75 <= clock.seconds < 5.0, clock.seconds


@SOCKET_DRIVERS
def test_closed_stdout_script_is_ended_by_alarm(flavour: Flavour, driver: str,
                                                tmp_path: Path) -> None:
    """``alarm=1`` on a script that closed stdout and sleeps: SIGTERM at 1 s, then ``-``."""
    pidfile = tmp_path / "pid"
    script = sh_script(tmp_path, "closer",
                       f"echo $$ > {pidfile}\nexec 0<&- 1>&-\nexec /bin/sleep 30\n")
    with _service(flavour, driver, tmp_path, script) as (address, log), timed() as clock:
        reply, how = exchange(address, V + b"alarm=1\n-\n\n", timeout=BOUND)
    note(f"stdout closed + alarm=1 / {flavour.name} {driver}: reply {reply!r} "
         f"in {clock.seconds:.2f} s")
    assert reply == b"-\n", (reply, how)
    assert 0.9 <= clock.seconds < 4.0, clock.seconds
    assert reaped_within(read_pid(pidfile), 1.0) is not None, "the script was not reaped"
    assert any("alarm 1 s expired, killed by signal 15" in m for m in log.messages()), \
        log.messages()


# --- stdin ---------------------------------------------------------------------------------


@ALL_DRIVERS
def test_script_never_reads_stdin(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """16 MiB the script never reads: the result code still arrives (Q8), no reset.

    The script waits 0.3 s, so the socket buffers are full of payload when
    it exits.  The service writes the result code, then drains what the
    client still sends before closing, so the close is not a reset; the fork
    client ignores EPIPE on the input pipe.  Strict about resets
    (``lenient_reset=False``).
    """
    script = sh_script(tmp_path, "deaf", say(driver, "hi") + "/bin/sleep 0.3\n")
    payload = b"unread line\n" * (16 * 1024 * 1024 // 12)
    with endpoint(flavour, driver, tmp_path, script) as target, timed() as clock:
        result = flavour.run(target, input=payload, lenient_reset=False, timeout=30,
                             limit=40)
    note(f"never reads 16 MiB of stdin / {flavour.name} {driver}: {result.status.name} "
         f"in {clock.seconds:.2f} s")
    assert result.status is Status.SUCCESS, result
    assert result.output == _line(driver, "hi")
    assert 0.3 <= clock.seconds < 20.0, clock.seconds


# --- runaway scripts ------------------------------------------------------------------------


@ALL_DRIVERS
def test_script_writes_forever(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """``yes``: the client's run timeout gives RUN_TIMEOUT, and the script does not outlive it.

    unix/tcp: the client closes the connection with unread output, so the
    script's next write fails (SIGPIPE, or EPIPE/ECONNRESET: ``yes`` exits 1)
    and the script ends at once; the service reaps it and goes on serving.
    Nothing in the service watches the client: the failed write ends it.
    fork: the client terminates the child (SIGTERM) and reaps it.
    """
    pidfile = tmp_path / "pid"
    script = sh_script(tmp_path, "yes", f"[ \"$1\" = alive ] && {{ {say(driver, 'ok')}exit 0; }}\n"
                       f"echo $$ > {pidfile}\nexec /usr/bin/yes\n")
    received = [0]

    def discard(chunk: bytes) -> None:
        received[0] += len(chunk)

    with contextlib.ExitStack() as stack:
        if driver == "fork":
            target, address = f"fork:{script}", None
        else:
            address, _ = stack.enter_context(_service(flavour, driver, tmp_path, script))
            target = target_of(address)
        with timed() as clock:
            result = flavour.run(target, timeout=0.5, output=discard)
        ended = reaped_within(read_pid(pidfile), 5.0)
        note(f"writes forever, run timeout 0.5 s / {flavour.name} {driver}: {result.kind.name} "
             f"in {clock.seconds:.2f} s after {received[0] / 1e6:.1f} MB; script gone "
             f"{ended if ended is None else round(ended, 2)} s later")
        assert result.status is Status.INTERNAL_FAILURE, result
        assert result.kind is ErrorKind.RUN_TIMEOUT, result
        assert 0.45 <= clock.seconds < 3.0, clock.seconds
        assert ended is not None, "the script outlived its client by 5 s"
        if driver == "fork":
            assert result.returncode == -15
        else:
            assert address is not None
            _alive(flavour, address)


_SILENT = "echo $$ > {pidfile}\nexec /bin/sleep 30\n"


@pytest.mark.parametrize("driver", ["tcp"])
def test_silent_script_outlives_its_client(flavour: Flavour, driver: str,
                                           tmp_path: Path) -> None:
    """A script that neither reads nor writes is not ended when its client gives up (tcp).

    Dovecot's script service does not notice either.  Over tcp a closed
    client cannot be told from a half-closed one without writing to it, so
    the script runs until it exits by itself, ``alarm=N`` fires, or the
    service stops (then grace, SIGTERM, SIGKILL).
    """
    pidfile = tmp_path / "pid"
    script = sh_script(tmp_path, "silent", _SILENT.format(pidfile=pidfile))
    with _service(flavour, driver, tmp_path, script) as (address, _):
        result = flavour.run(target_of(address), timeout=0.3)
        assert result.kind is ErrorKind.RUN_TIMEOUT, result
        pid = read_pid(pidfile)
        assert reaped_within(pid, 1.0) is None, "the script was ended: update this test"
        stop = time.monotonic()
    stopped_after = time.monotonic() - stop
    note(f"silent script, client gone / {flavour.name} {driver}: still running 1 s later; "
         f"ended by stop after {stopped_after:.2f} s")
    assert reaped_within(pid, 0.5) is not None


# --- SIGTERM ignored ------------------------------------------------------------------------

_IGNORES_TERM = """\
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open({pidfile!r} + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename({pidfile!r} + ".tmp", {pidfile!r})
time.sleep(30)
"""


@SOCKET_DRIVERS
def test_alarm_on_script_ignoring_sigterm(flavour: Flavour, driver: str,
                                          tmp_path: Path) -> None:
    """``alarm=1``, SIGTERM ignored: SIGKILL ``kill_timeout`` (0.5 s) later, then ``-``."""
    pidfile = tmp_path / "pid"
    script = py_script(tmp_path, "stubborn", _IGNORES_TERM.format(pidfile=str(pidfile)))
    with _service(flavour, driver, tmp_path, script, kill_timeout=0.5) as (address, log):
        with timed() as clock:
            reply, how = exchange(address, V + b"alarm=1\n-\n\n", timeout=BOUND)
        lines = log.wait_for(lambda m: "alarm 1 s expired" in m)
    note(f"alarm=1, SIGTERM ignored, kill_timeout 0.5 / {flavour.name} {driver}: "
         f"reply {reply!r} in {clock.seconds:.2f} s")
    assert reply == b"-\n", (reply, how)
    assert 1.4 <= clock.seconds < 5.0, clock.seconds
    assert reaped_within(read_pid(pidfile), 1.0) is not None
    assert lines and "alarm 1 s expired, killed by signal 9" in lines[0], lines


@SOCKET_DRIVERS
def test_stop_kills_script_ignoring_sigterm(flavour: Flavour, driver: str,
                                            tmp_path: Path) -> None:
    """Stop: grace (0.2 s), SIGTERM ignored, SIGKILL after ``kill_timeout`` (0.5 s); ``-``."""
    pidfile = tmp_path / "pid"
    script = py_script(tmp_path, "stubborn", _IGNORES_TERM.format(pidfile=str(pidfile)))
    with _service(flavour, driver, tmp_path, script, grace=0.2,
                  kill_timeout=0.5) as (address, _):
        sock = connect_raw(address)
        sock.sendall(V + b"-\n\n")
        sock.shutdown(socket.SHUT_WR)
        pid = read_pid(pidfile)
        stop = time.monotonic()
    stopped_after = time.monotonic() - stop
    with sock:
        reply, how = read_reply(sock, timeout=5)
    note(f"stop, SIGTERM ignored, grace 0.2 + kill_timeout 0.5 / {flavour.name} {driver}: "
         f"reply {reply!r}, stopped in {stopped_after:.2f} s")
    assert reply == b"-\n", (reply, how)
    assert 0.65 <= stopped_after < 4.0, stopped_after
    assert reaped_within(pid, 0.5) is not None

