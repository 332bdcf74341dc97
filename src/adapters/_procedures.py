"""Every adapter procedure, written once: generators that say what they wait for.

Theory of operation
-------------------
A run (connect, exchange, fork driver) and a service connection (header,
script, reply, close) are plain generators.  They do all the work with
non-blocking calls and, whenever one would block, *yield a request* saying
what they wait for; a flavour's driver (``blocking``, ``asyncio``, ``trio``)
waits for it its own way and sends the answer back in.  This is the shape of
psycopg 3's ``generators.py`` and ``waiting.py``, with richer requests:

==============  ===================================================  =================
request         the driver waits for / does                          sends back
==============  ===================================================  =================
``Wait``        one of ``read`` readable or ``write`` writable,      True, or False
                at most ``timeout`` seconds (no fds: a sleep)        when timed out
``Offload``     ``fn(*args)`` off the event loop (a name lookup)     its result
``NextInput``   the caller's next payload chunk                      bytes, or None
``Deliver``     hand one output chunk to the caller                  None
``Turn``        let other tasks run (a loop that never had to wait)  None
``WaitJobs``    the service's connections to be done                 True, or False
==============  ===================================================  =================

A request with a ``timeout`` that passes while the caller's own code runs
(``NextInput``, ``Deliver``, ``Offload``) makes the driver throw
:class:`Expired` into the generator.  Cancellation (``KeyboardInterrupt``,
``asyncio.CancelledError``, ``trio.Cancelled``) is thrown in the same way,
with ``generator.throw()``, wherever the generator waits; the generator
cleans up without waiting (a child is SIGKILLed and reaped at once) and lets
it propagate.  Nothing here imports an event loop.

Policy lives here and nowhere else: timeouts, the unix EAGAIN retry, the
shared tcp connect timeout, SIGTERM then SIGKILL, result and error texts,
half-close and drain rules, the reply's time limit, logging, the stop plan.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import signal
import socket
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Mapping,
)
from dataclasses import dataclass
from typing import Any, TypeVar

from execproto import (
    NEED_DATA,
    BytesLike,
    ClientConnection,
    ClientState,
    Data,
    EndOfInput,
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
    CHUNK,
    DEFAULT_CONNECT_TIMEOUT,
    KILL_TIMEOUT,
    UNIX_RETRY_INTERVAL,
    Listeners,
    RunOptions,
    RunResult,
    ServiceConfig,
    coerce_target,
    describe_connect_error,
    describe_returncode,
    env_bytes,
    fork_result,
    input_chunks,
    log_bad_header,
    log_request,
    peer_label,
    resolve_program,
    run_timeout_detail,
    spawn,
)

__all__ = [
    "TURN",
    "Abandoned",
    "Deliver",
    "Driver",
    "Expired",
    "Job",
    "Jobs",
    "NextInput",
    "Offload",
    "Procedure",
    "RunStream",
    "Serving",
    "Start",
    "Turn",
    "Wait",
    "WaitJobs",
    "accept",
    "drive",
    "run_answers",
    "serve_connection",
    "start_run",
    "wind_down",
]

T = TypeVar("T")

#: Seconds a loop that never had to wait runs before it lets others run.
SLICE = 0.01
#: Bound on reading what a client still sends after a dropped header.
BAD_HEADER_DRAIN = 1.0

monotonic = time.monotonic


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait until a fd of *read* is readable or of *write* writable; True, or False on timeout."""

    read: tuple[int, ...] = ()
    write: tuple[int, ...] = ()
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Offload:
    """Call ``fn(*args)`` off the event loop (a name lookup); its result is sent back.

    Its error is thrown in, and so is :class:`Expired` once *timeout* has
    passed.  On cancellation the driver stops waiting for the call.
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class NextInput:
    """The caller's next non-empty payload chunk, or None at its end."""

    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand one chunk of output to the caller (its callback, stream or list)."""

    data: bytes
    timeout: float | None = None


class Turn:
    """Let other tasks run: a busy loop that never waits still takes turns."""

    __slots__ = ()


TURN = Turn()


@dataclass(frozen=True, slots=True)
class WaitJobs:
    """Wait until the service has no connection left; True, or False on timeout."""

    timeout: float | None = None


class Expired(Exception):
    """The timeout of a NextInput, Deliver or Offload request passed (thrown in)."""


Request_ = Wait | Offload | NextInput | Deliver | Turn | WaitJobs
#: A procedure: yields requests, is sent their answers, returns a T.
Procedure = Generator[Request_, Any, T]


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - monotonic()


# --- processes ----------------------------------------------------------------


def _reap_orphan(pid: int) -> None:
    """SIGKILL a child by pid and reap it: one nobody can wait for through a pidfd."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def open_pidfd(pid: int) -> int:
    """A pidfd for a child just started; if that fails the child is killed and reaped."""
    try:
        return os.pidfd_open(pid)
    except BaseException:
        _reap_orphan(pid)
        raise


