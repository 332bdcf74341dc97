"""The request header: encode_request (client) and HeaderParser (service).

PROTOCOL.md section 2 and vectors CV-03 to CV-08 and CV-10 to CV-20.  Every
parser test runs every chunking of its input (tests/core/helpers.py).
"""

from __future__ import annotations

import pytest

from execproto import (
    DEFAULT_MAX_HEADER_BYTES,
    SCRIPT_MAJOR_VERSION,
    HeaderParser,
    LocalProtocolError,
    ParsedHeader,
    RemoteProtocolError,
    Request,
    encode_request,
)

from .helpers import every_chunking, split_at

V = b"VERSION\tscript\t4\t0\n"
VERSION_ERROR = r"^Client not compatible with this binary \(connecting to wrong socket\?\)"


# --- encoder -------------------------------------------------------------------


def test_major_version() -> None:
    assert SCRIPT_MAJOR_VERSION == 4


def test_cv03_reply_mode_env_args() -> None:
    request = Request(
        args=["one", "two words"],
        env=[
            ("USER", "root"),
            ("HOME", "/root"),
            ("HOST", "vm"),
            ("SENDER", "a@b"),
            ("RECIPIENT", "recipient@example.com"),
            ("ORIG_RECIPIENT", "recipient@example.com"),
        ],
    )
    assert encode_request(request) == (
        b"VERSION\tscript\t4\t0\nenv_USER=root\nenv_HOME=/root\nenv_HOST=vm\n"
        b"env_SENDER=a@b\nenv_RECIPIENT=recipient@example.com\n"
        b"env_ORIG_RECIPIENT=recipient@example.com\n-\none\ntwo words\n\n"
    )


def test_cv04_noreply() -> None:
    request = Request(args=["10", "frank"], noreply=True)
    assert encode_request(request) == b"VERSION\tscript\t4\t0\nnoreply\n10\nfrank\n\n"


def test_cv05_no_args() -> None:
    assert encode_request(Request()) == b"VERSION\tscript\t4\t0\n-\n\n"


def test_cv06_env_value_with_equals_and_tab() -> None:
    assert encode_request(Request(env={"FOO": "x=y\tz"})) == V + b"env_FOO=x=y\x01tz\n-\n\n"


def test_cv07_args_needing_escapes() -> None:
    assert encode_request(Request(args=["a\tb", "c\nd", "e\x01f"])) == (
        V + b"-\na\x01tb\nc\x01nd\ne\x011f\n\n"
    )


def test_cv08_empty_arg() -> None:
    request = Request(args=["a", "", "b"])
    assert encode_request(request) == V + b"-\na\n\x01\nb\n\n"
    assert encode_request(request, empty_args="soh") == V + b"-\na\n\x01\nb\n\n"
    with pytest.raises(LocalProtocolError, match="argument 1 is empty"):
        encode_request(request, empty_args="reject")


def test_env_name_and_value_escaped_as_one_unit() -> None:
    assert encode_request(Request(env=[(b"A\nB", b"\r\x01")])) == (
        V + b"env_A\x01nB=\x01r\x011\n-\n\n"
    )


def test_env_order_and_duplicates_kept() -> None:
    request = Request(env=[("B", "1"), ("A", "2"), ("B", "3")])
    assert encode_request(request) == V + b"env_B=1\nenv_A=2\nenv_B=3\n-\n\n"


