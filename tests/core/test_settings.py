"""Targets, URIs, execute settings and ``%{...}`` expansion (PROTOCOL.md 9, CV-31, CV-32)."""

from __future__ import annotations

import hashlib

import pytest

from execproto import (
    DEFAULT_BASE_DIR,
    DRIVERS,
    ConfigError,
    ExecuteSettings,
    ForkTarget,
    LocalProtocolError,
    Target,
    TcpTarget,
    UnixTarget,
    expand_args,
    expand_value,
    parse_hostport,
    parse_target,
)

B = DEFAULT_BASE_DIR


def test_defaults() -> None:
    assert DEFAULT_BASE_DIR == "/run/dovecot"
    assert DRIVERS == ("unix", "fork", "tcp")
    assert ExecuteSettings("x").driver == "unix"


# --- 9.2: target inference ------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "target"),
    [
        (ExecuteSettings("test-script"), UnixTarget(f"{B}/test-script")),
        (ExecuteSettings("/run/x.sock"), UnixTarget("/run/x.sock")),
        (ExecuteSettings("x", unix_socket_path="sub/y"), UnixTarget(f"{B}/sub/y")),
        (ExecuteSettings("x", unix_socket_path="/abs/y"), UnixTarget("/abs/y")),
        (ExecuteSettings(""), UnixTarget(f"{B}/")),
        (ExecuteSettings("/usr/local/bin/t.sh", driver="fork"), ForkTarget("/usr/local/bin/t.sh")),
        (ExecuteSettings("x", driver="fork", fork_path="/bin/sh"), ForkTarget("/bin/sh")),
        (ExecuteSettings("sh", driver="fork"), ForkTarget("sh")),  # no base_dir (Q18)
        (ExecuteSettings("localhost:12345", driver="tcp"), TcpTarget("localhost", 12345)),
        (ExecuteSettings("[::1]:12345", driver="tcp"), TcpTarget("::1", 12345)),
        (
            ExecuteSettings("x", driver="tcp", tcp_host="localhost", tcp_port=12345),
            TcpTarget("localhost", 12345),
        ),
        (ExecuteSettings("", driver="tcp", tcp_host="h", tcp_port=1), TcpTarget("h", 1)),
        # Only the selected driver's settings matter.
        (ExecuteSettings("n", driver="fork", unix_socket_path="/u", tcp_host="h"), ForkTarget("n")),
        (ExecuteSettings("n", fork_path="/f", tcp_port=5), UnixTarget(f"{B}/n")),
    ],
)
def test_target_inference(settings: ExecuteSettings, target: Target) -> None:
    assert settings.target() == target


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            ExecuteSettings("localhost", driver="tcp"),
            "execute_tcp_port must not be 0 with execute_driver=tcp",
        ),
        (  # quirk Q17: the name's (missing) port replaces tcp_port
            ExecuteSettings("localhost", driver="tcp", tcp_port=12345),
            "execute_tcp_port must not be 0 with execute_driver=tcp",
        ),
        (
            ExecuteSettings("localhost:0", driver="tcp"),
            "Failed to parse execute_tcp_host:port from execute_name=localhost:0",
        ),
        (
            ExecuteSettings("[::1", driver="tcp"),
            "Failed to parse execute_tcp_host:port from execute_name=[::1",
        ),
        (
            ExecuteSettings("h:99999", driver="tcp"),
            "Failed to parse execute_tcp_host:port from execute_name=h:99999",
        ),
        (
            ExecuteSettings("x", driver="tcp", tcp_host="h"),
            "execute_tcp_port must not be 0 with execute_driver=tcp",
        ),
        (
            ExecuteSettings("", driver="tcp"),
            "execute_tcp_port must not be 0 with execute_driver=tcp",
        ),
        (ExecuteSettings("", driver="fork"), "execute: empty fork_path and name"),
    ],
)
def test_target_errors(settings: ExecuteSettings, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings.target()
    assert info.value.message == message
    assert info.value.line is None


def test_q17_port_from_name_replaces_tcp_port() -> None:
    settings = ExecuteSettings("localhost:1", driver="tcp", tcp_port=2)
    assert settings.target() == TcpTarget("localhost", 1)


def test_target_error_carries_line() -> None:
    settings = ExecuteSettings("localhost", driver="tcp", line=7)
    with pytest.raises(ConfigError) as info:
        settings.target()
    assert info.value.line == 7
    assert str(info.value) == "line 7: execute_tcp_port must not be 0 with execute_driver=tcp"


def test_target_base_dir() -> None:
    assert ExecuteSettings("s").target(base_dir="/var/run/dovecot") == UnixTarget(
        "/var/run/dovecot/s"
    )


def test_settings_validation() -> None:
    with pytest.raises(ConfigError, match="invalid driver 'pipe'"):
        ExecuteSettings("x", driver="pipe")
    with pytest.raises(ConfigError, match="invalid tcp_port 65536") as info:
        ExecuteSettings("x", tcp_port=65536, line=3)
    assert info.value.line == 3
    with pytest.raises(ConfigError, match="invalid tcp_port -1"):
        ExecuteSettings("x", tcp_port=-1)
    assert ExecuteSettings("x", tcp_port=65535).tcp_port == 65535


def test_labels() -> None:
    assert UnixTarget("/run/x").label == "unix:/run/x"
    assert TcpTarget("localhost", 1).label == "tcp:localhost:1"
    assert TcpTarget("::1", 2).label == "tcp:[::1]:2"
    assert TcpTarget("127.0.0.1", 3).label == "tcp:127.0.0.1:3"
    assert ForkTarget("/bin/t").label == "fork:/bin/t"


# --- 9.5.1: program client URIs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "target"),
    [
        ("exec:/usr/bin/t.sh", ForkTarget("/usr/bin/t.sh")),
        ("exec:sh", ForkTarget("sh")),
        ("fork:/bin/t", ForkTarget("/bin/t")),
        ("unix:/run/qw.sock", UnixTarget("/run/qw.sock")),
        ("unix:relative", UnixTarget("relative")),  # used as is
        ("unix:a:b", UnixTarget("a:b")),
        ("tcp:localhost:12345", TcpTarget("localhost", 12345)),
        ("tcp:[::1]:12345", TcpTarget("::1", 12345)),
        ("tcp:127.0.0.1:1", TcpTarget("127.0.0.1", 1)),
    ],
)
def test_parse_target(uri: str, target: Target) -> None:
    assert parse_target(uri) == target


