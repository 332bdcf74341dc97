"""Blocking adapter: run scripts and serve them from synchronous code.

``run()`` drives one :class:`execproto.ClientConnection` over a socket (or a
child process for ``fork``) with a selector, so payload and output flow at
the same time and every wait is bounded.  ``Service`` accepts connections
and handles each in a thread, peeking the header so that the script reads
the payload straight from the socket, exactly like Dovecot's ``script``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import select
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import BinaryIO

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

__all__ = ["Service", "run", "serve"]

Input = bytes | bytearray | memoryview | BinaryIO | Iterable[bytes] | None

_CHUNK = 256 * 1024
#: Seconds an idle service worker thread waits for a connection before ending.
_IDLE_WORKER_EXIT = 60.0


class _Timeout(Exception):
    pass


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Timeout
    return left


# --- client ------------------------------------------------------------------


def _connect(target: Target, timeout: float) -> socket.socket:
    """Connect like Dovecot's program client; raises OSError or _Timeout."""
    deadline = time.monotonic() + timeout
    if isinstance(target, TcpTarget):
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        last: OSError | None = None
        for index, (family, kind, proto, _, address) in enumerate(infos):
            # Each address gets an equal share of what is left, so one
            # black-holed address cannot use up the whole connect timeout.
            share = (deadline - time.monotonic()) / (len(infos) - index)
            if share <= 0:
                break
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(share)
                sock.connect(address)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
            except BaseException:  # KeyboardInterrupt while connecting
                sock.close()
                raise
        if last is None or isinstance(last, socket.timeout):
            raise _Timeout
        raise last
    assert not isinstance(target, ForkTarget)
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(target.path)
            return sock
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError) or exc.errno != errno.EAGAIN:
                raise
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Timeout
        time.sleep(min(UNIX_RETRY_INTERVAL, left))


def run(
    target: Target | str,
    args: Iterable[BytesLike] = (),
    *,
    input: Input = None,
    env: EnvLike | None = None,
    noreply: bool = False,
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    timeout: float | None = None,
    output: Callable[[bytes], object] | None = None,
    read_output: bool = True,
    base_dir: str | None = None,
    lenient_reset: bool = True,
) -> RunResult:
    """Run one script and wait for its result.

    Args:
        target: a :class:`execproto.Target` or a URI (``unix:PATH``,
            ``tcp:HOST:PORT``, ``exec:PATH``/``fork:PATH``).
        args: the script's arguments.
        input: the payload: bytes, a binary file, or an iterable of bytes
            (streamed; read while output is being received).
        env: variables for the script.  Over unix/tcp the service keeps only
            its allowlisted names; with fork they are the whole environment.
        noreply: no result code (the status is SUCCESS if the exchange worked).
        connect_timeout: seconds to connect (None: wait forever).
        timeout: total seconds for the run after connecting (Dovecot's
            "input idle timeout", which is a total limit: quirk Q16).
        output: called with each output chunk instead of collecting it.
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
    resolved = coerce_target(target, base_dir)
    if isinstance(resolved, ForkTarget):
        return _run_fork(resolved, args, input, env, timeout, output, read_output)
    conn = ClientConnection(dot=isinstance(resolved, TcpTarget),
                            read_output=read_output or output is not None,
                            lenient_reset=lenient_reset)
    header = conn.send(Request(args=args, env=env_bytes(env).items(), noreply=noreply))
    label = resolved.label
    try:
        sock = _connect(resolved, connect_timeout if connect_timeout is not None else 1e9)
    except _Timeout:
        return RunResult.failure(ErrorKind.CONNECT_TIMEOUT,
                                 f"connect({label}) timed out after {connect_timeout} s",
                                 target=label)
    except OSError as exc:
        kind, detail = describe_connect_error(label, exc)
        return RunResult.failure(kind, detail, target=label)
    collected: list[bytes] | None = None if output is not None else []
    try:
        return _pump_socket(sock, conn, header, input_chunks(input), timeout, output,
                            collected, label)
    finally:
        sock.close()


def _deliver(event: Output, output: Callable[[bytes], object] | None,
             collected: list[bytes] | None) -> None:
    if output is not None:
        output(event.data)
    elif collected is not None:
        collected.append(event.data)


def _pump_socket(
    sock: socket.socket,
    conn: ClientConnection,
    header: bytes,
    chunks: Iterator[bytes],
    timeout: float | None,
    output: Callable[[bytes], object] | None,
    collected: list[bytes] | None,
    label: str,
) -> RunResult:
    deadline = None if timeout is None else time.monotonic() + timeout
    sock.setblocking(False)
    pending = memoryview(header)
    sending = True
    sel = selectors.DefaultSelector()

    def out() -> bytes | None:
        return b"".join(collected) if collected is not None else None

    def fail(kind: ErrorKind, detail: str) -> RunResult:
        return RunResult.failure(kind, detail, target=label, output=out())

    def interest() -> int:
        mask = selectors.EVENT_WRITE if sending else 0
        return mask | (selectors.EVENT_READ if conn.reads_reply else 0)

    try:
        sel.register(sock, interest())
        while True:
            try:
                wait = _remaining(deadline)
            except _Timeout:
                return fail(ErrorKind.RUN_TIMEOUT, run_timeout_detail(timeout))
            for _, mask in sel.select(wait):
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(_CHUNK)
                    except BlockingIOError:
                        data = None
                    except ConnectionResetError:
                        conn.receive_reset()
                        data = None
                    except OSError as exc:
                        return fail(ErrorKind.IO, f"read({label}) failed: {exc.strerror}")
                    if data is not None:
                        conn.receive_data(data)
                    while True:
                        event = conn.next_event()
                        if isinstance(event, Output):
                            _deliver(event, output, collected)
                            continue
                        if not isinstance(event, Result):
                            break
                        return RunResult.from_result(event, output=out(), target=label)
                if mask & selectors.EVENT_WRITE and sending:
                    try:
                        while True:
                            if not pending:
                                chunk = next(chunks, None)
                                if chunk is not None:
                                    pending = memoryview(conn.send(Data(data=chunk)))
                                    continue
                                pending = memoryview(conn.send(EndOfInput()))
                                if not pending:
                                    break
                            sent = sock.send(pending)
                            pending = pending[sent:]
                            if pending or conn.state is ClientState.SENT:
                                break
                    except BlockingIOError:
                        pass
                    except OSError as exc:
                        # The service stopped reading (the script ended early):
                        # stop sending, but its result code may still arrive;
                        # the core decides what counts.
                        conn.send_failed(f"write({label}) failed: {exc.strerror}")
                        pending = memoryview(b"")
                    if conn.state is ClientState.SENT and not pending:
                        sending = False
                        if not conn.reads_reply:
                            result = conn.next_event()
                            assert isinstance(result, Result)
                            return RunResult.from_result(result, output=None, target=label)
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_WR)
                        sel.modify(sock, interest())
    finally:
        sel.close()


# --- fork driver -------------------------------------------------------------


def _wait_readable(fd: int, timeout: float | None) -> bool:
    """Wait until *fd* is readable (poll: fds may exceed FD_SETSIZE)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(timeout, 0) * 1000))


