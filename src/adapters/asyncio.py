"""asyncio adapter: run scripts and serve them from asyncio code.

The same behaviour as :mod:`execproto.adapters.blocking`, with ``async def``
where that one blocks.  Every wait is a readiness callback on a raw file
descriptor (``loop.add_reader``/``loop.add_writer``): sockets, pipes and the
pidfds of children alike.  No transports, no asyncio subprocess API, no
child watcher: each child is reaped by the code that started it.

Cancelling :func:`run` (or leaving an :func:`open_run` block early) closes
the connection, or kills the fork driver's child at once and reaps it.
Cancelling :func:`serve` winds the service down like the blocking
``Service.stop()`` and then re-raises the cancellation.

Works with Python 3.10: timeouts are ``asyncio.wait(..., timeout=)`` on
tasks the adapter owns, never the cancellation of the caller's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import logging
import os
import signal
import socket
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from execproto import (
    DEFAULT_LIBEXEC_DIR,
    DEFAULT_MAX_HEADER_BYTES,
    NEED_DATA,
    BytesLike,
    ClientConnection,
    ClientState,
    Data,
    EndOfInput,
    EnvLike,
    ErrorKind,
    ForkTarget,
    Output,
    RemoteProtocolError,
    Request,
    Result,
    ScriptExited,
    ScriptRequest,
    ServiceConnection,
    Target,
    TcpTarget,
    UnixTarget,
    fork_argv,
)

from ._common import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_GRACE,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    KILL_TIMEOUT,
    UNIX_RETRY_INTERVAL,
    Listener,
    RunResult,
    ServiceConfig,
    SocketFile,
    bind_listener,
    coerce_target,
    describe_connect_error,
    describe_returncode,
    drop_privileges,
    env_bytes,
    fork_result,
    input_chunks,
    listener_address,
    log_bad_header,
    log_request,
    peer_label,
    resolve_program,
    run_timeout_detail,
    spawn,
)

__all__ = ["RunStream", "open_run", "run", "serve"]

#: The payload: bytes, a binary file, an iterable or an async iterable of bytes.
Input = (
    bytes | bytearray | memoryview | BinaryIO | Iterable[bytes] | AsyncIterable[bytes] | None
)
#: Receives each output chunk; it may return an awaitable, which is awaited.
OutputCallback = Callable[[bytes], object]
#: A bound address: a unix socket path or ``(host, port)``.
Address = str | tuple[str, int]

_T = TypeVar("_T")
_CHUNK = 256 * 1024
#: A loop that never has to wait (a fast peer, tiny input chunks) still
#: lets other tasks run after this many seconds.
_SLICE = 0.01


class _Timeout(Exception):
    pass


# --- waiting on file descriptors ----------------------------------------------


def _wake(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


async def _wait_fd(fd: int, *, write: bool = False, timeout: float | None = None) -> bool:
    """Wait until *fd* is readable (or writable); False if *timeout* expired first."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bool] = loop.create_future()
    if write:
        loop.add_writer(fd, _wake, waiter, True)
    else:
        loop.add_reader(fd, _wake, waiter, True)
    timer = None if timeout is None else loop.call_later(timeout, _wake, waiter, False)
    try:
        return await waiter
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
        if timer is not None:
            timer.cancel()


