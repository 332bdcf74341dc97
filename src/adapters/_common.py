"""What the three adapters share: results, listeners, spawning, policies.

Everything here is flavour-neutral: no event loop, no blocking waits.  The
adapters (``blocking``, ``asyncio``, ``trio``) only differ in how they wait
for sockets, pipes and process exits.

Processes are started with ``os.posix_spawn`` and waited for through a
pidfd (Linux 5.3+), which every flavour can wait on like a socket: no
SIGCHLD handler, no child watcher thread, and every child is reaped with
``os.waitpid`` by the code that started it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import subprocess
import threading
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypedDict

from execproto import (
    DEFAULT_LIBEXEC_DIR,
    DEFAULT_MAX_HEADER_BYTES,
    BytesLike,
    EnvLike,
    ErrorKind,
    ForkTarget,
    LocalProtocolError,
    RemoteProtocolError,
    Result,
    ScriptRequest,
    ServiceConnection,
    Status,
    Target,
    TcpTarget,
    UnixTarget,
    parse_target,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_GRACE",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "KILL_TIMEOUT",
    "UNIX_RETRY_INTERVAL",
    "Address",
    "AsyncInput",
    "FdListener",
    "Input",
    "Listener",
    "Listeners",
    "OutputCallback",
    "RunOptions",
    "RunResult",
    "ServiceConfig",
    "ServiceOptions",
    "SocketFile",
    "StopSignal",
    "TcpListener",
    "UnixListener",
    "bind_listener",
    "coerce_target",
    "describe_connect_error",
    "describe_returncode",
    "drop_privileges",
    "env_bytes",
    "exit_result",
    "fork_result",
    "input_chunks",
    "listen_backlog",
    "listener_address",
    "log_bad_header",
    "log_request",
    "peer_label",
    "resolve_program",
    "run_timeout_detail",
    "sanitize_args",
    "spawn",
]

#: Seconds to wait for a connection when the caller gives no connect timeout.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Dovecot retries a unix connect that fails with EAGAIN every 100 ms.
UNIX_RETRY_INTERVAL = 0.1
#: Seconds between SIGTERM and SIGKILL (Dovecot's KILL_TIMEOUT, 5000 ms).
KILL_TIMEOUT = 5.0
#: The service's header deadline (Dovecot's SCRIPT_READ_TIMEOUT_SECS).
DEFAULT_HEADER_TIMEOUT = 10.0
#: Scripts run at once by one service; more clients wait in the backlog.
DEFAULT_MAX_CONNECTIONS = 64
#: Seconds a stopping service lets running scripts finish before killing them.
DEFAULT_GRACE = 10.0
#: glibc's default search path, used when the environment has no PATH.
DEFAULT_SEARCH_PATH = ("/bin", "/usr/bin")

log = logging.getLogger("execproto")

#: A payload for ``run()``: bytes, a binary file or an iterable of bytes.
Input = bytes | bytearray | memoryview | BinaryIO | Iterable[bytes] | None
#: The asyncio and trio flavours also take an async iterable of bytes.
AsyncInput = Input | AsyncIterable[bytes]
#: Called with each output chunk (by the async flavours: awaited if it
#: returns an awaitable).
OutputCallback = Callable[[bytes], object]
#: Where a service listens: a unix socket path or ``(host, port)``.
Address = str | tuple[str, int]


@dataclass(frozen=True)
class RunResult:
    """The outcome of one run, in every flavour.

    Fields:
        status: SUCCESS, FAILURE or INTERNAL_FAILURE (Dovecot's values 1, 0, -1).
        kind: why an INTERNAL_FAILURE happened (``ErrorKind.NONE`` otherwise).
        detail: one human-readable line ("" on plain success).
        output: the script's output, or None when it went to an ``output``
            callback (or was not read).
        target: the target's label (``unix:/path``, ``tcp:host:port``, ``fork:/path``).
        returncode: the fork driver's child exit code (``-N`` for signal N),
            else None.
    """

    status: Status
    kind: ErrorKind = ErrorKind.NONE
    detail: str = ""
    output: bytes | None = None
    target: str = ""
    returncode: int | None = None

    def __repr__(self) -> str:
        # The output may be megabytes: show its size and start only.
        out = "None"
        if self.output is not None:
            more = "..." if len(self.output) > 40 else ""
            out = f"<{len(self.output)} bytes: {self.output[:40]!r}{more}>"
        return (f"RunResult(status={self.status.name}, kind={self.kind.name}, "
                f"detail={self.detail!r}, output={out}, target={self.target!r}, "
                f"returncode={self.returncode!r})")

    @property
    def ok(self) -> bool:
        """True when the script ran and reported success."""
        return self.status is Status.SUCCESS

    @classmethod
    def from_result(
        cls, result: Result, *, output: bytes | None, target: str, returncode: int | None = None
    ) -> RunResult:
        """Build a RunResult from the core's :class:`Result`."""
        return cls(result.status, result.kind, result.detail, output, target, returncode)

    @classmethod
    def failure(cls, kind: ErrorKind, detail: str, *, target: str,
                output: bytes | None = None) -> RunResult:
        """An INTERNAL_FAILURE of the given kind."""
        return cls(Status.INTERNAL_FAILURE, kind, detail, output, target)


class RunOptions(TypedDict, total=False):
    """The keyword arguments of every flavour's ``run()`` and ``open_run()``, all optional.

    Keys:
        env: variables for the script.  Over unix/tcp the service keeps only
            its allowlisted names; with fork they are the whole environment.
        noreply: no result code (the status is SUCCESS if the exchange worked).
        connect_timeout: seconds to connect (default 10; None: wait forever).
        timeout: total seconds for the run after connecting (Dovecot's
            "input idle timeout", which is a total limit: quirk Q16).
        read_output: with ``noreply``, False closes the connection after the
            payload without reading anything (Dovecot's quota warnings do so).
        base_dir: resolve a relative ``unix:`` path against it.
        lenient_reset: a reset after a complete result code is the verdict
            (default True; False reports it as an I/O error, like Dovecot).
    """

    env: EnvLike | None
    noreply: bool
    connect_timeout: float | None
    timeout: float | None
    read_output: bool
    base_dir: str | None
    lenient_reset: bool


def coerce_target(target: Target | str, base_dir: str | None = None) -> Target:
    """Accept a Target or a URI string (``unix:``, ``tcp:``, ``exec:``/``fork:``)."""
    if isinstance(target, (UnixTarget, TcpTarget, ForkTarget)):
        return target
    if isinstance(target, str):
        return parse_target(target, base_dir=base_dir)
    raise LocalProtocolError(f"target must be a Target or a URI string, not {target!r}")


def env_bytes(env: EnvLike | None) -> dict[bytes, bytes]:
    """The environment for a child: exactly *env*, nothing inherited."""
    if env is None:
        return {}
    items: Iterable[tuple[BytesLike, BytesLike]] = (
        env.items() if isinstance(env, Mapping) else env)
    out: dict[bytes, bytes] = {}
    for name, value in items:
        n, v = _bytes(name), _bytes(value)
        if not n or b"=" in n or b"\0" in n or b"\0" in v:
            raise LocalProtocolError(f"invalid environment entry {n!r}")
        out[n] = v
    return out


#: Size of the chunks the adapters read and send.
CHUNK = 256 * 1024


def input_chunks(data: object) -> Iterator[bytes]:
    """A synchronous payload (bytes, a binary file, an iterable of bytes) as non-empty chunks.

    Bytes are sliced without copying the whole; a file is read ``CHUNK``
    bytes at a time; ``None`` is no payload.
    """
    if data is None:
        return
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for i in range(0, len(view), CHUNK):
            yield bytes(view[i : i + CHUNK])
        return
    read = getattr(data, "read", None)
    if read is not None:
        while chunk := read(CHUNK):
            yield chunk
        return
    for chunk in data:  # type: ignore[attr-defined]
        if chunk:
            yield bytes(chunk)


def _bytes(value: BytesLike) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return bytes(value)


def resolve_program(path: bytes) -> bytes:
    """Find *path* like ``execvp`` with an empty environment (quirk Q18).

    A name without ``/`` is searched in ``/bin:/usr/bin``; if it is not found
    there it is returned unchanged and the spawn fails with ENOENT.
    """
    if b"/" in path:
        return path
    for directory in DEFAULT_SEARCH_PATH:
        candidate = os.path.join(os.fsencode(directory), path)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return path


_ALL_SIGNALS = frozenset(
    s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)
)


