"""Blocking adapter: run scripts and serve them from synchronous code.

The procedures are the shared ones of ``_procedures.py``; this module only
answers what they ask, waiting with ``poll()``.  ``run()`` drives one run in
the calling thread.  :class:`Service` accepts in the thread that calls
:meth:`Service.serve_forever` and hands each connection to a pool of at
most ``max_connections`` worker threads, reused while they are idle.
"""

from __future__ import annotations

import queue
import select
import socket
import threading
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
_READ, _WRITE = select.POLLIN, select.POLLOUT


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
    procedure = proc.start_run(target, args, options, has_input=input is not None,
                               output=output)
    return _drive(procedure, proc.run_answers(_ANSWERS, input, output, _unbounded))


class Service:
    """A stand-alone ``script`` service: listen, read headers, run scripts.

    Create it (which binds the listeners), then call :meth:`serve_forever`
    in some thread and :meth:`stop` from another (or a signal handler).
    Also a context manager that stops it on exit.

    Args:
        listeners: where to listen (:class:`UnixListener`, :class:`TcpListener`,
            :class:`FdListener`).
        config: the service's settings.

    """

    def __init__(self, listeners: Sequence[Listener], config: ServiceConfig) -> None:
        self.config = config
        self._listeners = Listeners(listeners, config)
        lock = threading.RLock()
        self._jobs = proc.Jobs(lock=lock)
        self._done = threading.Condition(lock)
        self._stop = StopSignal()
        self._work: queue.SimpleQueue[tuple[socket.socket, str] | None] = queue.SimpleQueue()
        self._workers: set[threading.Thread] = set()
        self._idle = 0  # workers waiting for a connection
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._serving = False

    @property
    def addresses(self) -> list[str | tuple[str, int]]:
        """The bound addresses, unix paths and ``(host, port)`` pairs."""
        return self._listeners.addresses

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if not self._serving:  # serve_forever() never ran: clean up here
            self._listeners.close()
            self._stop.close()

    def stop(self) -> None:
        """Stop accepting; :meth:`serve_forever` then winds down and returns.

        Re-entrant: it may run in a signal handler of the serving thread.
        """
        self._stop.set()

    def serve_forever(self) -> None:
        """Accept and handle connections until :meth:`stop`; then clean up.

        Running scripts get ``config.grace`` seconds to finish; then they are
        terminated (SIGTERM, SIGKILL).  Unix socket files created are removed.
        """
        self._serving = True
        try:
            while not self._stop.is_set():
                # Take a slot before accepting: extra clients wait in the backlog.
                if not self._slots.acquire(timeout=0.1):
                    continue
                accept = proc.accept(self._listeners.sockets, self.config, self._stop,
                                     wait_first=True)
                client = _drive(accept)
                if client is None:
                    self._slots.release()
                    break
                self._hand_over(client)
        finally:
            self._listeners.close()
            _drive(proc.wind_down(self._jobs, self.config),
                   {**_ANSWERS, proc.WaitJobs: self._wait_jobs})
            with self._jobs.lock:
                workers = list(self._workers)
                for _ in workers:
                    self._work.put(None)
            for worker in workers:
                worker.join()
            self._stop.close()

    async def _wait_jobs(self, request: proc.WaitJobs) -> bool:
        with self._done:
            return self._done.wait_for(lambda: not len(self._jobs), request.timeout)

    def _hand_over(self, client: tuple[socket.socket, str]) -> None:
        # To an idle worker, a new one only when none is idle: a thread start
        # per connection cost a third of the accept loop's time (and a
        # ThreadPoolExecutor's futures and conditions 10 % of a request's).
        with self._jobs.lock:
            start = self._idle == 0
            self._idle -= 0 if start else 1
            self._work.put(client)
            if start:
                worker = threading.Thread(target=self._worker, daemon=True)
                self._workers.add(worker)
        if start:
            worker.start()

    def _worker(self) -> None:
        # At most max_connections workers; one idle for a minute ends.
        while True:
            try:
                client = self._work.get(timeout=60.0)
            except queue.Empty:
                with self._jobs.lock:
                    if self._idle > 0:  # else a connection is on its way to it
                        self._idle -= 1
                        self._workers.discard(threading.current_thread())
                        return
                continue
            if client is None:
                return
            self._handle(*client)
            with self._jobs.lock:
                self._idle += 1

    def _handle(self, conn: socket.socket, peer: str) -> None:
        # A blocking thread cannot be cancelled: shutting the socket down
        # ends whatever the procedure waits for on it.
        job = proc.Job(cancel=lambda: conn.shutdown(socket.SHUT_RDWR))
        self._jobs.add(job)
        try:
            _drive(proc.serve_connection(conn, peer, self.config, job, self._jobs))
        finally:
            with self._done:
                self._jobs.discard(job)
                self._done.notify_all()
            conn.close()
            self._slots.release()


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
