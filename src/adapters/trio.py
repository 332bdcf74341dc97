"""Trio adapter: run scripts and serve them from trio code.

The same operations as :mod:`execproto.adapters.blocking`, as coroutines:

* ``run()`` drives one :class:`execproto.ClientConnection` over a socket,
  with a sender and a receiver task, or a child process (``fork``) with a
  task per pipe.  It returns the same :class:`RunResult` as the blocking
  flavour in every situation.
* ``open_run()`` is ``run()`` as an async context manager whose value is an
  async iterator of output chunks; it never collects the output.
* ``serve()`` is the ``script`` service; start it with
  ``await nursery.start(serve, ...)`` to learn its addresses, cancel it to
  stop it.

Children are waited for through a pidfd (``trio.lowlevel.wait_readable``),
so no SIGCHLD handler or watcher thread is involved; every child is reaped
by the task that started it, cancellation included.  Cancelling a run kills
its child at once (SIGKILL); exceptions raised by the caller's input or
output callables propagate as they are, never wrapped in an exception group.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import logging
import math
import os
import signal
import socket
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from typing import Any, BinaryIO

import trio  # type: ignore[import-untyped,unused-ignore]

from execproto import (
    DEFAULT_LIBEXEC_DIR,
    DEFAULT_MAX_HEADER_BYTES,
    NEED_DATA,
    BytesLike,
    ClientConnection,
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
    listener_address,
    log_bad_header,
    log_request,
    peer_label,
    resolve_program,
    run_timeout_detail,
    spawn,
)

__all__ = ["RunStream", "open_run", "run", "serve"]

Input = (
    bytes | bytearray | memoryview | BinaryIO | Iterable[bytes] | AsyncIterable[bytes] | None
)
#: Called with each output chunk; may return an awaitable, which is awaited.
OutputCallback = Callable[[bytes], object]
#: Where a service listens: a unix socket path or ``(host, port)``.
Address = str | tuple[str, int]

_CHUNK = 256 * 1024


class _Timeout(Exception):
    pass


def _deadline(timeout: float | None) -> float:
    return math.inf if timeout is None else float(trio.current_time() + timeout)


async def _input_chunks(data: Input) -> AsyncGenerator[bytes, None]:
    if data is None:
        return
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for i in range(0, len(view), _CHUNK):
            yield bytes(view[i : i + _CHUNK])
        return
    read = getattr(data, "read", None)
    if read is not None:
        # A file may be a pipe or a slow device: read it in a worker thread.
        while chunk := await trio.to_thread.run_sync(read, _CHUNK):
            yield chunk
        return
    if isinstance(data, AsyncIterable):
        async for chunk in data:
            if chunk:
                yield bytes(chunk)
        return
    for chunk in data:
        if chunk:
            yield bytes(chunk)


class _Sink:
    """Where output goes: the caller's callback, a list, or nowhere."""

    def __init__(self, callback: OutputCallback | None, collect: bool) -> None:
        self.callback = callback
        self.chunks: list[bytes] | None = [] if collect and callback is None else None

    async def put(self, data: bytes) -> None:
        if self.callback is not None:
            pending = self.callback(data)
            if inspect.isawaitable(pending):
                await pending
        elif self.chunks is not None:
            self.chunks.append(data)

    def data(self) -> bytes | None:
        return b"".join(self.chunks) if self.chunks is not None else None


def _sole_cancelled(exc: BaseException) -> trio.Cancelled | None:
    """The Cancelled in *exc* if it is one, or a group of nothing but Cancelled."""
    while not isinstance(exc, trio.Cancelled):
        inner = getattr(exc, "exceptions", None)  # an exception group (or MultiError)
        if not inner or not all(_sole_cancelled(e) is not None for e in inner):
            return None
        exc = inner[0]
    return exc


@contextlib.contextmanager
def _plain_cancellation() -> Iterator[None]:
    """Let a cancellation leave an internal nursery as a plain ``trio.Cancelled``.

    With strict exception groups (trio's default since 0.25) a nursery wraps
    the Cancelled of its tasks in a group; callers of run() and serve() get
    the cancellation itself, like from any other trio function.
    """
    try:
        yield
    except BaseException as exc:
        cancelled = _sole_cancelled(exc)
        if cancelled is None or cancelled is exc:
            raise
        raise cancelled from None


