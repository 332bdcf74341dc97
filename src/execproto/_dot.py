"""SMTP-style dot framing as Dovecot's tcp driver uses it (PROTOCOL.md section 5).

Theory of operation
-------------------
The encoder (``ostream-dot``) turns bare LF into CRLF, keeps CRLF and bare CR,
doubles a dot at the start of a line and ends with ``.\\r\\n`` (after a line
break) or ``\\r\\n.\\r\\n``.  Since the CVE-2026-33604 fix (Dovecot 2.4.5, and
Debian's 2.3.19.1+deb12u7) a bare CR followed by a dot is also taken as a line
break: ``\\r.`` becomes ``\\r\\n..``.

The decoder (``istream-dot`` with TRIM_TRAIL and LOOSE_EOT) is a small state
machine over bytes; only a ``.`` at the start of a line is special.  Running
that machine byte by byte in Python would be slow, so both classes only walk
the states at chunk boundaries (at most a few bytes) and handle the rest of a
chunk with whole-chunk ``re``/``bytes`` calls, which run in C.  The states are::

    DATA    inside a line, nothing held back
    CR      a CR was the last byte; it may start a CRLF line break (held back)
    BOL     at the start of a line; the line break before it is held back,
            because it is trimmed if this line is the end marker
    DOT     BOL and a "." arrived
    DOT_CR  BOL and ".\\r" arrived
    END     the end marker was seen; everything after it is left over

So at most four bytes (``\\r\\n.\\r``) are ever held back and every input byte
is looked at a bounded number of times: linear in the input, whatever the
chunking, and the same output for every chunking.
"""

from __future__ import annotations

import enum
import io
import re
from typing import Any

from typing_extensions import Buffer

from ._errors import LocalProtocolError, RemoteProtocolError

__all__ = ["DotDecoder", "DotEncoder"]

_CR, _LF, _DOT = 0x0D, 0x0A, 0x2E
# One regex pass stuffs dots faster than bytes.replace with a 2-byte pattern.
_DOT_LINE = re.compile(rb"\n\.")


def _crlf_only(data: bytes) -> bool:
    """Whether *data* has a CRLF, every CR but a final one starts a CRLF and every LF ends one.

    The obvious test, ``count(b"\\r\\n") == count(b"\\r") == count(b"\\n")``,
    scans the data three times, once with CPython's two-byte search; the
    universal-newlines decoder of the io module (a pure transform, no I/O)
    records which kinds of line break it met in one scan.  It holds back a
    final CR without classifying it, as the encoder needs: that CR may
    start a CRLF split across chunks.
    """
    seen = io.IncrementalNewlineDecoder(None, translate=False)
    seen.decode(data.decode("latin-1"))
    return seen.newlines == "\r\n"


class _EncState(enum.Enum):
    BOL = enum.auto()
    MID = enum.auto()
    CR = enum.auto()


