"""A transparent tap between Dovecot and its script service: ``execproto trace``.

The tap listens where Dovecot connects, connects to the real service for
each client and copies both directions byte for byte, while a pure
:class:`execproto.ExchangeObserver` looks at a copy of each chunk.  When a
connection ends it emits one :class:`TraceRecord`: who connected, the
header (args, env lines and which the service's ``-e`` list keeps), the
payload's size and SHA-256, the output's size, the result code, the
duration, and what went wrong, if anything.

It adds no behaviour of its own: a header it cannot decode is forwarded
unchanged (the real service decides), nothing is answered in the service's
place, and a half-close on one side becomes a half-close on the other.  A
reset becomes a close of the other side (once what was already read has
been forwarded); a client whose service cannot be reached sees a close.

Theory of operation
-------------------
The copying is a procedure in the style of ``_procedures.py`` (a generator
that yields :class:`~._procedures.Wait` when neither direction can move),
run here by the blocking flavour: one worker thread per connection, at most
``max_connections`` of them, further clients waiting in the listen backlog.
Each direction holds at most one chunk read but not yet written, and is not
read again before that chunk has gone: a side is read only as fast as the
other side accepts (backpressure), so memory per connection is bounded by
two chunks plus the observer's header limit.  A connection on which nothing
moves for ``idle_timeout`` seconds is closed.

Why a thread per connection: copying two sockets is one ``poll()`` loop per
connection, with nothing to share between connections, and a tap sees few
clients at once.  The procedure itself waits only through ``Wait``
requests, so the asyncio or trio driver, or the blocking service's
``epoll`` loop, could run it too.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from execproto import (
    DEFAULT_MAX_HEADER_BYTES,
    BytesLike,
    ExchangeObserver,
    ExchangeSummary,
    TcpTarget,
    UnixTarget,
)

from . import _procedures as proc
from ._common import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_GRACE,
    DEFAULT_MAX_CONNECTIONS,
    Listener,
    StopSignal,
    bind_listener,
    describe_connect_error,
    listener_address,
    peer_label,
)
from .blocking import _drive

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "Peer",
    "RecordWriter",
    "Tap",
    "TraceConfig",
    "TraceRecord",
    "escape",
    "record_json",
    "record_text",
]

#: Seconds a connection may stay without any byte moving before the tap closes it.
DEFAULT_IDLE_TIMEOUT = 300.0
#: Bytes read from one side at a time (and the most held per direction).
TAP_CHUNK = 64 * 1024
#: Seconds the tap reads what a client still sends when its service is unreachable.
DRAIN_FOR = 1.0

log = logging.getLogger("execproto.trace")


@dataclass
class TraceConfig:
    """The settings of a :class:`Tap`.

    Fields:
        upstream: the real service (a unix socket or a tcp address).
        emit: called with each :class:`TraceRecord` (from worker threads,
            one call at a time).
        env_allowlist: the real service's ``-e`` names, to show which env
            lines it keeps; None when not given.
        keep: how many leading payload bytes to show (0: none).
        max_connections: connections forwarded at once; others wait in the backlog.
        idle_timeout: seconds without any byte moving before a connection is
            closed (None: never).
        connect_timeout: seconds to reach the upstream.
        grace: on stop, seconds open connections get to finish.
        max_header_bytes: decode headers up to this size (longer ones are
            still forwarded, and reported as not decoded).
    """

    upstream: UnixTarget | TcpTarget
    emit: Callable[[TraceRecord], object]
    env_allowlist: tuple[BytesLike, ...] | None = None
    keep: int = 0
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    grace: float = DEFAULT_GRACE
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.keep < 0:
            raise ValueError("keep must not be negative")


@dataclass(frozen=True)
class Peer:
    """Who connected: an address, and for a unix client its process.

    Fields:
        label: ``127.0.0.1:40312``, or ``doveadm[4242] uid=65534`` (unix).
        pid: the client's process id (unix, ``SO_PEERCRED``), else None.
        uid: its user id, else None.
        gid: its group id, else None.
        command: its command name (``/proc/PID/comm``) if still readable, else None.
    """

    label: str
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    command: str | None = None


def identify(sock: socket.socket, listener: str | tuple[str, int], address: object) -> Peer:
    """Name the client of an accepted connection (its process, over unix)."""
    if sock.family != socket.AF_UNIX:
        return Peer(peer_label(listener, address))
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:
        return Peer(peer_label(listener, address))
    try:
        command: str | None = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        command = None
    return Peer(f"{command or 'pid'}[{pid}] uid={uid}", pid, uid, gid, command)


@dataclass(frozen=True)
class TraceRecord:
    """What the tap saw of one connection.

    Fields:
        started: when the client was accepted (seconds since the epoch).
        client: who connected.
        upstream: the real service's label (``unix:PATH``, ``tcp:HOST:PORT``).
        duration: seconds from accept to the last close.
        summary: what went over the wire, from the observer.
        result: ``+``, ``-``, ``noreply``, ``none`` (the service sent
            nothing), ``bad`` (no valid result code), ``bad-header`` (the
            header could not be decoded) or ``upstream-down``.
        detail: why, for ``none``, ``bad``, ``bad-header`` and ``upstream-down``.
        notes: what else happened on the way (resets, a side gone, an idle
            timeout, a stop, a dot stream without its end line).
        dot: the exchange uses dot framing (a tcp client).
    """

    started: float
    client: Peer
    upstream: str
    duration: float
    summary: ExchangeSummary
    result: str
    detail: str = ""
    notes: tuple[str, ...] = ()
    dot: bool = False


# --- escaping and formatting ----------------------------------------------------

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\\": "\\\\"}


def escape(data: bytes, quote: str = "") -> str:
    """Render bytes as one printable line: UTF-8 text as is, the rest escaped.

    ``\\t``, ``\\n``, ``\\r`` and ``\\\\`` for those bytes, ``\\xNN`` for other
    control bytes and bytes that are not UTF-8, and a backslash before
    *quote* (a character to quote with).
    """
    out = []
    for ch in data.decode("utf-8", "surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch in _NAMED:
            out.append(_NAMED[ch])
        elif ch == quote:
            out.append("\\" + ch)
        elif not ch.isprintable():
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _time(started: float) -> str:
    moment = datetime.datetime.fromtimestamp(started, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record_json(record: TraceRecord, *, show_payload: bool = False) -> dict[str, Any]:
    """The record as a JSON object (bytes escaped as by :func:`escape`)."""
    s = record.summary
    header = s.header
    obj: dict[str, Any] = {
        "time": _time(record.started),
        "client": record.client.label,
        "client_pid": record.client.pid,
        "client_uid": record.client.uid,
        "client_command": record.client.command,
        "upstream": record.upstream,
        "duration": round(record.duration, 6),
        "version": None if header is None else f"4.{header.version_minor}",
        "noreply": None if header is None else header.noreply,
        "alarm": None if header is None else header.alarm,
        "args": None if header is None else [escape(a) for a in header.args],
        "env": [{"name": escape(e.name), "value": escape(e.value), "status": e.status,
                 "escaped": e.escaped} for e in s.env],
        "request_bytes": s.request_bytes,
        "header_bytes": None if header is None else header.header_size,
        "payload_bytes": s.payload_bytes,
        "payload_sha256": s.payload_sha256,
        "output_bytes": s.output_bytes,
        "reply_bytes": s.reply_bytes,
        "result": record.result,
        "detail": record.detail,
        "notes": list(record.notes),
    }
    if show_payload:
        obj["payload_head"] = escape(s.payload_head if header is not None else s.request_head)
    if record.dot:
        obj["payload_dot_end"] = s.payload_dot_end
        obj["output_dot_end"] = s.output_dot_end
    return obj


def record_text(record: TraceRecord, *, show_payload: bool = False) -> str:
    """The record as one line of text."""
    s = record.summary
    header = s.header
    parts = [_time(record.started), record.client.label, "->", record.upstream,
             f"{record.duration:.3f}s"]
    if header is not None:
        parts.append(f"v4.{header.version_minor}")
        parts.append("noreply" if header.noreply else "reply")
        if header.alarm is not None:
            parts.append(f"alarm={header.alarm}")
        parts.append("args=[" + " ".join(f'"{escape(a, chr(34))}"' for a in header.args) + "]")
        env = []
        for entry in s.env:
            text = f'{escape(entry.name, chr(34))}="{escape(entry.value, chr(34))}"'
            fate = [entry.status] if entry.status is not None else []
            fate += ["escaped"] if entry.escaped else []
            env.append(f"{text}({','.join(fate)})" if fate else text)
        parts.append("env=[" + " ".join(env) + "]")
        payload = f"payload={s.payload_bytes}B sha256={s.payload_sha256[:16]}"
        if record.dot and s.payload_dot_end is not None:
            payload += "" if s.payload_dot_end else "(no-dot-end)"
        parts.append(payload)
        if show_payload:
            parts.append(f'head="{escape(s.payload_head, chr(34))}"')
    else:
        parts.append(f"request={s.request_bytes}B")
        if show_payload:
            parts.append(f'head="{escape(s.request_head, chr(34))}"')
    parts.append(f"output={s.output_bytes}B")
    parts.append(f"result={record.result}")
    if record.detail:
        parts.append(f'detail="{escape(record.detail.encode(), chr(34))}"')
    if record.notes:
        parts.append(f'notes="{escape("; ".join(record.notes).encode(), chr(34))}"')
    return " ".join(parts)


class RecordWriter:
    """Writes records to a text stream, one line each, flushed (thread-safe).

    A stream that fails (a closed pipe) is reported once on the log and the
    tap goes on forwarding: tracing must never stop mail.
    """

    def __init__(self, stream: TextIO, *, as_json: bool = False,
                 show_payload: bool = False) -> None:
        self._stream = stream
        self._json = as_json
        self._show = show_payload
        self._lock = threading.Lock()
        self._broken = False

    def __call__(self, record: TraceRecord) -> None:
        """Write one record."""
        if self._json:
            line = json.dumps(record_json(record, show_payload=self._show), ensure_ascii=False)
        else:
            line = record_text(record, show_payload=self._show)
        with self._lock:
            if self._broken:
                return
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError) as exc:
                self._broken = True
                log.error("cannot write trace records any more (%s); still forwarding", exc)


# --- the copying procedure ------------------------------------------------------


class _Flow:
    """One direction: bytes read from *src*, seen by *observe*, written to *dst*."""

    __slots__ = ("dead", "dst", "dst_name", "ended", "observe", "pending", "reset", "shut",
                 "src", "src_name")

    def __init__(self, src: socket.socket, dst: socket.socket, observe: Callable[[bytes], None],
                 src_name: str, dst_name: str) -> None:
        self.src, self.dst, self.observe = src, dst, observe
        self.src_name, self.dst_name = src_name, dst_name
        self.pending = memoryview(b"")  # read, not yet written
        self.ended = False  # src gave EOF or a reset; observe(b"") was called
        self.reset = False
        self.shut = False  # the end was passed on to dst
        self.dead = False  # dst takes no more: nothing moves this way any more

    @property
    def done(self) -> bool:
        return self.dead or (self.ended and self.shut)

    @property
    def wants_read(self) -> bool:
        return not (self.dead or self.ended or self.pending)


def _step(flow: _Flow, other: _Flow, notes: list[str]) -> bool:
    """Move *flow* on without waiting; True if anything happened."""
    if flow.dead:
        return False
    moved = False
    if flow.pending:
        try:
            flow.pending = flow.pending[flow.dst.send(flow.pending):]
            moved = True
        except BlockingIOError:
            pass
        except OSError as exc:
            # The peer of dst is gone (EPIPE, ECONNRESET): stop this way, and
            # stop reading src; the other way may still have bytes to carry.
            notes.append(f"{flow.dst_name} gone ({exc.strerror}): {len(flow.pending)} bytes "
                         f"from the {flow.src_name} not forwarded")
            flow.pending = memoryview(b"")
            flow.dead = True
            return True
    if flow.wants_read:
        try:
            data: bytes | None = flow.src.recv(TAP_CHUNK)
        except BlockingIOError:
            data = None
        except OSError as exc:
            if exc.errno == errno.ECONNRESET:
                notes.append(f"{flow.src_name} reset the connection")
            else:
                notes.append(f"reading from the {flow.src_name} failed: {exc.strerror}")
            flow.ended = flow.reset = True
            flow.observe(b"")
            data = None
            moved = True
        if data is not None:
            moved = True
            flow.observe(data)  # before forwarding: the header is decoded first
            if data:
                flow.pending = memoryview(data)
                with contextlib.suppress(BlockingIOError, OSError):
                    # Most chunks go at once; an error shows on the next step.
                    flow.pending = flow.pending[flow.dst.send(flow.pending):]
            else:
                flow.ended = True
    if flow.ended and not flow.pending and not flow.shut:
        flow.shut = moved = True
        if flow.reset:
            # A reset is passed on as a close: nothing more goes either way.
            with contextlib.suppress(OSError):
                flow.dst.shutdown(socket.SHUT_RDWR)
            other.dead = True
            other.pending = memoryview(b"")
        else:
            with contextlib.suppress(OSError):  # ENOTCONN: the peer is gone already
                flow.dst.shutdown(socket.SHUT_WR)
    return moved


def pump(client: socket.socket, upstream: socket.socket, observer: ExchangeObserver,
         idle_timeout: float | None, notes: list[str]) -> proc.Procedure[None]:
    """Copy both directions until both have ended (or nothing moves for *idle_timeout*).

    Both sockets must be non-blocking.  Each side is read only when the
    chunk read from it before has been written to the other side.
    """
    up = _Flow(client, upstream, observer.from_client, "client", "upstream")
    down = _Flow(upstream, client, observer.from_service, "upstream", "client")
    since = time.monotonic()
    while not (up.done and down.done):
        moved = _step(up, down, notes)
        moved = _step(down, up, notes) or moved
        if moved:
            if time.monotonic() - since >= proc.SLICE:
                yield proc.TURN
                since = time.monotonic()
            continue
        flows = (up, down)
        reads = tuple(f.src.fileno() for f in flows if f.wants_read)
        writes = tuple(f.dst.fileno() for f in flows if f.pending and not f.dead)
        if not reads and not writes:  # pragma: no cover (every state moves or waits)
            break
        if not (yield proc.Wait(read=reads, write=writes, timeout=idle_timeout)):
            notes.append(f"nothing moved for {idle_timeout:g} s: closed")
            return
        since = time.monotonic()


def drain(client: socket.socket, observer: ExchangeObserver,
          seconds: float) -> proc.Procedure[None]:
    """Close the client's way gently: half-close, then read (and observe) its request.

    Used when the service cannot be reached: the client sees a close rather
    than a reset, and the record still shows what it asked for.
    """
    deadline = time.monotonic() + seconds
    with contextlib.suppress(OSError):
        client.shutdown(socket.SHUT_WR)
    while True:
        try:
            data = client.recv(TAP_CHUNK)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0 or not (yield proc.Wait(read=(client.fileno(),), timeout=left)):
                return
            continue
        except OSError:
            data = b""
        observer.from_client(data)
        if not data:
            return


@dataclass(eq=False)
class _Connection:
    """One forwarded connection: its sockets (to cut them on a stop)."""

    client: socket.socket
    upstream: socket.socket | None = None
    stopped: bool = False

    def cancel(self) -> None:
        """End the forwarding at once: both sockets are shut down."""
        self.stopped = True
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def trace_connection(conn: _Connection, peer: Peer, config: TraceConfig,
                     dot: bool) -> proc.Procedure[TraceRecord]:
    """Forward one accepted client to the upstream and describe what passed."""
    started, t0 = time.time(), time.monotonic()
    observer = ExchangeObserver(dot=dot, env_allowlist=config.env_allowlist,
                                max_header_bytes=config.max_header_bytes, keep=config.keep)
    notes: list[str] = []
    label = config.upstream.label
    client = conn.client
    client.setblocking(False)
    down = ""
    try:
        upstream = yield from proc.connect(config.upstream, config.connect_timeout)
    except proc._ConnectTimeout:
        down = f"connect({label}) timed out after {config.connect_timeout:g} s"
    except OSError as exc:
        down = describe_connect_error(label, exc)[1]
    if down:
        yield from drain(client, observer, DRAIN_FOR)
        result, detail = "upstream-down", down
    else:
        conn.upstream = upstream
        if conn.stopped:  # the stop came while connecting: cut at once
            conn.cancel()
        try:
            yield from pump(client, upstream, observer, config.idle_timeout, notes)
        finally:
            upstream.close()
        result, detail = "", ""
    summary = observer.summary()
    if conn.stopped:
        notes.append("cut by the stop of the tap")
    if not result:
        if summary.header_error is not None:
            result, detail = "bad-header", summary.header_error
        else:
            result, detail = summary.result, summary.result_detail
            if dot and summary.payload_dot_end is False and summary.client_ended:
                notes.append("the payload's dot stream ends without '.' line")
            if summary.output_dot_end is False and summary.service_ended:
                notes.append("the output's dot stream ends without '.' line")
    return TraceRecord(started, peer, label, time.monotonic() - t0, summary, result, detail,
                       tuple(notes), dot)


# --- the tap --------------------------------------------------------------------


class Tap:
    """A tracing proxy: listen, forward each client to the upstream, emit records.

    Create it (which binds the listener), then call :meth:`serve_forever` in
    some thread and :meth:`stop` from another (or from a signal handler).
    Also a context manager that stops it on exit.

    Args:
        listener: where to listen (:class:`UnixListener`, :class:`TcpListener`
            or :class:`FdListener`); a tcp listener means dot-framed clients.
        config: the tap's settings.
    """

    def __init__(self, listener: Listener, config: TraceConfig) -> None:
        self.config = config
        sock, self._socket_file = bind_listener(listener)
        self._sock: socket.socket | None = sock
        sock.setblocking(False)
        #: The bound address: a unix path or ``(host, port)``.
        self.address = listener_address(sock, listener)
        #: Clients speak dot framing (they use Dovecot's tcp driver).
        self.dot = sock.family != socket.AF_UNIX
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._stop = StopSignal()
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._serving = False

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if not self._serving:
            self._close_listener()
            self._stop.close()

    def stop(self) -> None:
        """Stop accepting; :meth:`serve_forever` then winds down and returns."""
        self._stop.set()

    def serve_forever(self) -> None:
        """Forward connections until :meth:`stop`; then clean up.

        Open connections get ``config.grace`` seconds to finish, then they
        are cut.  The unix socket file is removed.
        """
        self._serving = True
        pool = ThreadPoolExecutor(self.config.max_connections, "execproto-trace")
        try:
            while not self._stop.is_set():
                if not self._slots.acquire(timeout=0.1):
                    continue
                accepted = self._accept()
                if accepted is None:
                    self._slots.release()
                    break
                pool.submit(self._handle, *accepted)
        finally:
            self._close_listener()
            with self._done:
                if not self._done.wait_for(lambda: not self._connections, self.config.grace):
                    for conn in list(self._connections):
                        conn.cancel()
            pool.shutdown()
            self._stop.close()

    def _accept(self) -> tuple[socket.socket, Peer] | None:
        assert self._sock is not None
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._stop.fd, select.POLLIN)
        while not self._stop.is_set():
            try:
                client, address = self._sock.accept()
            except (BlockingIOError, ConnectionAbortedError):
                poller.poll()
                continue
            except OSError as exc:  # EMFILE...: keep serving
                log.error("accept() failed: %s", exc)
                time.sleep(0.1)
                continue
            return client, identify(client, self.address, address)
        return None

    def _handle(self, client: socket.socket, peer: Peer) -> None:
        conn = _Connection(client)
        try:
            with self._lock:
                self._connections.add(conn)
            record = _drive(trace_connection(conn, peer, self.config, self.dot))
            try:
                self.config.emit(record)
            except Exception:  # tracing must never stop the forwarding
                log.exception("emitting a trace record failed")
        except Exception:
            log.exception("%s: unexpected error", peer.label)
        finally:
            client.close()
            with self._done:
                self._connections.discard(conn)
                self._done.notify_all()
            self._slots.release()

    def _close_listener(self) -> None:
        if self._socket_file is not None:
            self._socket_file.remove()
            self._socket_file = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