def test_env_value_may_be_empty() -> None:
    assert encode_request(Request(env={"E": ""})) == V + b"env_E=\n-\n\n"


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (Request(args=["a\x00b"]), "NUL byte in argument 0"),
        (Request(args=["ok", "\x00"]), "NUL byte in argument 1"),
        (Request(env={"A\x00": "x"}), "NUL byte in environment variable"),
        (Request(env={"A": "x\x00"}), "NUL byte in environment variable"),
        (Request(env={"": "x"}), "invalid environment variable name"),
        (Request(env={"A=B": "x"}), "invalid environment variable name"),
        (Request(env={"=": ""}), "invalid environment variable name"),
    ],
)
def test_encoder_errors(request_: Request, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        encode_request(request_)


def test_encoder_bad_empty_args_mode() -> None:
    with pytest.raises(LocalProtocolError, match="empty_args must be one of"):
        encode_request(Request(args=["x"]), empty_args="drop")


def test_encoder_round_trips_through_parser() -> None:
    request = Request(args=["a", "", "b\tc", "\x01"], env={"X": "1=2\n"}, noreply=True)
    parsed = HeaderParser().feed(encode_request(request) + b"payload")
    assert parsed is not None
    assert parsed.args == request.args
    assert parsed.env == request.env
    assert parsed.noreply


# --- parser: helpers ----------------------------------------------------------------


def parse(data: bytes, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> tuple[
    ParsedHeader, bytes
]:
    """Parse *data* in every chunking; check they agree; return header and payload."""
    outcomes: set[tuple[ParsedHeader, bytes]] = set()
    for chunks in every_chunking(data):
        parser = HeaderParser(max_header_bytes=max_header_bytes)
        for index, chunk in enumerate(chunks):
            header = parser.feed(chunk)
            if header is not None:
                assert parser.result is header
                payload = parser.trailing_data + b"".join(chunks[index + 1 :])
                # header_size says exactly where the payload starts.
                assert data[: header.header_size].endswith(b"\n\n")
                assert b"\n\n" not in data[: header.header_size - 1]
                assert payload == data[header.header_size :]
                outcomes.add((header, payload))
                break
            assert parser.result is None
            assert parser.trailing_data == b""
        else:
            raise AssertionError(f"header not complete with {chunks!r}")
    assert len(outcomes) == 1, outcomes
    return outcomes.pop()


def reject(data: bytes, match: str, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> None:
    """Check that *data* (then EOF) is rejected in every chunking."""
    for chunks in every_chunking(data):
        parser = HeaderParser(max_header_bytes=max_header_bytes)
        with pytest.raises(RemoteProtocolError, match=match):
            for chunk in chunks:
                assert parser.feed(chunk) is None
            parser.feed(b"")


# --- parser: VERSION (PROTOCOL.md 2.4, CV-12) ------------------------------------------


@pytest.mark.parametrize(
    ("line", "minor"),
    [
        (b"VERSION\tscript\t4\t0", 0),
        (b"VERSION\tscript\t4\t1", 1),
        (b"VERSION\tscript\t4\t99", 99),
        (b"VERSION\tscript\t004\t000", 0),
        (b"VERSION\tscript\t4\t4294967295", 4294967295),
        (b"VERSION\tscript\t" + b"0" * 30 + b"4\t" + b"0" * 30 + b"7", 7),
    ],
)
def test_version_accepted(line: bytes, minor: int) -> None:
    header, payload = parse(line + b"\n-\n\nP")
    assert header.version_minor == minor
    assert payload == b"P"


@pytest.mark.parametrize(
    "line",
    [
        b"VERSION\tscript\t4\t4294967296",
        b"VERSION\tscript\t4\t99999999999999999999999",
        b"VERSION\tscript\t5\t0",
        b"VERSION\tscript\t3\t0",
        b"VERSION\tscript\t4\t0\r",
        b"VERSION\tscript\t4",
        b"VERSION\tscript\t4\t",
        b"VERSION\tscript\t4\t1\tx",
        b"VERSION\tscript\t4\t0\t",
        b"VERSION\tscript\t+4\t0",
        b"VERSION\tscript\t 4\t0",
        b"VERSION\tscript\t4\t 0",
        b"VERSION\tscript\t4\t-0",
        b"VERSION\tscript\t4\t0 ",
        b"version\tscript\t4\t0",
        b"VERSION \tscript\t4\t0",
        b"VERSION\tscripts\t4\t0",
        b"VERSION\tScript\t4\t0",
        b"VERSION\tscript\t18446744073709551620\t0",
        b"VERSION\tscript\t18446744073709551616\t0",
        b"VERSION\tscript\t\t0",
        b"VERSION\tscript\t4\t\xd9\xa0",  # a non-ASCII digit
        b"",
        b"-",
    ],
)
def test_version_rejected(line: bytes) -> None:
    reject(line + b"\n-\n\n", VERSION_ERROR)


def test_version_rejected_early() -> None:
    # The VERSION line is checked as soon as its LF arrives, long before the
    # header ends (a client speaking another protocol is dropped at once).
    parser = HeaderParser()
    assert parser.feed(b"GET / HTTP/1.1") is None
    with pytest.raises(RemoteProtocolError, match=VERSION_ERROR):
        parser.feed(b"\r\nHost: x")


def test_version_rejected_early_byte_by_byte() -> None:
    data = b"VERSION\tscript\t5\t0\n-\n\n"
    parser = HeaderParser()
    lf = data.index(b"\n")
    for byte in data[:lf]:
        assert parser.feed(bytes([byte])) is None
    with pytest.raises(RemoteProtocolError, match=VERSION_ERROR):
        parser.feed(b"\n")


def test_version_checked_before_disconnect() -> None:
    # EOF mid-header after a bad first line: reported as a version error.
    reject(b"VERSION\tscript\t5\t0\n-\n", VERSION_ERROR)
    reject(b"\n", VERSION_ERROR)


def test_good_version_then_eof() -> None:
    reject(b"VERSION\tscript\t4\t0\n-\na\n", "^disconnected before the end of the header")
    reject(b"VERSION\tscript\t4\t0", "^disconnected before the end of the header")
    reject(b"VERS", "^disconnected")
    with pytest.raises(RemoteProtocolError, match=r"\(0 bytes received\)"):
        HeaderParser().feed(b"")


def test_eof_message_counts_bytes() -> None:
    parser = HeaderParser()
    parser.feed(V + b"-\n")
    with pytest.raises(RemoteProtocolError, match=r"\(21 bytes received\)"):
        parser.feed(b"")


# --- parser: structure ------------------------------------------------------------------


def test_cv11_version_only() -> None:
    header, payload = parse(b"VERSION\tscript\t4\t0\n\nDATA\n")
    assert header == ParsedHeader(0, None, (), False, (), len(V) + 1)
    assert payload == b"DATA\n"


def test_cv10_full_example_before_allowlist() -> None:
    header, payload = parse(
        b"VERSION\tscript\t4\t0\nenv_FOO=foo\x01tx\nenv_BAR=bar\n-\nhello\nwo\x01nrld\n\n"
        b"DATA line\n"
    )
    assert header.env == ((b"FOO", b"foo\tx"), (b"BAR", b"bar"))
    assert header.args == (b"hello", b"wo\nrld")
    assert header.noreply is False
    assert header.alarm is None
    assert payload == b"DATA line\n"


def test_cv14_header_split_across_chunks() -> None:
    parser = HeaderParser()
    assert parser.feed(b"VERSION\tscript\t4\t0\n-\nech") is None
    assert parser.feed(b"o\n") is None
    header = parser.feed(b"\n")
    assert header is not None
    assert header.args == (b"echo",)
    assert parser.trailing_data == b""
    assert header.header_size == len(b"VERSION\tscript\t4\t0\n-\necho\n\n")


def test_cv15_lf_pair_split() -> None:
    parser = HeaderParser()
    assert parser.feed(b"VERSION\tscript\t4\t0\n-\necho\n") is None
    header = parser.feed(b"\npayload")
    assert header is not None
    assert header.args == (b"echo",)
    assert parser.trailing_data == b"payload"


def test_header_ends_at_first_lf_pair() -> None:
    # CV-08 as Dovecot's client sends it: the empty argument ends the header.
    header, payload = parse(b"VERSION\tscript\t4\t0\n-\na\n\nb\n\nPAYLOAD")
    assert header.args == (b"a",)
    assert payload == b"b\n\nPAYLOAD"


def test_payload_is_never_interpreted() -> None:
    header, payload = parse(V + b"-\n\n\n\nVERSION\tx\x00\n\n")
    assert header.args == ()
    assert payload == b"\n\nVERSION\tx\x00\n\n"


def test_header_size_and_trailing_data_exact() -> None:
    data = V + b"-\narg\n\n" + b"\n\x00PAY\nLOAD"
    header, payload = parse(data)
    assert header.header_size == len(V) + len(b"-\narg\n\n")
    assert payload == b"\n\x00PAY\nLOAD"


def test_feed_after_complete() -> None:
    parser = HeaderParser()
    assert parser.feed(V + b"\n") is not None
    with pytest.raises(LocalProtocolError, match="already complete"):
        parser.feed(b"x")
    with pytest.raises(LocalProtocolError, match="already complete"):
        parser.feed(b"")


# --- parser: alarm (2.5) -------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "alarm"),
    [(b"0", 0), (b"10", 10), (b"007", 7), (b"4294967295", 4294967295)],
)
def test_alarm(value: bytes, alarm: int) -> None:
    header, _ = parse(V + b"alarm=" + value + b"\n-\n\n")
    assert header.alarm == alarm
    assert header.noreply is False


@pytest.mark.parametrize(
    "value", [b"", b"x", b"4294967296", b"-1", b"+1", b" 1", b"1 ", b"1x", b"\xd9\xa1"]
)
def test_alarm_invalid(value: bytes) -> None:
    reject(V + b"alarm=" + value + b"\n-\n\n", "^invalid alarm option")


def test_cv16_alarm_and_noreply() -> None:
    header, payload = parse(b"VERSION\tscript\t4\t0\nalarm=10\nnoreply\ntext/html\n\n")
    assert header.alarm == 10
    assert header.noreply is True
    assert header.args == (b"text/html",)
    assert payload == b""


def test_alarm_only_as_first_line() -> None:
    # A second alarm= line, or one after env_ lines, is the options line.
    header, _ = parse(V + b"alarm=1\nalarm=2\nx\n\n")
    assert (header.alarm, header.noreply, header.args) == (1, False, (b"x",))
    header, _ = parse(V + b"env_A=1\nalarm=2\nx\n\n")
    assert (header.alarm, header.env, header.args) == (None, ((b"A", b"1"),), (b"x",))
    # "alarm=x" as the options line is not checked.
    header, _ = parse(V + b"alarm=1\nalarm=x\n\n")
    assert header.alarm == 1


def test_alarm_then_env() -> None:
    header, _ = parse(V + b"alarm=3\nenv_A=1\nnoreply\n\n")
    assert (header.alarm, header.env, header.noreply) == (3, ((b"A", b"1"),), True)


# --- parser: env_ (2.6) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "env"),
    [
        (b"env_FOO=foo", (b"FOO", b"foo")),
        (b"env_BAZ=x=y", (b"BAZ", b"x=y")),
        (b"env_BAR=b\x01ar", (b"BAR", b"bar")),  # 2.4.3+; 2.3.19 drops it
        (b"env_F\x01OO=1", (b"FOO", b"1")),
        (b"env_EMPTY=", (b"EMPTY", b"")),
        (b"env_=value", (b"", b"value")),
        (b"env_A\x01==b", (b"A", b"=b")),  # "\x01=" unescapes to "=": split at the first
        (b"env_FOO=a\x010b", (b"FOO", b"a")),  # NUL from unescaping truncates
        (b"env_T=\x01t\x01n\x01r\x011", (b"T", b"\t\n\r\x01")),
    ],
)
def test_env_line(line: bytes, env: tuple[bytes, bytes]) -> None:
    header, _ = parse(V + line + b"\n-\n\n")
    assert header.env == (env,)


@pytest.mark.parametrize(
    "line", [b"env_FOO", b"env_", b"env_F\x010OO=1", b"env_\x01"]
)
def test_env_line_invalid(line: bytes) -> None:
    reject(V + line + b"\n-\n\n", "^invalid environment variable")


def test_cv17_env_without_equals() -> None:
    reject(b"VERSION\tscript\t4\t0\nenv_FOO\n-\n\n", "^invalid environment variable")


def test_env_after_options_is_an_arg() -> None:
    header, _ = parse(V + b"-\nenv_A=1\n\n")
    assert header.env == ()
    assert header.args == (b"env_A=1",)


def test_env_lines_kept_in_order_with_duplicates() -> None:
    header, _ = parse(V + b"env_B=1\nenv_A=2\nenv_B=3\n-\n\n")
    assert header.env == ((b"B", b"1"), (b"A", b"2"), (b"B", b"3"))


# --- parser: options line (2.7, CV-20) and missing options (CV-17) -------------------


@pytest.mark.parametrize(
    ("options", "noreply"),
    [
        (b"noreply", True),
        (b"-", False),
        (b"noreplyx", False),
        (b"NOREPLY", False),
        (b"noreply ", False),
        (b"x", False),
        (b"\x01", False),
        (b"noreply\r", False),
    ],
)
def test_cv20_options_line(options: bytes, noreply: bool) -> None:
    header, _ = parse(V + options + b"\narg\n\n")
    assert header.noreply is noreply
    assert header.args == (b"arg",)


def test_cv20_second_alarm_is_eaten() -> None:
    header, _ = parse(V + b"alarm=1\nalarm=2\n\n")
    assert (header.alarm, header.noreply, header.args) == (1, False, ())


@pytest.mark.parametrize(
    "data",
    [
        b"VERSION\tscript\t4\t0\nalarm=5\n\n",
        b"VERSION\tscript\t4\t0\nenv_FOO=x\n\nDATA\n",
        b"VERSION\tscript\t4\t0\nalarm=5\nenv_FOO=x\nenv_BAR=y\n\n",
    ],
)
def test_cv17_missing_options_line(data: bytes) -> None:
    # Dovecot crashes (SIGSEGV); here it is a protocol error (quirk Q3).
    reject(data, "^missing options line")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"VERSION\tscript\t4\t0\nenv_FOO\n-\n\n", "^invalid environment variable"),
        (b"VERSION\tscript\t4\t0\nalarm=x\n-\n\n", "^invalid alarm option"),
        (b"VERSION\tscript\t4\t0\nalarm=5\n\n", "^missing options line"),
        (b"VERSION\tscript\t4\t0\nenv_FOO=x\n\nDATA\n", "^missing options line"),
        (b"\n\nVERSION\tscript\t4\t0\n-\n\n", VERSION_ERROR),
        (b"VERSION\tscript\t4\t0\n-\na\n", "^disconnected"),
    ],
)
def test_cv17_fatal_lines(data: bytes, match: str) -> None:
    reject(data, match)