def spawn(
    argv: tuple[bytes, ...],
    env: Mapping[bytes, bytes],
    *,
    stdin: int,
    stdout: int,
    stderr: int = 2,
    executable: bytes | None = None,
) -> int:
    """Start *argv* with exactly *env* and fds 0, 1, 2 set; return its pid.

    *executable* is the file to run (default ``argv[0]``).  The child starts
    with an empty signal mask and default signal dispositions (Python
    ignores SIGPIPE; Dovecot scripts sometimes inherit a blocked mask:
    quirks Q11, Q12).  Only fds 0-2 reach it: every other descriptor Python
    creates is close-on-exec.

    Raises:
        OSError: the program cannot be executed (ENOENT, EACCES...).

    """
    sources = (stdin, stdout, stderr)
    if any(src in (0, 1, 2) and src != dst for dst, src in enumerate(sources)):
        raise LocalProtocolError("spawn: a source descriptor must not be another of 0, 1, 2")
    if _keeps_root():
        return _spawn_without_root(argv, env, sources, executable or argv[0])
    actions: list[tuple[int, int, int]] = []
    for dst, src in enumerate(sources):
        if src != dst:
            actions.append((os.POSIX_SPAWN_DUP2, src, dst))
        else:
            # dup2(fd, fd) would not clear close-on-exec; make it inheritable.
            os.set_inheritable(dst, True)
    return os.posix_spawn(
        executable or argv[0],
        list(argv),
        dict(env),
        file_actions=actions,
        setsigmask=(),
        setsigdef=_ALL_SIGNALS,
    )