async def _wait_any(fds: Sequence[int]) -> None:
    """Wait until one of *fds* is readable."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bool] = loop.create_future()
    for fd in fds:
        loop.add_reader(fd, _wake, waiter, True)
    try:
        await waiter
    finally:
        for fd in fds:
            loop.remove_reader(fd)


async def _sendall(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await _wait_fd(sock.fileno(), write=True)


class _Turns:
    """Lets a busy loop give the event loop a turn every ``_SLICE`` seconds."""

    __slots__ = ("_since",)

    def __init__(self) -> None:
        self._since = time.monotonic()

    async def take(self) -> None:
        if time.monotonic() - self._since >= _SLICE:
            await asyncio.sleep(0)
            self._since = time.monotonic()


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


# --- running coroutines side by side ---------------------------------------------


async def _settle(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Wait until every task is done, even through a cancellation (re-raised after)."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    interrupted = False
    while pending:
        try:
            _, pending = await asyncio.wait(pending)
        except asyncio.CancelledError:
            interrupted = True
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" log for a secondary error
    if interrupted:
        raise asyncio.CancelledError


async def _both(
    main: Coroutine[Any, Any, _T],
    side: Coroutine[Any, Any, None] | None,
    deadline: float | None,
    *,
    wait_side: bool = False,
) -> _T:
    """Run *main* and *side* at the same time; return what *main* returns.

    *side* is cancelled once *main* has returned, unless *wait_side*.  An
    exception in either ends both and propagates.  At *deadline* both are
    cancelled and ``_Timeout`` is raised.  Either way nothing is left running.
    """
    if side is None and deadline is None:
        return await main
    main_task = asyncio.ensure_future(main)
    tasks: list[asyncio.Future[Any]] = [main_task]
    if side is not None:
        tasks.append(asyncio.ensure_future(side))
    try:
        pending: set[asyncio.Future[Any]] = set(tasks)
        while True:
            left = _left(deadline)
            if left is not None and left <= 0:
                raise _Timeout
            done, pending = await asyncio.wait(
                pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise _Timeout
            for task in done:
                if task.cancelled():
                    raise asyncio.CancelledError
                error = task.exception()
                if error is not None:
                    raise error
            if main_task.done() and (not wait_side or not pending):
                return main_task.result()
    finally:
        for task in tasks:
            task.cancel()
        await _settle(tasks)


# --- payload and output -------------------------------------------------------


class _Payload:
    """The caller's input as non-empty chunks, pulled one at a time."""

    def __init__(self, data: Input) -> None:
        self._data = data
        self._sync: Iterator[bytes] | None = None
        self._async: AsyncIterator[bytes] | None = None

    async def next(self) -> bytes | None:
        data = self._data
        if data is None:
            return None
        if self._async is None and self._sync is None:
            if isinstance(data, AsyncIterable):
                self._async = data.__aiter__()
            else:
                self._sync = input_chunks(data)
        if self._sync is not None:
            return next(self._sync, None)
        assert self._async is not None
        while True:
            try:
                chunk = await self._async.__anext__()
            except StopAsyncIteration:
                return None
            if chunk:
                return bytes(chunk)


async def _deliver(data: bytes, output: OutputCallback | None,
                   collected: list[bytes] | None) -> None:
    if output is not None:
        returned = output(data)
        if inspect.isawaitable(returned):
            await returned
    elif collected is not None:
        collected.append(data)


def _joined(collected: list[bytes] | None) -> bytes | None:
    return b"".join(collected) if collected is not None else None


# --- client: unix and tcp -----------------------------------------------------------


async def _connect_socket(sock: socket.socket, address: Any, timeout: float) -> None:
    """Non-blocking connect; EAGAIN (a full unix backlog) is raised to the caller."""
    sock.setblocking(False)
    try:
        sock.connect(address)
        return
    except BlockingIOError as exc:
        if exc.errno != errno.EINPROGRESS:
            raise
    if not await _wait_fd(sock.fileno(), write=True, timeout=timeout):
        raise TimeoutError("timed out")
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        raise OSError(code, os.strerror(code))


async def _resolve(target: TcpTarget, deadline: float) -> list[Any]:
    """getaddrinfo() without blocking the loop (IP literals are resolved inline)."""
    try:
        return socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass
    lookup = asyncio.ensure_future(asyncio.get_running_loop().getaddrinfo(
        target.host, target.port, type=socket.SOCK_STREAM))
    # A lookup given up on still finishes in its thread: retrieve its outcome.
    lookup.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        done, _ = await asyncio.wait({lookup}, timeout=max(deadline - time.monotonic(), 0))
    finally:
        lookup.cancel()  # a no-op once it is done
    if not done:
        return []  # the connect timeout went into the lookup
    return list(lookup.result())


async def _connect(target: UnixTarget | TcpTarget, timeout: float) -> socket.socket:
    """Connect like Dovecot's program client; raises OSError or _Timeout."""
    deadline = time.monotonic() + timeout
    if isinstance(target, TcpTarget):
        infos = await _resolve(target, deadline)
        last: OSError | None = None
        for index, (family, kind, proto, _, address) in enumerate(infos):
            # Each address gets an equal share of what is left, so one
            # black-holed address cannot use up the whole connect timeout.
            share = (deadline - time.monotonic()) / (len(infos) - index)
            if share <= 0:
                break
            sock = socket.socket(family, kind, proto)
            try:
                await _connect_socket(sock, address, share)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
            except BaseException:
                sock.close()
                raise
        if last is None or isinstance(last, TimeoutError):
            raise _Timeout
        raise last
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await _connect_socket(sock, target.path, max(deadline - time.monotonic(), 0.001))
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EAGAIN:
                raise
        except BaseException:
            sock.close()
            raise
        # Retry every 100 ms; the connect timeout fires when it is due.
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Timeout
        await asyncio.sleep(min(UNIX_RETRY_INTERVAL, left))