async def _concurrently(*tasks: Callable[[], Awaitable[None]]) -> None:
    """Run *tasks* at once; the first error cancels the others and is re-raised as is.

    Errors are caught inside the tasks so that they leave the nursery
    unwrapped, whatever trio's ``strict_exception_groups`` setting is.
    """
    errors: list[Exception] = []
    with _plain_cancellation():
        async with trio.open_nursery() as nursery:

            async def guarded(task: Callable[[], Awaitable[None]]) -> None:
                try:
                    await task()
                except Exception as exc:
                    errors.append(exc)
                    nursery.cancel_scope.cancel()

            for task in tasks:
                nursery.start_soon(guarded, task)
    if errors:
        raise errors[0]


# --- client ------------------------------------------------------------------


async def _connect_address(
    family: int, kind: int, proto: int, address: str | tuple[Any, ...]
) -> socket.socket:
    """A non-blocking connect; raises OSError with the plain errno text."""
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect(target: TcpTarget | UnixTarget, deadline: float) -> socket.socket:
    """Connect like Dovecot's program client; raises OSError or _Timeout."""
    if isinstance(target, TcpTarget):
        infos: Sequence[tuple[Any, ...]] | None = None
        with trio.move_on_at(deadline):
            infos = await trio.socket.getaddrinfo(target.host, target.port,
                                                  type=socket.SOCK_STREAM)
        if infos is None:
            raise _Timeout
        last: OSError | None = None
        for index, (family, kind, proto, _, address) in enumerate(infos):
            # Each address gets an equal share of what is left, so one
            # black-holed address cannot use up the whole connect timeout.
            share = (deadline - trio.current_time()) / (len(infos) - index)
            if share <= 0:
                break
            with trio.move_on_after(share):
                try:
                    return await _connect_address(family, kind, proto, address)
                except OSError as exc:
                    last = exc
                    continue
            last = TimeoutError()
        if last is None or isinstance(last, TimeoutError):
            raise _Timeout
        raise last
    while True:
        try:
            # A unix connect never waits: it succeeds, fails, or says EAGAIN.
            return await _connect_address(socket.AF_UNIX, socket.SOCK_STREAM, 0, target.path)
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise
        left = deadline - trio.current_time()
        if left <= 0:
            raise _Timeout
        await trio.sleep(min(UNIX_RETRY_INTERVAL, left))


class _SocketRun:
    """One run over a socket: a sender and a receiver sharing the connection object."""

    def __init__(self, sock: trio.socket.SocketType, conn: ClientConnection, header: bytes,
                 chunks: AsyncIterable[bytes], sink: _Sink, label: str) -> None:
        self.sock = sock
        self.conn = conn
        self.header = header
        self.chunks = chunks
        self.sink = sink
        self.label = label
        self.result: RunResult | None = None
        self.scope = trio.CancelScope()

    def fail(self, kind: ErrorKind, detail: str) -> RunResult:
        return RunResult.failure(kind, detail, target=self.label, output=self.sink.data())

    def finish(self, result: RunResult) -> None:
        self.result = result
        self.scope.cancel()

    async def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent: int = await self.sock.send(view)
            view = view[sent:]

    async def send(self) -> None:
        conn = self.conn
        try:
            await self._send_all(self.header)
            async for chunk in self.chunks:
                # The receiver may have got the result meanwhile: the
                # connection object then takes no more payload.
                if self.result is not None:
                    return
                await self._send_all(conn.send(Data(data=chunk)))
            if self.result is not None:
                return
            await self._send_all(conn.send(EndOfInput()))
        except OSError as exc:
            # The service stopped reading (the script ended early): stop
            # sending, but its result code may still arrive; the core
            # decides what counts.
            conn.send_failed(f"write({self.label}) failed: {exc.strerror}")
        if not conn.reads_reply:
            result = conn.next_event()
            assert isinstance(result, Result)
            self.finish(RunResult.from_result(result, output=None, target=self.label))
            return
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    async def receive(self) -> None:
        conn = self.conn
        while True:
            data: bytes | None
            try:
                data = await self.sock.recv(_CHUNK)
            except ConnectionResetError:
                conn.receive_reset()
                data = None
            except OSError as exc:
                self.finish(self.fail(ErrorKind.IO, f"read({self.label}) failed: {exc.strerror}"))
                return
            if data is not None:
                conn.receive_data(data)
            while True:
                event = conn.next_event()
                if isinstance(event, Output):
                    await self.sink.put(event.data)
                    continue
                if not isinstance(event, Result):
                    break
                self.finish(RunResult.from_result(event, output=self.sink.data(),
                                                  target=self.label))
                return