def test_parse_target_base_dir() -> None:
    assert parse_target("unix:qw", base_dir="/b") == UnixTarget("/b/qw")
    assert parse_target("unix:/abs", base_dir="/b") == UnixTarget("/abs")
    assert parse_target("exec:rel", base_dir="/b") == ForkTarget("rel")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("tcp:localhost", "Invalid tcp syntax, must be host:port in 'localhost'"),
        ("tcp:localhost:0", "Invalid tcp syntax, must be host:port in 'localhost:0'"),
        ("tcp:localhost:x", "Invalid tcp syntax, must be host:port in 'localhost:x'"),
        ("tcp:localhost:65536", "Invalid tcp syntax, must be host:port in 'localhost:65536'"),
        ("tcp:::1", "Invalid tcp syntax, must be host:port in '::1'"),
        ("tcp:[::1]", "Invalid tcp syntax, must be host:port in '[::1]'"),
        ("tcp:[::1", "Invalid tcp syntax, must be host:port in '[::1'"),
        ("tcp:", "Invalid tcp syntax, must be host:port in ''"),
        ("tcp::123", "Invalid tcp syntax, must be host:port in ':123'"),
        ("http://x", "Unsupported program client scheme 'http'"),
        ("ssh:x:y", "Unsupported program client scheme 'ssh'"),
        ("/run/x.sock", "Unsupported program client scheme '/run/x.sock'"),
        ("", "Unsupported program client scheme ''"),
        ("UNIX:/x", "Unsupported program client scheme 'UNIX'"),
        ("exec:", "empty program path in 'exec:'"),
        ("unix:", "empty socket path in 'unix:'"),
    ],
)
def test_parse_target_errors(uri: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_target(uri)
    assert info.value.message == message


# --- parse_hostport -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost:12345", ("localhost", 12345)),
        ("localhost", ("localhost", 99)),
        ("[::1]:12345", ("::1", 12345)),
        ("[::1]", ("::1", 99)),
        ("::1", ("::1", 99)),
        ("a:b:c", ("a:b:c", 99)),
        ("fe80::1:80", ("fe80::1:80", 99)),
        ("", ("", 99)),
        ("h:1", ("h", 1)),
        ("h:65535", ("h", 65535)),
        ("h:00080", ("h", 80)),
        (":80", ("", 80)),
        ("[]:1", ("", 1)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, 99) == expected


def test_parse_hostport_default_port() -> None:
    assert parse_hostport("h") == ("h", 0)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("h:", "invalid port ''"),
        ("h:0", "invalid port '0'"),
        ("h:65536", "invalid port '65536'"),
        ("h:+1", "invalid port"),
        ("h:1 ", "invalid port"),
        ("h: 1", "invalid port"),
        ("h:-1", "invalid port"),
        ("h:99999999999", "invalid port"),
        ("h:\u0661", "invalid port"),
        ("[::1", "missing ']'"),
        ("[::1]x", "unexpected 'x' after ']'"),
        ("[::1]:", "invalid port ''"),
        ("[::1]:0", "invalid port '0'"),
    ],
)
def test_parse_hostport_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_hostport(text)