@dataclass
class _Exchange:
    """One run over a socket: the pieces the sending and receiving halves share."""

    sock: socket.socket
    conn: ClientConnection
    label: str
    output: OutputCallback | None
    collected: list[bytes] | None

    def fail(self, kind: ErrorKind, detail: str) -> RunResult:
        return RunResult.failure(kind, detail, target=self.label,
                                 output=_joined(self.collected))

    async def send(self, header: bytes, payload: _Payload) -> None:
        """Send the header and the payload, then half-close (or just stop)."""
        sock, conn = self.sock, self.conn
        turns = _Turns()
        try:
            await _sendall(sock, header)
            while (chunk := await payload.next()) is not None:
                await turns.take()
                if conn.state is not ClientState.SENDING:
                    return  # the reply is complete: receive() has returned
                await _sendall(sock, conn.send(Data(data=chunk)))
            if conn.state is not ClientState.SENDING:
                return
            await _sendall(sock, conn.send(EndOfInput()))
        except OSError as exc:
            # The service stopped reading (the script ended early): stop
            # sending, but its result code may still arrive; the core
            # decides what counts.
            conn.send_failed(f"write({self.label}) failed: {exc.strerror}")
        if conn.reads_reply:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

    async def receive(self) -> RunResult:
        """Read the reply until the core has its Result."""
        sock, conn = self.sock, self.conn
        turns = _Turns()
        while True:
            await turns.take()
            try:
                data: bytes | None = sock.recv(_CHUNK)
            except BlockingIOError:
                await _wait_fd(sock.fileno())
                continue
            except ConnectionResetError:
                conn.receive_reset()
                data = None
            except OSError as exc:
                return self.fail(ErrorKind.IO, f"read({self.label}) failed: {exc.strerror}")
            if data is not None:
                conn.receive_data(data)
            while True:
                event = conn.next_event()
                if isinstance(event, Output):
                    await _deliver(event.data, self.output, self.collected)
                    continue
                if not isinstance(event, Result):
                    break
                return RunResult.from_result(event, output=_joined(self.collected),
                                             target=self.label)


async def _run_socket(
    target: UnixTarget | TcpTarget,
    conn: ClientConnection,
    header: bytes,
    input: Input,
    connect_timeout: float | None,
    timeout: float | None,
    output: OutputCallback | None,
) -> RunResult:
    label = target.label
    try:
        sock = await _connect(target, connect_timeout if connect_timeout is not None else 1e9)
    except _Timeout:
        return RunResult.failure(ErrorKind.CONNECT_TIMEOUT,
                                 f"connect({label}) timed out after {connect_timeout} s",
                                 target=label)
    except OSError as exc:
        kind, detail = describe_connect_error(label, exc)
        return RunResult.failure(kind, detail, target=label)
    try:
        ex = _Exchange(sock, conn, label, output, None if output is not None else [])
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if not conn.reads_reply:
                await _both(ex.send(header, _Payload(input)), None, deadline)
                result = conn.next_event()
                assert isinstance(result, Result)
                return RunResult.from_result(result, output=None, target=label)
            return await _both(ex.receive(), ex.send(header, _Payload(input)), deadline)
        except _Timeout:
            return ex.fail(ErrorKind.RUN_TIMEOUT, run_timeout_detail(timeout))
    finally:
        sock.close()


# --- client: fork driver ----------------------------------------------------------


def _signal(pidfd: int, signum: int) -> None:
    # Through the pidfd: never a recycled pid.
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signum)


def _kill_and_reap(pid: int, pidfd: int) -> None:
    """SIGKILL and a blocking reap: the way out on cancellation."""
    _signal(pidfd, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # SIGKILLed: a matter of microseconds


async def _wait_pid(pid: int, pidfd: int, timeout: float | None) -> int | None:
    """Wait up to *timeout* seconds; return the return code or None if still running."""
    await _wait_fd(pidfd, timeout=timeout)
    done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (it has exited)
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status)


