"""asyncio adapter: run scripts and serve them from asyncio code.

The procedures are the shared ones of ``_procedures.py``; this module only
waits for what they ask: readiness callbacks on raw descriptors
(``loop.add_reader``/``add_writer``) for sockets, pipes and the pidfds of
children alike, the default executor for a name lookup.  No transports,
no asyncio subprocess API, no child watcher: each child is reaped by the
procedure that started it.  The service steps each connection's procedure
from those callbacks directly; a run is a coroutine that awaits a future
per wait.

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
from typing import Any, Generic, TypeVar

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


class _Stepper(Generic[T]):
    """A service's procedure (accepting, or one client), stepped from the loop's callbacks.

    A wait is a reader, writer or timer callback that resumes the procedure
    directly: no task, future or coroutine per connection or per wait, and
    one pass of the loop per wait instead of two.  The procedure is every
    flavour's; *finished* gets its result once it has ended (None if it
    raised).
    """

    __slots__ = ("_finished", "_handle", "_loop", "_procedure", "_reads", "_writes")

    def __init__(self, procedure: proc.Procedure[T],
                 finished: Callable[[T | None], object]) -> None:
        self._loop = asyncio.get_running_loop()
        self._procedure, self._finished = procedure, finished
        self._reads: tuple[int, ...] = ()
        self._writes: tuple[int, ...] = ()
        #: The pending timer or call_soon of the current wait, if any.
        self._handle: asyncio.Handle | None = self._loop.call_soon(self._step, None)

    def _unwait(self) -> None:
        loop = self._loop
        for fd in self._reads:
            loop.remove_reader(fd)
        for fd in self._writes:
            loop.remove_writer(fd)
        if self._handle is not None:
            self._handle.cancel()
        self._reads, self._writes, self._handle = (), (), None

    def _step(self, answer: object) -> None:
        self._unwait()
        try:
            request = self._procedure.send(answer)
        except StopIteration as stop:
            self._finished(stop.value)
            return
        except BaseException:  # an interruption (KeyboardInterrupt) went through it
            self._finished(None)
            raise
        loop = self._loop
        if type(request) is proc.Turn:
            self._handle = loop.call_soon(self._step, None)
            return
        assert type(request) is proc.Wait, request  # a service asks for nothing else
        for fd in request.read:
            loop.add_reader(fd, self._step, True)
        for fd in request.write:
            loop.add_writer(fd, self._step, True)
        self._reads, self._writes = request.read, request.write
        if request.timeout is not None:
            self._handle = loop.call_later(max(request.timeout, 0.0), self._step, False)

    def cancel(self) -> None:
        """End the procedure where it waits; *finished* is not called."""
        self._unwait()
        self._procedure.close()


class _Service:
    """One :func:`serve` call: the shared plan of :class:`proc.Serving`, stepped by callbacks."""

    def __init__(self, listeners: Sequence[Listener], config: ServiceConfig) -> None:
        self.config = config
        self.serving = proc.Serving(Listeners(listeners, config), config, self._start,
                                    self._idle)
        self.idle: asyncio.Future[None] | None = None  # set when the last connection ends

    async def serve(self, ready: Callable[[list[Address]], object] | None) -> None:
        try:
            if ready is not None:
                ready(self.serving.listeners.addresses)
            self.serving.begin()
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self.serving.stop()
            await proc.drive(proc.wind_down(self.serving.jobs, self.config),
                             {**_ANSWERS, proc.WaitJobs: self._wait_jobs})

    @staticmethod
    def _start(procedure: proc.Procedure[Any],
               done: Callable[[Any], object]) -> Callable[[], object]:
        return _Stepper(procedure, done).cancel

    def _idle(self) -> None:
        if self.idle is not None and not self.idle.done():
            self.idle.set_result(None)

    async def _wait_jobs(self, request: proc.WaitJobs) -> bool:
        if not len(self.serving.jobs):
            return True
        if self.idle is None or self.idle.done():
            self.idle = asyncio.get_running_loop().create_future()
        done, _ = await asyncio.wait({self.idle}, timeout=request.timeout)
        return bool(done)


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