def send_signal(pidfd: int, signum: int) -> None:
    """Signal a child through its pidfd: never a recycled pid."""
    with contextlib.suppress(ProcessLookupError, OSError):
        signal.pidfd_send_signal(pidfd, signum)


def kill_and_reap(pid: int, pidfd: int) -> None:
    """SIGKILL and a blocking reap: the way out on cancellation (microseconds)."""
    send_signal(pidfd, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def wait_child(pid: int, pidfd: int, timeout: float | None) -> Procedure[int | None]:
    """Wait up to *timeout* seconds for the child; its return code, or None if it runs on."""
    yield Wait(read=(pidfd,), timeout=timeout)
    done, status = os.waitpid(pid, os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if done else None


def terminate(pid: int, pidfd: int, kill_timeout: float) -> Procedure[int]:
    """SIGTERM, then SIGKILL after *kill_timeout*; always reaps."""
    send_signal(pidfd, signal.SIGTERM)
    code = yield from wait_child(pid, pidfd, kill_timeout)
    while code is None:
        send_signal(pidfd, signal.SIGKILL)
        code = yield from wait_child(pid, pidfd, None)
    return code


# --- client: connect ----------------------------------------------------------


class _ConnectTimeout(Exception):
    pass


def _connect_address(family: int, kind: int, proto: int, address: Any,
                     timeout: float | None) -> Procedure[socket.socket]:
    """A non-blocking connect; raises OSError (EAGAIN included) or _ConnectTimeout."""
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err == errno.EINPROGRESS:
            if not (yield Wait(write=(sock.fileno(),), timeout=timeout)):
                raise _ConnectTimeout
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


def _resolve(target: TcpTarget, deadline: float | None) -> Procedure[list[Any]]:
    try:  # an IP literal is resolved at once
        return socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass
    try:
        infos = yield Offload(socket.getaddrinfo, (target.host, target.port, 0,
                                                   socket.SOCK_STREAM),
                              timeout=_left(deadline))
    except Expired:
        raise _ConnectTimeout from None
    return list(infos)


def connect(target: UnixTarget | TcpTarget, timeout: float | None) -> Procedure[socket.socket]:
    """Connect like Dovecot's program client (PROTOCOL.md 6.3, 6.4).

    unix: a full backlog (EAGAIN) is retried every 100 ms until the timeout.
    tcp: every resolved address is tried in turn, each with an equal share
    of what is left of the timeout, so one black-holed address cannot use
    it all up.

    Raises:
        OSError: the connect failed (the last address's error for tcp).
        _ConnectTimeout: the timeout passed.
    """
    deadline = None if timeout is None else monotonic() + timeout
    if isinstance(target, TcpTarget):
        infos = yield from _resolve(target, deadline)
        last: OSError | None = None
        for index, (family, kind, proto, _, address) in enumerate(infos):
            left = _left(deadline)
            share = None if left is None else left / (len(infos) - index)
            if share is not None and share <= 0:
                break
            try:
                return (yield from _connect_address(family, kind, proto, address, share))
            except OSError as exc:
                last = exc
            except _ConnectTimeout:
                last = None
        if last is None:
            raise _ConnectTimeout
        raise last
    while True:
        try:
            # A unix connect never waits: it succeeds, fails, or says EAGAIN.
            return (yield from _connect_address(socket.AF_UNIX, socket.SOCK_STREAM, 0,
                                                target.path, None))
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise
        left = _left(deadline)
        if left is not None and left <= 0:
            raise _ConnectTimeout
        yield Wait(timeout=UNIX_RETRY_INTERVAL if left is None
                   else min(UNIX_RETRY_INTERVAL, left))


# --- client: the exchange -----------------------------------------------------


class _Output:
    """Where output goes: collected here, delivered to the caller chunk by chunk, or dropped."""

    __slots__ = ("chunks", "deliver")

    def __init__(self, collect: bool, deliver: bool = True) -> None:
        self.chunks: list[bytes] | None = [] if collect else None
        self.deliver = deliver

    def put(self, data: bytes, deadline: float | None) -> Procedure[None]:
        if self.chunks is not None:
            self.chunks.append(data)
        elif self.deliver:
            yield Deliver(data, _left(deadline))

    def data(self) -> bytes | None:
        return b"".join(self.chunks) if self.chunks is not None else None


def exchange(sock: socket.socket, conn: ClientConnection, header: bytes, label: str,
             timeout: float | None, out: _Output) -> Procedure[RunResult]:
    """Send the request and payload while reading the reply, until the core has a Result.

    One loop does both directions, so a script that writes before it reads
    cannot deadlock it.  Sending stops when the core says so (the payload
    ended, a write failed, or the reply is already complete); a failed
    write is reported with ``send_failed()`` and the core decides what it
    means for the result.
    """
    deadline = None if timeout is None else monotonic() + timeout
    fd = sock.fileno()
    pending = memoryview(header)
    reads = conn.reads_reply
    sending = True
    since = monotonic()

    def fail(kind: ErrorKind, detail: str) -> RunResult:
        return RunResult.failure(kind, detail, target=label, output=out.data())

    try:
        while True:
            # One chunk out, then whatever came in: a reply that completes
            # while payload is still being sent is seen at once.
            blocked = False
            if sending:
                if not pending and conn.state is ClientState.SENDING:
                    chunk = yield NextInput(_left(deadline))
                    pending = memoryview(conn.send(
                        EndOfInput() if chunk is None else Data(data=chunk)))
                if pending:
                    try:
                        pending = pending[sock.send(pending):]
                    except BlockingIOError:
                        blocked = True
                    except OSError as exc:
                        # The service stopped reading (the script ended early):
                        # its result code may still arrive.
                        conn.send_failed(f"write({label}) failed: {exc.strerror}")
                        pending = memoryview(b"")
                if not pending and conn.state is not ClientState.SENDING:
                    sending = False  # all sent, or a write failed: the core knows which
                    if not reads:
                        result = conn.next_event()
                        assert isinstance(result, Result)
                        return RunResult.from_result(result, output=None, target=label)
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
            quiet = True
            if reads:
                try:
                    data: bytes | None = sock.recv(CHUNK)
                except BlockingIOError:
                    data = None
                except ConnectionResetError:
                    conn.receive_reset()
                    data = None
                except OSError as exc:
                    return fail(ErrorKind.IO, f"read({label}) failed: {exc.strerror}")
                if data is not None:
                    conn.receive_data(data)
                    quiet = False
                while True:
                    event = conn.next_event()
                    if type(event) is Output:
                        yield from out.put(event.data, deadline)
                        continue
                    if type(event) is Result:
                        # The reply is complete: nothing more is sent either.
                        return RunResult.from_result(event, output=out.data(), target=label)
                    break
            left = _left(deadline)
            if left is not None and left <= 0:
                return fail(ErrorKind.RUN_TIMEOUT, run_timeout_detail(timeout))
            if quiet and (blocked or not sending):
                if not (yield Wait(read=(fd,) if reads else (), write=(fd,) if blocked else (),
                                   timeout=left)):
                    return fail(ErrorKind.RUN_TIMEOUT, run_timeout_detail(timeout))
                since = monotonic()
            elif monotonic() - since >= SLICE:
                yield TURN
                since = monotonic()
    except Expired:
        return fail(ErrorKind.RUN_TIMEOUT, run_timeout_detail(timeout))


def _run_socket(target: UnixTarget | TcpTarget, conn: ClientConnection, header: bytes,
                connect_timeout: float | None, timeout: float | None,
                out: _Output) -> Procedure[RunResult]:
    label = target.label
    try:
        sock = yield from connect(target, connect_timeout)
    except _ConnectTimeout:
        return RunResult.failure(ErrorKind.CONNECT_TIMEOUT,
                                 f"connect({label}) timed out after {connect_timeout} s",
                                 target=label)
    except OSError as exc:
        kind, detail = describe_connect_error(label, exc)
        return RunResult.failure(kind, detail, target=label)
    with sock:
        return (yield from exchange(sock, conn, header, label, timeout, out))


# --- client: the fork driver --------------------------------------------------


def _pump_pipes(in_w: int | None, out_r: int | None, deadline: float | None,
                out: _Output, fds: list[int]) -> Procedure[bool]:
    """Feed the child's stdin and read its stdout at once; False when the deadline passed."""
    pending = memoryview(b"")
    since = monotonic()
    try:
        while in_w is not None or out_r is not None:
            waiting_write = waiting_read = False
            while in_w is not None:
                if not pending:
                    left = _left(deadline)
                    if left is not None and left <= 0:
                        return False  # the child reads as fast as the input comes
                    chunk = yield NextInput(left)
                    if chunk is None:
                        fds.remove(in_w)
                        os.close(in_w)
                        in_w = None
                        break
                    pending = memoryview(chunk)
                    if monotonic() - since >= SLICE:  # many small chunks
                        yield TURN
                        since = monotonic()
                try:
                    pending = pending[os.write(in_w, pending):]
                except BlockingIOError:
                    waiting_write = True
                    break
                except BrokenPipeError:  # the program does not read all of its input
                    fds.remove(in_w)
                    os.close(in_w)
                    in_w = None
            if out_r is not None:
                try:
                    data = os.read(out_r, CHUNK)
                except BlockingIOError:
                    waiting_read = True
                else:
                    if data:
                        yield from out.put(data, deadline)
                    else:
                        out_r = None
            left = _left(deadline)
            if left is not None and left <= 0:
                return False
            if (waiting_read and (waiting_write or in_w is None)) or (
                    waiting_write and out_r is None):
                ready = yield Wait(read=(out_r,) if waiting_read and out_r is not None else (),
                                   write=(in_w,) if waiting_write and in_w is not None else (),
                                   timeout=left)
                if not ready:
                    return False
                since = monotonic()
            elif monotonic() - since >= SLICE:
                yield TURN
                since = monotonic()
    except Expired:
        return False
    return True


def _run_fork(target: ForkTarget, argv: tuple[bytes, ...], environ: dict[bytes, bytes],
              has_input: bool, want_output: bool, timeout: float | None,
              out: _Output) -> Procedure[RunResult]:
    label = target.label
    deadline = None if timeout is None else monotonic() + timeout
    fds: list[int] = []
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        fds.append(null)
        in_r, in_w = os.pipe() if has_input else (null, -1)
        out_r, out_w = os.pipe() if want_output else (-1, null)
        fds.extend(fd for fd in (in_r, in_w, out_r, out_w) if fd not in (-1, null))
        try:
            pid = spawn(argv, environ, stdin=in_r, stdout=out_w,
                        executable=resolve_program(argv[0]))
        except OSError as exc:
            return fork_result(None, killed_by_us=False, target=label, output=out.data(),
                               detail=f"execvp({target.path}) failed: {exc.strerror}")
        for fd in (in_r, out_w):
            if fd != null:
                fds.remove(fd)
                os.close(fd)
        for fd in (in_w, out_r):
            if fd != -1:
                os.set_blocking(fd, False)
        try:
            pidfd = open_pidfd(pid)
        except OSError as exc:
            return RunResult.failure(ErrorKind.OTHER, f"pidfd_open() failed: {exc.strerror}",
                                     target=label, output=out.data())
        try:
            finished = yield from _pump_pipes(in_w if has_input else None,
                                              out_r if want_output else None, deadline, out, fds)
            returncode = None
            if finished:
                returncode = yield from wait_child(pid, pidfd, _left(deadline))
            kind, detail = ErrorKind.NONE, ""
            if returncode is None:
                kind, detail = ErrorKind.RUN_TIMEOUT, run_timeout_detail(timeout)
                returncode = yield from terminate(pid, pidfd, KILL_TIMEOUT)
        except BaseException:
            # Cancelled, or the caller's input/output raised: kill at once, reap.
            kill_and_reap(pid, pidfd)
            raise
        finally:
            os.close(pidfd)
        return fork_result(returncode, killed_by_us=kind is not ErrorKind.NONE, target=label,
                           output=out.data(), kind=kind, detail=detail)
    finally:
        for fd in fds:
            os.close(fd)


def start_run(target: Target | str, args: Iterable[BytesLike], options: RunOptions, *,
              input: object, output: Callable[[bytes], object] | None = None,
              stream: bool = False) -> Procedure[RunResult]:
    r"""Check a run's arguments now and return the procedure that performs it.

    The output is collected into the result, unless there is an *output*
    callback (then it is read even with ``read_output=False``) or the run
    is *stream*\ ed by ``open_run()``: both take it as Deliver requests.
    *input* is the payload as the caller gave it (None: no payload).  Up to
    ``CHUNK`` bytes in memory go out with the header, in one send; any
    other payload is asked for with NextInput (the fork driver then gives
    the child a pipe rather than ``/dev/null``).

    Raises:
        LocalProtocolError: invalid arguments (a NUL byte, a bad URI...).
    """
    collect = output is None and not stream
    if output is not None:
        options = {**options, "read_output": True}
    resolved = coerce_target(target, options.get("base_dir"))
    env = env_bytes(options.get("env"))
    read_output = options.get("read_output", True)
    timeout = options.get("timeout")
    out = _Output(collect and read_output, deliver=read_output)
    if isinstance(resolved, ForkTarget):
        argv = fork_argv(resolved.path, args)
        return _run_fork(resolved, argv, env, input is not None, read_output, timeout, out)
    conn = ClientConnection(dot=isinstance(resolved, TcpTarget), read_output=read_output,
                            lenient_reset=options.get("lenient_reset", True))
    header = conn.send(Request(args=args, env=env.items(), noreply=options.get("noreply", False)))
    if isinstance(input, (bytes, bytearray)) and len(input) <= CHUNK:
        payload = conn.send(Data(data=bytes(input))) if input else b""
        header += payload + conn.send(EndOfInput())
    return _run_socket(resolved, conn, header,
                       options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT), timeout, out)


Answers = Mapping[type, Callable[[Any], Awaitable[Any]]]


class Driver:
    """Answers a procedure's requests from a table, until it ends or asks something else.

    The one driver loop of every flavour.  Whatever an answer raises (a
    cancellation, an error of the caller's input or output) is thrown into
    the procedure, which cleans up and lets it propagate.
    """

    __slots__ = ("_answers", "_procedure", "result")

    def __init__(self, procedure: Procedure[Any], answers: Answers) -> None:
        self._procedure = procedure
        self._answers = answers
        #: What the procedure returned, once it has ended.
        self.result: Any = None

    async def advance(self, reply: Any = None) -> Request_ | None:
        """Run on: the first request the table cannot answer, or None at the end.

        *reply* is sent in first (the answer to the request last returned).
        """
        error: BaseException | None = None
        procedure, answers = self._procedure, self._answers
        while True:
            try:
                request = procedure.throw(error) if error is not None else procedure.send(reply)
            except StopIteration as stop:
                self.result = stop.value
                return None
            answer = answers.get(type(request))
            if answer is None:
                return request
            try:
                reply, error = await answer(request), None
            except BaseException as exc:  # thrown into the procedure
                reply, error = None, exc

    def abandon(self) -> None:
        """End a procedure nobody will drive on: it cleans up (kills, closes) at once."""
        with contextlib.suppress(Abandoned, StopIteration):
            self._procedure.throw(Abandoned())


async def _next_chunk(chunks: AsyncIterator[bytes]) -> bytes | None:
    async for chunk in chunks:
        if chunk:
            return bytes(chunk)
    return None


Within = Callable[[Awaitable[Any], "float | None"], Awaitable[Any]]


def run_answers(answers: Answers, input: object, output: Callable[[bytes], object] | None,
                within: Within, read: Callable[..., Awaitable[bytes]] | None = None) -> Answers:
    """A flavour's *answers* plus those of one run: its input and its output.

    *input* is what ``run()`` accepts (bytes, a file, an iterable or an
    async iterable of bytes); an async iterable's next chunk and an
    awaitable that *output* returns are awaited through *within*, which
    raises :class:`Expired` when the request's timeout passes.  *read*
    reads a file off the loop (``read(file.read, size)``), else the file is
    read where the driver runs.  Without *output* there is no Deliver
    answer: ``open_run()`` takes the output itself.
    """
    next_input: Callable[[NextInput], Awaitable[bytes | None]]
    if isinstance(input, AsyncIterable):
        chunks = input.__aiter__()

        async def next_input(request: NextInput) -> bytes | None:
            return await within(_next_chunk(chunks), request.timeout)  # type: ignore[no-any-return]

    elif read is not None and (read_file := getattr(input, "read", None)) is not None:

        async def next_input(request: NextInput) -> bytes | None:
            return await within(read(read_file, CHUNK), request.timeout) or None

    else:
        sync_chunks = input_chunks(input)

        async def next_input(request: NextInput) -> bytes | None:
            return next(sync_chunks, None)

    async def deliver(request: Deliver) -> None:
        assert output is not None
        returned = output(request.data)
        if inspect.isawaitable(returned):
            await within(returned, request.timeout)

    mine: dict[type, Callable[[Any], Awaitable[Any]]] = {**answers, NextInput: next_input}
    if output is not None:
        mine[Deliver] = deliver
    return mine


class Abandoned(Exception):
    """Thrown into a procedure whose caller went away (an ``open_run`` block left early)."""


async def drive(procedure: Procedure[T], answers: Answers) -> T:
    """Run *procedure* to its end, answering each request with ``answers[type(request)]``.

    asyncio and trio await it; the blocking flavour's answers never
    suspend, so it completes in a single ``send()``.
    """
    driver = Driver(procedure, answers)
    left = await driver.advance()
    assert left is None, f"no answer for {left!r}"
    return driver.result  # type: ignore[no-any-return]


class RunStream:
    """A run's output, chunk by chunk: what ``async with open_run(...)`` gives.

    Iterate it with ``async for``; each item is one chunk of output as it
    arrives.  The run advances only while the consumer asks for the next
    chunk, so memory stays bounded whatever the output's size (the run
    timeout includes the time the consumer takes).  Entering the block
    starts the run.  When the iteration ends, :attr:`result` holds the
    :class:`RunResult` (its ``output`` is None: the chunks were the
    output); an exception the run raised (from the input, say) is raised by
    the iteration.  Leaving the block before the end stops the run at once:
    the connection is closed, a fork driver's child is killed and reaped,
    and :attr:`result` stays None.
    """

    def __init__(self, procedure: Procedure[RunResult], answers: Answers) -> None:
        #: The run's outcome, once the iteration has ended (else None).
        self.result: RunResult | None = None
        self._driver = Driver(procedure, answers)
        self._next: bytes | Exception | None = None
        self._state = "new"  # then "open", "over"

    async def __aenter__(self) -> RunStream:
        if self._state != "new":
            raise RuntimeError("a RunStream is entered once, as open_run() returns it")
        self._state = "open"
        try:
            self._next = await self._step()
        except Exception as exc:  # raised by the iteration, as documented
            self._next = exc
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._state == "open":
            self._state = "over"
            self._driver.abandon()

    def __aiter__(self) -> RunStream:
        return self

    async def __anext__(self) -> bytes:
        if self._state == "new":
            raise RuntimeError("iterate a RunStream inside its async with block")
        pending, self._next = self._next, None
        if isinstance(pending, Exception):
            raise pending
        if pending is None and self._state == "open":
            pending = await self._step()
        if pending is None:
            raise StopAsyncIteration
        return pending

    async def _step(self) -> bytes | None:
        try:
            request = await self._driver.advance()
        except BaseException:
            self._state = "over"
            raise
        if request is None:
            self._state = "over"
            self.result = self._driver.result
            return None
        assert type(request) is Deliver
        return request.data


# --- service ------------------------------------------------------------------


class Job:
    """One connection a service handles: what a stop needs to know of it.

    Fields:
        pidfd: the running script's pidfd, else None.
        reading_header: no script has been started yet.
        cancel: set by the flavour: ends the handling at once (a stop that
            ran out of patience).
    """

    __slots__ = ("cancel", "pidfd", "reading_header")

    def __init__(self, cancel: Callable[[], object]) -> None:
        self.pidfd: int | None = None
        self.reading_header = True
        self.cancel = cancel


class Jobs:
    """The connections of one service, all handled in one thread (each flavour's loop)."""

    def __init__(self) -> None:
        self._jobs: set[Job] = set()

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: Job) -> None:
        """A connection starts being handled."""
        self._jobs.add(job)

    def discard(self, job: Job) -> None:
        """A connection is done."""
        self._jobs.discard(job)

    def signal_scripts(self, signum: int) -> None:
        """Send *signum* to every running script (through its pidfd: never a recycled pid)."""
        for job in self._jobs:
            if job.pidfd is not None:
                send_signal(job.pidfd, signum)

    def cancel(self, *, header_only: bool) -> None:
        """Cancel the jobs still reading a header (too late to start a script), or all."""
        for job in list(self._jobs):  # a job that is done (discarded) is never cancelled
            if job.reading_header or not header_only:
                with contextlib.suppress(OSError):
                    job.cancel()


