"""Helpers for the tap tests: a tap in a thread, a scripted upstream, a trace process."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from execproto import TcpTarget, UnixTarget
from execproto.adapters import Listener, TcpListener, UnixListener
from execproto.adapters.trace import Tap, TraceConfig, TraceRecord

LIMIT = 30.0
"""Upper bound in seconds of every wait in these tests."""


def address_of(tap: Tap) -> str:
    """The tap's address as a client target."""
    address = tap.address
    return f"unix:{address}" if isinstance(address, str) else f"tcp:{address[0]}:{address[1]}"


@contextlib.contextmanager
def running_tap(listener: Listener, upstream: UnixTarget | TcpTarget,
                **options: Any) -> Iterator[tuple[Tap, list[TraceRecord]]]:
    """A :class:`Tap` serving in a thread; its records are collected in a list."""
    records: list[TraceRecord] = []
    lock = threading.Lock()

    def emit(record: TraceRecord) -> None:
        with lock:
            records.append(record)

    tap = Tap(listener, TraceConfig(upstream=upstream, emit=emit, **options))
    thread = threading.Thread(target=tap.serve_forever, daemon=True)
    thread.start()
    try:
        yield tap, records
    finally:
        tap.stop()
        thread.join(LIMIT)
        assert not thread.is_alive(), "the tap did not stop"


def wait_for(predicate: Callable[[], object], what: str, timeout: float = LIMIT) -> None:
    """Poll *predicate* until true (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@dataclass
class Exchange:
    """What the scripted upstream saw of one connection."""

    received: bytes = b""
    count: int = 0
    eof: bool = False
    error: str = ""


@dataclass
class Upstream:
    """A scripted service: for each connection, read to EOF, then send *reply* and close.

    ``reply_early``: send the reply before reading (and still read to EOF).
    ``hold``: seconds to wait between the EOF and the reply.  ``store``: keep
    what was received (else only count it).  ``read_limit``: stop reading after
    that many bytes, answer and close with the rest unread (a reset: quirk Q8).
    """

    listener: Listener
    reply: bytes = b""
    reply_early: bool = False
    hold: float = 0.0
    store: bool = True
    read_limit: int | None = None
    exchanges: list[Exchange] = field(default_factory=list)
    active: int = 0
    most_active: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.listener, UnixListener):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.bind(self.listener.path)
        else:
            assert isinstance(self.listener, TcpListener)
            self.sock = socket.create_server((self.listener.host, self.listener.port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def target(self) -> UnixTarget | TcpTarget:
        """Where the tap forwards to."""
        if isinstance(self.listener, UnixListener):
            return UnixTarget(self.listener.path)
        host, port = self.sock.getsockname()[:2]
        return TcpTarget(host, port)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            exchange = Exchange()
            self.exchanges.append(exchange)
            thread = threading.Thread(target=self._handle, args=(conn, exchange), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket, exchange: Exchange) -> None:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            with conn:
                conn.settimeout(LIMIT)
                if self.reply_early:
                    conn.sendall(self.reply)
                kept = bytearray()
                while data := conn.recv(1 << 20):
                    exchange.count += len(data)
                    if self.store:
                        kept += data
                    if self.read_limit is not None and exchange.count >= self.read_limit:
                        break
                else:
                    exchange.eof = True
                exchange.received = bytes(kept)
                time.sleep(self.hold)
                if not self.reply_early:
                    conn.sendall(self.reply)
        except OSError as exc:
            exchange.error = str(exc)
        finally:
            with self._lock:
                self.active -= 1

    def close(self) -> None:
        """Stop accepting and wait for the handlers."""
        self._stop.set()
        self.thread.join(LIMIT)
        for thread in self._threads:
            thread.join(LIMIT)
        self.sock.close()

    def __enter__(self) -> Upstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(target: str) -> socket.socket:
    """A blocking client socket to ``unix:PATH`` or ``tcp:HOST:PORT``."""
    scheme, _, rest = target.partition(":")
    if scheme == "unix":
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(LIMIT)
        sock.connect(rest)
        return sock
    host, _, port = rest.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=LIMIT)


def exchange(target: str, request: bytes, *, close: bool = False) -> bytes:
    """Send *request*, half-close (or close), and read to EOF meanwhile; what came back."""
    with connect(target) as sock:
        if close:
            sock.sendall(request)
            return b""
        received: list[bytes] = []

        def read() -> None:
            while data := sock.recv(1 << 20):
                received.append(data)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        reader.join(LIMIT)
        assert not reader.is_alive(), "no EOF"
        return b"".join(received)


_LISTENING = re.compile(r"listening on (.*)$", re.MULTILINE)


class TraceProcess:
    """``execproto trace ARGS...`` as a subprocess: records on stdout, log on stderr."""

    def __init__(self, args: list[str], directory: Path, name: str = "trace") -> None:
        self.out = directory / f"{name}.out"
        self.err = directory / f"{name}.err"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "execproto", "trace", *args],
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        deadline = time.monotonic() + LIMIT
        while not (found := _LISTENING.search(self.log())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"trace did not start:\n{self.log()}")
            time.sleep(0.02)
        self.address = found.group(1).strip()

    def log(self) -> str:
        """stderr so far."""
        return self.err.read_text(errors="replace")

    def lines(self) -> list[str]:
        """The records written so far (stdout lines)."""
        return self.out.read_text().splitlines()

    def records(self) -> list[dict[str, Any]]:
        """The JSON records written so far."""
        return [json.loads(line) for line in self.lines()]

    def wait_records(self, count: int) -> list[dict[str, Any]]:
        """Wait (bounded) for *count* records."""
        wait_for(lambda: len(self.lines()) >= count, f"{count} trace records")
        return self.records()

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signal, wait (bounded), reap; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(LIMIT)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"trace ignored signal {signum}:\n{self.log()}") from None
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL and reap, if still running."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(LIMIT)

    def __enter__(self) -> TraceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()
