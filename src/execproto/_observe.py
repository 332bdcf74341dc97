"""Watch an exchange from the outside: what a tap between client and service sees.

Theory of operation
-------------------
An :class:`ExchangeObserver` is fed a copy of both byte streams of one
connection as they pass: :meth:`~ExchangeObserver.from_client` with what the
client sends (header, then payload), :meth:`~ExchangeObserver.from_service`
with what the service sends back (the script's output, then the result
code), ``b""`` for each end of stream.  It never changes the bytes, and it
never needs a stream whole:

* the client's stream goes through a :class:`HeaderParser` until the header
  is complete (at most ``max_header_bytes`` are buffered); the payload after
  it is counted and hashed (SHA-256) as it passes, and only its first
  ``keep`` bytes are kept; over tcp a :class:`DotDecoder` tells whether the
  payload's dot end line came;
* of the service's stream only the last two bytes are kept, because only the
  end of the stream tells which two bytes are the result code (as in
  :class:`ResultCodeFilter`); over tcp the output before them goes through
  a :class:`DotDecoder`.

So the memory used is bounded by ``max_header_bytes + keep`` whatever the
sizes, and every chunking of the same streams gives the same
:class:`ExchangeSummary`.  :meth:`~ExchangeObserver.summary` may be called at
any time (a tap that gives up on an idle connection summarises what it saw);
it classifies the result code the way a client would at EOF.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from typing_extensions import Buffer

from ._dot import DotDecoder
from ._errors import RemoteProtocolError
from ._events import Status
from ._header import DEFAULT_MAX_HEADER_BYTES, HeaderParser, ParsedHeader
from ._reply import ResultCodeFilter
from ._util import BytesLike, to_bytes

__all__ = ["EnvEntry", "ExchangeObserver", "ExchangeSummary"]

# The bytes tab-escaping changes (PROTOCOL.md 3.1).
_NEEDS_ESCAPE = re.compile(b"[\x00\x01\t\n\r]")

@dataclass(frozen=True, slots=True)
class EnvEntry:
    """One ``env_`` line of a request, and what a service with an allowlist does with it.

    Fields:
        name: the variable's name (unescaped).
        value: its value (unescaped).
        status: ``"kept"``, ``"dropped"`` (not on the allowlist) or
            ``"overridden"`` (allowed, but a later line sets the same name:
            the last one wins); None when no allowlist was given.
        escaped: the name or value has a byte the client must tab-escape (TAB,
            CR, LF, SOH, NUL).  Dovecot's service up to 2.4.2 drops such
            lines whatever its allowlist says (quirk Q6); *status* follows
            2.4.3 and later, which keep them.
    """

    name: bytes
    value: bytes
    status: str | None
    escaped: bool = False


@dataclass(frozen=True, slots=True)
class ExchangeSummary:
    """What one exchange looked like from the outside.

    Fields:
        header: the parsed request header, or None (incomplete or bad).
        header_error: why the header could not be decoded, else None.
        env: the header's ``env_`` lines in order, with their fate.
        request_bytes: every byte the client sent.
        request_head: the first ``keep`` bytes of the request, header included.
        payload_bytes: the bytes after the header (the script's stdin, as sent:
            dot-encoded over tcp).
        payload_sha256: the SHA-256 of those bytes, in hex.
        payload_head: their first ``keep`` bytes.
        payload_dot_end: over tcp, whether the payload's dot end line came;
            None over unix.
        client_ended: the client's stream has ended.
        reply_bytes: every byte the service sent.
        output_bytes: those bytes without the result code, as a client counts
            them (dot-encoded over tcp).
        result: ``"+"``, ``"-"``, ``"noreply"`` (none was asked for),
            ``"none"`` (the service sent nothing) or ``"bad"`` (the reply does
            not end in a result code line; *result_detail* says how).
        result_detail: for ``"bad"`` and ``"none"``, the client's diagnosis.
        output_dot_end: over tcp, whether the output's dot end line came; None
            over unix, and for a noreply reply without any output.
        service_ended: the service's stream has ended.
    """

    header: ParsedHeader | None
    header_error: str | None
    env: tuple[EnvEntry, ...]
    request_bytes: int
    request_head: bytes
    payload_bytes: int
    payload_sha256: str
    payload_head: bytes
    payload_dot_end: bool | None
    client_ended: bool
    reply_bytes: int
    output_bytes: int
    result: str
    result_detail: str
    output_dot_end: bool | None
    service_ended: bool

    @property
    def status(self) -> Status | None:
        """SUCCESS for ``+``, FAILURE for ``-``, else None."""
        return {"+": Status.SUCCESS, "-": Status.FAILURE}.get(self.result)


def env_fates(env: Iterable[tuple[bytes, bytes]],
              allowlist: Iterable[bytes] | None) -> tuple[EnvEntry, ...]:
    """Say what a service with *allowlist* (None: unknown) does with each ``env_`` entry.

    The same rules as :class:`ServiceConnection`: exact names, the last
    duplicate wins, an empty name is never allowed.
    """
    pairs = tuple(env)
    allowed = None if allowlist is None else frozenset(allowlist) - {b""}
    last = {name: index for index, (name, _) in enumerate(pairs)}

    def fate(index: int, name: bytes) -> str | None:
        if allowed is None:
            return None
        if name not in allowed:
            return "dropped"
        return "kept" if last[name] == index else "overridden"

    return tuple(
        EnvEntry(name, value, fate(index, name), _NEEDS_ESCAPE.search(name + value) is not None)
        for index, (name, value) in enumerate(pairs))


class ExchangeObserver:
    """Follow both streams of one connection without changing or storing them.

    Args:
        dot: the client uses dot framing (tcp): check the payload's and the
            output's dot end lines.
        env_allowlist: the service's ``-e`` names, to say which ``env_``
            entries it keeps; None when unknown.
        max_header_bytes: give up decoding a longer header (it is still
            counted; Dovecot's service has no limit).
        keep: how many leading bytes of the request and of the payload to keep.
    """

    __slots__ = (
        "_allow", "_client_ended", "_dot", "_header_error", "_keep", "_output_decoder",
        "_parser", "_payload_bytes", "_payload_decoder", "_payload_head", "_reply_bytes",
        "_request_bytes", "_request_head", "_service_ended", "_sha", "_tail", "header",
    )

    def __init__(self, *, dot: bool = False, env_allowlist: Iterable[BytesLike] | None = None,
                 max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, keep: int = 0) -> None:
        self._dot = dot
        self._allow = None if env_allowlist is None else tuple(
            to_bytes(name, "env allowlist entry") for name in env_allowlist)
        self._keep = max(keep, 0)
        self._parser: HeaderParser | None = HeaderParser(max_header_bytes=max_header_bytes)
        #: The request header once decoded, else None.
        self.header: ParsedHeader | None = None
        self._header_error: str | None = None
        self._request_bytes = 0
        self._request_head = b""
        self._payload_bytes = 0
        self._payload_head = b""
        self._sha = hashlib.sha256()
        self._payload_decoder = DotDecoder() if dot else None
        self._client_ended = False
        self._reply_bytes = 0
        self._tail = b""  # the last (at most) 2 bytes of the reply
        self._output_decoder = DotDecoder() if dot else None
        self._service_ended = False

    def from_client(self, data: Buffer) -> None:
        """See bytes the client sent; ``b""`` when its stream ended (EOF or reset)."""
        data = bytes(data)
        if not data:
            if not self._client_ended:
                self._client_ended = True
                self._feed_parser(b"")
            return
        if self._client_ended:
            return  # nothing follows an end; a tap never sends it
        self._request_bytes += len(data)
        if len(self._request_head) < self._keep:
            self._request_head += data[: self._keep - len(self._request_head)]
        if self._parser is not None:
            data = self._feed_parser(data)
        if data and self.header is not None:
            self._payload(data)

    def _feed_parser(self, data: bytes) -> bytes:
        """Feed the header parser; return the payload bytes that followed the header."""
        parser = self._parser
        if parser is None:
            return b""
        try:
            header = parser.feed(data)
        except RemoteProtocolError as exc:
            self._header_error = exc.message
            self._parser = None
            return b""
        if header is None:
            return b""
        self.header = header
        self._parser = None
        return parser.trailing_data

    def _payload(self, data: bytes) -> None:
        self._payload_bytes += len(data)
        self._sha.update(data)
        if len(self._payload_head) < self._keep:
            self._payload_head += data[: self._keep - len(self._payload_head)]
        if self._payload_decoder is not None:
            self._payload_decoder.decode(data)

    def from_service(self, data: Buffer) -> None:
        """See bytes the service sent; ``b""`` when its stream ended (EOF or reset)."""
        data = bytes(data)
        if not data:
            self._service_ended = True
            return
        if self._service_ended:
            return
        self._reply_bytes += len(data)
        both = self._tail + data if len(data) < 2 else data
        released = both[:-2] if len(data) < 2 else self._tail + data[:-2]
        self._tail = both[-2:]
        if self._output_decoder is not None and released:
            self._output_decoder.decode(released)

    def summary(self) -> ExchangeSummary:
        """Describe the exchange so far (the result code as a client would read it at EOF)."""
        header = self.header
        noreply = header is not None and header.noreply
        output_dot_end: bool | None = None
        if noreply:
            result, detail, output = "noreply", "", self._reply_bytes
            if self._output_decoder is not None and self._reply_bytes:
                output_dot_end = self._decoded_end(self._tail)
        else:
            check = ResultCodeFilter()
            released = check.feed(self._tail)
            rest, status, detail = check.finish()
            output = self._reply_bytes - len(self._tail) + len(released) + len(rest)
            if status is Status.SUCCESS:
                result = "+"
            elif status is Status.FAILURE:
                result = "-"
            else:
                result = "none" if not self._reply_bytes else "bad"
            if self._output_decoder is not None:
                output_dot_end = self._decoded_end(released + rest)
        decoder = self._payload_decoder
        return ExchangeSummary(
            header=header,
            header_error=self._header_error,
            env=env_fates(header.env, self._allow) if header is not None else (),
            request_bytes=self._request_bytes,
            request_head=self._request_head,
            payload_bytes=self._payload_bytes,
            payload_sha256=self._sha.hexdigest(),
            payload_head=self._payload_head,
            payload_dot_end=None if decoder is None else decoder.ended,
            client_ended=self._client_ended,
            reply_bytes=self._reply_bytes,
            output_bytes=output,
            result=result,
            result_detail=detail,
            output_dot_end=output_dot_end,
            service_ended=self._service_ended,
        )

    def _decoded_end(self, last: bytes) -> bool:
        """Whether the output's dot stream, with *last* added, has its end line."""
        assert self._output_decoder is not None
        if not last:
            return self._output_decoder.ended
        decoder = copy.copy(self._output_decoder)
        decoder.decode(last)
        return decoder.ended
