"""Blocking adapter: run scripts and serve them from synchronous code.

The procedures are the shared ones of ``_procedures.py``; this module only
answers what they ask, waiting with ``poll()``.  ``run()`` drives one run in
the calling thread.  :class:`Service` drives every connection's procedure in
the thread that calls :meth:`Service.serve_forever`, in one ``epoll`` loop
(no thread per connection): a procedure never blocks, so one connection
waits while the others go on.
"""

from __future__ import annotations

import heapq
import itertools
import select
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from typing_extensions import Unpack

from execproto import BytesLike, Target

from . import _procedures as proc
from ._common import (
    Input,
    Listener,
    Listeners,
    OutputCallback,
    RunOptions,
    RunResult,
    ServiceConfig,
    ServiceOptions,
    StopSignal,
)

__all__ = ["Service", "run", "serve"]

T = TypeVar("T")
_READ, _WRITE = select.POLLIN, select.POLLOUT  # the same bits as EPOLLIN, EPOLLOUT
monotonic = time.monotonic


async def _wait(request: proc.Wait) -> bool:
    # poll, not select: descriptors may exceed FD_SETSIZE.
    poller = select.poll()
    for fd in request.read:
        poller.register(fd, _READ)
    for fd in request.write:
        poller.register(fd, _WRITE | (_READ if fd in request.read else 0))
    timeout = request.timeout
    return bool(poller.poll(None if timeout is None else max(timeout, 0.0) * 1000))


async def _call(request: proc.Offload) -> Any:
    return request.fn(*request.args)  # this thread may block


async def _nothing(request: object) -> None:
    return None


async def _unbounded(awaitable: Awaitable[T], timeout: float | None) -> T:
    return await awaitable  # pragma: no cover (blocking input and output are not awaitable)


_ANSWERS: dict[type, Callable[[Any], Awaitable[Any]]] = {
    proc.Wait: _wait, proc.Offload: _call, proc.Turn: _nothing}


def _drive(procedure: proc.Procedure[T],
           answers: Mapping[type, Callable[[Any], Awaitable[Any]]] = _ANSWERS) -> T:
    """Run *procedure* to its end in this thread: the shared driver never suspends here."""
    coroutine = proc.drive(procedure, answers)
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    raise RuntimeError("a blocking answer suspended")  # pragma: no cover


def run(target: Target | str, args: Iterable[BytesLike] = (), *, input: Input = None,
        output: OutputCallback | None = None, **options: Unpack[RunOptions]) -> RunResult:
    """Run one script and wait for its result.

    Args:
        target: a :class:`execproto.Target` or a URI (``unix:PATH``,
            ``tcp:HOST:PORT``, ``exec:PATH``/``fork:PATH``).
        args: the script's arguments.
        input: the payload: bytes, a binary file, or an iterable of bytes
            (streamed; read while output is being received).
        output: called with each output chunk instead of collecting it.
        options: :class:`RunOptions` (``env``, ``noreply``, ``timeout``...).

    Returns:
        A :class:`RunResult`; transport problems are INTERNAL_FAILURE results,
        never exceptions.  An interruption (``KeyboardInterrupt``) closes the
        connection, or kills (SIGKILL) and reaps the fork driver's child.

    Raises:
        LocalProtocolError: invalid arguments (a NUL byte, a bad URI...).

    """
    procedure = proc.start_run(target, args, options, input=input,
                               output=output)
    return _drive(procedure, proc.run_answers(_ANSWERS, input, output, _unbounded))


class _Task:
    """One procedure the service's loop drives, and what it waits for."""

    __slots__ = ("done", "fds", "parked", "procedure", "timed", "turn")

    def __init__(self, procedure: proc.Procedure[Any], done: Callable[[Any], object]) -> None:
        self.procedure, self.done = procedure, done
        self.fds: tuple[int, ...] = ()
        self.parked = False
        self.timed = False  # its wait has a timer in the heap
        self.turn = 0  # a timer of an earlier wait does not wake it


