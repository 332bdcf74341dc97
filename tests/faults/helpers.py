"""Small tools for the fault tests: timing, pid files, black-holed addresses, a fake resolver."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ..adapters.flavours import GuardTimeout

__all__ = [
    "Clock",
    "black_hole",
    "fake_resolver",
    "is_refused",
    "note",
    "read_pid",
    "reaped_within",
    "say",
    "timed",
]


class Clock:
    """Seconds measured by :func:`timed` (``seconds`` is set when the block ends)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seconds = 0.0


@contextlib.contextmanager
def timed() -> Iterator[Clock]:
    """Measure the block: ``with timed() as clock: ...; clock.seconds``."""
    clock = Clock()
    try:
        yield clock
    finally:
        clock.seconds = time.monotonic() - clock.started


def note(what: str) -> None:
    """Print one outcome line (shown with ``pytest -s``; the report collects them)."""
    print(f"\nFAULT {what}")


def say(driver: str, text: str) -> str:
    """A shell command writing one line of output the way the driver needs it.

    Over tcp a script's output must be dot-framed: the client then gets the
    line without its line break.
    """
    if driver == "tcp":
        return f"printf '{text}\\r\\n.\\r\\n'\n"
    return f"printf '{text}\\n'\n"


def read_pid(path: Path, timeout: float = 10.0) -> int:
    """Wait (bounded) for a script to write its pid into *path*."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text())
        if time.monotonic() > deadline:
            raise GuardTimeout(f"no pid in {path} within {timeout} s")
        time.sleep(0.01)


def reaped_within(pid: int, timeout: float) -> float | None:
    """Seconds until process *pid* is gone and reaped, or None if it is not after *timeout*."""
    started = time.monotonic()
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.01)
    return time.monotonic() - started


def is_refused(host: str, port: int) -> bool:
    """True if a tcp connect to (host, port) is refused at once."""
    with socket.socket() as probe:
        probe.settimeout(2.0)
        try:
            probe.connect((host, port))
        except OSError as exc:
            return exc.errno == errno.ECONNREFUSED
    return False


@contextlib.contextmanager
def black_hole(host: str, port: int) -> Iterator[None]:
    """A tcp address whose SYNs go unanswered: a listener with a full backlog.

    ``listen(0)`` leaves room for one pending connection; once it is taken
    the kernel drops further SYNs, so a connect neither succeeds nor fails
    until the client gives up.
    """
    fillers: list[socket.socket] = []
    with socket.socket() as listener:
        listener.bind((host, port))
        listener.listen(0)
        try:
            for _ in range(8):
                filler = socket.socket()
                fillers.append(filler)
                filler.settimeout(0.2)
                try:
                    filler.connect((host, port))
                except TimeoutError:
                    break
            else:
                pytest.fail(f"could not fill the listen backlog of {host}:{port}")
            yield
        finally:
            for filler in fillers:
                filler.close()


@contextlib.contextmanager
def fake_resolver(monkeypatch: pytest.MonkeyPatch, name: str,
                  addresses: Sequence[str]) -> Iterator[None]:
    """Make *name* resolve to *addresses*, in this order, in this process.

    ``socket.getaddrinfo`` is replaced: every flavour's client calls it (the
    blocking one directly, asyncio in the loop's executor, trio in a worker
    thread after a numeric-only attempt), so all of them see the fake.
    """
    real = socket.getaddrinfo
    wanted = {name, name.encode()}

    def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
                    flags: int = 0) -> Any:
        if host not in wanted:
            return real(host, port, family, type, proto, flags)
        if flags & socket.AI_NUMERICHOST:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, int(port)))
                for ip in addresses]

    with monkeypatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", getaddrinfo)
        yield