class DotEncoder:
    """Incremental dot-encoder for the payload the tcp client sends.

    Args:
        stuff_bare_cr_dot: apply the CVE-2026-33604 fix (default): a bare CR
            followed by ``.`` is sent as CR LF ``..``.  False reproduces Dovecot
            2.4.4 and older, which copy ``\\r.`` unchanged.
    """

    __slots__ = ("_finished", "_fix", "_started", "_state")

    def __init__(self, *, stuff_bare_cr_dot: bool = True) -> None:
        self._fix = stuff_bare_cr_dot
        self._state = _EncState.BOL
        self._started = False
        self._finished = False

    def encode(self, data: Buffer) -> bytes:
        """Encode one chunk of payload.

        Raises:
            LocalProtocolError: called after :meth:`finish`.
        """
        if self._finished:
            raise LocalProtocolError("dot encoder already finished")
        if not isinstance(data, bytes):
            data = bytes(data)
        if not data:
            return b""
        self._started = True
        prefix = b""
        i = 0
        first = data[0]
        if self._state is _EncState.CR:
            # The CR was already sent; decide what it was.
            if first == _LF:
                prefix, i, self._state = b"\n", 1, _EncState.BOL
            elif first == _DOT and self._fix:
                prefix, i, self._state = b"\n..", 1, _EncState.MID
            else:
                self._state = _EncState.MID
        if self._state is _EncState.BOL and i < len(data) and data[i] == _DOT:
            prefix += b".."
            i += 1
            self._state = _EncState.MID
        rest = data[i:] if i else data
        if not rest:
            return prefix
        last = rest[-1]
        if b"\r" not in rest:  # LF text
            out = _DOT_LINE.sub(b"\n..", rest).replace(b"\n", b"\r\n")
        elif _crlf_only(rest):
            # CRLF text (every CR starts a CRLF, every LF ends one): only
            # dots to stuff.  A final CR is sent as it is; the next chunk
            # tells whether it started a CRLF (state CR).
            out = _DOT_LINE.sub(b"\n..", rest)
        else:
            # Work in "LF space": every CRLF becomes LF, so every CR left is
            # bare; stuff dots there, then turn every LF back into CRLF.
            s = _DOT_LINE.sub(b"\n..", rest.replace(b"\r\n", b"\n"))
            if self._fix and b"\r." in s:
                # A bare CR before a dot is a line break: in LF space "\n..",
                # which becomes "\r\n.." below.
                s = s.replace(b"\r.", b"\n..")
            out = s.replace(b"\n", b"\r\n")
        self._state = (
            _EncState.BOL if last == _LF else _EncState.CR if last == _CR else _EncState.MID
        )
        return prefix + out if prefix else out

    def finish(self) -> bytes:
        """Return the end marker; no more data may be encoded afterwards."""
        if self._finished:
            raise LocalProtocolError("dot encoder already finished")
        self._finished = True
        if self._state is _EncState.BOL and self._started:
            return b".\r\n"
        return b"\r\n.\r\n"


class _DecState(enum.Enum):
    DATA = enum.auto()
    CR = enum.auto()
    BOL = enum.auto()
    DOT = enum.auto()
    DOT_CR = enum.auto()
    END = enum.auto()


