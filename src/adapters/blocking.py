"""Blocking adapter: run scripts and serve them from synchronous code.

The procedures are the shared ones of :mod:`._procedures`; this module only
waits for what they ask, with ``poll()``.  ``run()`` drives one run in the
calling thread.  :class:`Service` accepts in the thread that calls
:meth:`Service.serve_forever` and handles each connection in a pool of
worker threads (one per connection being handled, at most
``max_connections``, kept for a minute when idle).
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
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
    Job,
    Jobs,
    NextInput,
    Offload,
    Procedure,
    Turn,
    Wait,
    WaitJobs,
    accept,
    drive,
    serve_connection,
    start_run,
    wind_down,
)

__all__ = ["Service", "run", "serve"]

Input = bytes | bytearray | memoryview | BinaryIO | Iterable[bytes] | None
T = TypeVar("T")

#: Seconds an idle worker thread waits for a connection before it ends.
_IDLE_WORKER_EXIT = 60.0
_READ = select.POLLIN
_WRITE = select.POLLOUT


async def _wait(request: Wait) -> bool:
    # poll, not select: descriptors may exceed FD_SETSIZE.
    poller = select.poll()
    for fd in request.read:
        poller.register(fd, _READ)
    for fd in request.write:
        poller.register(fd, _WRITE | (_READ if fd in request.read else 0))
    timeout = request.timeout
    return bool(poller.poll(None if timeout is None else max(timeout, 0.0) * 1000))


async def _call(request: Offload) -> Any:
    return request.fn(*request.args)  # this thread may block


async def _nothing(request: object) -> None:
    return None


_ANSWERS: dict[type, Callable[[Any], Awaitable[Any]]] = {
    Wait: _wait, Offload: _call, Turn: _nothing}


def _drive(procedure: Procedure[T],
           answers: Mapping[type, Callable[[Any], Awaitable[Any]]] = _ANSWERS) -> T:
    """Run *procedure* to its end in this thread: the shared driver never suspends here."""
    coroutine = drive(procedure, answers)
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    raise RuntimeError("a blocking answer suspended")  # pragma: no cover


def run(target: Target | str, args: Iterable[BytesLike] = (), *, input: Input = None,
        output: Callable[[bytes], object] | None = None,
        **options: Unpack[RunOptions]) -> RunResult:
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
    if output is not None:
        options["read_output"] = True
    procedure = start_run(target, args, options, collect=output is None,
                          has_input=input is not None)
    chunks = input_chunks(input)

    async def next_input(request: NextInput) -> bytes | None:
        return next(chunks, None)

    async def deliver(request: Deliver) -> None:
        assert output is not None
        output(request.data)

    return _drive(procedure, {**_ANSWERS, NextInput: next_input, Deliver: deliver})


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
        self._jobs = Jobs()
        self._done = threading.Condition(self._jobs.lock)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._wake_lock = threading.RLock()
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._work: queue.SimpleQueue[tuple[socket.socket, str] | None] = queue.SimpleQueue()
        self._workers: set[threading.Thread] = set()
        self._idle = 0  # workers waiting for a connection
        self._serving = False

    @property
    def addresses(self) -> list[str | tuple[str, int]]:
        """The bound addresses: unix paths and ``(host, port)`` pairs."""
        return self._listeners.addresses

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if not self._serving:  # serve_forever() never ran: clean up here
            self._listeners.close()
            self._close_wakeup()

    def stop(self) -> None:
        """Stop accepting; :meth:`serve_forever` then winds down and returns."""
        self._stop.set()
        # Re-entrant: stop() may run in a signal handler of the serving thread.
        with self._wake_lock, contextlib.suppress(OSError):
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")

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
                client = _drive(accept(self._listeners.sockets, self.config, self._wake_r))
                if client is None:
                    self._slots.release()
                    break
                self._hand_over(client)
        finally:
            self._listeners.close()
            _drive(wind_down(self._jobs, self.config), {**_ANSWERS, WaitJobs: self._wait_jobs})
            with self._jobs.lock:
                for _ in self._workers:
                    self._work.put(None)
                workers = list(self._workers)
            for worker in workers:
                worker.join()
            self._close_wakeup()

    def _close_wakeup(self) -> None:
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    async def _wait_jobs(self, request: WaitJobs) -> bool:
        with self._done:
            return self._done.wait_for(lambda: not len(self._jobs), request.timeout)

    def _hand_over(self, client: tuple[socket.socket, str]) -> None:
        # To an idle worker; a new one only when none is idle: a thread
        # start per connection cost a third of the accept loop's time.
        with self._jobs.lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
            self._work.put(client)
            if start:
                worker = threading.Thread(target=self._worker, daemon=True)
                self._workers.add(worker)
        if start:
            worker.start()

    def _worker(self) -> None:
        try:
            while True:
                try:
                    client = self._work.get(timeout=_IDLE_WORKER_EXIT)
                except queue.Empty:
                    with self._jobs.lock:
                        if self._idle > 0:  # else a connection is on its way to us
                            self._idle -= 1
                            return
                    continue
                if client is None:
                    return
                self._handle(*client)
                with self._jobs.lock:
                    self._idle += 1
        finally:
            with self._jobs.lock:
                self._workers.discard(threading.current_thread())

    def _handle(self, conn: socket.socket, peer: str) -> None:
        # A blocking thread cannot be cancelled: shutting the socket down
        # ends whatever the procedure waits for on it.
        job = Job(cancel=lambda: conn.shutdown(socket.SHUT_RDWR))
        self._jobs.add(job)
        try:
            _drive(serve_connection(conn, peer, self.config, job, self._jobs))
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