# --- parser: args (2.8, CV-19) --------------------------------------------------------


def test_args_unescaped() -> None:
    header, _ = parse(V + b"-\nhello\nwo\x01nrld\n\x01t\x01r\n\xff\xfe\n\n")
    assert header.args == (b"hello", b"wo\nrld", b"\t\r", b"\xff\xfe")


def test_arg_nul_from_unescaping_truncates() -> None:
    header, _ = parse(V + b"-\nn\x010ul\n\x010\n\n")
    assert header.args == (b"n", b"")


def test_cv19_empty_arg_via_soh() -> None:
    header, payload = parse(b"VERSION\tscript\t4\t0\n-\na\n\x01\nb\n\nDATA\n")
    assert header.args == (b"a", b"", b"b")
    assert payload == b"DATA\n"


def test_args_with_carriage_returns_and_spaces_are_kept() -> None:
    header, _ = parse(V + b"-\n a \r\n\t\n\n")
    assert header.args == (b" a \r", b"\t")


# --- parser: NUL in the header (2.9, CV-18) ---------------------------------------


def test_cv18_nul_truncates_rest_of_header() -> None:
    header, payload = parse(b"VERSION\tscript\t4\t0\n-\narg1\x00junk\narg2\n\nD")
    assert header.args == (b"arg1",)
    assert payload == b"D"