async def _terminate(pid: int, pidfd: int, kill_timeout: float) -> int:
    """SIGTERM, then SIGKILL after *kill_timeout*; always reaps."""
    _signal(pidfd, signal.SIGTERM)
    code = await _wait_pid(pid, pidfd, kill_timeout)
    if code is None:
        _signal(pidfd, signal.SIGKILL)
        code = await _wait_pid(pid, pidfd, None)
    assert code is not None
    return code


async def _feed_pipe(fd: int, payload: _Payload, fds: list[int]) -> None:
    os.set_blocking(fd, False)
    turns = _Turns()
    try:
        while (chunk := await payload.next()) is not None:
            await turns.take()
            view = memoryview(chunk)
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    await _wait_fd(fd, write=True)
    except BrokenPipeError:
        pass  # the program does not read all of its input: not an error
    fds.remove(fd)
    os.close(fd)


async def _read_pipe(fd: int, output: OutputCallback | None,
                     collected: list[bytes] | None) -> None:
    os.set_blocking(fd, False)
    turns = _Turns()
    while True:
        await turns.take()
        try:
            data = os.read(fd, _CHUNK)
        except BlockingIOError:
            await _wait_fd(fd)
            continue
        if not data:
            return
        await _deliver(data, output, collected)


async def _run_fork(
    target: ForkTarget,
    argv: tuple[bytes, ...],
    environ: dict[bytes, bytes],
    input: Input,
    timeout: float | None,
    output: OutputCallback | None,
    want_output: bool,
) -> RunResult:
    label = target.label
    deadline = None if timeout is None else time.monotonic() + timeout
    collected: list[bytes] | None = [] if want_output and output is None else None
    fds: list[int] = []
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        fds.append(null)
        in_r, in_w = (null, -1) if input is None else os.pipe()
        out_r, out_w = os.pipe() if want_output else (-1, null)
        fds.extend(fd for fd in (in_r, in_w, out_r, out_w) if fd not in (-1, null))
        try:
            pid = spawn(argv, environ, stdin=in_r, stdout=out_w,
                        executable=resolve_program(argv[0]))
        except OSError as exc:
            return fork_result(None, killed_by_us=False, target=label, output=_joined(collected),
                               detail=f"execvp({target.path}) failed: {exc.strerror}")
        for fd in (in_r, out_w):
            if fd != null:
                os.close(fd)
                fds.remove(fd)
        try:
            pidfd = os.pidfd_open(pid)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # noqa: ASYNC222 (SIGKILLed)
            raise
        try:
            reader = _read_pipe(out_r, output, collected) if want_output else None
            writer = _feed_pipe(in_w, _Payload(input), fds) if input is not None else None
            with contextlib.suppress(_Timeout):
                if reader is not None:
                    await _both(reader, writer, deadline, wait_side=True)
                elif writer is not None:
                    await _both(writer, None, deadline)
            returncode: int | None = None
            left = _left(deadline)
            if left is None or left > 0:
                returncode = await _wait_pid(pid, pidfd, left)
            kind, detail, killed = ErrorKind.NONE, "", False
            if returncode is None:
                kind, detail = ErrorKind.RUN_TIMEOUT, run_timeout_detail(timeout)
                returncode = await _terminate(pid, pidfd, KILL_TIMEOUT)
                killed = True
        except BaseException:
            # Cancelled (or the payload failed): kill at once, reap, re-raise.
            _kill_and_reap(pid, pidfd)
            raise
        finally:
            os.close(pidfd)
        return fork_result(returncode, killed_by_us=killed, target=label,
                           output=_joined(collected), kind=kind, detail=detail)
    finally:
        for fd in fds:
            os.close(fd)


# --- client: public API --------------------------------------------------------------