def _keeps_root() -> bool:
    """Whether this process runs unprivileged but keeps root as its real or saved id.

    ``doveadm -u USER`` is in that state.  A program exec'ed from it could
    take root back (dash sets its effective uid to the real one), so it is
    started with the effective ids only, as Dovecot 2.4.4+ does
    ("drop any real root privileges before program execvp()").
    """
    uid, gid = os.geteuid(), os.getegid()
    return (uid != 0 and 0 in os.getresuid()) or (gid != 0 and 0 in os.getresgid())


def _spawn_without_root(argv: tuple[bytes, ...], env: Mapping[bytes, bytes],
                        fds: tuple[int, int, int], executable: bytes) -> int:
    # posix_spawn cannot change ids in the child; subprocess's fork+exec can
    # (setregid/setreuid to the effective ids, which an unprivileged
    # process may do).  It resets the signals Python ignores; the mask of
    # a Python thread is empty.
    child = subprocess.Popen(list(argv), executable=executable, env=dict(env),
                             stdin=fds[0], stdout=fds[1], stderr=fds[2],
                             user=os.geteuid(), group=os.getegid(), restore_signals=True)
    child.returncode = 0  # reaped by the caller through a pidfd, not by subprocess
    return child.pid


def exit_result(returncode: int | None, *, killed: bool = False) -> Status:
    """Map a script's return code to the service's verdict (``+`` only for 0)."""
    return Status.SUCCESS if returncode == 0 and not killed else Status.FAILURE