def test_cv18_nul_empty_options() -> None:
    reject(b"VERSION\tscript\t4\t0\n\x00\n\nDATA\n", "^empty options")


def test_cv18_nul_trailing_empty_arg() -> None:
    header, payload = parse(b"VERSION\tscript\t4\t0\n-\nx\n\x00junk\n\nPAY")
    assert header.args == (b"x", b"")
    assert payload == b"PAY"


def test_nul_in_version_line() -> None:
    # The NUL hides everything after it, the options line included.
    header, _ = parse(b"VERSION\tscript\t4\t0\x00junk\nnoreply\narg\n\n")
    assert (header.noreply, header.args, header.version_minor) == (False, (), 0)
    reject(b"VERSION\tscript\t4\x00\t0\n-\n\n", VERSION_ERROR)


def test_nul_hides_env_and_alarm_checks() -> None:
    header, _ = parse(V + b"-\x00\nenv_BAD\n\n")
    assert header.args == ()
    # "alarm=1" then nothing: the options line is missing.
    reject(V + b"alarm=1\x00x\n-\n\n", "^missing options line")
    reject(V + b"env_A=1\x00\n-\n\n", "^missing options line")


# --- parser: size cap (quirk Q1) -------------------------------------------------------


def header_of_size(size: int) -> bytes:
    """A valid header of exactly *size* bytes (final LF LF included)."""
    base = V + b"-\n"
    arg_len = size - len(base) - 2
    assert arg_len >= 1
    data = base + b"a" * arg_len + b"\n\n"
    assert len(data) == size
    return data