def _prepare(
    target: Target | str,
    args: Iterable[BytesLike],
    *,
    input: Input,
    env: EnvLike | None,
    noreply: bool,
    connect_timeout: float | None,
    timeout: float | None,
    output: OutputCallback | None,
    want_output: bool,
    base_dir: str | None,
    lenient_reset: bool,
) -> Callable[[], Coroutine[Any, Any, RunResult]]:
    """Validate the arguments now; return what runs the script when called."""
    resolved = coerce_target(target, base_dir)
    if isinstance(resolved, ForkTarget):
        argv = fork_argv(resolved.path, args)
        environ = env_bytes(env)
        fork = resolved
        return lambda: _run_fork(fork, argv, environ, input, timeout, output, want_output)
    conn = ClientConnection(dot=isinstance(resolved, TcpTarget), read_output=want_output,
                            lenient_reset=lenient_reset)
    header = conn.send(Request(args=args, env=env_bytes(env).items(), noreply=noreply))
    remote = resolved
    return lambda: _run_socket(remote, conn, header, input, connect_timeout, timeout, output)


async def run(
    target: Target | str,
    args: Iterable[BytesLike] = (),
    *,
    input: Input = None,
    env: EnvLike | None = None,
    noreply: bool = False,
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    timeout: float | None = None,
    output: OutputCallback | None = None,
    read_output: bool = True,
    base_dir: str | None = None,
    lenient_reset: bool = True,
) -> RunResult:
    """Run one script and wait for its result.

    Args:
        target: a :class:`execproto.Target` or a URI (``unix:PATH``,
            ``tcp:HOST:PORT``, ``exec:PATH``/``fork:PATH``).
        args: the script's arguments.
        input: the payload: bytes, a binary file, an iterable or an async
            iterable of bytes (streamed while output is being received).
        env: variables for the script.  Over unix/tcp the service keeps only
            its allowlisted names; with fork they are the whole environment.
        noreply: no result code (the status is SUCCESS if the exchange worked).
        connect_timeout: seconds to connect (None: wait forever).
        timeout: total seconds for the run after connecting (Dovecot's
            "input idle timeout", which is a total limit: quirk Q16).
        output: called with each output chunk instead of collecting it; if
            it returns an awaitable, that is awaited before reading on.
        read_output: with ``noreply``, False closes the connection after the
            payload without reading anything (Dovecot's quota warnings do so).
        base_dir: resolve a relative ``unix:`` path against it.
        lenient_reset: a reset after a complete result code is the verdict.

    Returns:
        A :class:`RunResult`; transport problems are INTERNAL_FAILURE results,
        never exceptions.  Cancelling the call closes the connection, or kills
        (SIGKILL) and reaps the fork driver's child.

    Raises:
        LocalProtocolError: invalid arguments (a NUL byte, a bad URI...).

    """
    start = _prepare(target, args, input=input, env=env, noreply=noreply,
                     connect_timeout=connect_timeout, timeout=timeout, output=output,
                     want_output=read_output or output is not None, base_dir=base_dir,
                     lenient_reset=lenient_reset)
    return await start()


@dataclass(frozen=True)
class _Raised:
    error: Exception


class RunStream:
    """A run's output, chunk by chunk: what ``async with open_run(...)`` yields.

    Iterate it with ``async for``; each item is one chunk of output, as it
    arrives (at most one chunk waits here: the run pauses until it is taken).
    When the iteration ends, :attr:`result` holds the :class:`RunResult`
    (its ``output`` is None: the chunks were the output).  An exception the
    run raised (from the input, say) is raised by the iteration.

    Leaving the ``async with`` block before the end cancels the run: the
    connection is closed, a fork driver's child is killed and reaped, and
    :attr:`result` stays None.
    """

    def __init__(self) -> None:
        #: The run's outcome, once the iteration has ended (else None).
        self.result: RunResult | None = None
        self._start: Callable[[], Coroutine[Any, Any, RunResult]] | None = None
        self._queue: asyncio.Queue[bytes | RunResult | _Raised] = asyncio.Queue(maxsize=1)
        self._task: asyncio.Task[None] | None = None
        self._finished = False

    async def __aenter__(self) -> RunStream:
        if self._task is not None or self._start is None:
            raise RuntimeError("a RunStream is entered once, as open_run() returns it")
        self._task = asyncio.ensure_future(self._drive(self._start))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._finished = True
        task = self._task
        if task is not None:
            task.cancel()
            await _settle([task])

    def __aiter__(self) -> RunStream:
        return self

    async def __anext__(self) -> bytes:
        if self._task is None:
            raise RuntimeError("iterate a RunStream inside its async with block")
        if self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, bytes):
            return item
        self._finished = True
        if isinstance(item, RunResult):
            self.result = item
            raise StopAsyncIteration
        raise item.error

    async def _put(self, data: bytes) -> None:
        await self._queue.put(data)

    async def _drive(self, start: Callable[[], Coroutine[Any, Any, RunResult]]) -> None:
        try:
            result = await start()
        except Exception as exc:
            await self._queue.put(_Raised(exc))
            return
        await self._queue.put(result)


