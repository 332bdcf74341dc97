"""Raw-socket clients that misbehave, the scripts they talk to, and resource probes.

Everything speaks bytes on plain sockets (no execproto client code), so a
test controls exactly what reaches the service and when.  Every wait is
bounded; a wait that expires raises :class:`adapters.flavours.GuardTimeout`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.adapters.flavours import (
    Address,
    GuardTimeout,
    LogCapture,
    connect_raw,
    py_script,
    read_reply,
    sh_script,
)

__all__ = [
    "ALIVE_REPLY",
    "ALIVE_REQUEST",
    "PROMPT",
    "Served",
    "assert_alive",
    "assert_dropped",
    "exchange_raw",
    "header",
    "idle_flood",
    "introspect_script",
    "parse_introspection",
    "reset_close",
    "rss_kib",
    "send_slowly",
    "socket_count",
    "wait_closed",
    "worker_script",
]

#: A rejected header must be dropped this fast (the header timeout is longer,
#: so a drop within it was not the timeout).
PROMPT = 0.5


def header(*lines: bytes, version: bytes = b"VERSION\tscript\t4\t0") -> bytes:
    """A header: the version line, *lines*, then the blank line."""
    return b"".join(line + b"\n" for line in (version, *lines)) + b"\n"


#: A normal request to the worker script and the exact reply it gives.
ALIVE_REQUEST = header(b"-", b"ping") + b"hello"
ALIVE_REPLY = b"args:ping\nhello+\n"


@dataclass
class Served:
    """A running service as the hostile tests see it.

    Fields:
        flavour: the flavour's name.
        transport: ``unix`` or ``tcp``.
        address: where it listens.
        log: its log records.
        options: the serve() options it runs with.
    """

    flavour: str
    transport: str
    address: Address
    log: LogCapture
    options: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.flavour}/{self.transport}"

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """A raw connection (TCP_NODELAY on tcp, so single bytes leave at once)."""
        sock = connect_raw(self.address, timeout)
        if self.transport == "tcp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def log_mark(self) -> int:
        """The number of log records so far (see :meth:`warnings_since`)."""
        return len(self.log.records)

    def warnings_since(self, mark: int, timeout: float = 2.0) -> list[str]:
        """Wait (bounded) for a warning logged after *mark*; return those logged."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r.getMessage() for r in list(self.log.records)[mark:]
                     if r.levelname in ("WARNING", "ERROR")]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.01)


def reset_close(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0) instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def wait_closed(sock: socket.socket, timeout: float) -> tuple[bytes, str, float]:
    """Read until the service closes; return ``(data, "eof"|"reset", seconds)``."""
    started = time.monotonic()
    data, how = read_reply(sock, timeout)
    return data, how, time.monotonic() - started


def assert_dropped(served: Served, request: bytes, *, half_close: bool = False,
                   prompt: bool = True) -> str:
    """Send *request*; the service must close without replying (promptly).

    Returns:
        ``"eof"`` or ``"reset"``.
    """
    mark = served.log_mark()
    with served.connect() as sock:
        with contextlib.suppress(OSError):  # it may drop us while we send
            sock.sendall(request)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        limit = PROMPT if prompt else served.options["header_timeout"] + 2.0
        try:
            data, how, _ = wait_closed(sock, limit)
        except GuardTimeout:
            raise AssertionError(f"{served}: {request[:60]!r} not dropped within {limit} s "
                                 "(header timeout is "
                                 f"{served.options['header_timeout']} s)") from None
    assert data == b"", f"{served}: replied {data!r} to {request[:60]!r}"
    assert served.warnings_since(mark), f"{served}: no log line for {request[:60]!r}"
    return how


def exchange_raw(served: Served, request: bytes, timeout: float = 10.0) -> tuple[bytes, str]:
    """Send *request*, half-close, read the whole reply."""
    with served.connect() as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        return read_reply(sock, timeout)