def fork_result(returncode: int | None, *, killed_by_us: bool, target: str,
                output: bytes | None, kind: ErrorKind = ErrorKind.NONE,
                detail: str = "") -> RunResult:
    """Map a fork-driver child's end to a RunResult (PROTOCOL.md 8.2)."""
    if kind is not ErrorKind.NONE:
        return RunResult(Status.INTERNAL_FAILURE, kind, detail, output, target, returncode)
    if returncode is None:
        return RunResult(Status.FAILURE, ErrorKind.NONE, detail or "child process never started",
                         output, target, None)
    if returncode == 0:
        return RunResult(Status.SUCCESS, output=output, target=target, returncode=0)
    if returncode > 0:
        return RunResult(Status.FAILURE, ErrorKind.NONE,
                         f"terminated with non-zero exit code {returncode}", output, target,
                         returncode)
    how = "forcibly terminated" if killed_by_us else "terminated abnormally"
    return RunResult(Status.INTERNAL_FAILURE, ErrorKind.IO, f"{how} with signal {-returncode}",
                     output, target, returncode)


def describe_connect_error(label: str, exc: OSError) -> tuple[ErrorKind, str]:
    """Turn a connect error into (kind, message), naming the path and the problem."""
    if exc.errno == errno.EACCES and label.startswith("unix:"):
        path = label[5:]
        return ErrorKind.IO, (
            f"net_connect_unix({path}) failed: permission denied (euid={os.geteuid()}, "
            f"egid={os.getegid()}; {_missing_permission(path)})"
        )
    text = exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror):
        host = label[4:].rpartition(":")[0].strip("[]")
        return ErrorKind.IO, f"Cannot resolve `{host}': {text}"
    # Dovecot: a unix connect error is IO; tcp "all addresses failed" is OTHER.
    kind = ErrorKind.OTHER if label.startswith("tcp:") else ErrorKind.IO
    return kind, f"connect({label}) failed: {text}"


def _missing_permission(path: str) -> str:
    parts = path.split("/")
    for i in range(2, len(parts)):
        directory = "/".join(parts[:i]) or "/"
        if not os.access(directory, os.X_OK):
            return f"missing +x perm: {directory}"
    if not os.access(path, os.W_OK):
        return f"missing +w perm: {path}"
    return "no permission"


def run_timeout_detail(timeout: float | None) -> str:
    """The detail of a RUN_TIMEOUT result (Dovecot: "Execution timed out")."""
    return f"execution timed out (> {timeout} s)"


def describe_returncode(code: int | None) -> str:
    """Say how a script ended, for the log: ``exit 3``, ``killed by signal 15``."""
    if code is None:
        return "not started"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit {code}"


