"""No quadratic buffering: byte-at-a-time input costs O(n) (STYLE.md section 4).

Timings are relative, never absolute: quadrupling the input must cost about
four times as much, and the assertion allows up to eight (a quadratic
implementation costs sixteen).  Each measurement is the best of three
``time.perf_counter`` runs.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import pytest

from execproto import (
    ClientConnection,
    DotDecoder,
    HeaderParser,
    RemoteProtocolError,
    Request,
    ResultCodeFilter,
    ScriptRequest,
    ServiceConnection,
)

from .helpers import client_output, get_client_events, send_request

V = b"VERSION\tscript\t4\t0\n"
MAX_RATIO = 8.0


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def best_time(run: Callable[[list[bytes]], object], chunks: list[bytes], repeat: int = 3) -> float:
    """The best of *repeat* runs, with the garbage collector off (as timeit does)."""
    times = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            run(chunks)
            times.append(time.perf_counter() - start)
    finally:
        if enabled:
            gc.enable()
    return min(times)


def linear_ratio(make: Callable[[int], list[bytes]], run: Callable[[list[bytes]], object],
                 size: int, *, rounds: int = 3) -> float:
    """How much longer 4x the input takes: the first ratio under MAX_RATIO, else the lowest.

    The machine is shared, so a ratio over the limit is measured again (up to
    *rounds* times): noise does not repeat, a quadratic cost (16x) does.
    """
    small, large = make(size), make(4 * size)
    run(small)  # warm up
    ratios = []
    for _ in range(rounds):
        ratios.append(best_time(run, large) / best_time(run, small))
        if ratios[-1] < MAX_RATIO:
            break
    return min(ratios)


def assert_linear(make: Callable[[int], list[bytes]], run: Callable[[list[bytes]], object],
                  size: int) -> None:
    """Quadrupling the input must cost less than MAX_RATIO times as much."""
    ratio = linear_ratio(make, run, size)
    assert ratio < MAX_RATIO, f"4x the input cost {ratio:.1f}x the time"


# --- header -----------------------------------------------------------------------------------


def huge_header(size: int) -> bytes:
    return V + b"-\n" + b"a" * size + b"\n\n"


def feed_header(chunks: list[bytes]) -> None:
    conn = ServiceConnection("/s", max_header_bytes=sum(map(len, chunks)))
    for chunk in chunks:
        conn.receive_data(chunk)
    request = conn.next_event()
    assert isinstance(request, ScriptRequest)


def test_one_megabyte_header_byte_by_byte() -> None:
    size = 1 << 20
    data = huge_header(size)
    conn = ServiceConnection("/s", max_header_bytes=len(data))
    for chunk in bytewise(data):
        conn.receive_data(chunk)
    request = conn.next_event()
    assert isinstance(request, ScriptRequest)
    assert request.args == (b"a" * size,)
    assert request.header_size == len(data)


def test_header_parse_is_linear() -> None:
    assert_linear(lambda n: bytewise(huge_header(n)), feed_header, 1 << 14)


def test_header_with_many_lines_is_linear() -> None:
    def make(n: int) -> list[bytes]:
        return bytewise(V + b"-\n" + b"ab\n" * (n // 3) + b"\n")

    assert_linear(make, feed_header, 1 << 14)


def fill_to_cap(chunks: list[bytes]) -> None:
    parser = HeaderParser(max_header_bytes=len(chunks))
    with pytest.raises(RemoteProtocolError, match="header exceeds"):
        for chunk in chunks:
            parser.feed(chunk)


def test_size_cap_countermeasure_is_linear() -> None:
    # h11's test_max_incomplete_event_size_countermeasure: newline-free input,
    # one byte at a time, until the cap.
    assert_linear(lambda n: [b"V"] * n, fill_to_cap, 1 << 14)


# --- dot decoder ------------------------------------------------------------------------------


def decode_all(chunks: list[bytes]) -> None:
    decoder = DotDecoder()
    for chunk in chunks:
        decoder.decode(chunk)


def test_dot_decoder_bytewise_long_line_is_linear() -> None:
    assert_linear(lambda n: bytewise(b"x" * n), decode_all, 1 << 14)


def test_dot_decoder_bytewise_many_lines_is_linear() -> None:
    assert_linear(lambda n: bytewise(b"ab\r\n..c\n" * (n // 9)), decode_all, 1 << 14)


def test_dot_decoder_one_chunk_is_linear() -> None:
    assert_linear(lambda n: [b"line\r\n.dot\n\r\n" * (n // 14)], decode_all, 1 << 18)


# --- result code filter and the client --------------------------------------------------------


def filter_all(chunks: list[bytes]) -> None:
    filt = ResultCodeFilter()
    for chunk in chunks:
        filt.feed(chunk)
    filt.finish()


def test_result_code_filter_is_linear() -> None:
    assert_linear(lambda n: bytewise(b"o" * n + b"+\n"), filter_all, 1 << 15)


def test_result_code_filter_big_chunks_is_linear() -> None:
    assert_linear(lambda n: [b"o" * 1024] * (n // 1024) + [b"+\n"], filter_all, 1 << 23)


def client_all(chunks: list[bytes]) -> None:
    conn = ClientConnection(dot=True)
    send_request(conn, Request())
    client_output(get_client_events(conn, chunks))


def test_client_bytewise_is_linear() -> None:
    assert_linear(lambda n: bytewise(b"x\n" * (n // 2) + b".\n+\n"), client_all, 1 << 12)


# --- the check itself -------------------------------------------------------------------------


def test_the_check_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake clock that advances by a cost model, so the check is tested
    # deterministically: linear code passes, quadratic code fails.
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    def linear(chunks: list[bytes]) -> None:
        clock[0] += len(chunks)

    def quadratic(chunks: list[bytes]) -> None:
        clock[0] += len(chunks) ** 2

    def make(n: int) -> list[bytes]:
        return [b"a"] * n

    assert linear_ratio(make, linear, 100) == 4
    assert_linear(make, linear, 100)
    assert linear_ratio(make, quadratic, 100) == 16
    with pytest.raises(AssertionError, match=r"4x the input cost 16\.0x the time"):
        assert_linear(make, quadratic, 100)
