"""No quadratic buffering: byte-at-a-time input costs O(n) (STYLE.md section 4).

Nothing here is timed (speed belongs to benchmarks/).  Linearity is shown by
counting work deterministically:

* the header parser is the one place that keeps a growing buffer; its buffer
  is replaced by one that counts how many bytes each search covers, and the
  total must stay proportional to the input;
* the result-code filter and the dot decoder keep no buffer: after every
  chunk they release all but a few bytes, so no byte can be looked at again
  later.  That bound is checked after every single byte.
"""

from __future__ import annotations

from typing import Any, SupportsIndex

import pytest

from execproto import (
    ClientConnection,
    DotDecoder,
    DotEncoder,
    HeaderParser,
    Output,
    RemoteProtocolError,
    Request,
    ResultCodeFilter,
    ScriptRequest,
    ServiceConnection,
)

from .helpers import send_request

V = b"VERSION\tscript\t4\t0\n"


class CountingBuffer(bytearray):
    """A bytearray that adds up how many bytes its searches cover."""

    scanned = 0

    def find(self, sub: Any, start: SupportsIndex | None = None,
             end: SupportsIndex | None = None) -> int:
        begin = 0 if start is None else int(start)
        CountingBuffer.scanned += max(len(self) - begin, 0)
        return super().find(sub, start, end)


def header_scan_cost(data: bytes, max_header_bytes: int) -> int:
    """Bytes searched while feeding *data* one byte at a time."""
    parser = HeaderParser(max_header_bytes=max_header_bytes)
    parser._buf = CountingBuffer()  # white box: count the parser's searches
    CountingBuffer.scanned = 0
    try:
        for i in range(len(data)):
            if parser.feed(data[i : i + 1]) is not None:
                break
    except RemoteProtocolError:
        pass
    return CountingBuffer.scanned


@pytest.mark.parametrize(
    "make",
    [
        lambda n: V + b"-\n" + b"a" * n + b"\n\n",  # one huge argument
        lambda n: V + b"-\n" + b"ab\n" * (n // 3) + b"\n",  # many lines
        lambda n: b"V" * n,  # newline-free input up to the cap
    ],
    ids=["long-line", "many-lines", "to-the-cap"],
)
def test_header_search_is_linear(make: Any) -> None:
    for n in (1 << 12, 1 << 14, 1 << 16):
        data = make(n)
        # Each search starts one byte before the previous end: at most a
        # few bytes per byte fed (a rescanning parser would cost n*n/2).
        cost = header_scan_cost(data, len(data) + 1)
        assert 0 < cost <= 4 * len(data)


def test_one_megabyte_header_byte_by_byte() -> None:
    size = 1 << 20
    data = V + b"-\n" + b"a" * size + b"\n\n"
    conn = ServiceConnection("/s", max_header_bytes=len(data))
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
    request = conn.next_event()
    assert isinstance(request, ScriptRequest)
    assert request.args == (b"a" * size,)
    assert request.header_size == len(data)


def test_header_cap_stops_buffering() -> None:
    parser = HeaderParser(max_header_bytes=1000)
    with pytest.raises(RemoteProtocolError, match="header exceeds 1000 bytes"):
        for _ in range(2000):
            parser.feed(b"V")
    assert len(parser._buf) == 0  # white box: the buffer was freed


@pytest.mark.parametrize(
    "data",
    [b"x" * 5000, b"ab\r\n..c\n" * 600, b"line\r\n.dot\n\r\n.\r" * 300, b"\r" * 3000],
    ids=["long-line", "dot-lines", "mixed", "carriage-returns"],
)
def test_dot_decoder_holds_back_a_few_bytes(data: bytes) -> None:
    decoder = DotDecoder()
    released = 0
    for i in range(len(data)):
        released += len(decoder.decode(data[i : i + 1]))
        fed = i + 1
        # Output can only be shorter by the dots removed (at most one per
        # line) plus the held-back "\r\n.\r" of the boundary states.
        dots_removed = data[: i + 1].count(b"\n.") + data[:1].count(b".")
        assert fed - released <= dots_removed + 4


def test_result_code_filter_holds_back_two_bytes() -> None:
    filt = ResultCodeFilter()
    released = 0
    for i, byte in enumerate(b"o" * 3000 + b"+\n"):
        released += len(filt.feed(bytes([byte])))
        assert i + 1 - released <= 2


def test_tcp_client_releases_as_it_goes() -> None:
    conn = ClientConnection(dot=True)
    send_request(conn, Request())
    reply = b"x\n" * 2000 + b".\n+\n"
    released = 0
    for i in range(len(reply)):
        conn.receive_data(reply[i : i + 1])
        while isinstance(event := conn.next_event(), Output):
            released += len(event.data)
        # result-code filter (2) + dot decoder boundary state (4)
        assert i + 1 - released <= 6


def test_dot_encoder_output_grows_with_input() -> None:
    encoder = DotEncoder()
    out = 0
    for i in range(3000):
        out += len(encoder.encode(b"\n" if i % 2 else b"."))
        assert out >= i  # nothing is held back