def peer_label(listener: str | tuple[str, int], peer: object) -> str:
    """Name the client of an accepted connection for the log."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return f"unix:{listener}"


def listener_address(sock: socket.socket, spec: Listener) -> str | tuple[str, int]:
    """The address a listener is reachable at: its path, or ``(host, port)``."""
    if isinstance(spec, UnixListener):
        return spec.path
    name = sock.getsockname()
    return name if isinstance(name, str) else (name[0], name[1])


def log_request(
    logger: logging.Logger, peer: str, request: ScriptRequest, how: str, duration: float
) -> None:
    """Write the one log line per request: peer, args (sanitized), outcome, duration."""
    if logger.isEnabledFor(logging.INFO):  # the args are rendered only for a line written
        logger.info("%s: args=[%s] %s duration=%.3fs", peer, sanitize_args(request.args),
                    how, duration)


def log_bad_header(logger: logging.Logger, peer: str, error: RemoteProtocolError) -> None:
    """Log a dropped header: one warning, or a debug line for a bare connect.

    A client that connects and closes without sending a byte is a health
    check (a load balancer, a monitor), not a problem worth a warning.
    """
    level = logging.DEBUG if error.message.startswith(_BARE_CONNECT) else logging.WARNING
    logger.log(level, "%s: %s", peer, error.message)


_BARE_CONNECT = "disconnected before the end of the header (0 bytes"


def sanitize_args(args: Iterable[bytes], limit: int = 200) -> str:
    """Render args for a log line: printable, escaped, length-limited."""
    text = " ".join(repr(a)[2:-1] for a in args)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def drop_privileges(user: str | None, group: str | None = None) -> None:
    """Switch the whole process to *user* (and *group*) for good.

    Called by the services after binding their listeners and before running
    any script, so scripts never run as root when a user is given.  The
    group defaults to the user's primary group; supplementary groups are
    reset to the user's.

    Raises:
        LocalProtocolError: unknown user or group, or not running as root.
    """
    if user is None and group is None:
        return
    import grp
    import pwd

    try:
        entry = pwd.getpwnam(user) if user is not None else None
        gid = grp.getgrnam(group).gr_gid if group is not None else (
            entry.pw_gid if entry is not None else os.getgid())
    except KeyError as exc:
        raise LocalProtocolError(f"unknown user or group: {exc.args[0]}") from None
    if os.geteuid() != 0:
        raise LocalProtocolError("dropping privileges needs root")
    if entry is not None:
        os.initgroups(entry.pw_name, gid)
    else:
        os.setgroups([])
    os.setresgid(gid, gid, gid)
    if entry is not None:
        os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)


# --- listeners --------------------------------------------------------------


@dataclass(frozen=True)
class UnixListener:
    """A UNIX socket to listen on.

    Fields:
        path: the socket path.  A stale socket file (nothing accepting on it)
            is replaced; a live one is an error.
        mode: permissions of the socket file.  It is never wider than this,
            not even for an instant (see ``bind_listener()``).
    """

    path: str
    mode: int = 0o600


@dataclass(frozen=True)
class TcpListener:
    """A TCP address to listen on (IPv4 or IPv6; port 0 picks a free port).

    Fields:
        host: an address such as ``127.0.0.1`` or ``::1``.
        port: the port.
    """

    host: str
    port: int


@dataclass(frozen=True)
class FdListener:
    """An already listening socket, e.g. from systemd (``LISTEN_FDS``).

    Fields:
        fd: the descriptor; the service takes ownership of it.
    """

    fd: int


#: Anything ``bind_listener()`` accepts.
Listener = UnixListener | TcpListener | FdListener


def _unix_alive(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as exc:
        # EAGAIN (backlog full), EACCES...: someone is there.
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True


@dataclass(frozen=True)
class SocketFile:
    """A unix socket file a service created, to remove when it stops.

    Fields:
        path: where it is.
        ident: ``(st_dev, st_ino)`` right after it was bound.
    """

    path: str
    ident: tuple[int, int]

    def remove(self) -> None:
        """Unlink the file, unless it is gone or is no longer ours.

        Another service may have replaced it meanwhile (an overlapping
        restart); its socket must survive our stop.
        """
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.ident:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            # E.g. after --user, in a directory only root may write to: the
            # stop must go on (scripts still need winding down).
            log.warning("cannot remove socket file %s: %s", self.path, exc.strerror)


#: Serializes the umask dance of concurrent bind_listener() calls: one
#: restoring the umask another had only narrowed would keep it narrowed.
_UMASK_LOCK = threading.Lock()


def _bind_umask(mode: int, old_umask: int) -> int:
    """The umask to bind a unix socket under: *old_umask* plus every bit *mode* lacks.

    bind() creates the file with ``0o777 & ~umask``, so the result is at most
    *mode*; and since the old bits stay set, a file another thread creates
    meanwhile only gets a stricter mode, never a wider one.
    """
    return (old_umask | ~mode) & 0o777


def _set_socket_mode(created: SocketFile, mode: int) -> None:
    """Give the socket file *created* exactly *mode*; never touch anything in its place.

    The file is opened with ``O_PATH | O_NOFOLLOW`` and checked to be that
    very socket, then changed through ``/proc/self/fd`` (what glibc's
    ``fchmodat(AT_SYMLINK_NOFOLLOW)`` does): someone who can write to the
    directory cannot make a privileged service chmod a symlink's target.
    """
    fd = os.open(created.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) != created.ident:
            raise OSError(errno.EEXIST, f"{created.path} was replaced while being created")
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def bind_listener(spec: Listener, backlog: int = 128) -> tuple[socket.socket, SocketFile | None]:
    """Create the listening socket for *spec*.

    A unix socket is bound at its own path, so ``ss -xlp`` and
    ``/proc/net/unix`` show that path (Linux records the name given to
    bind()).  Its mode is never wider than ``spec.mode``, at no instant:
    bind() runs under a umask made stricter by every bit the mode lacks
    (:func:`_bind_umask`), then the file gets exactly ``spec.mode``.  Like
    Dovecot's master, this sets the umask around bind(); the umask is
    process-wide, so for the duration of that one call files other threads
    create get a stricter mode than usual (never a wider one).  A stale
    socket file is replaced; between bind() and listen() the new socket
    refuses connections for a moment, as Dovecot's do.

    Returns:
        ``(sock, socket_file)``: the unix socket file this call created (to
        remove on stop), else None.

    Raises:
        OSError: the address is in use (a live unix socket included) or
            cannot be bound.

    """
    if isinstance(spec, FdListener):
        sock = socket.socket(fileno=spec.fd)
        # systemd passes it inheritable: it must not reach the scripts.
        sock.set_inheritable(False)
        sock.listen(backlog)
        return sock, None
    if isinstance(spec, TcpListener):
        family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((spec.host, spec.port))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock, None
    path = spec.path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        if _unix_alive(path):
            raise OSError(errno.EADDRINUSE, f"{path}: a service is already listening there")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    created: SocketFile | None = None
    try:
        with _UMASK_LOCK:
            old_umask = os.umask(0o777)  # reading the umask sets it: to the strictest
            try:
                os.umask(_bind_umask(spec.mode, old_umask))
                sock.bind(path)
            finally:
                os.umask(old_umask)
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} was replaced while being created")
        created = SocketFile(path, (st.st_dev, st.st_ino))
        sock.listen(backlog)
        _set_socket_mode(created, spec.mode)
    except BaseException:
        sock.close()
        if created is not None:
            created.remove()
        raise
    return sock, created


def listen_backlog(max_connections: int) -> int:
    """The listen backlog for a service: room for a burst as large as *max_connections*.

    At least 128 (the old fixed value), at most the kernel's
    ``net.core.somaxconn``, which caps it anyway: a burst that fits then
    waits in the backlog instead of meeting EAGAIN (unix) or SYN retries.
    """
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            ceiling = int(f.read())
    except (OSError, ValueError):
        ceiling = 4096
    return max(128, min(max_connections, ceiling))


class Listeners:
    """A service's listening sockets: bound at once, then root is given up.

    Binding happens before :func:`drop_privileges` (privileged ports,
    root-owned directories), so no script ever runs as root when a user is
    given.  On failure whatever was bound is closed again.

    Args:
        specs: where to listen.
        config: the service's settings (``user``/``group``).

    Raises:
        OSError: a listener cannot be bound.
        LocalProtocolError: an unknown user or group.
    """

    def __init__(self, specs: Iterable[Listener], config: ServiceConfig) -> None:
        #: ``(socket, address)`` pairs, non-blocking.
        self.sockets: list[tuple[socket.socket, str | tuple[str, int]]] = []
        self._files: list[SocketFile] = []
        backlog = listen_backlog(config.max_connections)
        try:
            for spec in specs:
                sock, socket_file = bind_listener(spec, backlog)
                self.sockets.append((sock, listener_address(sock, spec)))
                if socket_file is not None:
                    self._files.append(socket_file)
                sock.setblocking(False)
            drop_privileges(config.user, config.group)
        except BaseException:
            self.close()
            raise

    @property
    def addresses(self) -> list[str | tuple[str, int]]:
        """The bound addresses: unix paths and ``(host, port)`` pairs."""
        return [address for _, address in self.sockets]

    def close(self) -> None:
        """Remove the unix socket files still ours, then close the sockets (idempotent).

        In this order: once a socket is closed its inode number may be reused
        by a service that replaces the file, whose socket must survive.
        """
        for socket_file in self._files:
            socket_file.remove()
        self._files.clear()
        for sock, _ in self.sockets:
            sock.close()
        self.sockets.clear()


class StopSignal:
    """A stop request that a blocking accept loop can also poll for: an event plus a pipe.

    :meth:`set` may be called from any thread or from a signal handler of
    the serving thread (it is re-entrant); :attr:`fd` becomes readable.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._read, self._write = os.pipe()
        self._lock = threading.RLock()

    @property
    def fd(self) -> int:
        """The descriptor to poll: readable once the stop was asked for."""
        return self._read

    def is_set(self) -> bool:
        """Whether the stop was asked for."""
        return self._event.is_set()

    def set(self) -> None:
        """Ask for the stop."""
        self._event.set()
        with self._lock, contextlib.suppress(OSError):
            if self._write >= 0:
                os.write(self._write, b"x")

    def close(self) -> None:
        """Close the pipe (idempotent)."""
        with self._lock:
            for fd in (self._read, self._write):
                if fd >= 0:
                    os.close(fd)
            self._read = self._write = -1


