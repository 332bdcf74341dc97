"""ServiceConnection: what the ``script`` binary decides (PROTOCOL.md 2, 4.1, 4.4, 7)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from execproto import (
    DEFAULT_LIBEXEC_DIR,
    DEFAULT_MAX_HEADER_BYTES,
    NEED_DATA,
    BytesLike,
    LocalProtocolError,
    RemoteProtocolError,
    ScriptExited,
    ScriptRequest,
    ServiceConnection,
    ServiceState,
    parse_env_allowlist,
)

from .helpers import every_chunking, feed_service

V = b"VERSION\tscript\t4\t0\n"


def request_every_chunking(
    data: bytes,
    script: BytesLike,
    script_args: Sequence[BytesLike] = (),
    *,
    env_allowlist: Sequence[BytesLike] = (),
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    libexec_dir: BytesLike = DEFAULT_LIBEXEC_DIR,
) -> tuple[ScriptRequest, bytes]:
    """Feed every chunking of *data* to a fresh service; check they agree."""
    outcomes = set()
    for chunks in every_chunking(data):
        conn = ServiceConnection(
            script,
            script_args,
            env_allowlist=env_allowlist,
            max_header_bytes=max_header_bytes,
            libexec_dir=libexec_dir,
        )
        request, payload = feed_service(conn, chunks)
        assert request is not None
        assert conn.state is ServiceState.RUNNING
        assert payload == data[request.header_size :]
        outcomes.add((request, payload))
    assert len(outcomes) == 1, outcomes
    return outcomes.pop()


def test_cv10_full_example() -> None:
    request, payload = request_every_chunking(
        b"VERSION\tscript\t4\t0\nenv_FOO=foo\x01tx\nenv_BAR=bar\n-\nhello\nwo\x01nrld\n\n"
        b"DATA line\n",
        "/tmp/test-script.sh",
        ["one"],
        env_allowlist=["FOO"],
    )
    assert request.argv == (b"/tmp/test-script.sh", b"one", b"hello", b"wo\nrld")
    assert request.args == (b"hello", b"wo\nrld")
    assert request.env == ((b"FOO", b"foo\tx"),)
    assert request.environ == {b"FOO": b"foo\tx"}
    assert request.noreply is False
    assert request.passthrough is False
    assert request.sends_result is True
    assert request.alarm is None
    assert request.version_minor == 0
    assert payload == b"DATA line\n"


def test_cv11_version_only() -> None:
    request, payload = request_every_chunking(b"VERSION\tscript\t4\t0\n\nDATA\n", "/s", ["one"])
    assert request.argv == (b"/s", b"one")
    assert request.args == ()
    assert request.sends_result
    assert payload == b"DATA\n"
    assert request.header_size == len(V) + 1


def test_cv13_allowlist() -> None:
    request, _ = request_every_chunking(
        V + b"env_FOO=foo\nenv_BAZ=x=y\nenv_QUX=q\n-\n\n",
        "/s",
        env_allowlist=parse_env_allowlist(["FOO,BAR,BAZ"]),
    )
    assert request.environ == {b"FOO": b"foo", b"BAZ": b"x=y"}


def test_allowlist_is_exact_and_case_sensitive() -> None:
    request, _ = request_every_chunking(
        V + b"env_foo=1\nenv_FOO2=2\nenv_FO=3\nenv_=4\nenv_FOO=5\n-\n\n",
        "/s",
        env_allowlist=["FOO"],
    )
    assert request.env == ((b"FOO", b"5"),)


def test_empty_name_is_never_allowed() -> None:
    # PROTOCOL.md 2.6: "An empty NAME is never on the list."  parse_env_allowlist
    # drops empty pieces, but an allowlist passed directly may contain one, and
    # the entry (b"", b"4") then reaches the script's environment (execve
    # refuses an empty name).
    request, _ = request_every_chunking(V + b"env_=4\n-\n\n", "/s", env_allowlist=[""])
    assert request.env == ()


def test_allowlist_accepts_str_and_bytes() -> None:
    request, _ = request_every_chunking(
        V + b"env_A=1\nenv_B=2\nenv_C=3\n-\n\n", "/s", env_allowlist=["A", b"B"]
    )
    assert request.env == ((b"A", b"1"), (b"B", b"2"))


def test_escaped_env_entries_are_kept() -> None:
    # The 2.4.3+ behaviour (quirk Q6); Dovecot 2.3.19 to 2.4.2 drop them.
    request, _ = request_every_chunking(
        V + b"env_BAR=b\x01ar\nenv_F\x01OO=1\n-\n\n", "/s", env_allowlist=["FOO", "BAR"]
    )
    assert request.env == ((b"BAR", b"bar"), (b"FOO", b"1"))


def test_last_duplicate_wins_in_first_seen_order() -> None:
    request, _ = request_every_chunking(
        V + b"env_B=1\nenv_A=2\nenv_B=3\nenv_X=9\nenv_A=4\n-\n\n",
        "/s",
        env_allowlist=["A", "B"],
    )
    assert request.env == ((b"B", b"3"), (b"A", b"4"))


def test_empty_allowlist_drops_everything() -> None:
    request, _ = request_every_chunking(V + b"env_A=1\n-\n\n", "/s")
    assert request.env == ()
    assert request.environ == {}


def test_alarm_and_noreply() -> None:
    request, payload = request_every_chunking(
        b"VERSION\tscript\t4\t0\nalarm=10\nnoreply\ntext/html\n\nMIME", "/fts"
    )
    assert request.alarm == 10
    assert request.noreply is True
    assert request.sends_result is False
    assert request.argv == (b"/fts", b"text/html")
    assert payload == b"MIME"


def test_version_minor() -> None:
    request, _ = request_every_chunking(b"VERSION\tscript\t4\t7\n-\n\n", "/s")
    assert request.version_minor == 7


# --- result codes (4.1, CV-21) ------------------------------------------------------------


def running(header: bytes = V + b"-\n\n") -> ServiceConnection:
    conn = ServiceConnection("/s")
    request, _ = feed_service(conn, [header])
    assert request is not None
    return conn


@pytest.mark.parametrize(
    ("returncode", "code"), [(0, b"+\n"), (3, b"-\n"), (84, b"-\n"), (-15, b"-\n"), (None, b"-\n")]
)
def test_cv21_result_codes(returncode: int | None, code: bytes) -> None:
    conn = running()
    assert conn.send(ScriptExited(returncode=returncode)) == code
    assert conn.state is ServiceState.DONE


@pytest.mark.parametrize("returncode", [0, 3, -15, None])
def test_noreply_sends_nothing(returncode: int | None) -> None:
    conn = running(V + b"noreply\n\n")
    assert conn.send(ScriptExited(returncode=returncode)) == b""
    assert conn.state is ServiceState.DONE


# --- passthrough (4.4, CV-23) ---------------------------------------------------------------


def test_cv23_passthrough() -> None:
    data = b"VERSION\tscript\t4\t0\n-\nfoo\n\nD\n"
    conn = ServiceConnection("/x.py", ["passthru"], passthrough=True, env_allowlist=["FOO"])
    assert conn.passthrough
    request = conn.next_event()
    assert isinstance(request, ScriptRequest)
    assert request.argv == (b"/x.py", b"passthru")
    assert request.env == ()
    assert request.args == ()
    assert request.passthrough is True
    assert request.noreply is False
    assert request.sends_result is False
    assert request.alarm is None
    assert request.version_minor is None
    assert request.header_size == 0
    assert data[request.header_size :] == data
    assert conn.state is ServiceState.RUNNING
    assert conn.send(ScriptExited(returncode=0)) == b""


def test_passthrough_parses_nothing() -> None:
    conn = ServiceConnection("/s", passthrough=True)
    with pytest.raises(LocalProtocolError, match="passthrough service reads no header"):
        conn.receive_data(b"garbage\n\n")
    request, payload = feed_service(ServiceConnection("/s", passthrough=True), [b"\x00\n\n"])
    assert request is not None and payload == b"\x00\n\n"


@pytest.mark.parametrize("returncode", [0, 1, None])
def test_passthrough_sends_no_result_code(returncode: int | None) -> None:
    conn = ServiceConnection("/s", passthrough=True)
    conn.next_event()
    assert conn.send(ScriptExited(returncode=returncode)) == b""


# --- script path (7.1) ---------------------------------------------------------------------


def test_relative_script_uses_libexec_dir() -> None:
    request, _ = request_every_chunking(V + b"-\na\n\n", "test-script.sh", ["one"])
    assert request.argv == (f"{DEFAULT_LIBEXEC_DIR}/test-script.sh".encode(), b"one", b"a")
    request, _ = request_every_chunking(
        V + b"-\n\n", "sub/t.sh", libexec_dir="/usr/lib/dovecot"
    )
    assert request.argv == (b"/usr/lib/dovecot/sub/t.sh",)
    request, _ = request_every_chunking(V + b"-\n\n", b"t.sh", libexec_dir=b"/x")
    assert request.argv == (b"/x/t.sh",)


def test_absolute_script_used_as_is() -> None:
    request, _ = request_every_chunking(V + b"-\n\n", "/abs/t.sh", libexec_dir="/ignored")
    assert request.argv == (b"/abs/t.sh",)


def test_default_libexec_dir() -> None:
    assert DEFAULT_LIBEXEC_DIR == "/usr/libexec/dovecot"


def test_missing_script_path() -> None:
    with pytest.raises(LocalProtocolError, match="Missing script path"):
        ServiceConnection("")
    with pytest.raises(LocalProtocolError, match="NUL"):
        ServiceConnection("/a\x00b")
    with pytest.raises(LocalProtocolError, match="NUL"):
        ServiceConnection("/a", ["x\x00"])


def test_script_args_precede_client_args() -> None:
    request, _ = request_every_chunking(V + b"-\nc1\nc2\n\n", "/s", ["s1", b"s2"])
    assert request.argv == (b"/s", b"s1", b"s2", b"c1", b"c2")
    assert request.args == (b"c1", b"c2")


# --- header errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"VERSION\tscript\t5\t0\n-\n\n", "Client not compatible"),
        (b"VERSION\tscript\t4\t0\nenv_FOO\n-\n\n", "invalid environment variable"),
        (b"VERSION\tscript\t4\t0\nalarm=x\n-\n\n", "invalid alarm option"),
        (b"VERSION\tscript\t4\t0\nalarm=5\n\n", "missing options line"),
        (b"VERSION\tscript\t4\t0\n\x00\n\n", "empty options"),
        (b"VERSION\tscript\t4\t0\n-\na\n", "disconnected"),
    ],
)
def test_bad_header_is_sticky_error(data: bytes, match: str) -> None:
    for chunks in every_chunking(data):
        conn = ServiceConnection("/s")
        with pytest.raises(RemoteProtocolError, match=match):
            feed_service(conn, chunks)
        assert conn.state is ServiceState.ERROR
        with pytest.raises(LocalProtocolError, match="cannot receive data in state ERROR"):
            conn.receive_data(b"x")
        with pytest.raises(LocalProtocolError, match="no more events in state ERROR"):
            conn.next_event()
        with pytest.raises(LocalProtocolError, match="cannot send ScriptExited in state ERROR"):
            conn.send(ScriptExited(returncode=0))


def test_max_header_bytes() -> None:
    header = V + b"-\n" + b"a" * 77 + b"\n\n"
    assert len(header) == 100
    request, _ = request_every_chunking(header, "/s", max_header_bytes=100)
    assert request.header_size == 100
    conn = ServiceConnection("/s", max_header_bytes=99)
    with pytest.raises(RemoteProtocolError, match="header exceeds 99 bytes"):
        conn.receive_data(header)
    assert conn.state is ServiceState.ERROR
    with pytest.raises(LocalProtocolError, match="max_header_bytes too small"):
        ServiceConnection("/s", max_header_bytes=3)


# --- state errors -----------------------------------------------------------------------------


def test_next_event_before_header() -> None:
    conn = ServiceConnection("/s")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(V)
    assert conn.next_event() is NEED_DATA
    assert conn.state is ServiceState.HEADER


def test_receive_after_header_complete() -> None:
    conn = ServiceConnection("/s")
    conn.receive_data(V + b"-\n\nPAY")
    # The header is complete but not yet returned: no more data.
    with pytest.raises(LocalProtocolError, match="cannot receive data"):
        conn.receive_data(b"LOAD")
    assert conn.trailing_data == b"PAY"
    assert isinstance(conn.next_event(), ScriptRequest)
    with pytest.raises(LocalProtocolError, match="cannot receive data in state RUNNING"):
        conn.receive_data(b"LOAD")
    with pytest.raises(LocalProtocolError, match="no more events in state RUNNING"):
        conn.next_event()


def test_send_before_running() -> None:
    conn = ServiceConnection("/s")
    with pytest.raises(LocalProtocolError, match="cannot send ScriptExited in state HEADER"):
        conn.send(ScriptExited(returncode=0))


def test_send_twice() -> None:
    conn = running()
    conn.send(ScriptExited(returncode=0))
    with pytest.raises(LocalProtocolError, match="cannot send ScriptExited in state DONE"):
        conn.send(ScriptExited(returncode=0))
    with pytest.raises(LocalProtocolError, match="in state DONE"):
        conn.next_event()
    with pytest.raises(LocalProtocolError, match="in state DONE"):
        conn.receive_data(b"x")


def test_send_wrong_event() -> None:
    conn = running()
    with pytest.raises(LocalProtocolError, match="cannot send int"):
        conn.send(0)  # type: ignore[arg-type]
    assert conn.state is ServiceState.RUNNING


def test_receive_data_accepts_bytes_like() -> None:
    conn = ServiceConnection("/s")
    conn.receive_data(bytearray(V))
    conn.receive_data(memoryview(b"-\n\nP"))
    request = conn.next_event()
    assert isinstance(request, ScriptRequest)
    assert conn.trailing_data == b"P"


# --- parse_env_allowlist -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "names"),
    [
        (["FOO,BAR", "BAZ  QUX"], (b"FOO", b"BAR", b"BAZ", b"QUX")),
        (["FOO"], (b"FOO",)),
        ([], ()),
        ([""], ()),
        ([",, \t,"], ()),
        (["A,\tB ,C"], (b"A", b"B", b"C")),
        ([b"X,Y", "Z"], (b"X", b"Y", b"Z")),
        (["A", "A"], (b"A", b"A")),
        (["a;b"], (b"a;b",)),
    ],
)
def test_parse_env_allowlist(values: list[str | bytes], names: tuple[bytes, ...]) -> None:
    assert parse_env_allowlist(values) == names


def test_parse_env_allowlist_bad_type() -> None:
    with pytest.raises(LocalProtocolError, match="env allowlist entry must be bytes or str"):
        parse_env_allowlist([1])  # type: ignore[list-item]


# --- fresh(): one template, a connection per client ----------------------------------------


@pytest.mark.parametrize("passthrough", [False, True])
def test_fresh_is_the_constructor_again(passthrough: bool) -> None:
    settings = dict(env_allowlist=["A"], passthrough=passthrough, max_header_bytes=60,
                    libexec_dir="/lib")
    template = ServiceConnection("s", ["x"], **settings)  # type: ignore[arg-type]
    wire = V + b"env_A=1\nenv_B=2\n-\narg\n\npayload"
    # The template's own use does not leak into the connections it gives.
    template_outcome = feed_service(template, [wire])
    for _ in range(2):
        fresh = template.fresh()
        assert fresh is not template and fresh.state is ServiceState.HEADER
        expected = feed_service(ServiceConnection("s", ["x"], **settings), [wire])  # type: ignore[arg-type]
        assert feed_service(fresh, [wire]) == expected == template_outcome
        assert fresh.send(ScriptExited(returncode=0)) == (b"" if passthrough else b"+\n")
    assert template.state is ServiceState.RUNNING


def test_fresh_keeps_the_header_cap() -> None:
    fresh = ServiceConnection("s", max_header_bytes=30).fresh()
    with pytest.raises(RemoteProtocolError, match="exceeds 30 bytes"):
        fresh.receive_data(V + b"-\n" + b"a" * 20 + b"\n\n")
    assert fresh.state is ServiceState.ERROR
