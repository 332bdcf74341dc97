"""ResultCodeFilter: the table of PROTOCOL.md 4.2 and its measured examples (CV-24, CV-25)."""

from __future__ import annotations

import pytest

from execproto import LocalProtocolError, ResultCodeFilter, Status

from .helpers import every_chunking, ref_classify_reply


def run(chunks: list[bytes]) -> tuple[bytes, Status | None, str]:
    filt = ResultCodeFilter()
    released = [filt.feed(chunk) for chunk in chunks]
    tail, status, detail = filt.finish()
    return b"".join(released) + tail, status, detail


def run_every_chunking(reply: bytes) -> tuple[bytes, Status | None, str]:
    outcomes = {run(chunks) for chunks in every_chunking(reply)}
    assert len(outcomes) == 1, outcomes
    return outcomes.pop()


# (reply, output, status, fragment of the detail); measured rows of 4.2 first.
TABLE = [
    (b"hello\n+\n", b"hello\n", Status.SUCCESS, ""),
    (b"hello\n+\n+\n", b"hello\n+\n", Status.SUCCESS, ""),
    (b"hello\n+\n-\n", b"hello\n+\n", Status.FAILURE, ""),
    (b"+\n", b"", Status.SUCCESS, ""),
    (b"-\n", b"", Status.FAILURE, ""),
    (b"", b"", None, "no result code received"),
    (b"x", b"", None, "bad result code"),
    (b"\n", b"", None, "bad result code"),
    (b"+", b"", None, "bad result code"),
    (b"hello", b"hell", None, "bad result code"),
    (b"hello\nX\n", b"hello\n", None, "unexpected result code 'X'"),
    (b"hello\n\x01\n", b"hello\n", None, "unexpected result code 0x01"),
    (b"hello\n\n", b"hello", None, "unexpected result code 0x0a"),
    (b"ab+\r\n", b"ab+", None, "unexpected result code 0x0d"),
    # More rows of the general table.
    (b"\n\n", b"", None, "unexpected result code 0x0a"),
    (b"+-", b"+", None, "bad result code"),
    (b"out+\n\r", b"out+\n", None, "bad result code"),
    (b" \n", b"", None, "unexpected result code ' '"),
    (b"~\n", b"", None, "unexpected result code '~'"),
    (b"\x7f\n", b"", None, "unexpected result code 0x7f"),
    (b"\x1f\n", b"", None, "unexpected result code 0x1f"),
    (b"\xff\n", b"", None, "unexpected result code 0xff"),
    (b"\x00\n", b"", None, "unexpected result code 0x00"),
    (b"+\n+", b"+\n", None, "bad result code"),
    (b"OUT\n+\n+\n", b"OUT\n+\n", Status.SUCCESS, ""),  # CV-22
]


@pytest.mark.parametrize(("reply", "output", "status", "detail"), TABLE)
def test_table(reply: bytes, output: bytes, status: Status | None, detail: str) -> None:
    got_output, got_status, got_detail = run_every_chunking(reply)
    assert (got_output, got_status) == (output, status)
    assert (got_output, got_status) == ref_classify_reply(reply)
    if detail:
        assert detail in got_detail
    else:
        assert got_detail == ""


def test_detail_names_the_last_byte_when_too_short() -> None:
    assert run([b"hello"])[2] == (
        "bad result code from the service: the reply ends in b'o', not in a result code line"
    )


@pytest.mark.parametrize(
    "chunks", [[b"hel", b"lo\n+", b"\n"], [b"hello\n", b"+", b"\n"]]
)
def test_cv25_trailer_split(chunks: list[bytes]) -> None:
    assert run(chunks) == (b"hello\n", Status.SUCCESS, "")


@pytest.mark.parametrize("reply", [row[0] for row in TABLE] + [b"abcdefgh\n+\n", b"ab"])
def test_released_output_never_includes_the_last_two_bytes(reply: bytes) -> None:
    # Everything but the last two bytes received is released at once: never a
    # byte that could still be the result code (4.2.1), and no more held back.
    for chunks in every_chunking(reply):
        filt = ResultCodeFilter()
        received = b""
        released = b""
        for chunk in chunks:
            received += chunk
            released += filt.feed(chunk)
            assert released == received[:-2]


def test_holdback_example_of_4_2_1() -> None:
    filt = ResultCodeFilter()
    assert filt.feed(b"hello\n") == b"hell"
    assert filt.feed(b"+") == b"o"
    assert filt.feed(b"\n") == b"\n"
    assert filt.finish() == (b"", Status.SUCCESS, "")


def test_empty_feed_releases_nothing() -> None:
    filt = ResultCodeFilter()
    assert filt.feed(b"") == b""
    assert filt.feed(b"ab") == b""
    assert filt.feed(b"") == b""
    assert filt.finish() == (b"a", None, run([b"ab"])[2])


def test_empty_chunks_do_not_count_as_data() -> None:
    filt = ResultCodeFilter()
    filt.feed(b"")
    assert filt.finish()[1:] == (None, "no result code received from the service")


def test_feed_and_finish_after_finish() -> None:
    filt = ResultCodeFilter()
    filt.feed(b"+\n")
    filt.finish()
    with pytest.raises(LocalProtocolError, match="already finished"):
        filt.feed(b"x")
    with pytest.raises(LocalProtocolError, match="already finished"):
        filt.finish()


def test_large_reply_in_one_chunk() -> None:
    body = bytes(range(256)) * 1000
    assert run([body + b"-\n"]) == (body, Status.FAILURE, "")
    assert run([body[:1000], body[1000:] + b"+", b"\n"]) == (body, Status.SUCCESS, "")