def accept(listeners: list[tuple[socket.socket, str | tuple[str, int]]],
           config: ServiceConfig) -> Procedure[tuple[socket.socket, str]]:
    """Accept one client of any listener: ``(socket, peer label)``.

    Failures such as EMFILE are logged and retried after 0.1 s: the service
    keeps serving.  A service stops accepting by cancelling it.
    """
    fds = tuple(sock.fileno() for sock, _ in listeners)
    while True:
        for sock, name in listeners:
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, ConnectionAbortedError):
                continue
            except OSError as exc:
                config.logger.error("accept() failed: %s", exc)
                yield Wait(timeout=0.1)
                continue
            return conn, peer_label(name, peer)
        yield Wait(read=fds)


class _HeaderTimeout(Exception):
    pass


# A client's socket stays in blocking mode from accept to close, as the script
# needs it: the service's own calls say MSG_DONTWAIT instead of switching the
# mode back and forth (three ioctl calls fewer per request).  Plain ints: the
# socket module's MsgFlag members combine through enum's Python-level __or__.
_DONTWAIT = int(socket.MSG_DONTWAIT)
_PEEK = int(socket.MSG_PEEK)


def _recv(sock: socket.socket, size: int, deadline: float, flags: int = 0) -> Procedure[bytes]:
    while True:
        try:
            return sock.recv(size, flags | _DONTWAIT)
        except BlockingIOError:
            left = deadline - monotonic()
            if left <= 0 or not (yield Wait(read=(sock.fileno(),), timeout=left)):
                raise _HeaderTimeout from None


