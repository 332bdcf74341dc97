"""The service side of a run: what Dovecot's ``script`` binary decides.

The adapter peeks (or reads) bytes from an accepted connection and feeds
them to :meth:`ServiceConnection.receive_data` until :meth:`next_event`
returns a :class:`ScriptRequest`.  That event carries the argv and the
environment to run the script with, and ``header_size``: the adapter
consumes exactly that many bytes from the socket so the script reads the
payload straight from it.  When the script has ended, ``send(ScriptExited(...))``
returns the result code to write (``b""`` with noreply or passthrough).

The service decides nothing from time: the header deadline, ``alarm=N`` and
killing the script are the adapter's, driven by the ScriptRequest fields.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from typing_extensions import Buffer

from ._argv import service_argv
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import NEED_DATA, ScriptExited, ScriptRequest
from ._header import DEFAULT_MAX_HEADER_BYTES, HeaderParser
from ._util import BytesLike, to_bytes

__all__ = ["DEFAULT_LIBEXEC_DIR", "ServiceConnection", "ServiceState", "parse_env_allowlist"]

#: Where Dovecot resolves a relative script path (``PKG_LIBEXECDIR``; Debian
#: uses /usr/lib/dovecot).
DEFAULT_LIBEXEC_DIR = "/usr/libexec/dovecot"


class ServiceState(enum.Enum):
    """Where a :class:`ServiceConnection` is."""

    HEADER = "header"  #: reading the header
    RUNNING = "running"  #: the ScriptRequest was returned; the script runs
    DONE = "done"  #: the result code was produced
    ERROR = "error"  #: the header was bad; close the connection, no reply


def parse_env_allowlist(values: Iterable[BytesLike]) -> tuple[bytes, ...]:
    """Split ``-e`` option values the way the ``script`` binary does.

    Each value is split on any run of ``,``, space or TAB; empty pieces are
    dropped; lists from several ``-e`` options accumulate.

    >>> parse_env_allowlist(["FOO,BAR", "BAZ  QUX"])
    (b'FOO', b'BAR', b'BAZ', b'QUX')
    """
    names: list[bytes] = []
    for value in values:
        raw = to_bytes(value, "env allowlist entry")
        names.extend(p for p in raw.replace(b",", b" ").replace(b"\t", b" ").split(b" ") if p)
    return tuple(names)


class ServiceConnection:
    """One connection to the service.

    Args:
        script: the script path; a relative one is resolved against
            *libexec_dir* like Dovecot does.
        script_args: the service's own arguments, placed before the client's.
        env_allowlist: the env names clients may set (``-e``); exact,
            case-sensitive.  Entries outside it are dropped silently.
        passthrough: ``-p``: parse nothing; the script reads the raw request
            and no result code is sent.
        max_header_bytes: reject longer headers (Dovecot has no limit: Q1).
        libexec_dir: base of relative script paths.
    """

    def __init__(
        self,
        script: BytesLike,
        script_args: Iterable[BytesLike] = (),
        *,
        env_allowlist: Iterable[BytesLike] = (),
        passthrough: bool = False,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        libexec_dir: BytesLike = DEFAULT_LIBEXEC_DIR,
    ) -> None:
        self._base_argv = service_argv(script, script_args, (), libexec_dir=libexec_dir)
        # An empty name is never on the list (Dovecot), whatever the caller passes.
        self._allow = frozenset(
            to_bytes(n, "env allowlist entry") for n in env_allowlist) - {b""}
        self.passthrough = passthrough
        self._max_header_bytes = max_header_bytes
        self._parser = HeaderParser(max_header_bytes=max_header_bytes)
        self._start()

    def _start(self) -> None:
        self.state = ServiceState.HEADER
        self._request: ScriptRequest | None = None
        self._pending: ScriptRequest | None = None
        if self.passthrough:
            self._pending = ScriptRequest(
                argv=self._base_argv, env=(), args=(), noreply=False, passthrough=True,
                alarm=None, version_minor=None, header_size=0,
            )

    def fresh(self) -> ServiceConnection:
        """A new connection with this one's settings, in state HEADER.

        The same as calling the constructor again with the same arguments,
        without validating them again: a service keeps one connection as a
        template and takes a fresh one per client.  This connection's own
        state is neither copied nor changed.
        """
        new = object.__new__(ServiceConnection)
        new._base_argv = self._base_argv
        new._allow = self._allow
        new.passthrough = self.passthrough
        new._max_header_bytes = self._max_header_bytes
        new._parser = HeaderParser(max_header_bytes=self._max_header_bytes)
        new._start()
        return new

    @property
    def trailing_data(self) -> bytes:
        """Payload bytes that arrived with the end of the header.

        Adapters that peek never need it; adapters that read must hand these
        bytes to the script before the rest of the stream.
        """
        return self._parser.trailing_data

    def receive_data(self, data: Buffer) -> None:
        """Add bytes received (or peeked) from the client; ``b""`` means EOF.

        Raises:
            RemoteProtocolError: the header is malformed or too long, or the
                client closed before its end.  Close without a reply.
            LocalProtocolError: called when no header is expected.
        """
        if self.passthrough:
            raise LocalProtocolError("a passthrough service reads no header")
        if self.state is not ServiceState.HEADER or self._pending is not None:
            raise LocalProtocolError(f"cannot receive data in state {self.state.name}")
        try:
            parsed = self._parser.feed(bytes(data))
        except RemoteProtocolError:
            self.state = ServiceState.ERROR
            raise
        if parsed is None:
            return
        env: dict[bytes, bytes] = {}
        for name, value in parsed.env:
            if name in self._allow:
                env[name] = value  # the last duplicate wins
        self._pending = ScriptRequest(
            argv=self._base_argv + parsed.args,
            env=tuple(env.items()),
            args=parsed.args,
            noreply=parsed.noreply,
            passthrough=False,
            alarm=parsed.alarm,
            version_minor=parsed.version_minor,
            header_size=parsed.header_size,
        )

    def next_event(self) -> ScriptRequest | type[NEED_DATA]:
        """Return the :class:`ScriptRequest` once the header is complete, else NEED_DATA.

        Raises:
            LocalProtocolError: the request was already returned, or the
                connection is in ERROR.
        """
        if self.state is not ServiceState.HEADER:
            raise LocalProtocolError(f"no more events in state {self.state.name}")
        if self._pending is None:
            return NEED_DATA
        self._request, self._pending = self._pending, None
        self.state = ServiceState.RUNNING
        return self._request

    def send(self, event: ScriptExited) -> bytes:
        """Return the result code for the script's end (``b""`` when none is due).

        ``+\\n`` for return code 0, ``-\\n`` for anything else (exit status,
        signal, never started), nothing with noreply or passthrough.

        Raises:
            LocalProtocolError: no script is running.
        """
        if type(event) is not ScriptExited or self.state is not ServiceState.RUNNING:
            raise LocalProtocolError(
                f"cannot send {type(event).__name__} in state {self.state.name}")
        assert self._request is not None
        self.state = ServiceState.DONE
        if not self._request.sends_result:
            return b""
        return b"+\n" if event.returncode == 0 else b"-\n"
