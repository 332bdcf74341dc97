"""The adapter flavours as seen from synchronous test code, plus a small test kit.

A :class:`Flavour` wraps one of ``execproto.adapters.blocking``, ``.asyncio``
and ``.trio`` so that one synchronous test drives all three:

* :meth:`Flavour.run` runs one client call (blocking directly, asyncio under
  ``asyncio.run``, trio under ``trio.run``), always under a time guard;
* :meth:`Flavour.run_many` runs calls concurrently (threads, ``gather``, a nursery);
* :meth:`Flavour.run_cancelled` starts a run and cancels it the flavour's
  way (SIGALRM raising KeyboardInterrupt, ``task.cancel()``, a cancel scope);
* :meth:`Flavour.serving` runs the flavour's service in a background thread,
  yields the bound addresses and checks that it shuts down cleanly.

Flavours are looked up by name with :func:`get_flavour`; a module that does not
import yet makes the test skip, or fail when the environment variable ``CI``
is set.  Every wait here is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import importlib
import logging
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, NoReturn, TypeVar

import pytest
import trio

from execproto.adapters import (
    KILL_TIMEOUT,
    Listener,
    RunResult,
    TcpListener,
    UnixListener,
)

__all__ = [
    "ALL_DRIVERS",
    "FLAVOUR_NAMES",
    "RUN_LIMIT",
    "SOCKET_DRIVERS",
    "Address",
    "Cancellation",
    "Flavour",
    "GuardTimeout",
    "LogCapture",
    "children",
    "connect_raw",
    "dot_roundtrip",
    "endpoint",
    "exchange",
    "get_flavour",
    "guard",
    "open_fds",
    "py_script",
    "read_record",
    "read_reply",
    "recorder_script",
    "run_as_nobody",
    "sh_script",
    "target_of",
    "wait_for_file",
]

FLAVOUR_NAMES = ("blocking", "asyncio", "trio")
#: Parametrize a test over every driver / over the socket drivers only.
ALL_DRIVERS = pytest.mark.parametrize("driver", ["unix", "tcp", "fork"])
SOCKET_DRIVERS = pytest.mark.parametrize("driver", ["unix", "tcp"])

#: Upper bound for one client call made by a test (the test fails after it).
RUN_LIMIT = 30.0
#: Upper bound for a service to start listening.
START_LIMIT = 10.0
#: Tests stop services with running scripts; keep that short.
TEST_GRACE = 0.5

Address = str | tuple[str, int]


class GuardTimeout(BaseException):
    """A bounded wait of the test kit expired (the code under test hangs).

    A BaseException, so that an ``except Exception`` in the code under test
    cannot swallow it.
    """


# --- guards ------------------------------------------------------------------


def _dump_stacks() -> None:
    with contextlib.suppress(Exception):
        faulthandler.dump_traceback(file=2, all_threads=True)


@contextlib.contextmanager
def guard(seconds: float, what: str) -> Iterator[None]:
    """Interrupt the main thread with :class:`GuardTimeout` after *seconds*.

    The interrupt is a SIGUSR1 sent to the main thread itself, so it also ends
    a blocking ``poll()``/``select()``; all thread stacks are dumped first.
    Outside the main thread this does nothing (callers bound those waits).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    main = threading.main_thread().ident
    assert main is not None
    expired = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        if expired.is_set():
            raise GuardTimeout(f"{what} did not finish within {seconds} s")

    def fire() -> None:
        expired.set()
        _dump_stacks()
        signal.pthread_kill(main, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, previous)


# --- flavours ----------------------------------------------------------------


@dataclass
class Cancellation:
    """What :meth:`Flavour.run_cancelled` observed.

    Fields:
        cancelled: the run ended by the cancellation (not with a result).
        cleanup: seconds from the cancellation until the call returned.
        result: the RunResult if the run returned instead of being cancelled.
    """

    cancelled: bool
    cleanup: float
    result: RunResult | None = None


