"""Trio adapter: run scripts and serve them from trio code.

The procedures are the shared ones of ``_procedures.py``; this module only
waits for what they ask: ``trio.lowlevel.wait_readable``/``wait_writable``
on one descriptor (sockets, pipes, pidfds alike), or on an epoll descriptor
holding several, and a worker thread for a name lookup.

* ``run()`` returns the same :class:`RunResult` as the blocking flavour in
  every situation; cancelling it closes the connection, or kills (SIGKILL)
  and reaps the ``fork`` child.
* ``open_run()`` is ``run()`` as an async context manager whose value is an
  async iterator of output chunks; it never collects the output.
* ``serve()`` is the ``script`` service; start it with
  ``await nursery.start(serve, ...)`` to learn its addresses, cancel it to
  stop it.

Exceptions raised by the caller's input or output callables propagate as
they are, never wrapped in an exception group.
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import (
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from typing import Any, TypeVar

import trio  # type: ignore[import-untyped,unused-ignore]
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


async def _wait_fds(read: tuple[int, ...], write: tuple[int, ...]) -> None:
    if len(read) + len(write) == 1:
        if read:
            await trio.lowlevel.wait_readable(read[0])
        else:
            await trio.lowlevel.wait_writable(write[0])
        return
    # trio waits on one descriptor at a time: an epoll set is one descriptor.
    with select.epoll() as poller:
        for fd in read:
            poller.register(fd, select.EPOLLIN | (select.EPOLLOUT if fd in write else 0))
        for fd in write:
            if fd not in read:
                poller.register(fd, select.EPOLLOUT)
        await trio.lowlevel.wait_readable(poller.fileno())


async def _wait(request: proc.Wait) -> bool:
    if not request.read and not request.write:
        await trio.sleep(max(request.timeout or 0.0, 0.0))
        return False
    if request.timeout is None:
        await _wait_fds(request.read, request.write)
        return True
    with trio.move_on_after(max(request.timeout, 0.0)):
        await _wait_fds(request.read, request.write)
        return True
    return False


async def _within(awaitable: Awaitable[T], seconds: float | None) -> T:
    if seconds is None:
        return await awaitable
    with trio.move_on_after(max(seconds, 0.0)):
        return await awaitable
    raise proc.Expired


async def _offload(request: proc.Offload) -> Any:
    call = trio.to_thread.run_sync(request.fn, *request.args, abandon_on_cancel=True)
    return await _within(call, request.timeout)


async def _turn(request: proc.Turn) -> None:
    await trio.lowlevel.checkpoint()


_ANSWERS: dict[type, Callable[[Any], Awaitable[Any]]] = {
    proc.Wait: _wait, proc.Offload: _offload, proc.Turn: _turn}


def _answers(input: Input, output: OutputCallback | None) -> proc.Answers:
    # A file may be a pipe or a slow device: it is read in a worker thread.
    return proc.run_answers(_ANSWERS, input, output, _within, read=trio.to_thread.run_sync)


async def run(target: Target | str, args: Iterable[BytesLike] = (), *, input: Input = None,
              output: OutputCallback | None = None, **options: Unpack[RunOptions]) -> RunResult:
    """Run one script and wait for its result.

    The same as :func:`execproto.adapters.blocking.run`, as a coroutine;
    *input* may also be an async iterable of bytes (a file is read in a
    worker thread), and *output* may return an awaitable, which is awaited
    before reading on.  Cancelling it closes the connection, or kills
    (SIGKILL) and reaps the ``fork`` child, then re-raises the cancellation.

    Raises:
        LocalProtocolError: invalid arguments (a NUL byte, a bad URI...).
    """
    procedure = proc.start_run(target, args, options, input=input,
                               output=output)
    return await proc.drive(procedure, _answers(input, output))


def _sole_cancelled(exc: BaseException) -> trio.Cancelled | None:
    """The Cancelled in *exc* if it is one, or a group of nothing but Cancelled."""
    while not isinstance(exc, trio.Cancelled):
        inner = getattr(exc, "exceptions", None)  # an exception group
        if not inner or not all(_sole_cancelled(e) is not None for e in inner):
            return None
        exc = inner[0]
    return exc


@contextlib.contextmanager
def _plain_cancellation() -> Iterator[None]:
    """Let a cancellation leave an internal nursery as a plain ``trio.Cancelled``."""
    try:
        yield
    except BaseException as exc:
        cancelled = _sole_cancelled(exc)
        if cancelled is None or cancelled is exc:
            raise
        raise cancelled from None


def open_run(target: Target | str, args: Iterable[BytesLike] = (), *, input: Input = None,
             **options: Unpack[RunOptions]) -> RunStream:
    """Start a run whose output is streamed, chunk by chunk.

    Use it as ``async with open_run(target, args) as chunks:`` and iterate
    with ``async for chunk in chunks``.  The arguments are those of
    :func:`run` (less ``output``) and are validated at once; see
    :class:`RunStream` for the rest.

    Raises:
        LocalProtocolError: invalid arguments (a NUL byte, a bad URI...).
    """
    procedure = proc.start_run(target, args, options, input=input,
                               stream=True)
    return RunStream(procedure, _answers(input, None))


class _Service:
    """The listeners and handlers of one ``serve()`` call."""

    def __init__(self, listeners: Sequence[Listener], config: ServiceConfig) -> None:
        self.config = config
        self.listeners = Listeners(listeners, config)
        self.jobs = proc.Jobs()
        self.slots = trio.Semaphore(config.max_connections)
        self.idle = trio.Event()
        self.idle.set()

    async def serve(self, task_status: trio.TaskStatus[list[Address]]) -> None:
        try:
            async with trio.open_nursery() as handlers:
                try:
                    task_status.started(self.listeners.addresses)
                    while True:
                        # Take a slot before accepting: extra clients wait in the backlog.
                        await self.slots.acquire()
                        try:
                            client = await proc.drive(
                                proc.accept(self.listeners.sockets, self.config), _ANSWERS)
                        except BaseException:
                            self.slots.release()
                            raise
                        assert client is not None
                        handlers.start_soon(self._handle, *client)
                finally:
                    for sock, _ in self.listeners.sockets:
                        trio.lowlevel.notify_closing(sock)
                    self.listeners.close()
                    with trio.CancelScope(shield=True):
                        await proc.drive(proc.wind_down(self.jobs, self.config),
                                    {**_ANSWERS, proc.WaitJobs: self._wait_jobs})
        finally:
            self.listeners.close()

    async def _handle(self, conn: Any, peer: str) -> None:
        # Shielded from serve()'s cancellation: the stop plan (proc.wind_down)
        # decides when a connection is cancelled.
        with trio.CancelScope(shield=True) as scope:
            job = proc.Job(cancel=scope.cancel)
            self.jobs.add(job)
            if self.idle.is_set():
                self.idle = trio.Event()
            try:
                await proc.drive(proc.serve_connection(conn, peer, self.config, job),
                            _ANSWERS)
            finally:
                self.jobs.discard(job)
                if not len(self.jobs):
                    self.idle.set()
                conn.close()
                self.slots.release()

    async def _wait_jobs(self, request: proc.WaitJobs) -> bool:
        timeout = request.timeout
        with trio.move_on_after(float("inf") if timeout is None else timeout):
            await self.idle.wait()
            return True
        return False


async def serve(
    listeners: Sequence[Listener],
    script: BytesLike,
    script_args: Sequence[BytesLike] = (),
    *,
    task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[ServiceOptions],
) -> None:
    """Serve *script* on *listeners* until cancelled.

    Start it with ``addresses = await nursery.start(serve, listeners, script)``
    to learn where it listens (unix paths and ``(host, port)`` pairs).  When
    cancelled it stops accepting, lets running scripts finish for up to
    ``grace`` seconds (shielded from the cancellation), then sends them
    SIGTERM and, ``kill_timeout`` seconds later, SIGKILL; it reaps them,
    removes the unix socket files it created and re-raises the cancellation.

    Args:
        listeners: where to listen.
        script: the script; a relative path is resolved against ``libexec_dir``.
        script_args: arguments placed before the client's.
        task_status: given the list of addresses once listening.
        options: the service's settings, :class:`ServiceOptions`.

    Raises:
        OSError: a listener cannot be bound (before anything is served).
        LocalProtocolError: invalid settings.

    """
    config = ServiceConfig.of(script, script_args, options)
    with _plain_cancellation():
        await _Service(listeners, config).serve(task_status)
