"""Events exchanged with the connection objects, and the result vocabulary.

Every event is a frozen, slotted dataclass.  The events a caller sends
(:class:`Request`, :class:`Data`, :class:`ScriptExited`) are built with
keywords; their constructors normalise ``str`` to ``bytes`` and validate,
raising :class:`LocalProtocolError`.  The events the core returns are plain.
All are ``@final``: callers may dispatch on ``type(event) is X``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from typing_extensions import final

from ._errors import LocalProtocolError
from ._util import BytesLike, EnvLike, Sentinel, to_bytes

__all__ = [
    "NEED_DATA",
    "Data",
    "EndOfInput",
    "ErrorKind",
    "Output",
    "Request",
    "Result",
    "ScriptExited",
    "ScriptRequest",
    "Status",
]


class NEED_DATA(Sentinel, metaclass=Sentinel):
    """Returned by ``next_event()`` when more bytes (or EOF) must be received."""


class Status(enum.IntEnum):
    """The outcome of a run, with Dovecot's numeric values (``enum program_client_exit_status``)."""

    #: The script ran and reported success (``+``, or exit status 0).
    SUCCESS = 1
    #: The script ran and reported failure (``-``, or a non-zero exit status).
    FAILURE = 0
    #: The run itself failed (no connection, a timeout, garbage from the peer...).
    INTERNAL_FAILURE = -1


class ErrorKind(enum.Enum):
    """Why a run ended in :attr:`Status.INTERNAL_FAILURE` (``NONE`` otherwise)."""

    NONE = "none"
    #: The connection (or every tcp address) could not be made in time.
    CONNECT_TIMEOUT = "connect-timeout"
    #: The run timeout (Dovecot's "input idle timeout", a total limit) expired.
    RUN_TIMEOUT = "run-timeout"
    #: A socket, pipe or process error (connect refused, reset, EPIPE...).
    IO = "io"
    #: The peer broke the protocol (a bad or missing result code, dot stream
    #: without its end line).  Dovecot reports the first as kind NONE and the
    #: second as IO; see the README's compatibility notes.
    PROTOCOL = "protocol"
    #: Anything else (name resolution failed, all tcp addresses failed...).
    OTHER = "other"


def _args_tuple(values: Iterable[BytesLike], what: str) -> tuple[bytes, ...]:
    if isinstance(values, (str, bytes, bytearray, memoryview)):
        raise LocalProtocolError(f"{what} must be a sequence of values, not a single string")
    return tuple(to_bytes(v, what) for v in values)


def _env_tuple(env: EnvLike) -> tuple[tuple[bytes, bytes], ...]:
    items: Iterable[tuple[BytesLike, BytesLike]] = (
        env.items() if isinstance(env, Mapping) else env)
    pairs = []
    for item in items:
        try:
            name, value = item
        except (TypeError, ValueError):
            raise LocalProtocolError("env must be a mapping or (name, value) pairs") from None
        pairs.append((to_bytes(name, "env name"), to_bytes(value, "env value")))
    return tuple(pairs)


@final
@dataclass(frozen=True, slots=True, init=False)
class Request:
    """Client → service: start a run (the header).

    Fields:
        args: the script's arguments (after the service's own), as bytes.
        env: ``(NAME, VALUE)`` pairs, in order; the service keeps only the names
            on its ``-e`` allowlist.  Sent as ``env_NAME=VALUE`` lines.
        noreply: ask the service not to send a result code (and not to wait).
    """

    args: tuple[bytes, ...]
    env: tuple[tuple[bytes, bytes], ...]
    noreply: bool

    def __init__(
        self,
        *,
        args: Iterable[BytesLike] = (),
        env: EnvLike = (),
        noreply: bool = False,
    ) -> None:
        object.__setattr__(self, "args", _args_tuple(args, "argument"))
        object.__setattr__(self, "env", _env_tuple(env))
        object.__setattr__(self, "noreply", bool(noreply))


@final
@dataclass(frozen=True, slots=True, init=False)
class Data:
    """A chunk of payload (client → service) for the script's stdin.

    Fields:
        data: the bytes, as the script should read them (before dot-encoding).
    """

    data: bytes

    def __init__(self, *, data: BytesLike) -> None:
        object.__setattr__(self, "data", to_bytes(data, "data"))


@final
@dataclass(frozen=True, slots=True)
class EndOfInput:
    """The payload is complete; the adapter then half-closes (or closes)."""


@final
@dataclass(frozen=True, slots=True)
class Output:
    """A chunk of the script's output, with the result code already removed.

    Fields:
        data: the bytes (dot-decoded on tcp).  Output released before an error is
            not retracted: trust it only when the final status is SUCCESS or FAILURE.
    """

    data: bytes


@final
@dataclass(frozen=True, slots=True)
class Result:
    """The final outcome of a run; the last event of a connection.

    Fields:
        status: SUCCESS, FAILURE or INTERNAL_FAILURE.
        kind: why the run failed internally; ``ErrorKind.NONE`` unless
            ``status`` is INTERNAL_FAILURE.
        detail: a one-line human-readable explanation ("" on plain success).
    """

    status: Status
    kind: ErrorKind = ErrorKind.NONE
    detail: str = ""

    def __post_init__(self) -> None:
        if (self.kind is ErrorKind.NONE) == (self.status is Status.INTERNAL_FAILURE):
            raise LocalProtocolError(
                f"an INTERNAL_FAILURE result needs an error kind, others must not have one "
                f"(status={self.status.name}, kind={self.kind.name})"
            )


@final
@dataclass(frozen=True, slots=True)
class ScriptRequest:
    """Service side: a complete, valid header; run the script as described.

    Fields:
        argv: ``[script, *service_args, *args]``, ready for ``execve``.
        env: the script's whole environment: only allowlisted ``env_`` entries,
            last duplicate wins, in first-seen order.
        args: the client's arguments alone.
        noreply: the client sent ``noreply``: send no result code.
        passthrough: the service runs in ``-p`` mode: nothing was parsed,
            the script reads the raw request; send no result code.
        alarm: seconds from ``alarm=N`` (0 cancels), or None when absent.
        version_minor: the minor version the client sent (None in passthrough).
        header_size: how many bytes of the stream the header used; the payload
            (the script's stdin) starts right after them.
    """

    argv: tuple[bytes, ...]
    env: tuple[tuple[bytes, bytes], ...]
    args: tuple[bytes, ...]
    noreply: bool
    passthrough: bool
    alarm: int | None
    version_minor: int | None
    header_size: int

    @property
    def environ(self) -> dict[bytes, bytes]:
        """:attr:`env` as a dict, the form ``os.execve`` and ``subprocess`` take."""
        return dict(self.env)

    @property
    def sends_result(self) -> bool:
        """True when the service must send ``+``/``-`` after the script exits."""
        return not (self.noreply or self.passthrough)


@final
@dataclass(frozen=True, slots=True, init=False)
class ScriptExited:
    """Service side: the script has ended (or could not be started).

    Fields:
        returncode: like ``subprocess``: 0 success, N > 0 exit status N,
            -N killed by signal N; None when the script never started.
    """

    returncode: int | None

    def __init__(self, *, returncode: int | None) -> None:
        if returncode is not None and (type(returncode) is not int):
            raise LocalProtocolError(f"returncode must be an int or None, not {returncode!r}")
        object.__setattr__(self, "returncode", returncode)