# --- 9.3: %{...} expansion ----------------------------------------------------------------

VARS = {
    "user": "Frank@Example.COM",
    "plain": "frank",
    "empty": "",
    "spaced": "a b@c",
    "multi": "a@b@c",
    "provider:key": "pk",
    "owner_user": "",
    "home": "/home/frank",
    "ünï": "8bit",
}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("plain text", "plain text"),
        ("", ""),
        ("%{user}", "Frank@Example.COM"),
        ("<%{plain}>", "<frank>"),
        ("%{ user }", "Frank@Example.COM"),
        ("%{\tuser\t}", "Frank@Example.COM"),
        ("%{user|lower}", "frank@example.com"),
        ("%{user | upper}", "FRANK@EXAMPLE.COM"),
        ("%{user | username}", "Frank"),
        ("%{user | domain}", "Example.COM"),
        ("%{user | domain | lower}", "example.com"),
        ("%{plain | username}", "frank"),
        ("%{plain | domain}", ""),
        ("%{multi | username}", "a"),
        ("%{multi | domain}", "b@c"),
        ("%{owner_user | default('nobody')}", "nobody"),
        ('%{owner_user | default("nobody")}', "nobody"),
        ("%{plain | default('nobody')}", "frank"),
        ("%{missing | default('x')}", "x"),
        ("%{missing | default}", ""),
        ("%{missing|default}", ""),
        ("%{empty | default(home)}", "/home/frank"),
        ("%{missing | default( 'x' ) | upper}", "X"),
        ("%{missing | default | default('y')}", "y"),
        ("%{plain | upper | default('x') | lower}", "frank"),
        ("%{provider:key}", "pk"),
        ("%{ünï}", "8bit"),
        ("%{plain}%{plain}", "frankfrank"),
        ("%%{user}", "%{user}"),
        ("%%{user} %{plain}", "%{user} frank"),
        ("%%", "%%"),
        ("100%", "100%"),
        ("%u %d %n", "%u %d %n"),
        ("%%%{plain}", "%%{plain}"),  # longest match first, as Dovecot's lexer
        ("%{plain | lower}ÄÖ", "frankÄÖ"),
        ("%{spaced}", "a b@c"),
    ],
)
def test_expand_value(template: str, expected: str) -> None:
    assert expand_value(template, VARS) == expected


def test_lower_and_upper_are_ascii_only() -> None:
    variables = {"v": "ÄaZ\u0130"}
    assert expand_value("%{v | lower}", variables) == "Äaz\u0130"
    assert expand_value("%{v | upper}", variables) == "ÄAZ\u0130"


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        (r"'a\\b'", "a\\b"),
        (r"'a\'b'", "a'b"),
        (r"'a\"b'", 'a"b'),
        (r'"a\'b"', "a'b"),
        (r"'\t\r\n'", "\t\r\n"),
        (r"'\x41\x7a'", "Az"),
        (r"'\101\060'", "A0"),
        ("'a\"b'", 'a"b'),
        ("'a|}b'", "a|}b"),
        ("''", ""),
    ],
)
def test_default_string_escapes(argument: str, expected: str) -> None:
    assert expand_value(f"%{{missing | default({argument})}}", {}) == expected