class _ServiceHandle:
    """A flavour's service running in a daemon thread."""

    expected_outcome = "cancelled"

    def __init__(self, module: ModuleType, listeners: Sequence[Listener], script: str,
                 script_args: tuple[str, ...], options: dict[str, Any]) -> None:
        self.module = module
        self.listeners = list(listeners)
        self.script = script
        self.script_args = script_args
        self.options = options
        self.addresses: list[Address] = []
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.outcome = "running"
        self.leftovers: list[str] = []
        self.thread = threading.Thread(target=self._main, daemon=True,
                                       name=f"service-{module.__name__}")

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        try:
            self.body()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()

    def body(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class _BlockingHandle(_ServiceHandle):
    expected_outcome = "returned"
    _service: Any = None

    def body(self) -> None:
        config = self.module.ServiceConfig(script=self.script, script_args=self.script_args,
                                           **self.options)
        service = self.module.Service(self.listeners, config)
        self._service = service
        self.addresses = list(service.addresses)
        self.ready.set()
        service.serve_forever()
        self.outcome = "returned"

    def stop(self) -> None:
        if self._service is not None:
            self._service.stop()


class _AsyncioHandle(_ServiceHandle):
    _loop: asyncio.AbstractEventLoop | None = None
    _task: asyncio.Task[Any] | None = None

    def body(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._loop.set_exception_handler(
            lambda _, context: self.leftovers.append(f"loop error: {context}"))

        def ready(addresses: Sequence[Address]) -> None:
            self.addresses = list(addresses)
            self.ready.set()

        try:
            await self.module.serve(self.listeners, self.script, self.script_args,
                                    ready=ready, **self.options)
        except asyncio.CancelledError:
            self.outcome = "cancelled"
        else:
            self.outcome = "returned"
        me = asyncio.current_task()
        self.leftovers += [repr(t) for t in asyncio.all_tasks() if t is not me]

    def stop(self) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(task.cancel)


def _only_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, trio.Cancelled):
        return True
    inner: Sequence[BaseException] = getattr(exc, "exceptions", ())  # MultiError, groups
    return bool(inner) and all(_only_cancelled(e) for e in inner)


class _TrioHandle(_ServiceHandle):
    _token: Any = None
    _scope: trio.CancelScope | None = None

    def body(self) -> None:
        trio.run(self._serve)

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()

        async def service(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await self.module.serve(self.listeners, self.script, self.script_args,
                                        task_status=task_status, **self.options)
            except BaseException as exc:
                if _only_cancelled(exc):
                    self.outcome = "cancelled"
                raise
            self.outcome = "returned"

        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                addresses = await nursery.start(service)
                self.addresses = list(addresses)
                self.ready.set()

    def stop(self) -> None:
        scope, token = self._scope, self._token
        if scope is not None and token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(scope.cancel, trio_token=token)


class Flavour:
    """One adapter flavour, driven from synchronous code.

    Args:
        name: ``blocking``, ``asyncio`` or ``trio``.
        module: the imported ``execproto.adapters.<name>``.
    """

    _handle_class: type[_ServiceHandle] = _ServiceHandle

    def __init__(self, name: str, module: ModuleType) -> None:
        self.name = name
        self.module = module

    def __repr__(self) -> str:
        return f"<Flavour {self.name}>"

    # client

    def run(self, target: str, args: Sequence[Any] = (), *, limit: float = RUN_LIMIT,
            **kwargs: Any) -> RunResult:
        """Call the flavour's ``run(target, args, **kwargs)``; fail after *limit* s."""
        raise NotImplementedError

    def run_many(self, calls: Sequence[tuple[str, Mapping[str, Any]]], *,
                 limit: float = RUN_LIMIT) -> list[RunResult]:
        """Run ``run(target, **kwargs)`` for every call at the same time."""
        raise NotImplementedError

    def run_cancelled(self, target: str, *, delay: float, stall_input: bool,
                      ready: Callable[[], bool] = lambda: True, limit: float = 10.0,
                      **kwargs: Any) -> Cancellation:
        """Start a run and cancel it *delay* seconds after ``ready()`` became true.

        ``ready`` is polled (at most :data:`START_LIMIT` seconds), so a slow
        start of the script does not turn the test into a different one.
        With *stall_input* the input is an iterable that yields ``b"x"`` and
        then blocks for 30 s, so the run is cancelled while sending.
        """
        raise NotImplementedError

    # service

    @contextlib.contextmanager
    def serving(self, listeners: Sequence[Listener], script: str,
                script_args: Sequence[str] = (), *, limit: float = START_LIMIT,
                check_socket_files: bool = True, **options: Any) -> Iterator[list[Address]]:
        """Run the flavour's service in a thread; yield its bound addresses.

        On exit the service is stopped (blocking: ``stop()``; asyncio: the
        task is cancelled; trio: its cancel scope is cancelled) and must end
        within grace + kill timeout + *limit* seconds, the way the design
        says (asyncio and trio re-raise the cancellation), having removed its
        unix socket files (unless *check_socket_files* is false: a test replaced
        them).  ``options`` are ``serve()``'s keyword arguments;
        ``grace`` defaults to 0.5 s here.
        """
        options.setdefault("grace", TEST_GRACE)
        handle = self._handle_class(self.module, listeners, script, tuple(script_args),
                                    options)
        handle.start()
        if not handle.ready.wait(limit):
            handle.stop()
            raise AssertionError(f"{self.name} service did not listen within {limit} s")
        if handle.error is not None or (not handle.thread.is_alive() and not handle.addresses):
            handle.thread.join(limit)
            raise AssertionError(f"{self.name} service failed to start") from handle.error
        try:
            yield list(handle.addresses)
        finally:
            # Raised while another exception propagates, this one shows
            # both (as its __context__).
            problems = self._stop(handle, limit, check_socket_files)
            if problems:
                raise AssertionError(f"{self.name} service did not stop cleanly: "
                                     + "; ".join(problems)) from handle.error

    def _stop(self, handle: _ServiceHandle, limit: float,
              check_socket_files: bool = True) -> list[str]:
        started = time.monotonic()
        handle.stop()
        budget = handle.options["grace"] + handle.options.get("kill_timeout", KILL_TIMEOUT)
        handle.thread.join(budget + limit)
        problems = []
        if handle.thread.is_alive():
            _dump_stacks()
            problems.append(f"still running {time.monotonic() - started:.1f} s after stop")
        elif handle.error is not None:
            problems.append(f"serve raised {handle.error!r}")
        elif handle.outcome != handle.expected_outcome:
            problems.append(f"serve {handle.outcome} instead of having "
                            f"{handle.expected_outcome}")
        if handle.leftovers:
            problems.append(f"left behind: {handle.leftovers}")
        for spec in handle.listeners if check_socket_files else ():
            if isinstance(spec, UnixListener) and os.path.lexists(spec.path):
                problems.append(f"socket file {spec.path} not removed")
        return problems


class _BlockingFlavour(Flavour):
    _handle_class = _BlockingHandle

    def run(self, target: str, args: Sequence[Any] = (), *, limit: float = RUN_LIMIT,
            **kwargs: Any) -> RunResult:
        with guard(limit, f"blocking run({target})"):
            result: RunResult = self.module.run(target, args, **kwargs)
        return result

    def run_many(self, calls: Sequence[tuple[str, Mapping[str, Any]]], *,
                 limit: float = RUN_LIMIT) -> list[RunResult]:
        pool = ThreadPoolExecutor(max_workers=len(calls))
        try:
            futures = [pool.submit(self.module.run, target, **kw) for target, kw in calls]
            _, pending = wait_futures(futures, timeout=limit)
            if pending:
                _dump_stacks()
                raise GuardTimeout(f"{len(pending)} of {len(calls)} runs still running "
                                   f"after {limit} s")
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def run_cancelled(self, target: str, *, delay: float, stall_input: bool,
                      ready: Callable[[], bool] = lambda: True, limit: float = 10.0,
                      **kwargs: Any) -> Cancellation:
        # The way a blocking program is cancelled: a signal handler raises
        # (KeyboardInterrupt from SIGALRM, like Ctrl-C would), in the main thread.
        main = threading.main_thread().ident
        assert threading.current_thread().ident == main and main is not None
        if stall_input:
            kwargs["input"] = _stalled_sync()
        armed = threading.Event()
        armed.set()
        finished = threading.Event()
        cancelled_at: list[float] = []

        def handler(signum: int, frame: FrameType | None) -> None:
            if armed.is_set():
                armed.clear()
                cancelled_at.append(time.monotonic())
                raise KeyboardInterrupt

        def canceller() -> None:
            _wait_until(ready, finished)
            if not finished.wait(delay):
                signal.pthread_kill(main, signal.SIGALRM)

        previous = signal.signal(signal.SIGALRM, handler)
        thread = threading.Thread(target=canceller, daemon=True)
        try:
            thread.start()
            try:
                with guard(START_LIMIT + delay + limit, f"blocking run({target})"):
                    result = self.module.run(target, **kwargs)
            except KeyboardInterrupt:
                return Cancellation(True, time.monotonic() - cancelled_at[0])
            finally:
                armed.clear()
                finished.set()
                thread.join()
        finally:
            signal.signal(signal.SIGALRM, previous)
        return Cancellation(False, 0.0, result)


def _wait_until(ready: Callable[[], bool], stop: threading.Event) -> None:
    deadline = time.monotonic() + START_LIMIT
    while not ready() and time.monotonic() < deadline and not stop.wait(0.01):
        pass


def _stalled_sync() -> Iterator[bytes]:
    yield b"x"
    time.sleep(30)
    yield b"never"


T = TypeVar("T")


def _asyncio_run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run(main())``, failing on errors the loop only logs.

    (A task destroyed while pending, an exception never retrieved...)
    """
    reported: list[str] = []
    results: list[T] = []

    async def wrapper() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: reported.append(str(context)))
        results.append(await main())

    # The result is not returned through the main task: on Python 3.11,
    # asyncio.run() formats repr(main task) when it restores the SIGINT
    # handler, and the repr of a RunResult holds its whole output (seconds
    # for 50 MB).
    asyncio.run(wrapper())
    assert not reported, f"the asyncio loop reported errors: {reported}"
    return results[0]


class _AsyncioFlavour(Flavour):
    _handle_class = _AsyncioHandle

    def run(self, target: str, args: Sequence[Any] = (), *, limit: float = RUN_LIMIT,
            **kwargs: Any) -> RunResult:
        async def main() -> RunResult:
            result: RunResult = await asyncio.wait_for(
                self.module.run(target, args, **kwargs), limit)
            return result

        return _asyncio_run(main)

    def run_many(self, calls: Sequence[tuple[str, Mapping[str, Any]]], *,
                 limit: float = RUN_LIMIT) -> list[RunResult]:
        async def main() -> list[RunResult]:
            runs = [self.module.run(target, **kw) for target, kw in calls]
            return list(await asyncio.wait_for(asyncio.gather(*runs), limit))

        return _asyncio_run(main)

    def run_cancelled(self, target: str, *, delay: float, stall_input: bool,
                      ready: Callable[[], bool] = lambda: True, limit: float = 10.0,
                      **kwargs: Any) -> Cancellation:
        async def stalled() -> AsyncIterator[bytes]:
            yield b"x"
            await asyncio.sleep(30)
            yield b"never"

        async def main() -> Cancellation:
            if stall_input:
                kwargs["input"] = stalled()
            task = asyncio.ensure_future(self.module.run(target, **kwargs))
            for _ in range(int(START_LIMIT / 0.01)):  # poll: ready() is a file test
                if task.done() or ready():
                    break
                await asyncio.sleep(0.01)
            await asyncio.wait({task}, timeout=delay)
            cancelled_at = time.monotonic()
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=limit)
            if not done:
                raise GuardTimeout(f"asyncio run({target}) still running {limit} s "
                                   "after task.cancel()")
            cleanup = time.monotonic() - cancelled_at
            if task.cancelled():
                return Cancellation(True, cleanup)
            return Cancellation(False, cleanup, task.result())

        return _asyncio_run(main)


class _TrioFlavour(Flavour):
    _handle_class = _TrioHandle

    def run(self, target: str, args: Sequence[Any] = (), *, limit: float = RUN_LIMIT,
            **kwargs: Any) -> RunResult:
        async def main() -> RunResult:
            with trio.fail_after(limit):
                result: RunResult = await self.module.run(target, args, **kwargs)
            return result

        return trio.run(main)

    def run_many(self, calls: Sequence[tuple[str, Mapping[str, Any]]], *,
                 limit: float = RUN_LIMIT) -> list[RunResult]:
        results: list[RunResult | None] = [None] * len(calls)

        async def one(index: int, target: str, kw: Mapping[str, Any]) -> None:
            results[index] = await self.module.run(target, **kw)

        async def main() -> None:
            with trio.fail_after(limit):
                async with trio.open_nursery() as nursery:
                    for index, (target, kw) in enumerate(calls):
                        nursery.start_soon(one, index, target, kw)

        trio.run(main)
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def run_cancelled(self, target: str, *, delay: float, stall_input: bool,
                      ready: Callable[[], bool] = lambda: True, limit: float = 10.0,
                      **kwargs: Any) -> Cancellation:
        async def stalled() -> AsyncIterator[bytes]:
            yield b"x"
            await trio.sleep(30)
            yield b"never"

        async def main() -> Cancellation:
            if stall_input:
                kwargs["input"] = stalled()
            result: RunResult | None = None
            cancelled_at = 0.0

            async def run(scope: trio.CancelScope, nursery: trio.Nursery) -> None:
                nonlocal result
                with scope:
                    result = await self.module.run(target, **kwargs)
                nursery.cancel_scope.cancel()  # over: stop the canceller

            async def cancel(scope: trio.CancelScope) -> None:
                nonlocal cancelled_at
                for _ in range(int(START_LIMIT / 0.01)):  # poll: ready() is a file test
                    if ready():
                        break
                    await trio.sleep(0.01)
                await trio.sleep(delay)
                cancelled_at = time.monotonic()
                scope.cancel()

            scope = trio.CancelScope()
            with trio.fail_after(START_LIMIT + delay + limit):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run, scope, nursery)
                    nursery.start_soon(cancel, scope)
            cleanup = time.monotonic() - cancelled_at
            if scope.cancelled_caught:
                return Cancellation(True, cleanup)
            return Cancellation(False, 0.0, result)

        return trio.run(main)


_CLASSES: dict[str, type[Flavour]] = {
    "blocking": _BlockingFlavour,
    "asyncio": _AsyncioFlavour,
    "trio": _TrioFlavour,
}


def _unavailable(reason: str) -> NoReturn:
    if "CI" in os.environ:
        pytest.fail(f"adapter flavour unavailable in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@functools.cache
def _load(name: str) -> ModuleType | str:
    try:
        return importlib.import_module(f"execproto.adapters.{name}")
    except Exception as exc:  # a half-written module may raise anything
        return f"execproto.adapters.{name} does not import yet: {type(exc).__name__}: {exc}"


def get_flavour(name: str) -> Flavour:
    """The flavour called *name*; skips the test (fails it under CI) if it does not import."""
    loaded = _load(name)
    if isinstance(loaded, str):
        _unavailable(loaded)
    missing = [n for n in ("run", "serve") if not hasattr(loaded, n)]
    if missing:
        _unavailable(f"execproto.adapters.{name} has no {', '.join(missing)} yet")
    return _CLASSES[name](name, loaded)


# --- endpoints ---------------------------------------------------------------


def target_of(address: Address) -> str:
    """The client target URI for a bound service address."""
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address[0], address[1]
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


@contextlib.contextmanager
def endpoint(flavour: Flavour, driver: str, directory: Path, script: str,
             **options: Any) -> Iterator[str]:
    """Yield a target URI running *script* through *driver*.

    ``fork`` runs the script directly; ``unix`` and ``tcp`` start *flavour*'s
    service (with ``options``) on a socket in *directory* / on 127.0.0.1.
    """
    if driver == "fork":
        assert not options, "service options make no sense for the fork driver"
        yield f"fork:{script}"
        return
    listener: Listener
    if driver == "unix":
        listener = UnixListener(str(directory / "sock"))
    else:
        listener = TcpListener("127.0.0.1", 0)
    with flavour.serving([listener], script, **options) as addresses:
        assert len(addresses) == 1, addresses
        yield target_of(addresses[0])


# --- scripts -----------------------------------------------------------------


def _write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def sh_script(directory: Path, name: str, body: str) -> str:
    """Write an executable /bin/sh script; return its absolute path.

    Scripts run with an empty environment (no PATH): call programs by path.
    """
    return _write(directory, name, "#!/bin/sh\n" + body)


def py_script(directory: Path, name: str, body: str) -> str:
    """Write an executable Python script (absolute shebang); return its path."""
    return _write(directory, name, f"#!{sys.executable}\n" + body)


_RECORDER = """\
import os, pickle, sys
with open("/proc/self/cmdline", "rb") as f:
    cmdline = f.read().split(b"\\0")[:-1]
# /proc/self/environ is the environment execve() received, exactly: the
# interpreter's own start-up (C locale coercion sets LC_CTYPE in
# os.environb) cannot add to it.
with open("/proc/self/environ", "rb") as f:
    environ = dict(e.split(b"=", 1) for e in f.read().split(b"\\0") if e)
data = bytearray()
while True:
    chunk = os.read(0, 1 << 20)
    if not chunk:
        break
    data += chunk
record = {{"cmdline": cmdline, "environ": environ, "environb": dict(os.environb),
          "stdin": bytes(data), "pid": os.getpid()}}
with open({record!r} + ".tmp", "wb") as f:
    pickle.dump(record, f)
os.rename({record!r} + ".tmp", {record!r})
reply = memoryview({reply!r})
while reply:
    reply = reply[os.write(1, reply):]
sys.exit({code})
"""


def recorder_script(directory: Path, name: str = "recorder", *, reply: bytes = b"",
                    code: int = 0) -> tuple[str, Path]:
    """A script that records argv, environment and stdin, then writes *reply*.

    Returns ``(script path, record path)``; read the record with
    :func:`read_record` (keys ``cmdline``: the interpreter, the script path,
    then the script's arguments; ``environ``; ``environb``; ``stdin``; ``pid``).
    """
    record = directory / f"{name}.record"
    script = py_script(directory, name,
                       _RECORDER.format(record=str(record), reply=reply, code=code))
    return script, record


def wait_for_file(path: Path, timeout: float = 10.0) -> bool:
    """Wait until *path* exists (bounded); return whether it does."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def read_record(path: Path, timeout: float = 10.0) -> dict[str, Any]:
    """Wait (bounded) for a recorder's record and return it."""
    assert wait_for_file(path, timeout), f"the script did not run: no {path}"
    with path.open("rb") as f:
        record: dict[str, Any] = pickle.load(f)
    return record


def dot_roundtrip(data: bytes) -> bytes:
    """What the tcp client outputs when a script echoes its dot-encoded stdin.

    Dot framing (PROTOCOL.md 5.4, quirk Q15) is not binary-safe: bare LF
    becomes CRLF and the final line break is trimmed.  Only defined here for
    data without CR.
    """
    assert b"\r" not in data
    crlf = data.replace(b"\n", b"\r\n")
    return crlf[:-2] if data.endswith(b"\n") else crlf


# --- raw sockets -------------------------------------------------------------


def connect_raw(address: Address, timeout: float = 5.0) -> socket.socket:
    """A plain socket connected to a service address (no protocol)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def read_reply(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, str]:
    """Read until EOF; return ``(bytes, how)`` with *how* ``"eof"`` or ``"reset"``.

    Raises:
        GuardTimeout: the peer neither closed nor reset within *timeout*.
    """
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise GuardTimeout(f"no EOF within {timeout} s; received {bytes(data)!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data), "reset"
        except TimeoutError:
            continue
        if not chunk:
            return bytes(data), "eof"
        data += chunk


def exchange(address: Address, request: bytes, *, timeout: float = 10.0) -> tuple[bytes, str]:
    """Send *request*, half-close, read the whole reply (see :func:`read_reply`)."""
    with connect_raw(address) as sock:
        # The service may drop the connection before all is sent (EPIPE,
        # ECONNRESET, ENOTCONN on shutdown): what it replied is what counts.
        with contextlib.suppress(OSError):
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        return read_reply(sock, timeout)


# --- logs --------------------------------------------------------------------


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class LogCapture:
    """A private logger whose records are kept, for a service's ``logger=``."""

    _count = 0

    def __init__(self) -> None:
        LogCapture._count += 1
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(f"execproto.test.{os.getpid()}.{LogCapture._count}")
        self.logger.propagate = False
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(_ListHandler(self.records))

    def messages(self, min_level: int = 0) -> list[str]:
        """The formatted messages at *min_level* or above."""
        return [r.getMessage() for r in list(self.records) if r.levelno >= min_level]

    def wait_for(self, predicate: Callable[[str], bool], min_level: int = 0,
                 timeout: float = 5.0) -> list[str]:
        """Wait (bounded) until some message matches; return the matching ones."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.messages(min_level) if predicate(m)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.01)


# --- resources ---------------------------------------------------------------


def open_fds() -> dict[int, str]:
    """This process's open descriptors and what they point at."""
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def children() -> dict[int, str]:
    """This process's child processes and their states (``Z`` for zombies)."""
    me = os.getpid()
    found: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == me:
            found[int(name)] = fields[0].decode()
    return found


def run_as_nobody(flavour: Flavour, target: str, timeout: float = 10.0,
                  **kwargs: Any) -> RunResult:
    """Run the client in a forked child that dropped root privileges (uid 65534).

    The interpreter's files may not be readable by that user, so the child is
    a fork of this (already imported) process rather than a new interpreter.
    """
    assert os.geteuid() == 0
    r, w = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns when forking with other threads alive (left by
        # earlier tests): a lock one of them held stays held in the child.
        # The child only runs the client and is killed if it hangs, below.
        warnings.filterwarnings("ignore", r".*use of fork\(\) may lead to deadlocks",
                                DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result: object = flavour.run(target, limit=timeout, **kwargs)
            code = 0
        except BaseException as exc:
            result = f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(BaseException):
                view = memoryview(pickle.dumps(result))
                while view:
                    view = view[os.write(w, view):]
            os._exit(code)
    os.close(w)
    try:
        data = bytearray()
        deadline = time.monotonic() + timeout + 5
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([r], [], [], left)[0]:
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
        else:
            os.kill(pid, signal.SIGKILL)
            raise GuardTimeout(f"the unprivileged client did not finish within {timeout} s")
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    outcome = pickle.loads(data)
    if not isinstance(outcome, RunResult):
        raise AssertionError(f"the unprivileged client failed: {outcome}")
    return outcome