def open_run(
    target: Target | str,
    args: Iterable[BytesLike] = (),
    *,
    input: Input = None,
    env: EnvLike | None = None,
    noreply: bool = False,
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    timeout: float | None = None,
    read_output: bool = True,
    base_dir: str | None = None,
    lenient_reset: bool = True,
) -> RunStream:
    """Start a run whose output is streamed to an async iterator.

    Use it as ``async with open_run(target, ...) as stream:``.  The
    arguments are those of :func:`run` (less ``output``) and are validated
    at once.  The run starts when the block is entered; iterate the
    :class:`RunStream` for the output, then read ``stream.result``.
    Memory stays bounded whatever the output's size: nothing is collected.
    The run timeout includes the time the consumer takes.

    Raises:
        LocalProtocolError: invalid arguments (a NUL byte, a bad URI...).

    """
    stream = RunStream()
    stream._start = _prepare(target, args, input=input, env=env, noreply=noreply,
                             connect_timeout=connect_timeout, timeout=timeout,
                             output=stream._put, want_output=read_output, base_dir=base_dir,
                             lenient_reset=lenient_reset)
    return stream


# --- service -----------------------------------------------------------------------


class _Job:
    """What the service knows about one connection while it is handled."""

    __slots__ = ("pidfd", "reading_header")

    def __init__(self) -> None:
        self.reading_header = True
        self.pidfd: int | None = None