class DotDecoder:
    """Incremental dot-decoder for the reply of a tcp service.

    Dovecot's semantics: line breaks pass through unchanged, one leading dot
    is removed from each line, the line break before the end marker is
    trimmed, all four marker forms (``CRLF/LF . CRLF/LF``) end the stream,
    and bytes after the marker are left over (discarded by the client).

    A line that starts with ``.\\r`` followed by something other than LF is
    decoded as "dot removed, CR is data".  Dovecot drops bytes there (quirk
    Q14); only malformed streams can contain it.
    """

    __slots__ = ("_brk", "_state", "leftover")

    def __init__(self) -> None:
        self._state = _DecState.BOL
        self._brk = b""  # the held-back line break in BOL/DOT/DOT_CR
        #: How many bytes arrived after the end marker (they are discarded).
        self.leftover = 0

    @property
    def ended(self) -> bool:
        """True once the end marker has been decoded."""
        return self._state is _DecState.END

    def decode(self, data: Buffer) -> bytes:
        """Decode one chunk and return the data it completes (maybe ``b""``)."""
        if not isinstance(data, bytes):
            data = bytes(data)
        st = self._state
        n = len(data)
        if st is _DecState.END:
            self.leftover += n
            return b""
        out: list[bytes | memoryview] = []
        i = 0
        # Slow path: walk the boundary states until inside a line.
        while i < n and st is not _DecState.DATA:
            b = data[i]
            if st is _DecState.CR:
                if b == _LF:
                    self._brk, st, i = b"\r\n", _DecState.BOL, i + 1
                else:
                    out.append(b"\r")
                    st = _DecState.DATA
            elif st is _DecState.BOL:
                if b == _DOT:
                    st, i = _DecState.DOT, i + 1
                else:
                    out.append(self._brk)
                    self._brk, st = b"", _DecState.DATA
            elif st is _DecState.DOT:
                if b == _LF:
                    st, i = _DecState.END, i + 1
                elif b == _CR:
                    st, i = _DecState.DOT_CR, i + 1
                else:  # the dot is dropped, the line is data
                    out.append(self._brk)
                    self._brk, st = b"", _DecState.DATA
            else:  # DOT_CR
                if b == _LF:
                    st, i = _DecState.END, i + 1
                else:
                    out.append(self._brk)
                    out.append(b"\r")
                    self._brk, st = b"", _DecState.DATA
            if st is _DecState.END:
                self._brk = b""
                self.leftover = n - i
                self._state = st
                return b"".join(out)
        if i >= n:
            self._state = st
            return b"".join(out)
        # Fast path: inside a line at data[i].  Only "\n." can start a special
        # line.  One regex split finds every dot-line; if none of them can be
        # the end marker (the byte after the dot is never CR or LF, and no
        # dot-line is cut by the end of the chunk), dropping their dots is
        # joining the pieces with "\n".  min() finds the smallest piece in C:
        # an empty one or one that starts with a byte up to CR sends the chunk
        # to the byte-exact loop below (the end marker's chunk, in practice).
        parts: list[Any] = _DOT_LINE.split(data[i:] if i else data)
        if len(parts) > 1 and min(parts[1:])[:1] <= b"\r":
            return self._scan(data, i, out)
        tail = parts[-1]
        last = tail[-1]
        if last == _LF:
            # The line break is held back (BOL).  Its CR is ours when it is in
            # the same piece (see the slow path's exits).
            if len(tail) > 1 and tail[-2] == _CR:
                self._brk, parts[-1] = b"\r\n", memoryview(tail)[:-2]
            else:
                self._brk, parts[-1] = b"\n", memoryview(tail)[:-1]
            self._state = _DecState.BOL
        elif last == _CR:
            parts[-1] = memoryview(tail)[:-1]
            self._state = _DecState.CR
        else:
            self._state = _DecState.DATA
        if out:
            parts[0] = b"".join([*out, parts[0]])
        if len(parts) == 1:
            only = parts[0]
            return only if type(only) is bytes else bytes(only)
        return b"\n".join(parts)

    def _scan(self, data: bytes, i: int, out: list[bytes | memoryview]) -> bytes:
        """Decode data[i:], inside a line, with a loop over its dot-lines."""
        n = len(data)
        start = i
        copy_from = i
        mv = memoryview(data)
        pos = i
        while True:
            j = data.find(b"\n.", pos)
            if j < 0:
                break
            # The byte before a LF at j is a CR of the same line break only if
            # it is ours (j > start): see the slow path's exits.
            brk_at = j - 1 if j > start and data[j - 1] == _CR else j
            k = j + 2
            if k == n:  # "...\n." : need the next byte
                out.append(mv[copy_from:brk_at])
                self._brk, self._state = bytes(data[brk_at : j + 1]), _DecState.DOT
                return b"".join(out)
            c = data[k]
            if c == _LF or (c == _CR and k + 1 < n and data[k + 1] == _LF):
                out.append(mv[copy_from:brk_at])
                self._brk, self._state = b"", _DecState.END
                self.leftover = n - (k + 1 if c == _LF else k + 2)
                return b"".join(out)
            if c == _CR and k + 1 == n:  # "...\n.\r": need the next byte
                out.append(mv[copy_from:brk_at])
                self._brk, self._state = bytes(data[brk_at : j + 1]), _DecState.DOT_CR
                return b"".join(out)
            # A data line starting with a dot: drop the dot.
            out.append(mv[copy_from : j + 1])
            copy_from = pos = k
        last = data[n - 1]
        if last == _LF:
            brk_at = n - 2 if n - 1 > start and data[n - 2] == _CR else n - 1
            out.append(mv[copy_from:brk_at])
            self._brk, self._state = bytes(data[brk_at:]), _DecState.BOL
        elif last == _CR:
            out.append(mv[copy_from : n - 1])
            self._state = _DecState.CR
        else:
            out.append(mv[copy_from:])
            self._state = _DecState.DATA
        return b"".join(out)

    def finish(self) -> None:
        """Signal EOF.

        Raises:
            RemoteProtocolError: the stream ended before its ``.`` line.
        """
        if self._state is not _DecState.END:
            raise RemoteProtocolError("dot-input stream ends without '.' line")
