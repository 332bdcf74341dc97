"""Behaviours that once differed between the flavours, pinned in all three.

Each flavour used to carry its own copy of the service and client
procedures, and the copies drifted: an unbounded result-code write, three
stop plans, a child left behind when ``pidfd_open`` failed.  These
scenarios run against every flavour, unix and tcp, so the shared
procedures keep them equal.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from execproto import ErrorKind, Request, Status, encode_request
from execproto.adapters import TcpListener, UnixListener

from .flavours import (
    SOCKET_DRIVERS,
    Flavour,
    LogCapture,
    children,
    connect_raw,
    sh_script,
    target_of,
)

V = b"VERSION\tscript\t4\t0\n"

# "flood": fill the socket with output the client never reads, then exit 0;
# anything else: a quick, empty answer (a lone dot line: valid over tcp too).
_FLOOD = """\
if [ "$1" = flood ]; then
    timeout 1 cat /dev/zero
    exit 0
fi
printf '.\\r\\n'
"""
_EMPTY = (b".\r\n", b"")  # the empty answer over unix / over tcp


def _listener(driver: str, tmp_path: Path) -> UnixListener | TcpListener:
    return UnixListener(str(tmp_path / "sock")) if driver == "unix" else \
        TcpListener("127.0.0.1", 0)


@SOCKET_DRIVERS
def test_a_client_that_never_reads_does_not_keep_the_slot(
        flavour: Flavour, driver: str, tmp_path: Path) -> None:
    # The script fills the socket and exits; the result code cannot be
    # written while the client does not read.  That write is bounded by
    # header_timeout: then the slot is free for the next client.
    script = sh_script(tmp_path, "flood", _FLOOD)
    log = LogCapture()
    with flavour.serving([_listener(driver, tmp_path)], script, max_connections=1,
                         header_timeout=1.0, logger=log.logger) as addresses:
        target = target_of(addresses[0])
        with connect_raw(addresses[0]) as hog:
            hog.sendall(encode_request(Request(args=["flood"])))
            hog.shutdown(socket.SHUT_WR)
            time.sleep(0.2)  # the hog takes the only slot first
            began = time.monotonic()
            result = flavour.run(target, timeout=15)
            took = time.monotonic() - began
        assert result.status is Status.SUCCESS, result
        assert result.output in _EMPTY
        assert took < 8.0, f"served after {took:.1f} s"
    # Its handling ended (over unix the reply could not be written at all;
    # over tcp it fit, and the drain that follows is bounded the same way).
    assert any("args=[flood]" in line for line in log.messages()), log.messages()


@SOCKET_DRIVERS
def test_stop_does_not_wait_for_a_reader_that_never_reads(
        flavour: Flavour, driver: str, tmp_path: Path) -> None:
    script = sh_script(tmp_path, "flood", _FLOOD)
    began = None
    with connect_raw_later() as hogs, flavour.serving(
            [_listener(driver, tmp_path)], script, header_timeout=3.0) as addresses:
        for _ in range(2):
            hog = hogs(addresses[0])
            hog.sendall(encode_request(Request(args=["flood"])))
        time.sleep(1.5)  # the scripts have filled their sockets and exited
        began = time.monotonic()
    # serving() checks the stop itself (grace + kill timeout + its limit);
    # here it must not have waited for the clients to go away.
    assert began is not None
    assert time.monotonic() - began < 8.0


@SOCKET_DRIVERS
def test_stop_cancels_connections_still_reading_a_header(
        flavour: Flavour, driver: str, tmp_path: Path) -> None:
    script = sh_script(tmp_path, "ok", "exit 0\n")
    with connect_raw_later() as hogs:
        with flavour.serving([_listener(driver, tmp_path)], script,
                             header_timeout=60.0) as addresses:
            hog = hogs(addresses[0])
            hog.sendall(V + b"noreply\n")  # and never the rest
            time.sleep(0.3)
            began = time.monotonic()
        took = time.monotonic() - began
        assert took < 5.0, f"stop took {took:.1f} s with a header pending"
        hog.settimeout(5)
        assert hog.recv(10) == b""  # closed without a reply


@pytest.fixture
def fail_pidfd_open(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Make every pidfd_open fail (EMFILE), as with no descriptor left."""
    calls: list[int] = []

    def pidfd_open(pid: int, flags: int = 0) -> int:
        calls.append(pid)
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "pidfd_open", pidfd_open)
    yield calls


@SOCKET_DRIVERS
def test_service_reaps_the_script_when_pidfd_open_fails(
        flavour: Flavour, driver: str, tmp_path: Path, fail_pidfd_open: list[int]) -> None:
    script = sh_script(tmp_path, "sleepy", "exec sleep 30\n")
    log = LogCapture()
    with flavour.serving([_listener(driver, tmp_path)], script, logger=log.logger) as addresses:
        with connect_raw(addresses[0]) as sock:
            sock.sendall(encode_request(Request(args=[])))
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            # The script was killed unwaited for: a failure, as when it cannot start.
            assert sock.recv(10) == b"-\n"
        assert fail_pidfd_open, "the service never asked for a pidfd"
        deadline = time.monotonic() + 5
        while children() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not children(), "the script was left running or unreaped"
    assert any("Too many open files" in line for line in log.messages()), log.messages()


def test_fork_driver_reaps_the_child_when_pidfd_open_fails(
        flavour: Flavour, tmp_path: Path, fail_pidfd_open: list[int]) -> None:
    script = sh_script(tmp_path, "sleepy", "exec sleep 30\n")
    result = flavour.run(f"fork:{script}", timeout=10)
    assert fail_pidfd_open
    assert result.status is Status.INTERNAL_FAILURE, result
    assert result.kind is ErrorKind.OTHER
    assert "pidfd_open" in result.detail
    assert not children()


@SOCKET_DRIVERS
def test_sending_stops_once_the_result_has_arrived(
        flavour: Flavour, driver: str, tmp_path: Path) -> None:
    # The script answers without reading; the service drains what the
    # client sends.  An endless payload must not keep the run going.
    script = sh_script(tmp_path, "early", "printf '.\\r\\n'\n")

    def endless() -> Iterator[bytes]:
        while True:
            yield b"x" * 65536

    with flavour.serving([_listener(driver, tmp_path)], script) as addresses:
        began = time.monotonic()
        result = flavour.run(target_of(addresses[0]), input=endless(), timeout=20)
        took = time.monotonic() - began
    assert result.status is Status.SUCCESS, result
    assert result.output in _EMPTY
    assert took < 5.0, f"the run went on for {took:.1f} s after its result"


class _Hogs:
    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []

    def __call__(self, address: str | tuple[str, int]) -> socket.socket:
        sock = connect_raw(address)
        self.sockets.append(sock)
        return sock



@contextlib.contextmanager
def connect_raw_later() -> Iterator[_Hogs]:
    """Raw client sockets that outlive the service they connect to."""
    hogs = _Hogs()
    try:
        yield hogs
    finally:
        for sock in hogs.sockets:
            sock.close()