async def _run_socket(
    target: TcpTarget | UnixTarget,
    conn: ClientConnection,
    header: bytes,
    input: Input,
    connect_timeout: float | None,
    run_timeout: float | None,
    sink: _Sink,
) -> RunResult:
    label = target.label
    try:
        raw = await _connect(target, _deadline(connect_timeout))
    except _Timeout:
        return RunResult.failure(ErrorKind.CONNECT_TIMEOUT,
                                 f"connect({label}) timed out after {connect_timeout} s",
                                 target=label)
    except OSError as exc:
        kind, detail = describe_connect_error(label, exc)
        return RunResult.failure(kind, detail, target=label)
    with trio.socket.from_stdlib_socket(raw) as sock:
        async with contextlib.aclosing(_input_chunks(input)) as chunks:
            job = _SocketRun(sock, conn, header, chunks, sink, label)
            job.scope.deadline = _deadline(run_timeout)
            with job.scope:
                if conn.reads_reply:
                    await _concurrently(job.send, job.receive)
                else:
                    await job.send()
    if job.result is None:
        return job.fail(ErrorKind.RUN_TIMEOUT, run_timeout_detail(run_timeout))
    return job.result


# --- fork driver -------------------------------------------------------------


def _close_fd(fd: int) -> None:
    trio.lowlevel.notify_closing(fd)
    os.close(fd)


async def _wait_pid(pid: int, pidfd: int, deadline: float) -> int | None:
    """Wait until *deadline*; return the return code, or None if still running."""
    with trio.move_on_at(deadline):
        await trio.lowlevel.wait_readable(pidfd)
    done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG: never blocks)
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status)


async def _terminate(pid: int, pidfd: int, kill_timeout: float) -> int:
    """SIGTERM, then SIGKILL after *kill_timeout*; always reaps."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    code = await _wait_pid(pid, pidfd, trio.current_time() + kill_timeout)
    if code is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        code = await _wait_pid(pid, pidfd, math.inf)
    assert code is not None
    return code


async def _kill_and_reap(pid: int, pidfd: int) -> None:
    """Cancelled or failed: SIGKILL at once and reap, whatever else is cancelled."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with trio.CancelScope(shield=True):
        await _wait_pid(pid, pidfd, math.inf)