def test_short_octal_escape() -> None:
    # Dovecot's lexer takes 1 to 3 octal digits: backslash 1 2 is LF.
    assert expand_value("%{missing | default('\\12')}", {}) == "\n"


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("%{missing}", "unknown variable 'missing'"),
        ("%{missing | upper}", "unknown variable 'missing'"),
        ("%{missing | upper | default('x')}", "unknown variable 'missing'"),
        ("%{plain | nosuch}", "unknown filter 'nosuch'"),
        ("%{plain | default(nosuch)}", "unknown variable 'nosuch' in default"),
        ("%{plain", "expected '\\|' or '}'"),
        ("%{plain |", "expected a variable or filter name"),
        ("%{plain x}", "expected '\\|' or '}'"),
        ("%{}", "expected a variable or filter name"),
        ("%{", "expected a variable or filter name"),
        ("%{1abc}", "expected a variable or filter name"),
        ("%{_x}", "expected a variable or filter name"),
        ("%{plain | default('x'}", "expected '\\)' after the default\\(\\) argument"),
        ("%{plain | default('x' 'y')}", "expected '\\)'"),
        ("%{plain | default()}", "expected a variable or filter name"),
        ("%{plain | default('x}", "unterminated quoted string"),
        ("%{plain | default('\\q')}", "invalid escape '\\\\q'"),
        ("%{plain | default('\\x4')}", "invalid escape '\\\\x'"),
        ("%{plain | default('\\9')}", "invalid escape '\\\\9'"),
        ("%{plain | default('x'", "expected '\\)'"),
        ("%{plain | default(", "expected a variable or filter name"),
        ("%{plain | default('\\", "invalid escape"),
    ],
)
def test_expand_value_errors(template: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        expand_value(template, VARS)


def test_config_error_is_a_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError):
        expand_value("%{missing}", {})


# --- expand_args (9.3, CV-32) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "variables", "expected"),
    [
        ("hello  %{user}", {"user": "a b@c"}, ("hello", "a", "b@c")),
        ("%{user | username}", {"user": "u@d"}, ("u",)),
        ("%{user | domain}", {"user": "u"}, ()),
        ("%%{user}", {}, ("%{user}",)),
        ("", {}, ()),
        ("   ", {}, ()),
        ("  a   b  ", {}, ("a", "b")),
        ("a\tb c", {}, ("a\tb", "c")),  # TAB is not a separator
        ("'a b'", {}, ("'a", "b'")),  # no quoting
        ("%{v} x", {"v": ""}, ("x",)),
        ("%{v | default('one two')}", {}, ("one", "two")),
    ],
)
def test_expand_args(template: str, variables: dict[str, str], expected: tuple[str, ...]) -> None:
    assert expand_args(template, variables) == expected


def test_expand_args_split_first() -> None:
    variables = {"user": "a b@c", "empty": ""}
    assert expand_args("hello  %{user}", variables, split_first=True) == ("hello", "a b@c")
    # An empty expansion stays as an (empty) argument when splitting first.
    assert expand_args("x %{empty}", variables, split_first=True) == ("x", "")
    assert expand_args("%{user|username}", variables, split_first=True) == ("a b",)


def test_expand_args_errors() -> None:
    with pytest.raises(ConfigError, match="unknown variable 'user'"):
        expand_args("%{user}", {})


def test_settings_expand_args() -> None:
    settings = ExecuteSettings("w", args="welcome %{user}", line=4)
    assert settings.expand_args({"user": "u@d"}) == ("welcome", "u@d")
    assert ExecuteSettings("w", args="%{v}").expand_args({"v": "a b"}, split_first=True) == (
        "a b",
    )
    with pytest.raises(ConfigError) as info:
        settings.expand_args({})
    assert info.value.line == 4
    assert info.value.message == "line 4: execute w: args: unknown variable 'user'"


# --- more 2.4 filters (lib-var-expand's expansion-filter.c) ----------------------------------

