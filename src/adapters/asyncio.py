"""asyncio adapter: run scripts and serve them from asyncio code.

The procedures are the shared ones of ``_procedures.py``; this module only
waits for what they ask: readiness callbacks on raw descriptors
(``loop.add_reader``/``add_writer``) for sockets, pipes and the pidfds of
children alike, the default executor for a name lookup.  No transports,
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
from collections.abc import (
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from typing import Any, TypeVar

from typing_extensions import Unpack

from execproto import BytesLike, Target

from . import _procedures as proc
from ._common import (
    Address,
    Listener,
    Listeners,
    OutputCallback,
    RunOptions,
    RunResult,
    ServiceConfig,
    ServiceOptions,
)
from ._common import (
    AsyncInput as Input,
)
from ._procedures import RunStream

__all__ = ["RunStream", "open_run", "run", "serve"]

T = TypeVar("T")


def _wake(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


async def _wait(request: proc.Wait) -> bool:
    loop = asyncio.get_running_loop()
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
        raise proc.Expired from None


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # no "exception was never retrieved" for an abandoned call


async def _offload(request: proc.Offload) -> Any:
    future = asyncio.get_running_loop().run_in_executor(None, request.fn, *request.args)
    future.add_done_callback(_retrieve)  # abandoned on cancellation: nobody awaits it
    return await _within(future, request.timeout)


async def _turn(request: proc.Turn) -> None:
    await asyncio.sleep(0)


_ANSWERS: proc.Answers = {
    proc.Wait: _wait, proc.Offload: _offload, proc.Turn: _turn}


def _answers(input: Input, output: OutputCallback | None) -> proc.Answers:
    # A file or an iterable is read in the loop: it must not block.
    return proc.run_answers(_ANSWERS, input, output, _within)


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
    procedure = proc.start_run(target, args, options, input=input,
                               output=output)
    return await proc.drive(procedure, _answers(input, output))


def open_run(target: Target | str, args: Iterable[BytesLike] = (), *, input: Input = None,
             **options: Unpack[RunOptions]) -> RunStream:
    """Start a run whose output is streamed, chunk by chunk.

    Use it as ``async with open_run(target, ...) as stream:``.  The
    arguments are those of :func:`run` (less ``output``) and are validated
    at once; see :class:`RunStream` for the rest.

    Raises:
        LocalProtocolError: invalid arguments (a NUL byte, a bad URI...).
    """
    procedure = proc.start_run(target, args, options, input=input,
                               stream=True)
    return RunStream(procedure, _answers(input, None))


class _Service:
    """The listeners and the running connections of one :func:`serve` call."""

    def __init__(self, listeners: Sequence[Listener], config: ServiceConfig) -> None:
        self.config = config
        self.listeners = Listeners(listeners, config)
        self.jobs = proc.Jobs()
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
                    client = await proc.drive(proc.accept(self.listeners.sockets, self.config),
                                         _ANSWERS)
                except BaseException:
                    self.slots.release()
                    raise
                assert client is not None
                self._start(*client)
        finally:
            self.listeners.close()
            await proc.drive(proc.wind_down(self.jobs, self.config),
                        {**_ANSWERS, proc.WaitJobs: self._wait_jobs})

    def _start(self, conn: Any, peer: str) -> None:
        job = proc.Job(cancel=lambda: task.cancel())
        task = asyncio.ensure_future(
            proc.drive(proc.serve_connection(conn, peer, self.config, job), _ANSWERS))
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

    async def _wait_jobs(self, request: proc.WaitJobs) -> bool:
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