async def _run_fork(
    target: ForkTarget,
    argv: tuple[bytes, ...],
    environ: dict[bytes, bytes],
    input: Input,
    run_timeout: float | None,
    want_output: bool,
    sink: _Sink,
) -> RunResult:
    label = target.label
    deadline = _deadline(run_timeout)
    fds: list[int] = []
    streams: list[trio.lowlevel.FdStream] = []

    def new_fd(fd: int) -> int:
        fds.append(fd)
        return fd

    def stream(fd: int) -> trio.lowlevel.FdStream:
        # The stream owns the descriptor from here on (and makes it non-blocking).
        fds.remove(fd)
        streams.append(trio.lowlevel.FdStream(fd))
        return streams[-1]

    try:
        null = new_fd(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
        in_r, in_w = (os.pipe() if input is not None else (null, -1))
        if input is not None:
            new_fd(in_r), new_fd(in_w)
        out_r, out_w = (os.pipe() if want_output else (-1, null))
        if want_output:
            new_fd(out_r), new_fd(out_w)
        try:
            pid = spawn(argv, environ, stdin=in_r, stdout=out_w,
                        executable=resolve_program(argv[0]))
        except OSError as exc:
            return fork_result(None, killed_by_us=False, target=label, output=b"",
                               detail=f"execvp({target.path}) failed: {exc.strerror}")
        for fd in (in_r, out_w):
            if fd != null:
                os.close(fd)
                fds.remove(fd)
        pidfd = os.pidfd_open(pid)
        try:
            kind, detail = await _pump_pipes(
                stream(in_w) if input is not None else None,
                stream(out_r) if want_output else None,
                input, deadline, sink)
            if kind is ErrorKind.RUN_TIMEOUT:
                detail = run_timeout_detail(run_timeout)
            returncode: int | None = None
            if kind is ErrorKind.NONE:
                returncode = await _wait_pid(pid, pidfd, deadline)
                if returncode is None:
                    kind, detail = (ErrorKind.RUN_TIMEOUT,
                                    run_timeout_detail(run_timeout))
            killed = returncode is None
            if returncode is None:
                returncode = await _terminate(pid, pidfd, KILL_TIMEOUT)
        except BaseException:
            # Cancelled, or the caller's input/output raised: kill at once, reap.
            await _kill_and_reap(pid, pidfd)
            raise
        finally:
            _close_fd(pidfd)
        return fork_result(returncode, killed_by_us=killed, target=label, output=sink.data(),
                           kind=kind, detail=detail)
    finally:
        for s in streams:
            s.close()
        for fd in fds:
            os.close(fd)


async def _pump_pipes(
    stdin: trio.lowlevel.FdStream | None,
    stdout: trio.lowlevel.FdStream | None,
    input: Input,
    deadline: float,
    sink: _Sink,
) -> tuple[ErrorKind, str]:
    async def write() -> None:
        assert stdin is not None
        try:
            async with contextlib.aclosing(_input_chunks(input)) as chunks:
                async for chunk in chunks:
                    await stdin.send_all(chunk)
        except trio.BrokenResourceError as exc:
            # The program does not read all of its input: not an error.
            if not isinstance(exc.__cause__, BrokenPipeError):
                raise
        stdin.close()

    async def read() -> None:
        assert stdout is not None
        while data := await stdout.receive_some(_CHUNK):
            await sink.put(data)

    tasks: list[Callable[[], Awaitable[None]]] = []
    if stdin is not None:
        tasks.append(write)
    if stdout is not None:
        tasks.append(read)
    with trio.move_on_at(deadline) as scope:
        await _concurrently(*tasks)
    if scope.cancelled_caught:
        return ErrorKind.RUN_TIMEOUT, "execution timed out"
    return ErrorKind.NONE, ""


# --- run / open_run ----------------------------------------------------------


def _prepare(
    target: Target | str,
    args: Iterable[BytesLike],
    env: EnvLike | None,
    noreply: bool,
    want_output: bool,
    base_dir: str | None,
    lenient_reset: bool,
) -> Callable[[Input, float | None, float | None, _Sink], Awaitable[RunResult]]:
    """Validate everything that can be checked without I/O; return the run to start."""
    resolved = coerce_target(target, base_dir)
    if isinstance(resolved, ForkTarget):
        fork_target = resolved
        argv = fork_argv(resolved.path, args)
        environ = env_bytes(env)

        def start_fork(input: Input, connect_timeout: float | None, timeout: float | None,
                       sink: _Sink) -> Awaitable[RunResult]:
            return _run_fork(fork_target, argv, environ, input, timeout, want_output, sink)

        return start_fork
    remote = resolved
    conn = ClientConnection(dot=isinstance(resolved, TcpTarget), read_output=want_output,
                            lenient_reset=lenient_reset)
    header = conn.send(Request(args=args, env=env_bytes(env).items(), noreply=noreply))

    def start_socket(input: Input, connect_timeout: float | None, timeout: float | None,
                     sink: _Sink) -> Awaitable[RunResult]:
        return _run_socket(remote, conn, header, input, connect_timeout, timeout, sink)

    return start_socket


async def run(
    target: Target | str,
    args: Iterable[BytesLike] = (),
    *,
    input: Input = None,
    env: EnvLike | None = None,
    noreply: bool = False,
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    timeout: float | None = None,  # noqa: ASYNC109 (the same parameters in every flavour)
    output: OutputCallback | None = None,
    read_output: bool = True,
    base_dir: str | None = None,
    lenient_reset: bool = True,
) -> RunResult:
    """Run one script and wait for its result.

    The same as :func:`execproto.adapters.blocking.run`, as a coroutine.
    Cancelling it closes the connection, or kills (SIGKILL) and reaps the
    ``fork`` child, then re-raises the cancellation.

    Args:
        target: a :class:`execproto.Target` or a URI (``unix:PATH``,
            ``tcp:HOST:PORT``, ``exec:PATH``/``fork:PATH``).
        args: the script's arguments.
        input: the payload: bytes, a binary file (read in a worker thread),
            an iterable (iterated in the event loop: it must not block) or
            an async iterable of bytes; streamed while output is received.
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
        never exceptions.

    Raises:
        LocalProtocolError: invalid arguments (a NUL byte, a bad URI...).

    """
    reads = read_output or output is not None
    start = _prepare(target, args, env, noreply, reads, base_dir, lenient_reset)
    return await start(input, connect_timeout, timeout, _Sink(output, collect=reads))


class RunStream:
    """The output of a run started by :func:`open_run`, chunk by chunk.

    Iterate over it with ``async for``; each item is a chunk of output as
    it arrives.  The run waits while the consumer does not take the next
    chunk, so memory stays bounded.  When the iteration ends, :attr:`result`
    holds the run's :class:`RunResult` (its ``output`` is None).

    Fields:
        result: None until the iteration has ended.
    """

    def __init__(self, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self.result: RunResult | None = None
        self._receive = receive
        self._final: RunResult | None = None
        self._error: Exception | None = None

    def __aiter__(self) -> RunStream:
        return self

    async def __anext__(self) -> bytes:
        if self.result is not None:
            raise StopAsyncIteration
        try:
            chunk: bytes = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            error, self._error = self._error, None
            if error is not None:
                raise error from None
            if self._final is None:
                raise StopAsyncIteration from None
            self.result = self._final
            raise StopAsyncIteration from None
        return chunk

    async def _produce(self, start: Callable[[_Sink], Awaitable[RunResult]],
                       send: trio.MemorySendChannel[bytes]) -> None:
        with send:
            try:
                self._final = await start(_Sink(send.send, collect=False))
            except Exception as exc:  # handed to the consumer by __anext__
                self._error = exc


@contextlib.asynccontextmanager
async def open_run(
    target: Target | str,
    args: Iterable[BytesLike] = (),
    *,
    input: Input = None,
    env: EnvLike | None = None,
    noreply: bool = False,
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    timeout: float | None = None,  # noqa: ASYNC109 (the same parameters in every flavour)
    read_output: bool = True,
    base_dir: str | None = None,
    lenient_reset: bool = True,
) -> AsyncIterator[RunStream]:
    """Start a run and stream its output chunk by chunk.

    Use it as ``async with open_run(target, args) as chunks:`` and iterate
    with ``async for chunk in chunks``.

    The parameters are those of :func:`run` (there is no ``output``: the
    :class:`RunStream` is the output).  Arguments are checked on entry.
    Leaving the block before the iteration has ended cancels the run: the
    connection is closed, a ``fork`` child is killed and reaped.  An error
    raised by *input* is raised by the iteration.

    Raises:
        LocalProtocolError: invalid arguments, on entry.

    """
    start = _prepare(target, args, env, noreply, read_output, base_dir, lenient_reset)

    def begin(sink: _Sink) -> Awaitable[RunResult]:
        if not read_output:
            sink = _Sink(None, collect=False)
        return start(input, connect_timeout, timeout, sink)

    channel: tuple[trio.MemorySendChannel[bytes], trio.MemoryReceiveChannel[bytes]] = (
        trio.open_memory_channel(0))
    send, receive = channel
    stream = RunStream(receive)
    body_error: BaseException | None = None
    with receive, _plain_cancellation():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream._produce, begin, send)
            try:
                yield stream
            except GeneratorExit:
                raise
            except BaseException as exc:
                # Re-raised below, outside the nursery, so that it is not
                # wrapped in an exception group.
                body_error = exc
            finally:
                nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


# --- service -----------------------------------------------------------------


class _Service:
    """The listeners and handlers of one ``serve()`` call."""

    def __init__(self, listeners: Sequence[Listener], config: ServiceConfig) -> None:
        self.config = config
        self._sockets: list[tuple[socket.socket, Address]] = []
        self._paths: list[SocketFile] = []
        self._pids: set[int] = set()
        self._slots = trio.Semaphore(config.max_connections)
        self._stopping = trio.Event()
        self._stopped = trio.Event()
        try:
            for spec in listeners:
                sock, path = bind_listener(spec)
                self._sockets.append((sock, listener_address(sock, spec)))
                if path is not None:
                    self._paths.append(path)
                sock.setblocking(False)
            # Listeners are bound (privileged ports, root-owned dirs): now
            # give up root before any script can run.
            drop_privileges(config.user, config.group)
        except BaseException:
            self._close_listeners()
            raise

    async def serve(self, task_status: trio.TaskStatus[list[Address]]) -> None:
        try:
            async with trio.open_nursery() as host:
                handlers = await host.start(self._host_handlers)
                try:
                    async with trio.open_nursery() as acceptors:
                        for sock, name in self._sockets:
                            acceptors.start_soon(self._accept_loop, sock, name, handlers)
                        task_status.started([name for _, name in self._sockets])
                        await trio.sleep_forever()  # even with no listener: until cancelled
                finally:
                    self._close_listeners()
                    with trio.CancelScope(shield=True):
                        await self._wind_down()
        finally:
            self._close_listeners()

    async def _host_handlers(self, task_status: trio.TaskStatus[trio.Nursery]) -> None:
        """Own the handlers' nursery, out of reach of serve()'s cancellation."""
        try:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as nursery:
                    task_status.started(nursery)
                    await self._stopping.wait()
        finally:
            self._stopped.set()

    async def _accept_loop(self, sock: socket.socket, name: Address,
                           handlers: trio.Nursery) -> None:
        while True:
            # Wait for a client before taking a slot: an idle listener must
            # not hold one that a client of another listener could use.
            await trio.lowlevel.wait_readable(sock)
            while True:  # accept every pending client a slot is free for
                # Take a slot before accepting: extra clients wait in the backlog.
                await self._slots.acquire()
                try:
                    conn, peer = sock.accept()
                except ConnectionAbortedError:
                    self._slots.release()
                    continue
                except BlockingIOError:
                    self._slots.release()
                    break
                except OSError as exc:
                    self._slots.release()
                    self.config.logger.error("accept() failed: %s", exc)
                    await trio.sleep(0.1)  # e.g. EMFILE: back off, keep serving
                    break
                handlers.start_soon(self._handle, conn, peer_label(name, peer))

    def _close_listeners(self) -> None:
        for sock, _ in self._sockets:
            if sock.fileno() != -1:
                trio.lowlevel.notify_closing(sock)
            sock.close()
        self._sockets.clear()
        for socket_file in self._paths:
            socket_file.remove()
        self._paths.clear()

    def _signal_all(self, signum: int) -> None:
        for pid in self._pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    async def _wind_down(self) -> None:
        """Let running scripts finish within the grace time, then end them."""
        self._stopping.set()
        with trio.move_on_after(self.config.grace):
            await self._stopped.wait()
        if not self._stopped.is_set():
            self._signal_all(signal.SIGTERM)
            with trio.move_on_after(self.config.kill_timeout):
                await self._stopped.wait()
        if not self._stopped.is_set():
            self._signal_all(signal.SIGKILL)
            await self._stopped.wait()

    async def _handle(self, raw: socket.socket, peer_text: str) -> None:
        started = trio.current_time()
        logger = self.config.logger
        conn = trio.socket.from_stdlib_socket(raw)
        try:
            svc, request = await self._read_header(conn)
            status = await self._run_script(conn, svc, request)
            log_request(logger, peer_text, request, status, trio.current_time() - started)
        except RemoteProtocolError as exc:
            log_bad_header(logger, peer_text, exc)
            # Read what the client still sends before closing, so the close
            # is not a reset (bounded).
            await _close_gently(conn, min(1.0, self.config.header_timeout))
        except _Timeout:
            logger.warning("%s: header not received within %s s", peer_text,
                           self.config.header_timeout)
        except OSError as exc:
            logger.warning("%s: %s", peer_text, exc)
        except Exception:  # never let one connection take the service down
            logger.exception("%s: unexpected error", peer_text)
        finally:
            conn.close()
            self._slots.release()

    async def _read_header(
        self, conn: trio.socket.SocketType
    ) -> tuple[ServiceConnection, ScriptRequest]:
        svc = self.config.new_connection()
        with trio.move_on_after(self.config.header_timeout):
            consumed = 0
            event = svc.next_event()
            while event is NEED_DATA:
                data: bytes = await conn.recv(65536, socket.MSG_PEEK)
                svc.receive_data(data)
                event = svc.next_event()
                if event is NEED_DATA:
                    await conn.recv(len(data))  # all header bytes: consume them
                    consumed += len(data)
            assert isinstance(event, ScriptRequest)
            # Consume exactly the rest of the header; the payload stays
            # queued for the script.
            left = event.header_size - consumed
            while left > 0:
                chunk: bytes = await conn.recv(left)
                if not chunk:
                    raise RemoteProtocolError("disconnected while the header was consumed")
                left -= len(chunk)
            return svc, event
        raise _Timeout

    async def _run_script(self, conn: trio.socket.SocketType, svc: ServiceConnection,
                          request: ScriptRequest) -> str:
        fd = conn.fileno()
        os.set_blocking(fd, True)  # the script gets a blocking socket
        try:
            if len(self._pids) > 0:
                # posix_spawn blocks until the child runs (about half a
                # millisecond): with other scripts running, do it in a thread
                # (it releases the GIL) so the loop keeps serving.  The call is
                # not abandoned on cancellation: the pid always comes back and
                # the handler below kills and reaps it.
                pid = await trio.to_thread.run_sync(functools.partial(
                    spawn, request.argv, request.environ, stdin=fd, stdout=fd))
            else:
                pid = spawn(request.argv, request.environ, stdin=fd, stdout=fd)
        except OSError as exc:
            self.config.logger.error("execvp(%r) failed: %s", request.argv[0], exc.strerror)
            returncode: int | None = None
            how = "not started"
        else:
            self._pids.add(pid)
            pidfd = os.pidfd_open(pid)
            try:
                deadline = _deadline(request.alarm or None)
                returncode = await _wait_pid(pid, pidfd, deadline)
                how = ""
                if returncode is None:
                    # alarm=N expired: end the script before replying (quirk Q9).
                    how = f"alarm {request.alarm} s expired, "
                    returncode = await _terminate(pid, pidfd, self.config.kill_timeout)
            except BaseException:
                await _kill_and_reap(pid, pidfd)
                raise
            finally:
                _close_fd(pidfd)
                self._pids.discard(pid)
            how += describe_returncode(returncode)
        finally:
            # Trio's own I/O on the socket needs it non-blocking again.
            os.set_blocking(fd, False)
        reply = svc.send(ScriptExited(returncode=returncode))
        timeout = self.config.header_timeout
        try:
            with trio.move_on_after(timeout):
                view = memoryview(reply)
                while view:
                    sent: int = await conn.send(view)
                    view = view[sent:]
        except OSError as exc:
            how += f", client gone: {exc.strerror}"
        await _close_gently(conn, timeout)
        return how


async def _close_gently(conn: trio.socket.SocketType, drain_for: float) -> None:
    """Half-close, then read until the client closes too.

    Closing a socket with unread data makes Linux send a reset, which can
    destroy the result code before the client reads it (quirk Q8): so the
    rest of the payload the script did not read is drained first, for at
    most *drain_for* seconds.
    """
    with contextlib.suppress(OSError), trio.move_on_after(drain_for):
        conn.shutdown(socket.SHUT_WR)
        while await conn.recv(_CHUNK):
            pass


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
    logger: logging.Logger | None = None,
    user: str | None = None,
    group: str | None = None,
    task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *script* on *listeners* until cancelled.

    Start it with ``addresses = await nursery.start(serve, listeners, script)``
    to learn where it listens (unix paths and ``(host, port)`` pairs).  When
    cancelled it stops accepting, lets running scripts finish for up to
    *grace* seconds (shielded from the cancellation), then sends them
    SIGTERM and, *kill_timeout* seconds later, SIGKILL; it reaps them,
    removes the unix socket files it created and re-raises the cancellation.

    Args:
        listeners: where to listen.
        script: the script; a relative path is resolved against *libexec_dir*.
        script_args: arguments placed before the client's.
        env_allowlist: env names clients may set (``-e``); nothing else of any
            environment reaches the script.
        passthrough: ``-p``: the script reads the raw request; no result code.
        header_timeout: total seconds allowed for the header.
        max_header_bytes: header size cap (default 64 KiB).
        max_connections: scripts run at once; further clients wait in the backlog.
        libexec_dir: base of a relative script path.
        grace: on stop, seconds running scripts get before being terminated.
        kill_timeout: seconds between SIGTERM and SIGKILL, on stop and when
            a client's ``alarm=N`` expires.
        logger: where the one-line-per-request log goes (``execproto``).
        user: when started as root, switch to this user once the listeners
            are bound, before any script runs.
        group: with *user*, this group instead of the user's primary group.
        task_status: given the list of addresses once listening.

    Raises:
        OSError: a listener cannot be bound (before anything is served).
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
    with _plain_cancellation():
        await _Service(listeners, config).serve(task_status)