class _Service:
    """The listeners and the running connections of one :func:`serve` call."""

    def __init__(self, listeners: Sequence[Listener], config: ServiceConfig) -> None:
        self.config = config
        self._sockets: list[socket.socket] = []
        self._names: dict[int, Address] = {}
        self._paths: list[SocketFile] = []
        self._jobs: dict[asyncio.Task[None], _Job] = {}
        self._slots = asyncio.Semaphore(config.max_connections)
        try:
            for spec in listeners:
                sock, path = bind_listener(spec)
                self._sockets.append(sock)
                if path is not None:
                    self._paths.append(path)
                sock.setblocking(False)
                self._names[sock.fileno()] = listener_address(sock, spec)
            # Listeners are bound (privileged ports, root-owned dirs): now
            # give up root before any script can run.
            drop_privileges(config.user, config.group)
        except BaseException:
            self._close_listeners()
            raise

    @property
    def addresses(self) -> list[Address]:
        return [self._names[sock.fileno()] for sock in self._sockets]

    async def serve(self, ready: Callable[[list[Address]], object] | None) -> None:
        try:
            if ready is not None:
                ready(self.addresses)
            while True:
                # Take a slot before accepting: extra clients wait in the backlog.
                await self._slots.acquire()
                try:
                    conn, peer = await self._accept()
                except BaseException:
                    self._slots.release()
                    raise
                self._start_job(conn, peer)
        finally:
            self._close_listeners()
            await self._wind_down()

    async def _accept(self) -> tuple[socket.socket, str]:
        while True:
            for sock in self._sockets:
                try:
                    conn, peer = sock.accept()
                except (BlockingIOError, ConnectionAbortedError):
                    continue
                except OSError as exc:
                    self.config.logger.error("accept() failed: %s", exc)
                    await asyncio.sleep(0.1)  # e.g. EMFILE: back off, keep serving
                    continue
                return conn, peer_label(self._names[sock.fileno()], peer)
            await _wait_any([sock.fileno() for sock in self._sockets])

    def _start_job(self, conn: socket.socket, peer: str) -> None:
        job = _Job()
        task = asyncio.ensure_future(self._handle(conn, peer, job))
        self._jobs[task] = job

        def finished(task: asyncio.Task[None]) -> None:
            # Here rather than in _handle: a task cancelled before it ran
            # never enters its own finally.
            conn.close()
            del self._jobs[task]
            self._slots.release()
            if not task.cancelled():
                task.exception()

        task.add_done_callback(finished)

    def _close_listeners(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        for socket_file in self._paths:
            socket_file.remove()
        self._paths.clear()

    async def _wait_jobs(self, timeout: float | None) -> bool:
        """Wait for the running connections; False if cancelled meanwhile."""
        if not self._jobs:
            return True
        try:
            await asyncio.wait(set(self._jobs), timeout=timeout)
        except asyncio.CancelledError:
            return False
        return True

    async def _wind_down(self) -> None:
        """Grace, SIGTERM, SIGKILL, then cancel what is left; a new cancel skips ahead."""
        config = self.config
        patient = await self._wait_jobs(config.grace)
        for task, job in list(self._jobs.items()):
            if job.pidfd is not None:
                _signal(job.pidfd, signal.SIGTERM)
            elif job.reading_header:
                task.cancel()  # too late to start a script
        patient = patient and await self._wait_jobs(config.kill_timeout)
        for job in list(self._jobs.values()):
            if job.pidfd is not None:
                _signal(job.pidfd, signal.SIGKILL)
        # Killed scripts are reaped and answered ("-"); the drain is bounded.
        if patient:
            await self._wait_jobs(config.header_timeout + 1.0)
        tasks = list(self._jobs)
        for task in tasks:
            task.cancel()
        await _settle(tasks)

    async def _handle(self, conn: socket.socket, peer: str, job: _Job) -> None:
        started = time.monotonic()
        logger = self.config.logger
        try:
            conn.setblocking(False)
            svc, request = await self._read_header(conn)
            job.reading_header = False
            how = await self._run_script(conn, svc, request, job)
            log_request(logger, peer, request, how, time.monotonic() - started)
        except RemoteProtocolError as exc:
            log_bad_header(logger, peer, exc)
            # Read what the client still sends before closing, so the close
            # is not a reset (bounded).
            await _close_gently(conn, min(1.0, self.config.header_timeout))
        except _Timeout:
            logger.warning("%s: header not received within %s s", peer,
                           self.config.header_timeout)
        except OSError as exc:
            logger.warning("%s: %s", peer, exc)
        except Exception:  # never let one connection take the service down
            logger.exception("%s: unexpected error", peer)

    async def _read_header(self, conn: socket.socket) -> tuple[ServiceConnection, ScriptRequest]:
        svc = self.config.new_connection()
        deadline = time.monotonic() + self.config.header_timeout
        fd = conn.fileno()
        consumed = 0
        event = svc.next_event()
        while event is NEED_DATA:
            try:
                data = conn.recv(65536, socket.MSG_PEEK)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or not await _wait_fd(fd, timeout=left):
                    raise _Timeout from None
                continue
            svc.receive_data(data)
            event = svc.next_event()
            if event is NEED_DATA:
                conn.recv(len(data))  # all header bytes: consume them
                consumed += len(data)
        assert isinstance(event, ScriptRequest)
        # Consume exactly the rest of the header; the payload stays queued
        # for the script.
        left = event.header_size - consumed
        while left > 0:
            try:
                chunk = conn.recv(left)
            except BlockingIOError:
                await _wait_fd(fd)
                continue
            if not chunk:
                raise RemoteProtocolError("disconnected while the header was consumed")
            left -= len(chunk)
        return svc, event

    async def _run_script(self, conn: socket.socket, svc: ServiceConnection,
                          request: ScriptRequest, job: _Job) -> str:
        fd = conn.fileno()
        conn.setblocking(True)  # the script gets a blocking socket
        try:
            if len(self._jobs) > 1:
                # posix_spawn blocks until the child runs (about half a
                # millisecond): with other connections waiting, do it in a
                # thread (it releases the GIL) so the loop keeps serving them.
                pid = await _spawn_in_thread(request.argv, request.environ, fd)
            else:
                pid = spawn(request.argv, request.environ, stdin=fd, stdout=fd)
        except OSError as exc:
            self.config.logger.error("execvp(%r) failed: %s", request.argv[0], exc.strerror)
            returncode: int | None = None
            how = "not started"
        else:
            try:
                pidfd = os.pidfd_open(pid)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)  # noqa: ASYNC222 (SIGKILLed)
                raise
            job.pidfd = pidfd
            try:
                returncode = await _wait_pid(pid, pidfd, request.alarm or None)
                how = ""
                if returncode is None:
                    # alarm=N expired: end the script before replying (quirk Q9).
                    how = f"alarm {request.alarm} s expired, "
                    returncode = await _terminate(pid, pidfd, self.config.kill_timeout)
            except BaseException:
                _kill_and_reap(pid, pidfd)
                raise
            finally:
                job.pidfd = None
                os.close(pidfd)
            how += describe_returncode(returncode)
        conn.setblocking(False)  # the script is gone: the socket is ours again
        reply = svc.send(ScriptExited(returncode=returncode))
        try:
            if reply:
                await _sendall(conn, reply)
        except OSError as exc:
            how += f", client gone: {exc.strerror}"
        await _close_gently(conn, self.config.header_timeout)
        return how