FILTER_VARS = {"user": "Frank.Miller@Example.org", "n": "3", "e": "", "sep": "."}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("%{user | reverse}", "gro.elpmaxE@relliM.knarF"),
        ("%{user | truncate(5)}", "Frank"),
        ("%{user | truncate(n)}", "Fra"),
        ("%{user | truncate(0)}", ""),
        ("%{user | substr(6)}", "Miller@Example.org"),
        ("%{user | substr(6, 6)}", "Miller"),
        ("%{user | substr(-3)}", "org"),
        ("%{user | substr(0, -4)}", "Frank.Miller@Example"),
        ("%{user | substr(2, 0)}", ""),
        ("%{user | index('.', 0)}", "Frank"),
        ("%{user | index('.', -1)}", "org"),
        ("%{user | username | index(sep, 1)}", "Miller"),
        ("%{n | lfill(4)}", "0003"),
        ("%{n | rfill(4, 'ab')}", "3abab"),  # whole fillers until long enough
        ("%{user | lfill(2)}", "Frank.Miller@Example.org"),
        ("%{user | md5}", hashlib.md5(b"Frank.Miller@Example.org").hexdigest()),
        ("%{user | sha256 | hexlify}",
         hashlib.sha256(b"Frank.Miller@Example.org").hexdigest()),
        ("%{user | sha1 | truncate(4)}",
         hashlib.sha1(b"Frank.Miller@Example.org").digest()[:4].hex()),
        ("%{user | lower | sha512}", hashlib.sha512(b"frank.miller@example.org").hexdigest()),
        ("%{n | hexlify}", "33"),
        ("%{n | hexlify(4)}", "0033"),
        ("%{user | hexlify(3)}", "467"),
        # A text filter ends "binary": the raw digest bytes, not hex.
        ("%{user | sha384 | upper}", hashlib.sha384(
            b"Frank.Miller@Example.org").digest().upper().decode("utf-8", "surrogateescape")),
        ("%{e | default(user) | domain}", "Example.org"),
        ("%{user | truncate( 5 ) | lower}", "frank"),
    ],
)
def test_more_filters(template: str, expected: str) -> None:
    assert expand_value(template, FILTER_VARS) == expected


def test_filters_work_on_utf8_bytes() -> None:
    # Dovecot's values are bytes: truncating can cut a UTF-8 sequence.
    assert expand_value("%{v | truncate(1)}", {"v": "é"}) == "\udcc3"
    assert expand_value("%{v | reverse | reverse}", {"v": "é"}) == "é"


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("%{user | truncate}", r"truncate\(\) takes 1 parameter\(s\), got 0"),
        ("%{user | truncate(-1)}", "Value of out of bounds"),
        ("%{user | truncate(user)}", "is not a number"),
        ("%{user | truncate(nosuch)}", "unknown variable 'nosuch' in truncate"),
        ("%{user | substr(99)}", "Offset out of bounds"),
        ("%{user | substr(1, 99)}", "Length out of bounds"),
        ("%{user | substr(10, -20)}", "Length out of bounds"),
        ("%{user | index('.', 9)}", "Position out of bounds"),
        ("%{user | index('', 0)}", "empty separator"),
        ("%{user | lfill(0)}", "Fill length out of bounds"),
        ("%{user | lfill(100000)}", "Fill length out of bounds"),
        ("%{user | rfill(30, '')}", "empty filler"),
        ("%{user | hexlify(-1)}", "Width out of bounds"),
        ("%{user | md5(1)}", r"md5\(\) takes 0 parameter"),
        ("%{user | hash('md5')}", "unknown filter 'hash'"),
        ("%{user | truncate(bits=3)}", "named parameters are not supported"),
        ("%{user | truncate(99999999999999999999)}", "expected a number"),
        ("%{user | truncate(5}", r"expected '\)' after the truncate\(\) argument"),
    ],
)
def test_more_filters_errors(template: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        expand_value(template, FILTER_VARS)


# --- variables in paths ---------------------------------------------------------------


def test_expand_paths() -> None:
    settings = ExecuteSettings("qw", unix_socket_path="/run/qw/%{user | username}.sock",
                               args="95 %{user}")
    expanded = settings.expand({"user": "frank@example.org"})
    assert expanded.target() == UnixTarget("/run/qw/frank.sock")
    assert expanded.args == "95 %{user}"  # args stay a template: split after expanding
    fork = ExecuteSettings("x", driver="fork", fork_path="/bin/%{user}")
    assert fork.expand({"user": "u"}).target() == ForkTarget("/bin/u")
    tcp = ExecuteSettings("x", driver="tcp", tcp_host="%{user | domain}", tcp_port=9)
    assert tcp.expand({"user": "a@h"}).target() == TcpTarget("h", 9)
    plain = ExecuteSettings("x", unix_socket_path="100%")
    assert plain.expand({}) == plain


def test_expand_paths_error_names_the_block() -> None:
    settings = ExecuteSettings("qw", unix_socket_path="/run/%{nosuch}", line=3, file="f.conf")
    with pytest.raises(ConfigError, match=r"^f.conf line 3: execute qw: unix_socket_path: "):
        settings.expand({})