def assert_alive(served: Served, within: float = 10.0) -> float:
    """A normal request gets exactly the right reply within *within* s; return the time."""
    started = time.monotonic()
    deadline = started + within
    last: object = None
    while time.monotonic() < deadline:
        try:
            reply = exchange_raw(served, ALIVE_REQUEST, max(deadline - time.monotonic(), 0.1))
        except (OSError, GuardTimeout) as exc:  # e.g. EAGAIN on a full unix backlog
            last = exc
            time.sleep(0.05)
            continue
        assert reply == (ALIVE_REPLY, "eof"), f"{served}: normal request got {reply!r}"
        return time.monotonic() - started
    raise AssertionError(f"{served}: no correct reply within {within} s (last: {last!r})")


# --- scripts -----------------------------------------------------------------


_WORKER = """\
case "$1" in
sleep) /bin/sleep "$2" ;;
big) /usr/bin/head -c "$2" /dev/zero ;;
exit) exit "$2" ;;
*) echo "args:$*"; /bin/cat ;;
esac
"""


def worker_script(directory: Path) -> str:
    """The general script: ``ping`` echoes args and stdin; ``sleep N``, ``big N``, ``exit N``."""
    return sh_script(directory, "worker", _WORKER)


_INTROSPECT = """\
import json, os, sys
me = f"/proc/{os.getpid()}/fd"
fds = {}
for name in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink(f"/proc/self/fd/{name}")
    except OSError:
        continue
    if target != me:  # the listing's own descriptor
        fds[name] = target
status = {}
with open("/proc/self/status") as f:
    for line in f:
        key, _, value = line.partition(":")
        status[key] = value.strip()
with open("/proc/self/environ", "rb") as f:
    environ = [e.decode("latin-1") for e in f.read().split(b"\\0") if e]
with open("/proc/self/cmdline", "rb") as f:
    cmdline = [a.decode("latin-1") for a in f.read().split(b"\\0")[:-1]]
stdin = os.read(0, 65536).decode("latin-1")
out = json.dumps({"fds": fds, "environ": environ, "argv": cmdline[2:],
                  "sigblk": status["SigBlk"], "sigign": status["SigIgn"],
                  "uid": status["Uid"], "stdin": stdin})
sys.stdout.write(out)
"""


def introspect_script(directory: Path) -> str:
    """A script that reports its fds, environment, argv, signal state and uid as JSON."""
    return py_script(directory, "introspect", _INTROSPECT)


def parse_introspection(reply: bytes) -> dict[str, Any]:
    """Split the introspection script's reply into its JSON and check the result code."""
    assert reply.endswith(b"+\n"), f"the introspection script failed: {reply[-300:]!r}"
    report: dict[str, Any] = json.loads(reply[:-2])
    return report


# --- resources -----------------------------------------------------------------


def socket_count() -> int:
    """Sockets this process has open (both the clients' and the service's)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                count += 1
    return count


def rss_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0])
    return values["VmRSS"], values["VmHWM"]


@contextlib.contextmanager
def idle_flood(served: Served, count: int) -> Iterator[tuple[list[socket.socket], int]]:
    """Open up to *count* connections that never send a byte; close them on exit.

    Connects are non-blocking: a full unix backlog refuses at once (EAGAIN),
    a full tcp backlog leaves the client in SYN_SENT.  Yields the sockets
    and how many connects were refused.
    """
    family = socket.AF_UNIX if served.transport == "unix" else socket.AF_INET
    socks: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex(served.address)
            if code in (0, errno.EINPROGRESS):
                socks.append(sock)
            else:
                refused += 1
                sock.close()
        yield socks, refused
    finally:
        for sock in socks:
            sock.close()


def send_slowly(sock: socket.socket, data: Sequence[int] | bytes, pause: float) -> None:
    """Send one byte at a time with *pause* seconds between them."""
    for byte in bytes(data):
        sock.sendall(bytes([byte]))
        time.sleep(pause)