async def _spawn_in_thread(argv: tuple[bytes, ...], environ: dict[bytes, bytes], fd: int) -> int:
    """:func:`spawn` in the default executor; a child started for a cancelled caller is reaped."""
    loop = asyncio.get_running_loop()
    started = loop.run_in_executor(
        None, functools.partial(spawn, argv, environ, stdin=fd, stdout=fd))
    try:
        return await asyncio.shield(started)
    except asyncio.CancelledError:
        def reap(done: asyncio.Future[int]) -> None:
            if not done.cancelled() and done.exception() is None:
                pid = done.result()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)

        started.add_done_callback(reap)
        raise


async def _close_gently(conn: socket.socket, timeout: float) -> None:
    """Half-close, then read until the client closes too.

    Closing a socket with unread data makes Linux send a reset, which can
    destroy the result code before the client reads it (quirk Q8): so the
    rest of the payload the script did not read is drained first, for at
    most *timeout* seconds.
    """
    deadline = time.monotonic() + timeout
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        while True:
            try:
                if not conn.recv(_CHUNK):
                    return
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or not await _wait_fd(conn.fileno(), timeout=left):
                    return


async def serve(
    listeners: Sequence[Listener],
    script: BytesLike,
    script_args: Sequence[BytesLike] = (),
    *,
    env_allowlist: Sequence[BytesLike] = (),
    passthrough: bool = False,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    libexec_dir: BytesLike = DEFAULT_LIBEXEC_DIR,
    grace: float = DEFAULT_GRACE,
    kill_timeout: float = KILL_TIMEOUT,
    ready: Callable[[list[Address]], object] | None = None,
    logger: logging.Logger | None = None,
    user: str | None = None,
    group: str | None = None,
) -> None:
    """Serve *script* on *listeners* until cancelled.

    On cancellation the service stops accepting (its unix socket files are
    removed), lets running scripts finish for *grace* seconds, then sends
    them SIGTERM and, *kill_timeout* seconds later, SIGKILL; every script is
    reaped and answered before the cancellation is re-raised.  Cancelling
    again during that wind-down skips the waiting: what is left is killed
    at once.

    Args:
        listeners: where to listen.
        script: the script; a relative path is resolved against *libexec_dir*.
        script_args: arguments placed before the client's.
        env_allowlist: env names clients may set (``-e``); nothing else of any
            environment reaches the script.
        passthrough: ``-p``: the script reads the raw request; no result code.
        header_timeout: total seconds allowed for the header (also the bound
            on draining what the client still sends after the reply).
        max_header_bytes: header size cap (default 64 KiB).
        max_connections: scripts run at once; further clients wait in the backlog.
        libexec_dir: base of a relative script path.
        grace: on stop, seconds running scripts get before being terminated.
        kill_timeout: seconds between SIGTERM and SIGKILL (on stop, and when
            a client's ``alarm=N`` expires).
        ready: called with the bound addresses (unix paths and
            ``(host, port)`` pairs) once the service listens.
        logger: where the one-line-per-request log goes (``execproto``).
        user: when started as root, switch to this user once the listeners
            are bound, before any script runs.
        group: with *user*, this group instead of the user's primary group.

    Raises:
        OSError: a listener cannot be bound.
        LocalProtocolError: invalid settings.

    """
    config = ServiceConfig(
        script=script,
        script_args=tuple(script_args),
        env_allowlist=tuple(env_allowlist),
        passthrough=passthrough,
        header_timeout=header_timeout,
        max_connections=max_connections,
        max_header_bytes=max_header_bytes,
        libexec_dir=libexec_dir,
        grace=grace,
        kill_timeout=kill_timeout,
        logger=logger or logging.getLogger("execproto"),
        user=user,
        group=group,
    )
    await _Service(listeners, config).serve(ready)
