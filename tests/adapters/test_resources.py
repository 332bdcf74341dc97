"""Cancellation and resource hygiene, for every flavour.

Cancelling ``run()`` is done the flavour's way: a cancel scope (trio),
``task.cancel()`` (asyncio), KeyboardInterrupt raised by a SIGALRM handler
(blocking).  It must be prompt, close the connection (the script then sees
EOF or EPIPE), kill and reap a fork child, and leave no descriptor behind.
The autouse fixture in conftest checks descriptors and children after each
test; these tests also count descriptors while a service keeps running.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from execproto import ErrorKind, Status
from execproto.adapters import TcpListener, UnixListener

from .flavours import (
    ALL_DRIVERS,
    SOCKET_DRIVERS,
    Flavour,
    children,
    endpoint,
    open_fds,
    py_script,
    sh_script,
    target_of,
    wait_for_file,
)

_CANCELLED = """\
import os, time
with open({pidfile!r} + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename({pidfile!r} + ".tmp", {pidfile!r})
note = "?"
try:
    while os.read(0, 65536):
        pass
    note = "eof"
    if {phase!r} == "receiving":
        while True:
            os.write(1, b"tick\\n")
            time.sleep(0.02)
except OSError as exc:
    note = f"error {{exc.errno}}"
with open({marker!r}, "w") as f:
    f.write(note)
"""


@ALL_DRIVERS
@pytest.mark.parametrize("phase", ["sending", "receiving"])
def test_cancel_run(flavour: Flavour, driver: str, phase: str, tmp_path: Path) -> None:
    """A cancelled run ends promptly and releases everything.

    sending: the input iterable blocks after one chunk; receiving: the script
    streams output forever.  Socket drivers: the service's script notices
    the closed connection.  fork: the child is killed at once and reaped.
    """
    pidfile, marker = tmp_path / "pid", tmp_path / "marker"
    script = py_script(tmp_path, "cancelled", _CANCELLED.format(
        pidfile=str(pidfile), marker=str(marker), phase=phase))
    with endpoint(flavour, driver, tmp_path, script) as target:
        outcome = flavour.run_cancelled(target, delay=0.15, stall_input=phase == "sending",
                                        ready=pidfile.exists)
        assert outcome.cancelled, f"run() was not cancelled: {outcome.result}"
        assert outcome.cleanup < 2.0, f"cancellation took {outcome.cleanup:.2f} s"
        assert pidfile.exists(), "the script never started"
        pid = int(pidfile.read_text())
        if driver == "fork":
            assert not Path(f"/proc/{pid}").exists(), "the child was not killed and reaped"
            assert pid not in children()
            assert not marker.exists(), "the child was not killed at once"
        else:
            assert wait_for_file(marker, 5.0), "the script never saw the client go"


@contextlib.contextmanager
def _full_backlog(driver: str, directory: Path) -> Iterator[str]:
    family = socket.AF_UNIX if driver == "unix" else socket.AF_INET
    fillers: list[socket.socket] = []
    with socket.socket(family) as listener:
        listener.bind(str(directory / "full") if driver == "unix" else ("127.0.0.1", 0))
        listener.listen(0)
        try:
            for _ in range(8):
                filler = socket.socket(family)
                fillers.append(filler)
                filler.settimeout(0.1)
                try:
                    filler.connect(listener.getsockname())
                except OSError:
                    break
            yield target_of(listener.getsockname())
        finally:
            for filler in fillers:
                filler.close()


@SOCKET_DRIVERS
def test_cancel_while_connecting(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """Cancelled in the connect retry loop (unix EAGAIN) / a pending tcp connect."""
    with _full_backlog(driver, tmp_path) as target:
        outcome = flavour.run_cancelled(target, delay=0.3, stall_input=False,
                                        connect_timeout=20)
    assert outcome.cancelled, f"run() was not cancelled: {outcome.result}"
    assert outcome.cleanup < 1.0, outcome.cleanup


@ALL_DRIVERS
def test_repeated_runs_keep_descriptors(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """Runs that succeed, fail, time out or cannot connect leave the fd count unchanged.

    Counted while the service keeps running, so a per-connection leak in the
    service shows too.
    """
    out = "ok\\r\\n.\\r\\n" if driver == "tcp" else "ok\\n"
    script = sh_script(tmp_path, "mixed",
                       f'/bin/cat >/dev/null\nprintf \'{out}\'\n[ "$1" = fail ] && exit 3\n'
                       '[ "$1" = slow ] && exec /bin/sleep 0.2\nexit 0\n')
    with endpoint(flavour, driver, tmp_path, script) as target:
        dead = "fork:/nonexistent/program" if driver == "fork" else \
            f"unix:{tmp_path}/nothing-here"

        def round_trip() -> None:
            assert flavour.run(target, ["ok"], input=b"x").status is Status.SUCCESS
            assert flavour.run(target, ["fail"], input=b"x").status is Status.FAILURE
            timed_out = flavour.run(target, ["slow"], input=b"x", timeout=0.05)
            assert timed_out.kind is ErrorKind.RUN_TIMEOUT, timed_out
            assert flavour.run(dead, connect_timeout=1).status is not Status.SUCCESS

        round_trip()
        time.sleep(0.3)  # the service's "slow" script has ended
        before = open_fds()
        for _ in range(2):
            round_trip()
        deadline = time.monotonic() + 3.0
        while len(after := open_fds()) > len(before) and time.monotonic() < deadline:
            time.sleep(0.05)
    extra = {fd: path for fd, path in after.items() if before.get(fd) != path}
    assert len(after) <= len(before), f"descriptors grew by {len(after) - len(before)}: {extra}"


@SOCKET_DRIVERS
def test_serving_start_stop_cycles(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """Starting and stopping a service repeatedly on the same address leaks nothing."""
    path = str(tmp_path / "sock")
    counts = []
    port = 0
    for _ in range(4):
        listener = UnixListener(path) if driver == "unix" else TcpListener("127.0.0.1", port)
        with flavour.serving([listener], "/bin/cat") as addresses:
            if driver == "tcp":
                address = addresses[0]
                assert isinstance(address, tuple)
                port = address[1]  # reuse the port: SO_REUSEADDR must be set
            result = flavour.run(target_of(addresses[0]), input=b"hello\n")
            assert result.status is Status.SUCCESS, result
        counts.append(len(open_fds()))
        if driver == "unix":
            assert not Path(path).exists()
    assert counts[1:] == counts[:-1], counts