@pytest.mark.parametrize("limit", [40, 100, 1000])
def test_max_header_bytes_at_limit(limit: int) -> None:
    header, payload = parse(header_of_size(limit) + b"PAYLOAD", max_header_bytes=limit)
    assert header.header_size == limit
    assert payload == b"PAYLOAD"


@pytest.mark.parametrize("limit", [40, 100, 1000])
def test_max_header_bytes_one_below(limit: int) -> None:
    header, payload = parse(header_of_size(limit - 1) + b"X", max_header_bytes=limit)
    assert header.header_size == limit - 1
    assert payload == b"X"


@pytest.mark.parametrize("limit", [40, 100, 1000])
def test_max_header_bytes_one_above(limit: int) -> None:
    reject(header_of_size(limit + 1), f"^header exceeds {limit} bytes", max_header_bytes=limit)
    # ... also when the header is still incomplete, and when payload follows.
    reject(header_of_size(limit + 1)[:-1], f"^header exceeds {limit} bytes",
           max_header_bytes=limit)
    reject(header_of_size(limit + 1) + b"PAYLOAD", f"^header exceeds {limit} bytes",
           max_header_bytes=limit)


def test_max_header_bytes_rejects_as_soon_as_reached() -> None:
    # Newline-free input fed byte by byte fails at the cap, not later.
    parser = HeaderParser(max_header_bytes=100)
    for _ in range(99):
        assert parser.feed(b"V") is None
    with pytest.raises(RemoteProtocolError, match="header exceeds 100 bytes"):
        parser.feed(b"V")


def test_max_header_bytes_ignores_trailing_data() -> None:
    data = header_of_size(50)
    parser = HeaderParser(max_header_bytes=50)
    header = parser.feed(data + b"x" * 10_000)
    assert header is not None
    assert len(parser.trailing_data) == 10_000


def test_max_header_bytes_minimum() -> None:
    smallest = V + b"\n"
    assert parse(smallest, max_header_bytes=len(smallest))[0].header_size == len(smallest)
    with pytest.raises(LocalProtocolError, match="max_header_bytes too small"):
        HeaderParser(max_header_bytes=len(smallest) - 1)


def test_default_max_header_bytes() -> None:
    assert DEFAULT_MAX_HEADER_BYTES == 64 * 1024
    parse(header_of_size(DEFAULT_MAX_HEADER_BYTES))
    parser = HeaderParser()
    with pytest.raises(RemoteProtocolError, match="header exceeds"):
        for chunk in split_at(header_of_size(DEFAULT_MAX_HEADER_BYTES + 1), range(0, 70_000, 4096)):
            parser.feed(chunk)
