"""Helpers for the core tests: chunkings, event pumps and reference codecs.

The reference codecs are deliberately naive: one byte at a time, written
straight from the tables of PROTOCOL.md (5.2.1 for the encoder, 5.3.2 for the
decoder, 4.2 for the result code), so the fast implementations in
``execproto`` can be compared against them on any input.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from execproto import (
    NEED_DATA,
    ClientConnection,
    Data,
    EndOfInput,
    Output,
    Request,
    Result,
    ScriptRequest,
    ServiceConnection,
    Status,
)

__all__ = [
    "MAX_EVENTS",
    "RefDotDecoded",
    "client_output",
    "every_chunking",
    "feed_service",
    "get_client_events",
    "ref_classify_reply",
    "ref_dot_decode",
    "ref_dot_encode",
    "send_request",
    "split_at",
]

#: Upper bound on events drained from one connection (keeps every loop bounded).
MAX_EVENTS = 1_000_000

_CR, _LF, _DOT = 0x0D, 0x0A, 0x2E


# --- chunkings ---------------------------------------------------------------


def split_at(data: bytes, points: Iterable[int]) -> list[bytes]:
    """Cut *data* at the given offsets; empty pieces are left out."""
    chunks = []
    last = 0
    for point in sorted(set(points)):
        if 0 < point < len(data):
            chunks.append(data[last:point])
            last = point
    chunks.append(data[last:])
    return [c for c in chunks if c]


def every_chunking(data: bytes, *, max_splits: int = 48) -> Iterator[list[bytes]]:
    """Yield ways to cut *data* into chunks, as a receiver could get them.

    In order: the whole buffer, byte by byte, then every two-way split.  When
    *data* is longer than ``max_splits + 1`` bytes only a bounded sample of
    two-way splits is used: the first and last ``max_splits // 4`` offsets and
    evenly spaced ones in between.  No chunk is ever empty (an empty chunk
    means EOF to the connection objects), so ``b""`` yields ``[]`` once, and
    no chunking is yielded twice.
    """
    seen: set[tuple[bytes, ...]] = set()

    def fresh(chunks: list[bytes]) -> bool:
        key = tuple(chunks)
        if key in seen:
            return False
        seen.add(key)
        return True

    n = len(data)
    candidates: list[list[bytes]] = [[data] if data else []]
    candidates.append([data[i : i + 1] for i in range(n)])
    if n <= max_splits + 1:
        points: list[int] = list(range(1, n))
    else:
        edge = max_splits // 4
        middle = max_splits - 2 * edge
        spread = {1 + (k * (n - 2)) // max(middle - 1, 1) for k in range(middle)}
        points = sorted(set(range(1, edge + 1)) | set(range(n - edge, n)) | spread)
    for chunks in candidates:
        if fresh(chunks):
            yield chunks
    for point in points:
        chunks = [data[:point], data[point:]]
        if fresh(chunks):
            yield chunks


# --- driving the connection objects -------------------------------------------


def get_client_events(
    conn: ClientConnection, chunks: Iterable[bytes], *, eof: bool = True
) -> list[Output | Result]:
    """Feed *chunks* to a client connection and return every event it produces.

    After each chunk the events are drained until NEED_DATA; with *eof* an
    EOF is fed at the end and draining goes on until the Result.  Stops at
    the Result (a noreply run without output produces it before any data).
    """
    events: list[Output | Result] = []

    def drain() -> bool:
        for _ in range(MAX_EVENTS):
            event = conn.next_event()
            if event is NEED_DATA:
                return False
            assert isinstance(event, (Output, Result)), event
            events.append(event)
            if isinstance(event, Result):
                return True
        raise AssertionError("too many events")

    if drain():
        return events
    for chunk in chunks:
        assert chunk, "an empty chunk would mean EOF"
        conn.receive_data(chunk)
        if drain():
            return events
    if eof:
        conn.receive_data(b"")
        assert drain(), "no Result after EOF"
    return events


def client_output(events: Sequence[Output | Result]) -> tuple[bytes, Result]:
    """Join the Output events; check there is exactly one Result, at the end."""
    assert events, "no events"
    result = events[-1]
    assert isinstance(result, Result), events
    outputs = events[:-1]
    assert all(isinstance(e, Output) for e in outputs), events
    assert all(e.data for e in outputs if isinstance(e, Output)), "empty Output event"
    return b"".join(e.data for e in outputs if isinstance(e, Output)), result


def send_request(
    conn: ClientConnection, request: Request, payload: Iterable[bytes] = ()
) -> bytes:
    """Send *request*, each payload chunk and EndOfInput; return the wire bytes."""
    parts = [conn.send(request)]
    parts.extend(conn.send(Data(data=chunk)) for chunk in payload)
    parts.append(conn.send(EndOfInput()))
    return b"".join(parts)


def feed_service(
    conn: ServiceConnection, chunks: Iterable[bytes], *, eof: bool = True
) -> tuple[ScriptRequest | None, bytes]:
    """Feed *chunks* to a service connection until it returns a ScriptRequest.

    Returns:
        ``(request, payload)``: the ScriptRequest (None if the header is
        incomplete and *eof* is false) and the payload, i.e. the bytes the
        script would read: ``trailing_data`` plus every chunk not fed.  In
        passthrough mode nothing is fed and the payload is everything.

    Raises:
        RemoteProtocolError: from the connection, including at EOF (fed
            after the last chunk when the header is still incomplete).
    """
    pending = list(chunks)
    event = conn.next_event()
    if isinstance(event, ScriptRequest):
        return event, b"".join(pending)
    for index, chunk in enumerate(pending):
        assert chunk, "an empty chunk would mean EOF"
        conn.receive_data(chunk)
        event = conn.next_event()
        if isinstance(event, ScriptRequest):
            return event, conn.trailing_data + b"".join(pending[index + 1 :])
        assert event is NEED_DATA
    if eof:
        conn.receive_data(b"")
        raise AssertionError("EOF before the end of the header was accepted")
    return None, b""


# --- reference implementations, byte at a time --------------------------------


def ref_dot_encode(data: bytes, *, stuff_bare_cr_dot: bool = True) -> bytes:
    """Dot-encode *data* and append the end marker (PROTOCOL.md 5.2.1, 5.2.3)."""
    out = bytearray()
    state = "BOL"
    for byte in data:
        if state == "CR":
            if byte == _LF:
                out.append(_LF)
                state = "BOL"
            elif byte == _CR:
                out.append(_CR)
            elif byte == _DOT:
                # CVE-2026-33604 fix: the bare CR becomes a line break and the
                # dot that now starts a line is doubled.
                out += b"\n.." if stuff_bare_cr_dot else b"."
                state = "MID"
            else:
                out.append(byte)
                state = "MID"
        elif state == "BOL" and byte == _DOT:
            out += b".."
            state = "MID"
        elif byte == _LF:
            out += b"\r\n"
            state = "BOL"
        elif byte == _CR:
            out.append(_CR)
            state = "CR"
        else:
            out.append(byte)
            state = "MID"
    # BOL with data means the data ended with a line break.
    out += b".\r\n" if state == "BOL" and data else b"\r\n.\r\n"
    return bytes(out)


class RefDotDecoded(NamedTuple):
    """What :func:`ref_dot_decode` found."""

    #: The decoded data emitted before the end marker (or before EOF).
    output: bytes
    #: Whether the end marker was found.
    ended: bool
    #: How many bytes followed the end marker's line break.
    leftover: int


def ref_dot_decode(data: bytes, *, dovecot_defect: bool = False) -> RefDotDecoded:
    """Dot-decode *data* with TRIM_TRAIL and LOOSE_EOT (PROTOCOL.md 5.3.2).

    ``DOT_CR`` followed by another byte uses the recommended handling, or
    Dovecot's defect (quirk Q14) with *dovecot_defect*.
    """
    out = bytearray()
    state = "BOL"
    brk = b""
    for index, byte in enumerate(data):
        # Each pass either consumes the byte (break) or re-dispatches it in
        # DATA (continue); at most two passes per byte.
        for _ in range(2):
            if state == "DATA":
                if byte == _CR:
                    state = "CR"
                elif byte == _LF:
                    brk, state = b"\n", "BOL"
                else:
                    out.append(byte)
                break
            if state == "CR":
                if byte == _LF:
                    brk, state = b"\r\n", "BOL"
                    break
                out.append(_CR)
                state = "DATA"
                continue
            if state == "BOL":
                if byte == _DOT:
                    state = "DOT"
                    break
                out += brk
                brk, state = b"", "DATA"
                continue
            if state == "DOT":
                if byte == _LF:
                    return RefDotDecoded(bytes(out), True, len(data) - index - 1)
                if byte == _CR:
                    state = "DOT_CR"
                    break
                out += brk
                brk, state = b"", "DATA"
                continue
            # DOT_CR
            if byte == _LF:
                return RefDotDecoded(bytes(out), True, len(data) - index - 1)
            if dovecot_defect:
                # One "had a CR" flag serves both: the CR survives only after
                # a CRLF line break, and the byte itself is lost.
                out += brk
                if brk == b"\r\n":
                    out.append(_CR)
                brk, state = b"", "DATA"
                break
            out += brk
            out.append(_CR)
            brk, state = b"", "DATA"
            continue
        else:  # pragma: no cover - the loop always breaks by the second pass
            raise AssertionError("byte not consumed")
    return RefDotDecoded(bytes(out), False, 0)


def ref_classify_reply(reply: bytes) -> tuple[bytes, Status | None]:
    """Classify a complete reply as the table of PROTOCOL.md 4.2 does.

    Returns:
        ``(output, status)``; status is None for every INTERNAL_FAILURE row.
    """
    if not reply:
        return b"", None
    if len(reply) >= 2 and reply[-1] == _LF:
        code = reply[-2:-1]
        status = {b"+": Status.SUCCESS, b"-": Status.FAILURE}.get(code)
        return reply[:-2], status
    return reply[:-1], None