class _Loop:
    """Drives many procedures in one thread: each waits on ``epoll``, none blocks the others.

    *answers* handles the requests other than Wait and Turn (the service's
    WaitJobs); a service's procedures ask for nothing else.

    A descriptor is in the epoll set only while a task waits for it, except
    those given to :meth:`keep` (the listeners and the stop signal, waited
    for again after every client): they stay registered between waits,
    which spares two ``epoll_ctl`` calls per descriptor and wait.
    """

    def __init__(self, answers: Mapping[type, Callable[[_Task, Any], object]]) -> None:
        self._epoll = select.epoll()
        self._by_fd: dict[int, _Task] = {}
        self._armed: dict[int, int] = {}  # fd -> the events it is registered for
        self._kept: set[int] = set()
        self._timers: list[tuple[float, int, int, _Task]] = []
        self._stale = 0  # timers of waits that ended otherwise, still in the heap
        self._ready: deque[tuple[_Task, Any]] = deque()
        self._tasks: set[_Task] = set()
        self._answers = answers
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, procedure: proc.Procedure[Any], done: Callable[[Any], object]) -> _Task:
        """Drive *procedure* from the next turn on; *done* gets its result (None if it raised)."""
        task = _Task(procedure, done)
        self._tasks.add(task)
        self._ready.append((task, None))
        return task

    def keep(self, fds: Iterable[int]) -> None:
        """Leave *fds* registered between waits, until :meth:`release`."""
        self._kept.update(fds)

    def release(self, fds: Iterable[int]) -> None:
        """Unregister kept *fds* (before they are closed)."""
        for fd in fds:
            self._kept.discard(fd)
            if fd not in self._by_fd and self._armed.pop(fd, None) is not None:
                self._epoll.unregister(fd)

    def park(self, task: _Task, read: tuple[int, ...] = (), write: tuple[int, ...] = (),
             timeout: float | None = None) -> None:
        """Let *task* wait for a fd (answer True), *timeout* (False) or :meth:`wake`."""
        events = dict.fromkeys(read, _READ)
        for fd in write:
            events[fd] = events.get(fd, 0) | _WRITE
        armed = self._armed
        for fd, mask in events.items():
            was = armed.get(fd)
            if was is None:
                self._epoll.register(fd, mask)
            elif was != mask:
                self._epoll.modify(fd, mask)
            armed[fd] = mask
            self._by_fd[fd] = task
        task.fds, task.parked = tuple(events), True
        if timeout is not None:
            deadline = monotonic() + timeout
            heapq.heappush(self._timers, (deadline, next(self._order), task.turn, task))
            task.timed = True

    def wake(self, task: _Task, answer: bool = True) -> None:
        """End *task*'s wait (if it waits): it goes on with *answer*."""
        if task.parked:
            self._unpark(task)
            self._ready.append((task, answer))

    def cancel(self, task: _Task) -> None:
        """End *task* at once, waiting or not; its *done* is not called."""
        if task.parked:
            self._unpark(task)
        self._tasks.discard(task)
        task.procedure.close()

    def _unpark(self, task: _Task) -> None:
        for fd in task.fds:
            del self._by_fd[fd]
            if fd not in self._kept:
                del self._armed[fd]
                self._epoll.unregister(fd)
        task.fds, task.parked = (), False
        task.turn += 1
        if task.timed:
            # Its timer stays in the heap until due (the reply and drain
            # deadlines are seconds away): sweep once most entries are stale,
            # so the heap stays the size of the waits in progress.
            task.timed = False
            self._stale += 1
            timers = self._timers
            if self._stale > 256 and self._stale * 2 > len(timers):
                timers[:] = [entry for entry in timers if entry[3].timed
                             and entry[2] == entry[3].turn]
                heapq.heapify(timers)
                self._stale = 0

    def run(self) -> None:
        """Drive the tasks until none is left (what a task raises is raised here)."""
        ready, timers = self._ready, self._timers
        while self._tasks:
            while ready:
                self._step(*ready.popleft())
            if not self._tasks:
                return
            timeout = max(timers[0][0] - monotonic(), 0.0) if timers else -1
            for fd, _ in self._epoll.poll(timeout):
                task = self._by_fd.get(fd)
                if task is not None:
                    self.wake(task)
                elif fd in self._armed:  # kept, and nobody waits for it now
                    del self._armed[fd]
                    self._epoll.unregister(fd)
            now = monotonic() if timers else 0.0
            while timers and timers[0][0] <= now:
                _, _, turn, task = heapq.heappop(timers)
                if task.turn == turn and task.timed:
                    task.timed = False
                    self.wake(task, False)
                else:
                    self._stale -= 1

    def _step(self, task: _Task, answer: Any) -> None:
        if task not in self._tasks:  # cancelled while ready
            return
        try:
            request = task.procedure.send(answer)
        except StopIteration as stop:
            self._tasks.discard(task)
            task.done(stop.value)
            return
        except BaseException:
            self._tasks.discard(task)
            task.done(None)
            raise
        if type(request) is proc.Wait:
            self.park(task, request.read, request.write, request.timeout)
        elif type(request) is proc.Turn:
            self._ready.append((task, None))
        else:
            self._answers[type(request)](task, request)

    def close(self) -> None:
        """End every task at once (its procedure cleans up: scripts killed and reaped)."""
        for task in list(self._tasks):
            self.cancel(task)
        self._epoll.close()