class ServiceOptions(TypedDict, total=False):
    """The keyword arguments of every flavour's ``serve()``, all optional.

    Keys:
        env_allowlist: env names clients may set (``-e``); nothing else of any
            environment reaches the script.
        passthrough: ``-p``: the script reads the raw request; no result code.
        header_timeout: total seconds allowed for the header (also the bound
            on sending the result code and on draining what the client still
            sends after it).
        max_header_bytes: header size cap (default 64 KiB).
        max_connections: connections handled at once; further clients wait in
            the backlog.
        libexec_dir: base of a relative script path.
        grace: on stop, seconds running scripts get before being terminated.
        kill_timeout: seconds between SIGTERM and SIGKILL (on stop, and when a
            client's ``alarm=N`` expires).
        logger: where the one-line-per-request log goes (``execproto``).
        user: when started as root, switch to this user once the listeners
            are bound, before any script runs.
        group: with *user*, this group instead of the user's primary group.
    """

    env_allowlist: Sequence[BytesLike]
    passthrough: bool
    header_timeout: float
    max_header_bytes: int
    max_connections: int
    libexec_dir: BytesLike
    grace: float
    kill_timeout: float
    logger: logging.Logger | None
    user: str | None
    group: str | None


@dataclass
class ServiceConfig:
    """The settings of one service, shared by all flavours' ``serve()``.

    Fields: the script, its leading arguments, and :class:`ServiceOptions`.
    """

    script: BytesLike
    script_args: tuple[BytesLike, ...] = ()
    env_allowlist: tuple[BytesLike, ...] = ()
    passthrough: bool = False
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    libexec_dir: BytesLike = DEFAULT_LIBEXEC_DIR
    grace: float = DEFAULT_GRACE
    kill_timeout: float = KILL_TIMEOUT
    user: str | None = None
    group: str | None = None
    logger: logging.Logger = field(default_factory=lambda: log)
    _template: ServiceConnection = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Validate once, at start-up, rather than on each connection.
        self._template = ServiceConnection(
            self.script,
            self.script_args,
            env_allowlist=self.env_allowlist,
            passthrough=self.passthrough,
            max_header_bytes=self.max_header_bytes,
            libexec_dir=self.libexec_dir,
        )
        if self.max_connections < 1:
            raise LocalProtocolError("max_connections must be at least 1")

    @classmethod
    def of(cls, script: BytesLike, script_args: Sequence[BytesLike],
           options: ServiceOptions) -> ServiceConfig:
        """The settings of one ``serve(listeners, script, script_args, **options)`` call."""
        given: dict[str, Any] = dict(options)
        if "env_allowlist" in given:
            given["env_allowlist"] = tuple(given["env_allowlist"])
        if given.get("logger", 0) is None:
            del given["logger"]
        return cls(script=script, script_args=tuple(script_args), **given)

    def new_connection(self) -> ServiceConnection:
        """A fresh core connection object with these settings."""
        return self._template.fresh()