def _wait_pid(pid: int, pidfd: int, timeout: float | None) -> int | None:
    """Wait up to *timeout* seconds; return the return code or None if still running."""
    _wait_readable(pidfd, timeout)
    done, status = os.waitpid(pid, os.WNOHANG)
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _terminate(pid: int, pidfd: int, kill_timeout: float) -> int:
    """SIGTERM, then SIGKILL after *kill_timeout*; always reaps."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    code = _wait_pid(pid, pidfd, kill_timeout)
    if code is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        code = _wait_pid(pid, pidfd, None)
    assert code is not None
    return code


def _run_fork(
    target: ForkTarget,
    args: Iterable[BytesLike],
    input: Input,
    env: EnvLike | None,
    timeout: float | None,
    output: Callable[[bytes], object] | None,
    read_output: bool,
) -> RunResult:
    argv = fork_argv(target.path, args)
    environ = env_bytes(env)
    label = target.label
    deadline = None if timeout is None else time.monotonic() + timeout
    want_output = read_output or output is not None
    collected: list[bytes] | None = [] if output is None and want_output else None
    fds: list[int] = []

    def new_fd(fd: int) -> int:
        fds.append(fd)
        return fd

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
        returncode: int | None = None
        try:
            kind, detail = _pump_pipes(in_w if input is not None else None,
                                       out_r if want_output else None,
                                       input_chunks(input), deadline, timeout, output,
                                       collected, fds)
            if kind is ErrorKind.NONE:
                try:
                    returncode = _wait_pid(pid, pidfd, _remaining(deadline))
                except _Timeout:
                    returncode = None
                if returncode is None:
                    kind, detail = ErrorKind.RUN_TIMEOUT, run_timeout_detail(timeout)
            if returncode is None:
                returncode = _terminate(pid, pidfd, KILL_TIMEOUT)
                killed = True
            else:
                killed = False
        except BaseException:
            # Cancelled (KeyboardInterrupt...): kill at once, reap, re-raise.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        finally:
            os.close(pidfd)
        data = b"".join(collected) if collected is not None else None
        return fork_result(returncode, killed_by_us=killed, target=label, output=data,
                           kind=kind, detail=detail)
    finally:
        for fd in fds:
            os.close(fd)


def _pump_pipes(
    in_w: int | None,
    out_r: int | None,
    chunks: Iterator[bytes],
    deadline: float | None,
    timeout: float | None,
    output: Callable[[bytes], object] | None,
    collected: list[bytes] | None,
    fds: list[int],
) -> tuple[ErrorKind, str]:
    sel = selectors.DefaultSelector()
    pending = memoryview(b"")
    try:
        if in_w is not None:
            os.set_blocking(in_w, False)
            sel.register(in_w, selectors.EVENT_WRITE)
        if out_r is not None:
            sel.register(out_r, selectors.EVENT_READ)
        while sel.get_map():
            try:
                wait = _remaining(deadline)
            except _Timeout:
                return ErrorKind.RUN_TIMEOUT, run_timeout_detail(timeout)
            for key, _ in sel.select(wait):
                fd = key.fd
                if fd == out_r:
                    data = os.read(fd, _CHUNK)
                    if not data:
                        sel.unregister(fd)
                    else:
                        _deliver(Output(data), output, collected)
                    continue
                try:
                    while True:
                        if not pending:
                            chunk = next(chunks, None)
                            if chunk is None:
                                break
                            pending = memoryview(chunk)
                        pending = pending[os.write(fd, pending):]
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    pass  # the program does not read all of its input: not an error
                sel.unregister(fd)
                os.close(fd)
                fds.remove(fd)
        return ErrorKind.NONE, ""
    finally:
        sel.close()


# --- service -----------------------------------------------------------------


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
        self._sockets: list[socket.socket] = []
        self._names: dict[int, str | tuple[str, int]] = {}
        self._paths: list[SocketFile] = []
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._wake_lock = threading.RLock()
        self._threads: set[threading.Thread] = set()  # the workers
        self._work: queue.SimpleQueue[tuple[socket.socket, str] | None] = queue.SimpleQueue()
        self._idle = 0  # workers waiting for a connection
        self._pids: set[int] = set()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(config.max_connections)
        try:
            for spec in listeners:
                sock, path = bind_listener(spec)
                self._sockets.append(sock)
                if path is not None:
                    self._paths.append(path)
                self._names[sock.fileno()] = listener_address(sock, spec)
            # Listeners are bound (privileged ports, root-owned dirs): now
            # give up root before any script can run.
            drop_privileges(config.user, config.group)
        except BaseException:
            self._close_listeners()
            self._close_wakeup()
            raise
        self._serving = False

    def _close_wakeup(self) -> None:
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    @property
    def addresses(self) -> list[str | tuple[str, int]]:
        """The bound addresses: unix paths and ``(host, port)`` pairs."""
        return [self._names[sock.fileno()] for sock in self._sockets]

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if not self._serving:  # serve_forever() never ran: clean up here
            self._close_listeners()
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
        sel = selectors.DefaultSelector()
        try:
            for sock in self._sockets:
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                # Take a slot before accepting: extra clients wait in the backlog.
                if not self._slots.acquire(timeout=0.1):
                    continue
                accepted = False
                try:
                    for key, _ in sel.select():
                        if key.fileobj == self._wake_r or self._stop.is_set():
                            break
                        assert isinstance(key.fileobj, socket.socket)
                        try:
                            conn, peer = key.fileobj.accept()
                        except (BlockingIOError, ConnectionAbortedError):
                            continue
                        except OSError as exc:
                            self.config.logger.error("accept() failed: %s", exc)
                            time.sleep(0.1)  # e.g. EMFILE: back off, keep serving
                            continue
                        self._start_handler(conn, peer_label(self._names[key.fd], peer))
                        accepted = True
                        break
                finally:
                    if not accepted:
                        self._slots.release()
        finally:
            sel.close()
            self._close_listeners()
            self._wind_down()
            self._close_wakeup()

    def _start_handler(self, conn: socket.socket, peer: str) -> None:
        # Hand the connection to an idle worker; start one only when none is
        # idle.  Starting a thread per connection cost about a third of the
        # accept loop's time.  Slots bound the workers to max_connections.
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
            self._work.put((conn, peer))
            if start:
                thread = threading.Thread(target=self._worker, daemon=True)
                self._threads.add(thread)
        if start:
            thread.start()

    def _worker(self) -> None:
        try:
            while True:
                try:
                    item = self._work.get(timeout=_IDLE_WORKER_EXIT)
                except queue.Empty:
                    with self._lock:
                        if self._idle > 0:  # else a connection is on its way to us
                            self._idle -= 1
                            return
                    continue
                if item is None:
                    return
                self._handle(*item)
                with self._lock:
                    self._idle += 1
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _close_listeners(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        for socket_file in self._paths:
            socket_file.remove()
        self._paths.clear()

    def _wind_down(self) -> None:
        with self._lock:
            for _ in self._threads:
                self._work.put(None)  # each worker ends after its connection
        # Scripts get the grace period, then SIGTERM and kill_timeout, then SIGKILL.
        for wait, then_send in ((self.config.grace, signal.SIGTERM),
                                (self.config.kill_timeout, signal.SIGKILL)):
            deadline = time.monotonic() + wait
            for thread in list(self._threads):
                thread.join(max(deadline - time.monotonic(), 0))
            with self._lock:
                pids = list(self._pids)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, then_send)
        for thread in list(self._threads):
            thread.join()

    def _handle(self, conn: socket.socket, peer_text: str) -> None:
        started = time.monotonic()
        logger = self.config.logger
        try:
            svc, request = self._read_header(conn)
            status = self._run_script(conn, svc, request)
            log_request(logger, peer_text, request, status, time.monotonic() - started)
        except RemoteProtocolError as exc:
            log_bad_header(logger, peer_text, exc)
            # Close without reply, but read what the client still sends first,
            # so that the close is not a reset (bounded: a hostile client
            # cannot keep the slot).
            _close_gently(conn, min(1.0, self.config.header_timeout))
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

    def _read_header(self, conn: socket.socket) -> tuple[ServiceConnection, ScriptRequest]:
        svc = self.config.new_connection()
        deadline = time.monotonic() + self.config.header_timeout
        consumed = 0
        event = svc.next_event()
        while event is NEED_DATA:
            conn.settimeout(_remaining(deadline))
            try:
                data = conn.recv(65536, socket.MSG_PEEK)
            except TimeoutError:
                raise _Timeout from None
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
            chunk = conn.recv(left)
            if not chunk:
                raise RemoteProtocolError("disconnected while the header was consumed")
            left -= len(chunk)
        conn.setblocking(True)  # the script gets a blocking socket
        return svc, event

    def _run_script(self, conn: socket.socket, svc: ServiceConnection,
                    request: ScriptRequest) -> str:
        logger = self.config.logger
        fd = conn.fileno()
        try:
            pid = spawn(request.argv, request.environ, stdin=fd, stdout=fd)
        except OSError as exc:
            logger.error("execvp(%r) failed: %s", request.argv[0], exc.strerror)
            returncode: int | None = None
            how = "not started"
        else:
            with self._lock:
                self._pids.add(pid)
            pidfd = os.pidfd_open(pid)
            try:
                returncode = _wait_pid(pid, pidfd, request.alarm or None)
                how = ""
                if returncode is None:
                    # alarm=N expired: end the script before replying (quirk Q9).
                    how = f"alarm {request.alarm} s expired, "
                    returncode = _terminate(pid, pidfd, self.config.kill_timeout)
            finally:
                os.close(pidfd)
                with self._lock:
                    self._pids.discard(pid)
            how += describe_returncode(returncode)
        reply = svc.send(ScriptExited(returncode=returncode))
        try:
            if reply:
                conn.sendall(reply)
        except OSError as exc:
            how += f", client gone: {exc.strerror}"
        _close_gently(conn, self.config.header_timeout)
        return how


def _close_gently(conn: socket.socket, timeout: float) -> None:
    """Half-close, then read until the client closes too.

    Closing a socket with unread data makes Linux send a reset, which can
    destroy the result code before the client reads it (quirk Q8): so the
    rest of the payload the script did not read is drained first, for at
    most *timeout* seconds.
    """
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            conn.settimeout(left)
            if not conn.recv(_CHUNK):
                break


def serve(
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
    ready: Callable[[Service], object] | None = None,
    logger: logging.Logger | None = None,
    user: str | None = None,
    group: str | None = None,
) -> None:
    """Serve *script* on *listeners* until the Service is stopped.

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
        kill_timeout: seconds between SIGTERM and SIGKILL (alarm=N, stop).
        ready: called with the :class:`Service` once it listens (use its
            ``addresses`` and ``stop()``).
        logger: where the one-line-per-request log goes (``execproto``).
        user: when started as root, switch to this user once the listeners
            are bound, before any script runs.
        group: with *user*, this group instead of the user's primary group.
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
    with Service(listeners, config) as service:
        if ready is not None:
            ready(service)
        service.serve_forever()
