"""asyncio adapter: run scripts and serve them from asyncio code.

The procedures are the shared ones of :mod:`._procedures`; this module only
waits for what they ask: readiness callbacks on raw descriptors
(``loop.add_reader``/``add_writer``) for sockets, pipes and the pidfds of
children alike, the default executor for calls that block.  No transports,
no asyncio subprocess API, no child watcher: each child is reaped by the
procedure that started it.

Cancelling :func:`run` (or leaving an :func:`open_run` block early) closes
the connection, or kills the fork driver's child at once and reaps it.
Cancelling :func:`serve` winds the service down like the blocking
``Service.stop()`` and then re-raises the cancellation; a second
cancellation skips the waiting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401 (see below)
import inspect
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from typing_extensions import Unpack

from execproto import BytesLike, Target

from ._common import (
    Listener,
    Listeners,
    RunOptions,
    RunResult,
    ServiceConfig,
    ServiceOptions,
    input_chunks,
)
from ._procedures import (
    Deliver,
    Expired,
    Job,
    Jobs,
    NextInput,
    Offload,
    Turn,
    Wait,
    WaitJobs,
    accept,
    drive,
    serve_connection,
    start_run,
    wind_down,
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
T = TypeVar("T")
# The default executor's module is imported lazily, by the first spawn off
# the loop; after serve(user=...) dropped privileges that import can fail
# (an interpreter under /root): it is imported above, with this module.


def _wake(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


async def _wait(loop: asyncio.AbstractEventLoop, request: Wait) -> bool:
    waiter: asyncio.Future[bool] = loop.create_future()
    for fd in request.read:
        loop.add_reader(fd, _wake, waiter, True)
    for fd in request.write:
        loop.add_writer(fd, _wake, waiter, True)
    timer = (None if request.timeout is None
             else loop.call_later(max(request.timeout, 0.0), _wake, waiter, False))
    try:
        return await waiter
    finally:
        for fd in request.read:
            loop.remove_reader(fd)
        for fd in request.write:
            loop.remove_writer(fd)
        if timer is not None:
            timer.cancel()


async def _within(awaitable: Awaitable[T], timeout: float | None) -> T:
    if timeout is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, max(timeout, 0.0))
    except asyncio.TimeoutError:
        raise Expired from None


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # no "exception was never retrieved" for an abandoned call


async def _offload(loop: asyncio.AbstractEventLoop, request: Offload) -> Any:
    future = loop.run_in_executor(None, request.fn, *request.args)
    future.add_done_callback(_retrieve)
    if request.abandon:
        return await _within(future, request.timeout)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        undo = request.undo
        if undo is not None:  # the result nobody receives is undone when it comes
            future.add_done_callback(
                lambda done: done.cancelled() or done.exception() or undo(done.result()))
        raise


async def _next_chunk(chunks: AsyncIterator[bytes]) -> bytes | None:
    async for chunk in chunks:
        if chunk:
            return bytes(chunk)
    return None


async def _turn(request: Turn) -> None:
    await asyncio.sleep(0)


async def _offload_request(request: Offload) -> Any:
    return await _offload(asyncio.get_running_loop(), request)


async def _wait_request(request: Wait) -> bool:
    return await _wait(asyncio.get_running_loop(), request)


_ANSWERS: dict[type, Callable[[Any], Awaitable[Any]]] = {
    Wait: _wait_request, Offload: _offload_request, Turn: _turn}


def _prepare(target: Target | str, args: Iterable[BytesLike], input: Input,
             output: OutputCallback | None,
             options: RunOptions) -> Callable[[], Coroutine[Any, Any, RunResult]]:
    """Check the arguments now; return what performs the run when called."""
    procedure = start_run(target, args, options, collect=output is None,
                          has_input=input is not None)

    async def next_input(request: NextInput) -> bytes | None:
        if isinstance(chunks, Iterator):
            return next(chunks, None)
        return await _within(_next_chunk(chunks), request.timeout)

    async def deliver(request: Deliver) -> None:
        assert output is not None
        returned = output(request.data)
        if inspect.isawaitable(returned):
            await _within(returned, request.timeout)

    chunks = input.__aiter__() if isinstance(input, AsyncIterable) else input_chunks(input)
    answers: dict[type, Callable[[Any], Awaitable[Any]]] = {
        **_ANSWERS, NextInput: next_input, Deliver: deliver}
    return lambda: drive(procedure, answers)


async def run(target: Target | str, args: Iterable[BytesLike] = (), *, input: Input = None,
              output: OutputCallback | None = None, **options: Unpack[RunOptions]) -> RunResult:
    """Run one script and wait for its result.

    The same as :func:`execproto.adapters.blocking.run`, as a coroutine;
    *input* may also be an async iterable of bytes, and *output* may
    return an awaitable, which is awaited before reading on.  Cancelling
    the call closes the connection, or kills (SIGKILL) and reaps the fork
    driver's child.

    Raises:
        LocalProtocolError: invalid arguments (a NUL byte, a bad URI...).
    """
    if output is not None:
        options["read_output"] = True
    return await _prepare(target, args, input, output, options)()


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
            while not task.done():  # a cancellation of ours must not leave it running
                try:
                    await asyncio.wait([task])
                except asyncio.CancelledError:
                    task.cancel()
            _retrieve(task)

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


def open_run(target: Target | str, args: Iterable[BytesLike] = (), *, input: Input = None,
             **options: Unpack[RunOptions]) -> RunStream:
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
    stream._start = _prepare(target, args, input, stream._put, options)
    return stream


class _Service:
    """The listeners and the running connections of one :func:`serve` call."""

    def __init__(self, listeners: Sequence[Listener], config: ServiceConfig) -> None:
        self.config = config
        self.listeners = Listeners(listeners, config)
        self.jobs = Jobs()
        self.tasks: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(config.max_connections)

    async def serve(self, ready: Callable[[list[Address]], object] | None) -> None:
        try:
            if ready is not None:
                ready(self.listeners.addresses)
            while True:
                # Take a slot before accepting: extra clients wait in the backlog.
                await self.slots.acquire()
                try:
                    client = await drive(accept(self.listeners.sockets, self.config),
                                         _ANSWERS)
                except BaseException:
                    self.slots.release()
                    raise
                assert client is not None
                self._start(*client)
        finally:
            self.listeners.close()
            await drive(wind_down(self.jobs, self.config),
                        {**_ANSWERS, WaitJobs: self._wait_jobs})

    def _start(self, conn: Any, peer: str) -> None:
        job = Job(cancel=lambda: task.cancel())
        task = asyncio.ensure_future(
            drive(serve_connection(conn, peer, self.config, job, self.jobs), _ANSWERS))
        self.jobs.add(job)
        self.tasks.add(task)

        def finished(task: asyncio.Task[None]) -> None:
            # Here rather than in the task: a task cancelled before it ran
            # never enters its own finally.
            conn.close()
            self.jobs.discard(job)
            self.tasks.discard(task)
            self.slots.release()
            _retrieve(task)

        task.add_done_callback(finished)

    async def _wait_jobs(self, request: WaitJobs) -> bool:
        if not self.tasks:
            return True
        _, pending = await asyncio.wait(set(self.tasks), timeout=request.timeout)
        return not pending


async def serve(
    listeners: Sequence[Listener],
    script: BytesLike,
    script_args: Sequence[BytesLike] = (),
    *,
    ready: Callable[[list[Address]], object] | None = None,
    **options: Unpack[ServiceOptions],
) -> None:
    """Serve *script* on *listeners* until cancelled.

    On cancellation the service stops accepting (its unix socket files are
    removed), lets running scripts finish for ``grace`` seconds, then sends
    them SIGTERM and, ``kill_timeout`` seconds later, SIGKILL; every script is
    reaped and answered before the cancellation is re-raised.  Cancelling
    again during that wind-down skips the waiting: what is left is killed
    at once.

    Args:
        listeners: where to listen.
        script: the script; a relative path is resolved against ``libexec_dir``.
        script_args: arguments placed before the client's.
        ready: called with the bound addresses (unix paths and
            ``(host, port)`` pairs) once the service listens.
        options: the service's settings, :class:`ServiceOptions`.

    Raises:
        OSError: a listener cannot be bound.
        LocalProtocolError: invalid settings.

    """
    await _Service(listeners, ServiceConfig.of(script, script_args, options)).serve(ready)