class Service:
    """A stand-alone ``script`` service: listen, read headers, run scripts.

    Create it (which binds the listeners), then call :meth:`serve_forever`
    in some thread and :meth:`stop` from another (or a signal handler).
    Every connection is served in that one thread, by one ``epoll`` loop:
    no thread per connection.  Also a context manager that stops it on exit.

    Args:
        listeners: where to listen (:class:`UnixListener`, :class:`TcpListener`,
            :class:`FdListener`).
        config: the service's settings.

    """

    def __init__(self, listeners: Sequence[Listener], config: ServiceConfig) -> None:
        self.config = config
        # Binding first: if it fails, nothing else has been opened.
        self._serving = proc.Serving(Listeners(listeners, config), config, self._start,
                                     self._idle)
        self._stop = StopSignal()
        self._loop = _Loop({proc.WaitJobs: self._wait_jobs})
        # Waited for again after every client: kept in the epoll set.
        self._kept = [sock.fileno() for sock, _ in self._serving.listeners.sockets]
        self._kept.append(self._stop.fd)
        self._loop.keep(self._kept)
        self._winder: _Task | None = None
        self._started = False

    @property
    def addresses(self) -> list[str | tuple[str, int]]:
        """The bound addresses, unix paths and ``(host, port)`` pairs."""
        return self._serving.listeners.addresses

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if not self._started:  # serve_forever() never ran: clean up here
            self._serving.listeners.close()
            self._stop.close()
            self._loop.close()

    def stop(self) -> None:
        """Stop accepting; :meth:`serve_forever` then winds down and returns.

        Re-entrant: it may run in a signal handler of the serving thread.
        """
        self._stop.set()

    def serve_forever(self) -> None:
        """Accept and handle connections until :meth:`stop`; then clean up.

        Running scripts get ``config.grace`` seconds to finish; then they are
        terminated (SIGTERM, SIGKILL).  Unix socket files created are removed.
        A ``KeyboardInterrupt`` stops the service the same way and is raised
        at the end; a second one, or one during the stop, ends every
        connection at once (scripts killed and reaped) and is raised.
        """
        self._started = True
        interrupted: BaseException | None = None
        try:
            self._serving.begin()
            self._loop.start(self._until_stopped(), self._stopped)
            while len(self._loop):
                try:
                    self._loop.run()
                except BaseException as exc:
                    if interrupted is not None or self._winder is not None:
                        raise
                    interrupted = exc
                    self.stop()
        finally:
            self._loop.close()
            for conn in self._serving.sockets:
                conn.close()
            self._serving.listeners.close()
            self._stop.close()
        if interrupted is not None:
            raise interrupted

    def _start(self, procedure: proc.Procedure[Any],
               done: Callable[[Any], object]) -> Callable[[], object]:
        task = self._loop.start(procedure, done)
        return lambda: self._loop.cancel(task)

    def _until_stopped(self) -> proc.Procedure[None]:
        while not self._stop.is_set():
            yield proc.Wait(read=(self._stop.fd,))

    def _stopped(self, _: None) -> None:
        self._loop.release(self._kept)
        self._serving.stop()
        self._winder = self._loop.start(proc.wind_down(self._serving.jobs, self.config), bool)

    def _idle(self) -> None:
        if self._winder is not None:
            self._loop.wake(self._winder)

    def _wait_jobs(self, task: _Task, request: proc.WaitJobs) -> None:
        self._loop.park(task, timeout=request.timeout)
        if not len(self._serving.jobs):
            self._loop.wake(task)


def serve(
    listeners: Sequence[Listener],
    script: BytesLike,
    script_args: Sequence[BytesLike] = (),
    *,
    ready: Callable[[Service], object] | None = None,
    **options: Unpack[ServiceOptions],
) -> None:
    """Serve *script* on *listeners* until the Service is stopped.

    Args:
        listeners: where to listen.
        script: the script; a relative path is resolved against ``libexec_dir``.
        script_args: arguments placed before the client's.
        ready: called with the :class:`Service` once it listens (use its
            ``addresses`` and ``stop()``).
        options: the service's settings, :class:`ServiceOptions`
            (``env_allowlist``, ``header_timeout``, ``max_connections``...).
    """
    with Service(listeners, ServiceConfig.of(script, script_args, options)) as service:
        if ready is not None:
            ready(service)
        service.serve_forever()
