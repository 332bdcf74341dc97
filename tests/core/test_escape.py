"""Tab escaping (PROTOCOL.md section 3, vectors CV-01 and CV-02)."""

from __future__ import annotations

import pytest

from execproto import tab_escape, tab_unescape


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        (b"plain", b"plain"),
        (b"a\tb", b"a\x01tb"),
        (b"line1\nline2", b"line1\x01nline2"),
        (b"cr\rlf\n", b"cr\x01rlf\x01n"),
        (b"x\x01y", b"x\x011y"),
        (b"a=b\tc", b"a=b\x01tc"),
        (b"two words", b"two words"),
        (b"\x00", b"\x010"),
        (b"", b""),
        # CV-01
        (b"two\twords\nline\x01end\r", b"two\x01twords\x01nline\x011end\x01r"),
    ],
)
def test_escape(raw: bytes, escaped: bytes) -> None:
    assert tab_escape(raw) == escaped
    assert tab_unescape(escaped) == raw


@pytest.mark.parametrize(
    ("escaped", "raw"),
    [
        (b"a\x01qb", b"aqb"),
        (b"a\x01", b"a"),
        (b"\x01", b""),
        (b"\x01\x01", b"\x01"),
        (b"a\x01\x01tb", b"a\x01tb"),
        (b"\x01T", b"T"),
        (b"\x01N", b"N"),
        (b"a\x010b", b"a\x00b"),
        # CV-02
        (b"x\x01qy", b"xqy"),
        (b"end\x01", b"end"),
        (b"\x01\x01z", b"\x01z"),
        (b"n\x010ul", b"n\x00ul"),
        # An escape never spans more than two bytes, and a lone SOH at the very
        # end is the only one dropped without consuming a byte.
        (b"\x01\x01\x01", b"\x01"),
        (b"\x01\x01\x01\x01", b"\x01\x01"),
        (b"\x01\n", b"\n"),
        (b"\x01\x00", b"\x00"),
        (b"\x01\xff", b"\xff"),
    ],
)
def test_unescape(escaped: bytes, raw: bytes) -> None:
    assert tab_unescape(escaped) == raw


def test_escape_output_has_no_special_bytes() -> None:
    escaped = tab_escape(bytes(range(256)))
    for special in b"\x00\t\n\r":
        assert special not in escaped
    assert tab_unescape(escaped) == bytes(range(256))


@pytest.mark.parametrize("value", [bytearray(b"a\tb"), memoryview(b"a\tb")])
def test_escape_accepts_bytes_like(value: bytearray | memoryview) -> None:
    assert tab_escape(value) == b"a\x01tb"  # type: ignore[arg-type]
    assert tab_unescape(tab_escape(value)) == b"a\tb"  # type: ignore[arg-type]


def test_results_are_bytes() -> None:
    assert type(tab_escape(bytearray(b"plain"))) is bytes  # type: ignore[arg-type]
    assert type(tab_unescape(bytearray(b"plain"))) is bytes  # type: ignore[arg-type]
    assert type(tab_unescape(bytearray(b"\x01t"))) is bytes  # type: ignore[arg-type]
