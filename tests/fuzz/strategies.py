"""Hypothesis strategies for the fuzz targets, and the two settings profiles.

Profiles (chosen with the environment variable ``EXECPROTO_FUZZ_PROFILE``):

* ``fuzz-ci`` (default): example counts sized so that the whole fuzz
  directory runs in well under two minutes inside the normal test suite;
* ``fuzz``: a hundred times more, for a long hunt
  (``EXECPROTO_FUZZ_PROFILE=fuzz pytest tests/fuzz``);
* ``fuzz-round``: ten times ``fuzz-ci``; ``run.py --engine hypothesis``
  repeats rounds of it (fresh random seeds each time) until its time is up.

Inputs mix structure (almost valid headers, replies, configuration text) with
raw bytes, so that both the deep paths and the error paths are reached.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from execproto import DotEncoder, tab_escape

__all__ = [
    "PROFILE",
    "config_inputs",
    "cut_lists",
    "dot_streams",
    "header_inputs",
    "header_limits",
    "profile_settings",
    "reply_inputs",
    "target_texts",
]

settings.register_profile(
    "fuzz-ci",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "fuzz",
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
# run.py --engine hypothesis: rounds of this size until the time is up.
settings.register_profile(
    "fuzz-round",
    max_examples=1_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

#: The profile every fuzz test starts from.
PROFILE = settings.get_profile(os.environ.get("EXECPROTO_FUZZ_PROFILE", "fuzz-ci"))


def profile_settings(weight: float = 1.0) -> settings:
    """The active profile with *weight* times its example count."""
    return settings(PROFILE, max_examples=max(1, int(PROFILE.max_examples * weight)))


def _no_lf(data: bytes) -> bytes:
    return data.replace(b"\n", b"")


_line = st.binary(max_size=40).map(_no_lf)


@st.composite
def cut_lists(draw: st.DrawFn, data: bytes) -> list[list[int]]:
    """Up to three chunkings of *data* (offsets), one of them possibly byte by byte."""
    n = len(data)
    if n < 2:
        return []
    lists = draw(st.lists(st.lists(st.integers(1, n - 1), max_size=12), max_size=2))
    if draw(st.booleans()):
        lists.append(list(range(1, n)))
    return lists


# --- service header ------------------------------------------------------------------

_VERSIONS = [
    b"VERSION\tscript\t4\t0",
    b"VERSION\tscript\t4\t4294967295",
    b"VERSION\tscript\t4\t4294967296",
    b"VERSION\tscript\t3\t0",
    b"VERSION\tscript\t5\t0",
    b"VERSION\tscript\t04\t000",
    b"VERSION\tscript\t4\t",
    b"VERSION\tscript\t4\t0\0trailing",
    b"VERSION\tscript\t4\t0\t1",
    b"VERSION\tscript\t18446744073709551620\t0",
    b"VERSION\tscript\t0000000000000000000000000000004\t0",
    b"VERSION\tsieve\t4\t0",
    b"VERSION script 4 0",
    b"",
    b"GET / HTTP/1.1\r",
    b"\0VERSION\tscript\t4\t0",
]
_ALARMS = [b"alarm=5", b"alarm=0", b"alarm=", b"alarm=x", b"alarm=-1", b"alarm= 5",
           b"alarm=4294967295", b"alarm=4294967296", b"alarm=000000000000000000000000001",
           b"alarm=5\0junk", b"ALARM=5"]
_ENV_NAMES = [b"FOO", b"USER", b"HOME", b"LD_PRELOAD", b"PATH", b"foo", b"", b"FOO\0X",
              b"FO=O"]
_OPTIONS = [b"-", b"noreply", b"", b"NOREPLY", b"noreply ", b"x", b"noreply\0x", b"\0"]


@st.composite
def _env_line(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(_ENV_NAMES) | st.binary(max_size=8))
    value = draw(st.binary(max_size=16))
    assignment = name + (b"=" if draw(st.booleans()) else b"") + value
    if draw(st.booleans()):
        return b"env_" + tab_escape(assignment)
    return b"env_" + _no_lf(assignment)


@st.composite
def _structured_header(draw: st.DrawFn) -> bytes:
    lines = [draw(st.sampled_from(_VERSIONS) | _line)]
    alarm = draw(st.none() | st.sampled_from(_ALARMS) | _line.map(lambda b: b"alarm=" + b))
    if alarm is not None:
        lines.append(alarm)
    lines.extend(draw(st.lists(_env_line(), max_size=5)))
    if draw(st.integers(0, 9)):  # sometimes no options line at all (quirk Q3)
        lines.append(draw(st.sampled_from(_OPTIONS) | _line))
    args = draw(st.lists(_line.map(lambda b: tab_escape(b) if b and b[0] % 2 else b),
                         max_size=6))
    repeat = draw(st.sampled_from([0, 0, 0, 10, 200, 3000, 40000]))
    if repeat:
        args.extend([draw(st.sampled_from([b"a", b"\x01t", b"\x01", b"xy"]))] * repeat)
    lines.extend(args)
    text = b"\n".join(lines) + b"\n"
    text += draw(st.sampled_from([b"\n", b"\n", b"\n", b"", b"\r\n"]))
    text += draw(st.binary(max_size=32))  # payload
    if draw(st.integers(0, 4)) == 0:  # noise somewhere
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.binary(min_size=1, max_size=4)) + text[at:]
    return text


def header_inputs() -> st.SearchStrategy[bytes]:
    """Bytes a client might send: near-valid headers, long headers, raw bytes."""
    return _structured_header() | st.binary(max_size=400)


def header_limits() -> st.SearchStrategy[int]:
    """max_header_bytes values: tiny, typical and large."""
    return st.integers(20, 300) | st.integers(300, 70_000) | st.just(65_536)


# --- client reply and dot decoder -------------------------------------------------

_DOT_ALPHABET = [b"\r", b"\n", b".", b"a", b"\r\n", b"\n.", b".\r\n", b".\n", b"+", b"-"]


def dot_streams() -> st.SearchStrategy[bytes]:
    """Dot streams: from the encoder (with variants of the end), or from CR/LF/dot soup."""

    @st.composite
    def encoded(draw: st.DrawFn) -> bytes:
        encoder = DotEncoder(stuff_bare_cr_dot=draw(st.booleans()))
        parts = draw(st.lists(st.lists(st.sampled_from(_DOT_ALPHABET)).map(b"".join),
                              max_size=4))
        body = b"".join(encoder.encode(p) for p in parts)
        end = encoder.finish()
        end = draw(st.sampled_from([end, end, b"\n.\n", b"\r\n.\n", b"", end[:-1]]))
        return body + end + draw(st.binary(max_size=8))

    soup = st.lists(st.sampled_from(_DOT_ALPHABET), max_size=60).map(b"".join)
    return encoded() | soup | st.binary(max_size=200)


def reply_inputs(dot: bool) -> st.SearchStrategy[bytes]:
    """Replies: output plus a result code (good or bad), or raw bytes."""
    codes = st.sampled_from([b"+\n", b"-\n", b"+", b"", b"x\n", b"\n\n", b"+\r\n", b"\n"])
    body = dot_streams() if dot else st.binary(max_size=200)
    return st.tuples(body, codes).map(b"".join) | st.binary(max_size=200)


# --- configuration ----------------------------------------------------------------

_KEYS = ["driver", "args", "fork_path", "unix_socket_path", "tcp_host", "tcp_port",
         "execute_driver", "execute_args", "execute_tcp_port", "executable", "execute",
         "port", "mode", "path", "address", "listen", "base_dir", "user", "bogus", "a b",
         "quota_warning", "quota_warning2", "welcome_script", "sieve_pipe_socket_dir",
         "sieve_pipe_bin_dir", '"quoted key"', "unix_listener_mode", "inet_listener_port"]
_VALUES = ["unix", "fork", "tcp", "script x", "script -e FOO,BAR -p /bin/x a", "script -e",
           "script -q x", "script", "/usr/libexec/dovecot/script /x", "/bin/sh", '"  "', '""',
           "''", "0", "143", "65536", "99999", "²", "٣", "0777", "8", "-1", "%{user}",
           "%{user | domain}", "%{home|default('x')}", "%{nope}", "%{nope | default}",
           "%{user | bogus}", "%%{x}", "%{", "%{user", "%{'x'}", "%{empty|default(user)}",
           "%{user|default('\\x41\\101\\q')}", "localhost:143", "[::1]:25", "[::1",
           "::1", "host:0", "host:x", "*, ::", '"quoted \\" value"', "'single'", '"open',
           "a #comment", "x\\", "<file.txt", "< /abs", "$ENV:HOME", "'it\\'s'",
           "storage=95%% quota-warning 95 %u", "-messages=1%% exec:/bin/x %Lu %n",
           "storage=1%% tcp:[::1]:4 x", "welcome %u %q", "%{user | substr(1, -1) | md5}",
           "%{user | index('@', -1) | lfill(9, '-')}", "%{user | truncate(99999999999999999999)}"]
_KINDS = ["execute", "service", "unix_listener", "inet_listener", "welcome", "quota_warning",
          "protocol", "{", "", "plugin", "quota", "warning", "group @g", "}"]
_NAMES = ["", "test", "a:1", "[::1]:25", "/abs/path", "x", '"quoted name"', "'q'", "a b",
          '"User quota"', '"a\\"b"', '"un', "x{", "{ garbage"]


@st.composite
def _config_line(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 9))
    if kind <= 3:
        key = draw(st.sampled_from(_KEYS))
        value = draw(st.sampled_from(_VALUES) | st.text(max_size=12))
        return f"{key} = {value}"
    if kind <= 5:
        section = draw(st.sampled_from(_KINDS))
        name = draw(st.sampled_from(_NAMES))
        return f"{section} {name} {{"
    if kind <= 7:
        return "}"
    if kind == 8:
        return draw(st.sampled_from(["!include a.conf", "!include_try b", "!include", "!incl",
                                     "# comment", "", "key=value \\"]))
    return draw(st.text(max_size=20))


_EXECUTABLES = ["script x", "script -e FOO,BAR -p /bin/x a", "script -e", "script -q x",
                "script", "/usr/libexec/dovecot/script /x -e A", "script -- -x", "/bin/sh",
                '"  "', '""', "script -eFOO -p", "a/b/script /rel"]
_PORTS = ["143", "0", "65535", "65536", "", "x", "²", "٣", "1e3", " 25", "00025"]
_MODES = ["0600", "0666", "", "8", "07777", "17777", "rw", "٣"]


@st.composite
def _service_block(draw: st.DrawFn) -> list[str]:
    name = draw(st.sampled_from(["s", "script", "x", '"q s"']))
    key = draw(st.sampled_from(["executable", "execute"]))
    lines = [f"service {name} {{", f"  {key} = {draw(st.sampled_from(_EXECUTABLES))}"]
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            path = draw(st.sampled_from(["", "path = /run/s", "path = rel"]))
            mode = draw(st.sampled_from(_MODES))
            lines += [f"  unix_listener {draw(st.sampled_from(['', 'sock', '/abs']))} {{",
                      f"    {path}", f"    mode = {mode}" if mode else "", "  }"]
        else:
            address = draw(st.sampled_from(["", "address = 127.0.0.1", "address = *, ::",
                                            "address = ,"]))
            lines += ["  inet_listener {", f"    port = {draw(st.sampled_from(_PORTS))}",
                      f"    {address}", "  }"]
    return [*lines, "}"]


@st.composite
def _execute_block(draw: st.DrawFn) -> list[str]:
    name = draw(st.sampled_from(_NAMES))
    lines = [f"execute {name} {{"]
    for key in draw(st.lists(st.sampled_from(_KEYS[:9]), max_size=4)):
        lines.append(f"  {key} = {draw(st.sampled_from(_VALUES) | st.text(max_size=8))}")
    lines.append("}")
    if draw(st.booleans()):  # inside a consumer section
        consumer = draw(st.sampled_from(["welcome", "quota_warning q", "a"]))
        lines = [f"{consumer} {{", *lines, "}"]
    return lines


@st.composite
def _config_text(draw: st.DrawFn) -> str:
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 2))
        if kind == 0:
            lines += draw(_service_block())
        elif kind == 1:
            lines += draw(_execute_block())
        else:
            lines += draw(st.lists(_config_line(), max_size=8))
    if lines and draw(st.integers(0, 3)) == 0:  # drop or repeat a line
        at = draw(st.integers(0, len(lines) - 1))
        lines[at:at + 1] = [] if draw(st.booleans()) else [lines[at]] * 2
    newline = draw(st.sampled_from(["\n", "\n", "\r\n"]))
    return newline.join(lines) + draw(st.sampled_from(["", newline]))


@st.composite
def config_inputs(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A configuration text (near-valid, sometimes deeply nested) and include texts."""
    depth = draw(st.sampled_from([0, 0, 0, 0, 3, 50, 1200, 2500]))
    closing = draw(st.sampled_from([depth, depth, depth - 1, depth + 1]))
    main = "a {\n" * depth + draw(_config_text()) + "\n}" * closing + "\n"
    if draw(st.integers(0, 5)) == 0:
        main = draw(st.text(max_size=200))
    includes = [draw(_config_text()) for _ in range(draw(st.integers(0, 2)))]
    return main, includes


# --- targets (URIs) -----------------------------------------------------------------

_SCHEMES = ["unix:", "tcp:", "exec:", "fork:", "", "http:", "TCP:", "unix", "tcp:["]
_URI_ALPHABET = st.sampled_from([*":[]0123456789/.-_abcxyz%", "²", "٣", " ", "\0"])


def target_texts() -> st.SearchStrategy[str]:
    """URIs and host:port texts: near-valid or arbitrary."""
    near = st.tuples(st.sampled_from(_SCHEMES), st.text(_URI_ALPHABET, max_size=24)).map(
        "".join)
    return near | st.text(max_size=40)
