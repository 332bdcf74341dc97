"""Drive execproto from the interop tests: client flavours, the CLI, a probe script.

* :func:`run_client` runs one client call of a flavour (``blocking``,
  ``asyncio``, ``trio``) from synchronous code, under a time guard.
* :func:`cli` runs ``python -m execproto ...`` to completion (bounded);
  :class:`ServeProcess` runs ``execproto serve ...`` in the background and
  stops it with SIGTERM.
* :data:`PROBE_SOURCE` is a script for services: it records argv,
  environment and stdin into a JSON file and answers according to its first
  client argument; behind TCP it speaks dot framing.
* :func:`dot_transform` is the documented effect of dot framing on data
  (PROTOCOL.md 5.4), written independently of execproto's codec.
* :class:`RecordingService` listens where a Dovecot client connects and
  keeps the raw bytes of each request (no ``script`` service, no script):
  what a client sends, byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, NoReturn

import pytest
import trio

from execproto.adapters import RunResult

from .dovecot import write_script

__all__ = [
    "CLI",
    "FLAVOURS",
    "PROBE_SOURCE",
    "RUN_LIMIT",
    "GuardTimeout",
    "RecordingService",
    "ServeProcess",
    "child_processes",
    "cli",
    "dot_transform",
    "free_port",
    "guard",
    "load_flavour",
    "read_records",
    "run_client",
    "unavailable",
    "wait_records",
    "write_probe",
]

FLAVOURS = ("blocking", "asyncio", "trio")
"""The client/service flavours, in the order tests are parametrized."""

RUN_LIMIT = 30.0
"""Upper bound in seconds for any single client call, CLI call or wait."""

CLI = (sys.executable, "-m", "execproto")
"""The command line that runs execproto's CLI."""


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it when the environment variable ``CI`` is set."""
    if "CI" in os.environ:
        pytest.fail(f"interop test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


class GuardTimeout(BaseException):
    """A bounded wait expired: the code under test hangs.

    A BaseException, so that ``except Exception`` in that code cannot hide it.
    """


@contextlib.contextmanager
def guard(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`GuardTimeout` in the main thread after ``seconds``.

    Uses SIGALRM through ``setitimer``, which also ends a blocking ``poll``.
    """

    def expired(signum: int, frame: FrameType | None) -> None:
        raise GuardTimeout(f"{what} did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@functools.cache
def _import(name: str) -> ModuleType | str:
    try:
        module = importlib.import_module(f"execproto.adapters.{name}")
    except Exception as exc:  # a module being written may raise anything
        return f"execproto.adapters.{name} does not import: {type(exc).__name__}: {exc}"
    missing = [n for n in ("run", "serve") if not hasattr(module, n)]
    if missing:
        return f"execproto.adapters.{name} has no {', '.join(missing)}"
    return module


def load_flavour(name: str) -> ModuleType:
    """Return ``execproto.adapters.<name>``; skip (fail under CI) if unusable."""
    loaded = _import(name)
    if isinstance(loaded, str):
        unavailable(loaded)
    return loaded


def run_client(
    flavour: str, target: str, args: Sequence[str] = (), *, limit: float = RUN_LIMIT,
    **kwargs: Any,
) -> RunResult:
    """Call ``run(target, args, **kwargs)`` of a flavour; fail after ``limit`` s.

    ``timeout`` and ``connect_timeout`` default to ``limit`` too, so the
    client gives up on its own before the guard fires.
    """
    module = load_flavour(flavour)
    kwargs.setdefault("timeout", limit)
    kwargs.setdefault("connect_timeout", limit)
    with guard(limit + 5, f"{flavour} run({target})"):
        if flavour == "blocking":
            result = module.run(target, list(args), **kwargs)
        elif flavour == "asyncio":
            result = asyncio.run(module.run(target, list(args), **kwargs))
        else:
            result = trio.run(functools.partial(module.run, target, list(args), **kwargs))
    assert isinstance(result, RunResult), result
    return result


def child_processes() -> dict[int, str]:
    """This process's children and their states (``Z``: a zombie), from /proc."""
    me = os.getpid()
    found: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the parenthesised command: state ppid ...
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the process is gone
        if int(fields[1]) == me:
            found[int(stat.parent.name)] = fields[0]
    return found


# --- the command line ----------------------------------------------------------


def cli(
    *args: str,
    input: bytes = b"",
    env: dict[str, str] | None = None,
    timeout: float = RUN_LIMIT,
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[bytes]:
    """Run ``execproto ARGS...`` to completion; stdout and stderr are captured."""
    return subprocess.run(
        [*CLI, *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env=env,
        pass_fds=pass_fds,
        check=False,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    ``execproto serve --tcp 127.0.0.1:0`` is refused ("invalid port"), so
    tests pick a port themselves.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


_LISTENING = re.compile(r"listening on (.*)$", re.MULTILINE)


class ServeProcess:
    """``execproto serve ARGS...`` as a background process.

    :meth:`start` waits until the service logged ``listening on ...`` and
    parses the addresses from that line; :meth:`stop` sends SIGTERM and
    returns the exit status (SIGKILL after a bounded wait, and the test
    fails). The process is always reaped. stderr (the service's log) goes to
    a file, readable with :meth:`log`.

    Args:
        args: the arguments after ``serve``.
        log_path: where the service's stderr goes.
        command: the full command instead of ``execproto serve ARGS`` (for a
            launcher); ``args`` is then ignored.
        pass_fds: descriptors the process inherits (socket activation).
        env: the environment (default: inherited).
    """

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        *,
        command: Sequence[str] | None = None,
        pass_fds: Sequence[int] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = list(command) if command is not None else [*CLI, "serve", *args]
        self.log_path = log_path
        self.pass_fds = tuple(pass_fds)
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.addresses: list[str] = []

    def log(self) -> str:
        """The service's stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = RUN_LIMIT) -> ServeProcess:
        """Start the process and wait until it listens.

        Raises:
            AssertionError: it exited or did not listen within ``timeout``.
        """
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=self.pass_fds,
                env=self.env,
            )
        deadline = time.monotonic() + timeout
        while not (found := _LISTENING.search(self.log())):
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"serve did not listen within {timeout} s:\n{self.log()}")
            time.sleep(0.02)
        self.addresses = [a.strip() for a in found.group(1).split(",")]
        return self

    def stop(self, timeout: float = RUN_LIMIT) -> int:
        """SIGTERM, wait, reap; return the exit status.

        Raises:
            AssertionError: the process did not exit within ``timeout``
                (it is killed and reaped first).
        """
        process = self.process
        assert process is not None, "not started"
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"serve ignored SIGTERM for {timeout} s:\n{self.log()}") from None
        return process.returncode

    def kill(self) -> None:
        """SIGKILL and reap, if still running."""
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(RUN_LIMIT)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.stop()
            finally:
                self.kill()


# --- the probe script ----------------------------------------------------------

PROBE_SOURCE = '''\
#!{python}
"""Probe for interop tests: usage probe RECORD_DIR FRAMING ACTION [ARGS...].

FRAMING is "raw" (unix), "dot" (tcp: stdin is decoded, output encoded) or
"auto" (dot when stdin is a TCP socket).
Writes RECORD_DIR/ACTION-PID.json (argv, env, and stdin: its SHA-256, and
the text as latin-1 when shorter than 64 KiB), then answers. ACTION "early"
answers "early" and exits 0 without reading stdin (the record has no stdin),
"gone" does the same but writes nothing at all (not even a dot line); the
others read stdin to EOF first and answer: "echo" the payload, "fail" a
line and exit 3, "filter" the payload after an "X-Filtered: ARGS" header
line, "exec" a TAB-separated word pair, "silent" nothing at all (not even a
dot line), anything else "recorded". Write errors (a client that does not
read) are ignored.
"""
import hashlib
import json
import os
import sys

sys.path[:0] = {path!r}
record_dir, framing, action = sys.argv[1:4]
if framing == "auto":
    import socket
    try:
        family = socket.socket(fileno=os.dup(0)).family
    except OSError:  # not a socket (the fork driver's pipe)
        family = socket.AF_UNIX
    framing = "raw" if family == socket.AF_UNIX else "dot"
if framing == "dot":
    from execproto import DotDecoder, DotEncoder


def send(data):
    if framing == "dot":
        encoder = DotEncoder()
        data = encoder.encode(data) + encoder.finish()
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(1, view):]
    except OSError:
        pass


def write_record(data):
    # /proc: Python itself adds LC_CTYPE to os.environ in the C locale.
    with open("/proc/self/environ", "rb") as f:
        entries = [e.partition(b"=") for e in f.read().split(b"\\0") if e]
    record = {{
        "argv": [os.fsencode(a).decode("latin-1") for a in sys.argv],
        "env": {{k.decode("latin-1"): v.decode("latin-1") for k, _, v in entries}},
        "stdin": data.decode("latin-1") if data is not None and len(data) < 65536 else None,
        "stdin_sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
    }}
    path = os.path.join(record_dir, "%s-%d.json" % (action, os.getpid()))
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


if action in ("early", "gone"):
    if action == "early":
        send(b"early\\n")
    write_record(None)
    sys.exit(0)
received = bytearray()
while chunk := os.read(0, 1 << 20):
    received += chunk
data = bytes(received)
if framing == "dot":
    decoder = DotDecoder()
    data = decoder.decode(data)
    decoder.finish()
write_record(data)
if action == "echo":
    send(data)
elif action == "exec":
    send(b"exec\\toutput")
elif action == "filter":
    send(b"X-Filtered: " + " ".join(sys.argv[4:]).encode() + b"\\r\\n" + data)
elif action == "silent":
    pass
elif action == "fail":
    send(b"failing\\n")
    sys.exit(3)
else:
    send(b"recorded\\n")
'''
"""Source of the probe script; format with ``python`` and ``path`` (a list
of directories to import from first)."""


def write_probe(path: Path, python: str = sys.executable, import_from: Path | None = None) -> Path:
    """Write the probe script (absolute shebang: scripts run without PATH).

    ``python`` runs it; ``import_from`` is a directory that holds the
    ``execproto`` package when ``python`` cannot import it otherwise.
    """
    extra = [] if import_from is None else [str(import_from)]
    return write_script(path, PROBE_SOURCE.format(python=python, path=extra))


def read_records(directory: Path, pattern: str = "*.json") -> list[dict[str, Any]]:
    """Return the records in ``directory`` (sorted by name)."""
    return [json.loads(p.read_text()) for p in sorted(directory.glob(pattern))]


def wait_records(
    directory: Path, count: int = 1, pattern: str = "*.json", timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Wait (bounded) until ``directory`` has ``count`` records; return them.

    Raises:
        AssertionError: fewer records within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while len(found := sorted(directory.glob(pattern))) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} of {count} records in {directory}")
        time.sleep(0.02)
    return [json.loads(p.read_text()) for p in found]


# --- dot framing -------------------------------------------------------------------


def dot_transform(data: bytes) -> bytes:
    """What dot-encoding ``data`` and decoding it again gives (PROTOCOL.md 5.2-5.4).

    Written from the documented rules, not with execproto's codec: a bare CR
    before a dot gains an LF (the CVE-2026-33604 fix), every bare LF becomes
    CRLF, and the line break before the end marker is trimmed.
    """
    data = re.sub(rb"\r(?=\.)", b"\r\n", data)
    data = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    return data.removesuffix(b"\r\n")


# --- a recording service -------------------------------------------------------------


class RecordingService:
    """A unix (or tcp) listener that records the raw bytes of every request.

    Each connection is read to EOF (a noreply client closes, a reply-mode
    client half-closes), its bytes appended to :attr:`requests`, then
    ``reply`` is sent (``None``: the connection is just closed) and the
    connection closed. A unix socket is made mode 0666 (Dovecot's clients
    connect as the mail user). Use it as a context manager; :meth:`wait`
    bounds every wait.

    Args:
        path: the unix socket to listen on; ``None`` for tcp on 127.0.0.1.
        reply: what to answer after the request, e.g. ``b"+\\n"``.
        header_only: stop reading at the end of the header (the first empty
            line) instead of at EOF: for a client that never half-closes
            (2.3's welcome plugin) and sends no payload.
        delay: seconds to wait before replying (a slow script).
    """

    def __init__(self, path: Path | None, reply: bytes | None = b"+\n", *,
                 header_only: bool = False, delay: float = 0.0) -> None:
        if path is None:
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.port: int = self.listener.getsockname()[1]
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self.listener = socket.socket(socket.AF_UNIX)
            self.listener.bind(str(path))
            path.chmod(0o666)
            self.listener.listen(16)
        self.path = path
        self.listener.settimeout(0.1)
        self.reply = reply
        self.header_only = header_only
        self.delay = delay
        self.requests: list[bytes] = []
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            data = b""
            with connection:
                connection.settimeout(RUN_LIMIT)
                with contextlib.suppress(OSError):
                    while chunk := connection.recv(65536):
                        data += chunk
                        if self.header_only and b"\n\n" in data:
                            break
                    if self.delay:
                        self._stop.wait(self.delay)
                    if self.reply is not None:
                        connection.sendall(self.reply)
            with self.changed:
                self.requests.append(data)
                self.changed.notify_all()

    def wait(self, count: int = 1, timeout: float = RUN_LIMIT) -> list[bytes]:
        """The first ``count`` requests, once they are complete (bounded).

        Raises:
            AssertionError: fewer requests within ``timeout`` seconds.
        """
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.requests) >= count, timeout):
                raise AssertionError(f"{len(self.requests)} of {count} requests recorded")
            return list(self.requests[:count])

    def close(self) -> None:
        """Stop listening (bounded); removes the socket file."""
        self._stop.set()
        self._thread.join(RUN_LIMIT)
        self.listener.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> RecordingService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
