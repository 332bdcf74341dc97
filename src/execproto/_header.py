"""The request header: the client's encoder and the service's parser.

Wire format (PROTOCOL.md section 2)::

    VERSION \\t script \\t 4 \\t 0 LF
    [alarm=N LF]                  (never sent by the program client)
    *(env_ esc(NAME=VALUE) LF)
    ("noreply" / "-") LF
    *(esc(ARG) LF)
    LF                            (the header ends at the first LF LF)
    payload...

Theory of operation of :class:`HeaderParser`
--------------------------------------------
A header that arrives whole in the first chunk (the usual case: clients
send it in one write) is parsed straight from that chunk.  Otherwise the
parser appends received bytes to one ``bytearray`` and remembers how far
it has searched for ``LF LF`` (backing up one byte so a pair split across
chunks is found): each byte is searched once, so a 1 MB header fed one byte
at a time costs O(n), not O(n²).  As soon as the first LF arrives the
VERSION line is checked, so a client talking another protocol is dropped at
once instead of after the header timeout.  The size cap counts header bytes
including the final ``LF LF``; past it the header is rejected (Dovecot has no
cap: quirk Q1).  Payload bytes that arrive in the same chunk as the end of
the header are not part of the header: :attr:`HeaderParser.header_size`
says exactly where the payload starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from typing_extensions import Buffer

from ._errors import LocalProtocolError, RemoteProtocolError
from ._escape import tab_escape, tab_unescape
from ._events import Request

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "EMPTY_ARG_MODES",
    "SCRIPT_MAJOR_VERSION",
    "HeaderParser",
    "ParsedHeader",
    "encode_request",
]

#: The protocol major version Dovecot's ``script`` service requires.
SCRIPT_MAJOR_VERSION = 4
#: Default cap on the header size (Dovecot has none: quirk Q1).
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
#: How :func:`encode_request` treats an empty argument (quirk Q5).
EMPTY_ARG_MODES = ("soh", "reject")

_VERSION_LINE = b"VERSION\tscript\t4\t0\n"
_VERSION_LINE_4_0 = _VERSION_LINE[:-1]
_UINT32_MAX = 0xFFFFFFFF
_UINT64_MAX = 0xFFFFFFFFFFFFFFFF
_VERSION_RE = re.compile(rb"VERSION\tscript\t([0-9]+)\t([0-9]+)")
_DIGITS_RE = re.compile(rb"[0-9]+")


def encode_request(request: Request, *, empty_args: str = "soh") -> bytes:
    """Encode the header Dovecot's program client sends for *request*.

    Byte-identical to Dovecot's client except for empty arguments, which
    Dovecot writes as an empty line that ends the header early (quirk Q5).
    Here an empty argument is sent as ``\\x01`` (which the service unescapes
    to the empty string), or refused.

    Args:
        request: args, env and the noreply flag.
        empty_args: ``"soh"`` (default) or ``"reject"``.

    Returns:
        The header, ending in the blank line.

    Raises:
        LocalProtocolError: a NUL byte in an argument or env entry (Dovecot's
            service would truncate it), an env name that is empty or contains
            ``=``, or an empty argument with ``empty_args="reject"``.
    """
    if empty_args not in EMPTY_ARG_MODES:
        raise LocalProtocolError(f"empty_args must be one of {EMPTY_ARG_MODES}")
    parts = [_VERSION_LINE]
    for name, value in request.env:
        if not name or b"=" in name:
            raise LocalProtocolError(f"invalid environment variable name {name!r}")
        if b"\0" in name or b"\0" in value:
            raise LocalProtocolError(f"NUL byte in environment variable {name!r}")
        parts.append(b"env_" + tab_escape(name + b"=" + value) + b"\n")
    parts.append(b"noreply\n" if request.noreply else b"-\n")
    for index, arg in enumerate(request.args):
        if b"\0" in arg:
            raise LocalProtocolError(f"NUL byte in argument {index}")
        if not arg:
            if empty_args == "reject":
                raise LocalProtocolError(f"argument {index} is empty (empty_args='reject')")
            parts.append(b"\x01\n")
        else:
            parts.append(tab_escape(arg) + b"\n")
    parts.append(b"\n")
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class ParsedHeader:
    """What a complete header says, before the service applies its settings.

    Fields:
        version_minor: the minor version sent (ignored by Dovecot).
        alarm: the ``alarm=N`` value, or None.
        env: every ``env_`` entry in order, before the allowlist.
        noreply: the options line was exactly ``noreply``.
        args: the unescaped arguments (each cut at a NUL, as C does).
        header_size: bytes used by the header, including the final LF LF.
    """

    version_minor: int
    alarm: int | None
    env: tuple[tuple[bytes, bytes], ...]
    noreply: bool
    args: tuple[bytes, ...]
    header_size: int


def _c_string(value: bytes) -> bytes:
    nul = value.find(b"\0")
    return value if nul < 0 else value[:nul]


def _uint(digits: bytes, limit: int) -> int | None:
    """Parse 1+ ASCII digits no larger than *limit*; None if not that."""
    if _DIGITS_RE.fullmatch(digits) is None:
        return None
    significant = digits.lstrip(b"0")
    if len(significant) > 20:  # also keeps int() away from huge strings
        return None
    value = int(significant or b"0")
    return value if value <= limit else None


def check_version_line(line: bytes) -> int:
    """Check a VERSION line exactly as the ``script`` service does (2.4).

    Returns:
        The minor version.

    Raises:
        RemoteProtocolError: not ``VERSION<TAB>script<TAB>4<TAB>minor``.
    """
    if line == _VERSION_LINE_4_0:  # what every client sends
        return 0
    match = _VERSION_RE.fullmatch(line)
    if match is not None:
        major = _uint(match.group(1), _UINT64_MAX)
        minor = _uint(match.group(2), _UINT32_MAX)
        if major == SCRIPT_MAJOR_VERSION and minor is not None:
            return minor
    raise RemoteProtocolError(
        f"Client not compatible with this binary (connecting to wrong socket?): "
        f"first line {line[:80]!r}"
    )


def parse_header_text(
    text: bytes, header_size: int, *, version_minor: int | None = None
) -> ParsedHeader:
    """Interpret a complete header (without its final LF LF), as Dovecot does.

    Args:
        text: the header.
        header_size: reported back in the result.
        version_minor: the result of an earlier :func:`check_version_line`
            on the first line, if the caller already ran it.

    Raises:
        RemoteProtocolError: a fatal condition of PROTOCOL.md 2.10.
    """
    # The service treats the header as one C string: a NUL ends it (Q4).
    text = _c_string(text)
    escaped = b"\x01" in text  # else no line needs unescaping (nor can hold a NUL)
    lines = text.split(b"\n")
    minor = check_version_line(lines[0]) if version_minor is None else version_minor
    alarm: int | None = None
    env: list[tuple[bytes, bytes]] = []
    noreply = False
    args: tuple[bytes, ...] = ()
    i = 1
    if i < len(lines):
        if lines[i].startswith(b"alarm="):
            alarm = _uint(lines[i][6:], _UINT32_MAX)
            if alarm is None:
                raise RemoteProtocolError(f"invalid alarm option {lines[i][:40]!r}")
            i += 1
        while i < len(lines) and lines[i].startswith(b"env_"):
            assignment = _c_string(tab_unescape(lines[i][4:])) if escaped else lines[i][4:]
            name, eq, value = assignment.partition(b"=")
            if not eq:
                raise RemoteProtocolError(f"invalid environment variable {lines[i][:60]!r}")
            env.append((name, value))
            i += 1
        if i >= len(lines):
            # Dovecot dereferences the missing line and crashes (quirk Q3).
            raise RemoteProtocolError("missing options line after alarm=/env_ lines")
        if not lines[i]:
            raise RemoteProtocolError("empty options")
        noreply = lines[i] == b"noreply"
        if escaped:
            args = tuple(_c_string(tab_unescape(line)) for line in lines[i + 1 :])
        else:
            args = tuple(lines[i + 1 :])
    return ParsedHeader(minor, alarm, tuple(env), noreply, args, header_size)


class HeaderParser:
    """Incremental parser for the service side of the header.

    Args:
        max_header_bytes: reject a header longer than this (counting the
            final LF LF).

    Feed bytes with :meth:`feed` until it returns a :class:`ParsedHeader`;
    call :meth:`feed` with ``b""`` at EOF.  Bytes after the header are kept
    in :attr:`trailing_data` and never interpreted.
    """

    __slots__ = ("_buf", "_failed", "_max", "_minor", "_scanned", "result", "trailing_data")

    def __init__(self, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> None:
        if max_header_bytes < len(_VERSION_LINE) + 1:
            raise LocalProtocolError(f"max_header_bytes too small: {max_header_bytes}")
        self._max = max_header_bytes
        self._buf = bytearray()
        self._scanned = 0  # LF LF is not in _buf[:_scanned + 1]
        self._minor: int | None = None  # set once the VERSION line has been checked
        self._failed: str | None = None
        #: The parsed header once complete, else None.
        self.result: ParsedHeader | None = None
        #: Bytes received after the header (the start of the payload).
        self.trailing_data = b""

    def feed(self, data: Buffer) -> ParsedHeader | None:
        """Take bytes (``b""`` for EOF); return the header once it is complete.

        Raises:
            RemoteProtocolError: the header is malformed, too long, or the
                peer closed before its end.
            LocalProtocolError: called again after the header was complete.
        """
        if self.result is not None:
            raise LocalProtocolError("the header is already complete")
        if self._failed is not None:
            raise LocalProtocolError(f"the header was already rejected: {self._failed}")
        try:
            return self._feed(data)
        except RemoteProtocolError as exc:
            self._failed = exc.message
            self._buf = bytearray()  # free it: the connection is over
            raise

    def _feed(self, data: Buffer) -> ParsedHeader | None:
        buf = self._buf
        if not data:
            self._check_first_line()
            raise RemoteProtocolError(
                f"disconnected before the end of the header ({len(buf)} bytes received)"
            )
        start = max(self._scanned - 1, 0)
        if buf:
            buf += data
            end = buf.find(b"\n\n", start)
        else:
            # The first chunk is searched where it is: the usual case, a whole
            # header in one chunk, is parsed from it without the buffer.
            first = bytes(data)
            end = first.find(b"\n\n")
            if 0 <= end <= self._max - 2:
                # parse_header_text checks the VERSION line first, as below.
                self.result = parse_header_text(first[:end], end + 2)
                self.trailing_data = first[end + 2 :]
                return self.result
            buf += first
        if self._minor is None and buf.find(b"\n", start) >= 0:
            self._check_first_line()
        if end < 0:
            if len(buf) >= self._max:
                raise RemoteProtocolError(f"header exceeds {self._max} bytes")
            self._scanned = len(buf)
            return None
        size = end + 2
        if size > self._max:
            raise RemoteProtocolError(f"header exceeds {self._max} bytes")
        self.result = parse_header_text(bytes(buf[:end]), size, version_minor=self._minor)
        self.trailing_data = bytes(buf[size:])
        self._buf = bytearray()
        return self.result

    def _check_first_line(self) -> None:
        # Only within the cap: past it the header is too long, however it is cut.
        lf = self._buf.find(b"\n", 0, self._max)
        if lf >= 0 and self._minor is None:
            self._minor = check_version_line(_c_string(bytes(self._buf[:lf])))