def read_header(sock: socket.socket,
                config: ServiceConfig) -> Procedure[tuple[ServiceConnection, ScriptRequest]]:
    """Read the request header, consuming exactly its bytes.

    The payload stays queued on the socket for the script (Dovecot's
    script service does the same).
    """
    svc = config.new_connection()
    deadline = monotonic() + config.header_timeout
    consumed = 0
    event = svc.next_event()
    while event is NEED_DATA:
        data = yield from _recv(sock, 65536, deadline, _PEEK)
        svc.receive_data(data)
        event = svc.next_event()
        if event is NEED_DATA:
            sock.recv(len(data), _DONTWAIT)  # all header bytes: consume them
            consumed += len(data)
    assert isinstance(event, ScriptRequest)
    left = event.header_size - consumed
    while left > 0:
        chunk = yield from _recv(sock, left, deadline)
        if not chunk:
            raise RemoteProtocolError("disconnected while the header was consumed")
        left -= len(chunk)
    return svc, event


def _send_reply(sock: socket.socket, data: bytes, deadline: float) -> Procedure[str]:
    """Send the result code before *deadline*; "" or what went wrong (for the log)."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view, _DONTWAIT):]
        except BlockingIOError:
            left = deadline - monotonic()
            if left <= 0 or not (yield Wait(write=(sock.fileno(),), timeout=left)):
                return ", client does not read: no reply sent"
        except OSError as exc:
            return f", client gone: {exc.strerror}"
    return ""


def close_gently(sock: socket.socket, drain_for: float) -> Procedure[None]:
    """Half-close, then read until the client closes too, for at most *drain_for* seconds.

    Closing a socket with unread data makes Linux send a reset, which can
    destroy the result code before the client reads it (quirk Q8): so the
    payload the script did not read is drained first.
    """
    deadline = monotonic() + drain_for
    with contextlib.suppress(OSError, _HeaderTimeout):
        sock.shutdown(socket.SHUT_WR)
        while (yield from _recv(sock, CHUNK, deadline)):
            pass


def run_script(sock: socket.socket, svc: ServiceConnection, request: ScriptRequest,
               config: ServiceConfig, job: Job) -> Procedure[str]:
    """Run the script on the connection, reply, close; say how it went, for the log.

    *sock* is in blocking mode (serve_connection sees to it): the script
    inherits it as its stdin and stdout.
    """
    fd = sock.fileno()
    try:
        # Right here, even with other connections to serve: posix_spawn
        # blocks only until the child runs, and a thread hop costs more
        # (benchmarks/README.md, "spawn in place").
        pid = spawn(request.argv, request.environ, stdin=fd, stdout=fd)
    except OSError as exc:
        config.logger.error("execvp(%s) failed: %s", os.fsdecode(request.argv[0]),
                            exc.strerror)
        returncode: int | None = None
        how = "not started"
    else:
        try:
            pidfd = open_pidfd(pid)  # on failure the child is killed and reaped
        except OSError as exc:
            config.logger.error("pidfd_open() failed: %s", exc.strerror)
            returncode, how = None, "killed: cannot be waited for"
        else:
            job.pidfd = pidfd
            try:
                how = ""
                returncode = yield from wait_child(pid, pidfd, request.alarm or None)
                if returncode is None:
                    # alarm=N expired: end the script before replying (quirk Q9).
                    how = f"alarm {request.alarm} s expired, "
                    returncode = yield from terminate(pid, pidfd, config.kill_timeout)
            except BaseException:
                kill_and_reap(pid, pidfd)
                raise
            finally:
                job.pidfd = None
                os.close(pidfd)
            how += describe_returncode(returncode)
    # The reply has the header's time limit: a client that never reads it
    # must not keep the slot.
    reply = svc.send(ScriptExited(returncode=returncode))
    trouble = yield from _send_reply(sock, reply, monotonic() + config.header_timeout)
    if not trouble:  # else there is no result code to protect from a reset
        yield from close_gently(sock, config.header_timeout)
    return how + trouble


def serve_connection(sock: socket.socket, peer: str, config: ServiceConfig,
                     job: Job) -> Procedure[None]:
    """Handle one connection from accept to close: the whole of a request's way.

    Read the header, run the script with the socket as its stdin and
    stdout, send the result code, half-close and drain, and write one log
    line.  Nothing a client does makes it raise (only cancellation
    propagates); the caller closes the socket.
    """
    started = monotonic()
    logger = config.logger
    try:
        if sock.gettimeout() is not None:  # socket.setdefaulttimeout() was called
            sock.settimeout(None)  # the script needs a blocking socket
        svc, request = yield from read_header(sock, config)
        job.reading_header = False
        how = yield from run_script(sock, svc, request, config, job)
        log_request(logger, peer, request, how, monotonic() - started)
    except RemoteProtocolError as exc:
        log_bad_header(logger, peer, exc)
        # Read what the client still sends before closing, so that the
        # close is not a reset (bounded: a hostile client cannot keep the slot).
        yield from close_gently(sock, min(BAD_HEADER_DRAIN, config.header_timeout))
    except _HeaderTimeout:
        logger.warning("%s: header not received within %s s", peer, config.header_timeout)
    except OSError as exc:
        logger.warning("%s: %s", peer, exc)
    except Exception:  # never let one connection take the service down
        logger.exception("%s: unexpected error", peer)


def wind_down(jobs: Jobs, config: ServiceConfig) -> Procedure[None]:
    """Stop a service whose listeners are closed: the one stop plan of every flavour.

    Running scripts get ``grace`` seconds; then connections still reading a
    header are cancelled and scripts get SIGTERM; ``kill_timeout`` seconds
    later SIGKILL.  Killed scripts are still reaped and answered (``-``)
    within a bounded drain; whatever is left then is cancelled.  A
    cancellation thrown in meanwhile skips the remaining waits and is
    re-raised at the end, once every connection is done.
    """
    interrupted: BaseException | None = None

    def patience(timeout: float) -> Procedure[None]:
        nonlocal interrupted
        if interrupted is None and len(jobs):
            try:
                yield WaitJobs(timeout)
            except GeneratorExit:  # closed by its driver: not a cancellation
                raise
            except BaseException as exc:
                interrupted = exc

    yield from patience(config.grace)
    jobs.cancel(header_only=True)
    jobs.signal_scripts(signal.SIGTERM)
    yield from patience(config.kill_timeout)
    jobs.signal_scripts(signal.SIGKILL)
    yield from patience(config.header_timeout + 1.0)
    jobs.cancel(header_only=False)
    while len(jobs):
        try:
            yield WaitJobs(None)
        except GeneratorExit:
            raise
        except BaseException as exc:
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


#: How a flavour runs a procedure of its service: ``start(procedure, done)``
#: drives it in the service's loop, calls ``done(result)`` when it ends (None
#: if it raised) and returns what cancels it where it waits (*done* is then
#: not called).
Start = Callable[[Procedure[Any], Callable[[Any], object]], Callable[[], object]]


class Serving:
    """The accepting and the connections of a service whose flavour steps procedures itself.

    The blocking and asyncio services run every procedure from their loop's
    callbacks (trio runs each in a task of its nursery).  This is their one
    plan: accept while a slot is free (extra clients wait in the listen
    backlog), run :func:`serve_connection` for each client, accept again
    when a connection ends, and on :meth:`stop` cancel the accepting and
    close the listeners; :func:`wind_down` does the rest.

    Args:
        listeners: the bound listeners.
        config: the service's settings.
        start: the flavour's way to run a procedure (:data:`Start`).
        idle: called whenever the last running connection has ended.
    """

    def __init__(self, listeners: Listeners, config: ServiceConfig, start: Start,
                 idle: Callable[[], object]) -> None:
        self.listeners, self.config = listeners, config
        self.jobs = Jobs()
        #: The client sockets of the connections being handled.
        self.sockets: set[socket.socket] = set()
        self._start, self._idle = start, idle
        self._cancel_accept: Callable[[], object] | None = None
        self._stopped = False

    def begin(self) -> None:
        """Start accepting."""
        self._accept_next()

    def stop(self) -> None:
        """Stop accepting and close the listeners (unix socket files removed)."""
        self._stopped = True
        if self._cancel_accept is not None:
            self._cancel_accept()
            self._cancel_accept = None
        self.listeners.close()

    def _accept_next(self) -> None:
        if not self._stopped and len(self.jobs) < self.config.max_connections:
            self._cancel_accept = self._start(accept(self.listeners.sockets, self.config),
                                              self._accepted)

    def _accepted(self, client: tuple[socket.socket, str] | None) -> None:
        self._cancel_accept = None
        if client is None:  # accept() raised: what it raised went up the loop
            return
        conn, peer = client
        # Shutting the socket down ends whatever the procedure waits for on it.
        job = Job(cancel=lambda: conn.shutdown(socket.SHUT_RDWR))
        self.jobs.add(job)
        self.sockets.add(conn)
        self._start(serve_connection(conn, peer, self.config, job),
                    lambda _: self._finished(job, conn))
        self._accept_next()

    def _finished(self, job: Job, conn: socket.socket) -> None:
        self.jobs.discard(job)
        self.sockets.discard(conn)
        conn.close()
        if not len(self.jobs):
            self._idle()
        if self._cancel_accept is None:  # every slot was taken: one is free now
            self._accept_next()
