"""parse_config, find_execute and execute_settings (PROTOCOL.md 9.1, 9.2, CV-31)."""

from __future__ import annotations

import re

import pytest

from execproto import (
    ConfigError,
    ConfigSection,
    ExecuteSettings,
    ForkTarget,
    LocalProtocolError,
    ScriptCommand,
    ServiceSettings,
    TcpTarget,
    UnixTarget,
    convert_legacy_args,
    execute_settings,
    filter_kind,
    find_execute,
    find_service,
    legacy_executes,
    list_executes,
    parse_config,
    parse_script_command,
    sieve_programs,
)
from execproto._config import legacy_target

WELCOME = """\
# Dovecot 2.4 style
welcome {
  wait = yes
  execute welcome {          # the script service
    driver = unix
    args = welcome %{user}
  }
}

quota_warning warn-95 {
  execute quota-warning {
    execute_driver = tcp
    execute_tcp_host = "localhost"
    execute_tcp_port = 12345
    args = 95 %{user}
  }
}

service welcome {
  executable = script -e FOO,BAR /usr/local/bin/welcome.sh
  unix_listener welcome {
    mode = 0666
  }
}
"""


# --- parse_config -----------------------------------------------------------------------


def test_sections_and_settings() -> None:
    root = parse_config(WELCOME)
    assert (root.kind, root.name, root.line) == ("", "", 0)
    assert root.settings == []
    assert [(s.kind, s.name, s.line) for s in root.sections] == [
        ("welcome", "", 2),
        ("quota_warning", "warn-95", 10),
        ("service", "welcome", 19),
    ]
    welcome = root.sections[0]
    assert welcome.settings == [("wait", "yes", 3)]
    execute = welcome.sections[0]
    assert (execute.kind, execute.name, execute.line) == ("execute", "welcome", 4)
    assert execute.settings == [("driver", "unix", 5), ("args", "welcome %{user}", 6)]
    service = root.sections[2]
    assert service.get("executable") == "script -e FOO,BAR /usr/local/bin/welcome.sh"
    assert service.sections[0].settings == [("mode", "0666", 22)]


def test_walk_is_depth_first_in_text_order() -> None:
    root = parse_config(WELCOME)
    assert [(s.kind, s.name) for s in root.walk()] == [
        ("", ""),
        ("welcome", ""),
        ("execute", "welcome"),
        ("quota_warning", "warn-95"),
        ("execute", "quota-warning"),
        ("service", "welcome"),
        ("unix_listener", "welcome"),
    ]


def test_get_returns_the_last_value() -> None:
    root = parse_config("a = 1\nb = 2\na = 3\n")
    assert root.get("a") == "3"
    assert root.get("b") == "2"
    assert root.get("c") is None
    assert root.get("c", "dflt") == "dflt"
    assert root.settings == [("a", "1", 1), ("b", "2", 2), ("a", "3", 3)]


def test_get_ignores_nested_sections() -> None:
    root = parse_config("s {\n  a = 1\n}\n")
    assert root.get("a") is None


@pytest.mark.parametrize(
    ("line", "setting"),
    [
        ("key = value", ("key", "value")),
        ("key=value", ("key", "value")),
        ("  key   =   value with  spaces  ", ("key", "value with  spaces")),
        ("key =", ("key", "")),
        ("key = a = b", ("key", "a = b")),
        ('key = "quoted # not a comment"', ("key", "quoted # not a comment")),
        ("key = 'single'", ("key", "single")),
        ('key = "esc \\" quote"', ("key", 'esc " quote')),
        ('key = "back\\\\slash"', ("key", "back\\slash")),
        ('key = ""', ("key", "")),
        ("key = value # comment", ("key", "value")),
        ("key = value#comment", ("key", "value")),
        ("key = \"a\" # \"b", ("key", "a")),
        ("key\t=\tvalue", ("key", "value")),
        ("key = %{user | default('x')}", ("key", "%{user | default('x')}")),
        ("key = a\"b", ("key", 'a"b')),
    ],
)
def test_setting_lines(line: str, setting: tuple[str, str]) -> None:
    assert parse_config(line).settings == [(*setting, 1)]


def test_comments_and_blank_lines() -> None:
    text = "# comment\n\n   # indented comment\n\t\na = 1 # trailing\n#b = 2\n"
    assert parse_config(text).settings == [("a", "1", 5)]


def test_crlf_line_ends() -> None:
    assert parse_config("a = 1\r\ns {\r\n  b = 2\r\n}\r\n").sections[0].settings == [("b", "2", 3)]


def test_section_forms() -> None:
    root = parse_config('plain {\n}\nnamed n {\n}\nquoted "q" {\n}\nspaced   x   {\n}\n'
                        'mailbox "Sent Messages" {\n}\nq "a\\\\b\\x" {\n}\nsp\t"t"{\n}\n')
    assert [(s.kind, s.name) for s in root.sections] == [
        ("plain", ""),
        ("named", "n"),
        ("quoted", "q"),
        ("spaced", "x"),
        ("mailbox", "Sent Messages"),
        ("q", "a\\bx"),  # str_unescape(): a backslash keeps the next character
        ("sp", "t"),
    ]


def test_closing_brace_with_comment() -> None:
    root = parse_config("s {\n} # done\nt {\n  }\n")
    assert [s.kind for s in root.sections] == ["s", "t"]


def test_continuation() -> None:
    root = parse_config("a = one \\\n  two\nb = 3\n")
    assert root.settings[0][0] == "a"
    assert root.settings[0][1].split() == ["one", "two"]
    assert root.settings[0][2] == 2  # Dovecot's line: where the joined line ends
    assert root.settings[1] == ("b", "3", 3)


def test_continuation_error_reports_the_last_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("a = 1\nbad \\\nline\n")
    assert info.value.line == 3
    assert info.value.reason == "Expecting '{'"


def test_blank_line_drops_a_continuation() -> None:
    # The blank line ends the continuation and drops it: " b" stands alone.
    with pytest.raises(ConfigError) as info:
        parse_config("a = x \\\n\n b\n")
    assert (info.value.line, info.value.reason) == (3, "Expecting '{'")
    # A continuation on the last line is dropped silently.
    assert parse_config("a = 1\nb = 2 \\").settings == [("a", "1", 1)]


def test_continuation_joins_with_a_space() -> None:
    # config-parser.c strips the line, drops the backslash and appends ' '.
    assert parse_config("args = one\\\ntwo\n").settings == [("args", "one two", 2)]


def test_continuation_after_trailing_blanks_or_comment() -> None:
    assert parse_config("args = a \\  \nb\n").get("args") == "a b"
    assert parse_config("args = a \\ # note\nb\n").get("args") == "a b"


# --- includes -------------------------------------------------------------------------------


def test_include_via_callback() -> None:
    files = {
        "/etc/dovecot/conf.d/10-execute.conf": "execute inc {\n  driver = fork\n}\nx = 1\n",
        "/etc/dovecot/empty.conf": "",
    }
    seen: list[str] = []

    def load(path: str) -> str:
        seen.append(path)
        return files[path]

    root = parse_config(
        "a = 0\n"
        "welcome {\n"
        "  !include /etc/dovecot/conf.d/10-execute.conf\n"
        "  !include_try /etc/dovecot/empty.conf\n"
        "}\n",
        include=load,
    )
    assert seen == ["/etc/dovecot/conf.d/10-execute.conf", "/etc/dovecot/empty.conf"]
    welcome = root.sections[0]
    assert welcome.settings == [("x", "1", 4)]  # line numbers are the included file's
    assert [(s.kind, s.name) for s in welcome.sections] == [("execute", "inc")]
    assert find_execute(welcome) == ExecuteSettings(
        "inc", driver="fork", line=1, file="/etc/dovecot/conf.d/10-execute.conf")


def test_include_without_callback() -> None:
    for keyword in ("!include", "!include_try"):
        with pytest.raises(ConfigError) as info:
            parse_config(f"a = 1\n{keyword} /etc/x.conf\n")
        assert info.value.line == 2
        assert info.value.message == (
            f"line 2: {keyword} /etc/x.conf: includes are not followed here"
        )


def test_include_errors_propagate() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("!include x\n", include=lambda path: "a = 1\n}\n", name="main.conf")
    assert (info.value.file, info.value.line) == ("x", 2)  # the included file's own line
    assert info.value.message == "x line 2: Unexpected '}'"


def test_include_recursion_is_bounded() -> None:
    calls: list[str] = []

    def load(path: str) -> str:
        calls.append(path)
        return "!include self\n"

    with pytest.raises(ConfigError) as info:
        parse_config("!include self\n", include=load, name="main")
    assert info.value.message == "self line 1: Recursive include file: self"
    assert len(calls) == 2
    # Names that never repeat are bounded too.
    with pytest.raises(ConfigError, match="!include nested too deeply"):
        parse_config("!include 0\n", include=lambda p: f"!include {int(p) + 1}\n")


def test_unknown_directive() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("\n!includes x\n", include=lambda path: "")
    assert info.value.line == 2
    assert info.value.reason == "Expecting '{'"


# --- syntax errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        # Dovecot's messages and lines (doveconf 2.3.19 and 2.4 agree).
        ("a = 1\n}\n", 2, "Unexpected '}'"),
        ("{\n}\n", 1, "Expecting '{'"),
        ("a b c {\n}\n", 1, "Expecting '{'"),
        ("a = b {\n}\n", 2, "Unexpected '}'"),  # a value "b {", then a stray '}'
        ("ok = 1\njust words\n", 2, "Expecting '{'"),
        ("= value\n", 1, "Missing setting name before '='"),
        ("two words = value\n", 1, "Expecting '{'"),
        ("s {\n  key\n}\n", 2, "Expecting '{'"),
        ("s{\n}\n", 1, "Expecting '{'"),
        ("s x{\n}\n", 1, "Expecting '{'"),
        ("s x {y\n}\n", 1, "Garbage after '{'"),
        ('s "x {\n}\n', 1, "Expecting '{'"),
        ('s "a\\"b" {\n}\n', 1, "Expecting '{'"),
        ("} }\n", 1, "Expecting '{'"),
        ("a = 1\ns x {\n  t {\n  }\n", 2, "Missing '}' (section started at <text>:2)"),
        ("s {\n", 1, "Missing '}' (section started at <text>:1)"),
        ("a = 1\n\n\n!other\n", 4, "Expecting '{'"),
        ("group @g\n", 1, "Expecting group name"),
        ("group @g n\n", 1, "Expecting '{'"),
    ],
)
def test_syntax_errors(text: str, line: int | None, message: str | None) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    if line is None:
        return
    assert info.value.line == line
    assert info.value.reason == message
    assert str(info.value) == f"line {line}: {message}"


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ('a = "open', '"open'),  # an unbalanced quote is kept as written
        ("a = 'open", "'open"),
        ('a = "', ""),  # one quote is both the opening and the closing one
        ("a = \"v'", "\"v'"),
        ("a = don't # x", "don't # x"),  # the quote hides the '#'
        ('a = "x" # "y', "x"),
    ],
)
def test_quote_quirks(line: str, value: str) -> None:
    assert parse_config(line).get("a") == value


def test_errors_name_the_file() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("a = 1\n}\n", name="/etc/dovecot/dovecot.conf")
    assert info.value.message == "/etc/dovecot/dovecot.conf line 2: Unexpected '}'"
    assert (info.value.file, info.value.line, info.value.reason) == (
        "/etc/dovecot/dovecot.conf", 2, "Unexpected '}'")


def test_config_error_is_a_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError):
        parse_config("}")
    assert ConfigError("x").line is None
    assert str(ConfigError("x")) == "x"
    assert str(ConfigError("x", 3)) == "line 3: x"


def test_empty_text() -> None:
    assert parse_config("") == ConfigSection("", "", 0)


# --- find_execute (9.2: only one execute block) -------------------------------------------------


def test_find_execute_one() -> None:
    root = parse_config(WELCOME)
    settings = find_execute(root.sections[0])
    assert settings == ExecuteSettings("welcome", driver="unix", args="welcome %{user}", line=4)
    assert settings.target() == UnixTarget("/run/dovecot/welcome")


def test_find_execute_prefixed_keys() -> None:
    root = parse_config(WELCOME)
    settings = find_execute(root.sections[1])
    assert settings == ExecuteSettings(
        "quota-warning",
        driver="tcp",
        args="95 %{user}",
        tcp_host="localhost",
        tcp_port=12345,
        line=11,
    )
    assert settings.target() == TcpTarget("localhost", 12345)


def test_find_execute_none() -> None:
    root = parse_config(WELCOME)
    with pytest.raises(ConfigError) as info:
        find_execute(root.sections[2])
    assert info.value.message == "line 19: execute { .. } named list filter is missing"
    # The root section has no line.
    with pytest.raises(ConfigError) as info:
        find_execute(parse_config("a = 1\n"))
    assert info.value.message == "execute { .. } named list filter is missing"
    assert info.value.line is None


def test_find_execute_ignores_deeper_blocks() -> None:
    # Only blocks directly inside the consumer's section count.
    root = parse_config(WELCOME)
    with pytest.raises(ConfigError, match="named list filter is missing"):
        find_execute(root)


def test_cv31_two_execute_blocks() -> None:
    root = parse_config("welcome {\n  execute A {\n  }\n  execute B {\n  }\n}\n")
    with pytest.raises(ConfigError) as info:
        find_execute(root.sections[0])
    assert info.value.line == 4
    assert info.value.message == (
        "line 4: Extra execute B { .. } named list filter - only one execution is allowed "
        "for now (previous: execute A { .. })"
    )


def test_find_execute_by_name() -> None:
    root = parse_config(WELCOME)
    assert find_execute(root, "quota-warning").name == "quota-warning"
    assert find_execute(root, "welcome").name == "welcome"  # not the service welcome
    with pytest.raises(ConfigError, match=r"^no execute nosuch \{ \.\. \} block found$"):
        find_execute(root, "nosuch")
    # Selecting by name also settles two blocks in one section.
    two = parse_config("w {\n  execute A {\n  }\n  execute B {\n    driver = fork\n  }\n}\n")
    assert find_execute(two, "B") == ExecuteSettings("B", driver="fork", line=4)


def test_find_execute_by_name_matches_the_section_itself() -> None:
    root = parse_config("execute x {\n}\n")
    assert find_execute(root.sections[0], "x") == ExecuteSettings("x", line=1)


# --- execute_settings ---------------------------------------------------------------------------


def test_execute_settings_all_keys() -> None:
    section = parse_config(
        "execute n {\n"
        "  driver = fork\n"
        "  args = a b\n"
        "  fork_path = /bin/f\n"
        "  execute_unix_socket_path = /u\n"
        "  tcp_host = h\n"
        "  execute_tcp_port = 7\n"
        "}\n"
    ).sections[0]
    assert execute_settings(section) == ExecuteSettings(
        "n",
        driver="fork",
        args="a b",
        fork_path="/bin/f",
        unix_socket_path="/u",
        tcp_host="h",
        tcp_port=7,
        line=1,
    )


def test_execute_settings_last_value_wins() -> None:
    section = parse_config("execute n {\n  args = 1\n  execute_args = 2\n}\n").sections[0]
    assert execute_settings(section).args == "2"


def test_execute_settings_empty_port_is_zero() -> None:
    section = parse_config("execute n {\n  tcp_port =\n}\n").sections[0]
    assert execute_settings(section).tcp_port == 0


def test_execute_settings_unknown_key() -> None:
    section = parse_config("execute n {\n  driver = unix\n  execute_nope = 1\n}\n").sections[0]
    with pytest.raises(ConfigError) as info:
        execute_settings(section)
    assert info.value.line == 3
    assert info.value.message == "line 3: execute n: unknown setting 'execute_nope'"
    section = parse_config("execute n {\n  name = x\n}\n").sections[0]
    with pytest.raises(ConfigError, match="unknown setting 'name'"):
        execute_settings(section)


@pytest.mark.parametrize("port", ["x", "-1", "+1", "1.0", "123456", "\u0661", "0x10", " 1"])
def test_execute_settings_bad_port(port: str) -> None:
    section = ConfigSection("execute", "n", 5, settings=[("tcp_port", port, 6)])
    with pytest.raises(ConfigError) as info:
        execute_settings(section)
    assert info.value.line == 5
    assert info.value.message == f"line 5: execute n: invalid tcp_port {port!r}"


def test_execute_settings_port_out_of_range() -> None:
    section = parse_config("execute n {\n  tcp_port = 65536\n}\n").sections[0]
    with pytest.raises(ConfigError, match="invalid tcp_port 65536"):
        execute_settings(section)


def test_execute_settings_bad_driver() -> None:
    section = parse_config("\nexecute n {\n  driver = pipe\n}\n").sections[0]
    with pytest.raises(ConfigError) as info:
        execute_settings(section)
    assert info.value.line == 2
    assert "invalid driver 'pipe'" in info.value.message


def test_execute_settings_nested_section() -> None:
    section = parse_config("execute n {\n  inner {\n  }\n}\n").sections[0]
    with pytest.raises(ConfigError) as info:
        execute_settings(section)
    assert info.value.line == 2
    assert "unexpected nested section" in info.value.message


# --- parse_script_command (7.1) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("words", "command"),
    [
        (["/x.sh"], ScriptCommand((), False, "/x.sh", ())),
        (
            ["-e", "FOO,BAR", "/x.sh", "one"],
            ScriptCommand(("FOO", "BAR"), False, "/x.sh", ("one",)),
        ),
        (["-eFOO", "-e", "BAR BAZ", "s"], ScriptCommand(("FOO", "BAR", "BAZ"), False, "s", ())),
        (["-e", ",\t,", "s"], ScriptCommand((), False, "s", ())),
        (["-p", "/x.py", "passthru"], ScriptCommand((), True, "/x.py", ("passthru",))),
        (["-p", "-e", "A", "s"], ScriptCommand(("A",), True, "s", ())),
        # Options stop at the first non-option: later ones belong to the script.
        (["s", "-p", "-e", "X"], ScriptCommand((), False, "s", ("-p", "-e", "X"))),
        (["--", "-s"], ScriptCommand((), False, "-s", ())),
        (["-", "a"], ScriptCommand((), False, "-", ("a",))),
    ],
)
def test_parse_script_command(words: list[str], command: ScriptCommand) -> None:
    assert parse_script_command(words) == command


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ([], "Missing script path"),
        (["-p"], "Missing script path"),
        (["-e", "A"], "Missing script path"),
        (["--"], "Missing script path"),
        (["-e"], "option -e needs a value"),
        (["-x", "s"], "unknown script option '-x'"),
        (["--long", "s"], "unknown script option '--long'"),
    ],
)
def test_parse_script_command_errors(words: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_script_command(words)
    assert info.value.message == message


# --- find_service (9.6) ------------------------------------------------------------------------

SERVICES = """\
base_dir = /var/run/dovecot
service test-script-service {
  executable = script -e FOO,BAR /usr/local/bin/test-script.sh one
  user = vmail
  unix_listener test-script {
    mode = 0666
  }
  unix_listener other {
    path = /abs/sock
  }
  inet_listener script {
    port = 12345
  }
  inet_listener local {
    port = 2
    address = 127.0.0.1, ::1,
  }
}
service doc {
  execute = /usr/libexec/dovecot/script -p /x.py
}
service welcome {
  executable = /usr/bin/python3 x.py
}
service empty {
  user = nobody
}
"""


def test_find_service() -> None:
    root = parse_config(SERVICES)
    service = find_service(root, "test-script-service")
    assert service == ServiceSettings(
        name="test-script-service",
        command=ScriptCommand(("FOO", "BAR"), False, "/usr/local/bin/test-script.sh", ("one",)),
        unix_listeners=(("/var/run/dovecot/test-script", 0o666), ("/abs/sock", 0o600)),
        inet_listeners=(("*", 12345), ("::", 12345), ("127.0.0.1", 2), ("::1", 2)),
        line=2,
    )


def test_find_service_execute_spelling_and_base_dir() -> None:
    root = parse_config(SERVICES)
    assert find_service(root, "doc").command == ScriptCommand((), True, "/x.py", ())
    service = find_service(root, "test-script-service", base_dir="/b")
    assert service.unix_listeners[0] == ("/b/test-script", 0o666)
    plain = parse_config("service s {\n  executable = script /x\n  unix_listener l {\n  }\n}\n")
    assert find_service(plain, "s").unix_listeners == (("/run/dovecot/l", 0o600),)


def test_find_service_ignores_other_listeners() -> None:
    root = parse_config(
        "service s {\n  executable = script /x\n  fifo_listener f {\n    mode = 0600\n  }\n}\n"
    )
    service = find_service(root, "s")
    assert (service.unix_listeners, service.inet_listeners) == ((), ())


def test_find_service_listen_setting() -> None:
    root = parse_config(
        "listen = 10.0.0.1\nservice s {\n  executable = script /x\n"
        "  inet_listener i {\n    port = 9\n  }\n}\n"
    )
    assert find_service(root, "s").inet_listeners == (("10.0.0.1", 9),)


#: A service "s" with one listener block, whose opening line(s) fill the %s.
LISTENER = "service s {\n  executable = script /x\n  %s\n  }\n}\n"


@pytest.mark.parametrize(
    ("text", "name", "message"),
    [
        (SERVICES, "nosuch",
         "no service nosuch { .. } block found (script services here: doc, test-script-service)"),
        (SERVICES, "empty", "line 25: service empty: no 'executable = script ...' setting"),
        (
            SERVICES,
            "welcome",
            "line 23: service welcome: executable is '/usr/bin/python3', not the script binary",
        ),
        (
            "service s {\n  executable = script -x /s\n}\n",
            "s",
            "line 2: service s: unknown script option '-x'",
        ),
        (
            "service s {\n  executable = script\n}\n",
            "s",
            "line 2: service s: Missing script path",
        ),
        (
            "service s {\n  executable = script /x\n  unix_listener {\n  }\n}\n",
            "s",
            "line 3: unix_listener without a path",
        ),
        (LISTENER % "unix_listener l {\n    mode = 0999", "s",
         "line 3: invalid unix_listener mode '0999'"),
        (LISTENER % "unix_listener l {\n    mode = 07777", "s",
         "line 3: invalid unix_listener mode '07777'"),
        (LISTENER % "inet_listener i {", "s", "line 3: invalid inet_listener port ''"),
        (LISTENER % "inet_listener i {\n    port = 0", "s",
         "line 3: invalid inet_listener port '0'"),
        (LISTENER % "inet_listener i {\n    port = 65536", "s",
         "line 3: invalid inet_listener port '65536'"),
    ],
)
def test_find_service_errors(text: str, name: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        find_service(parse_config(text), name)
    assert info.value.message == message


def test_find_service_blank_executable() -> None:
    root = parse_config('service s {\n  executable = " "\n}\n')
    with pytest.raises(ConfigError):
        find_service(root, "s")


def test_find_service_non_ascii_port() -> None:
    root = parse_config(
        "service s {\n  executable = script /x\n  inet_listener i {\n    port = \u00b2\n  }\n}\n"
    )
    with pytest.raises(ConfigError):
        find_service(root, "s")


# --- the loader: includes with file names, <file values -------------------------------------


class DictLoader:
    """Files by name; patterns are names, a name ending in ``*`` matches by prefix."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        self.reads: list[tuple[str, str]] = []

    def include(self, pattern: str, parent: str, optional: bool) -> list[tuple[str, str]]:
        if pattern.endswith("*"):
            names = sorted(n for n in self.files if n.startswith(pattern[:-1]))
        else:
            names = [pattern] if pattern in self.files else []
        if not names and not optional:
            raise ConfigError("No matches")
        return [(n, self.files[n]) for n in names]

    def read(self, path: str, parent: str) -> str:
        self.reads.append((path, parent))
        if path not in self.files:
            raise ConfigError(f"Can't open file {path}: No such file or directory")
        return self.files[path]


def test_loader_names_files_in_errors() -> None:
    loader = DictLoader({"conf.d/10-a.conf": "a = 1\n", "conf.d/15-mailboxes.conf":
                         'namespace inbox {\n  mailbox "Sent Messages" {\n  }\n  oops\n}\n'})
    with pytest.raises(ConfigError) as info:
        parse_config("x = 1\n!include conf.d/*\n", loader=loader, name="dovecot.conf")
    assert info.value.message == "conf.d/15-mailboxes.conf line 4: Expecting '{'"
    assert (info.value.file, info.value.line, info.value.reason) == (
        "conf.d/15-mailboxes.conf", 4, "Expecting '{'")


def test_loader_errors_are_at_the_directive() -> None:
    loader = DictLoader({})
    with pytest.raises(ConfigError) as info:
        parse_config("\n!include nosuch.conf\n", loader=loader, name="main.conf")
    assert info.value.message == "main.conf line 2: No matches"
    root = parse_config("!include_try nosuch.conf\na = 1\n", loader=loader, name="main.conf")
    assert root.settings == [("a", "1", 2)]


def test_included_sections_know_their_file() -> None:
    loader = DictLoader({"svc.conf": "service s {\n  executable = script /x\n}\n"})
    root = parse_config("a = 1\n!include svc.conf\n", loader=loader, name="main.conf")
    (service,) = root.sections
    assert (service.file, service.line) == ("svc.conf", 1)
    assert service.where("executable") == ("svc.conf", 2)
    assert find_service(root, "s").file == "svc.conf"


def test_file_values_are_read_when_used() -> None:
    loader = DictLoader({"cmd.txt": "script /from/file.sh\n"})
    root = parse_config("ssl_key = </nosuch.key\nservice s {\n  executable = <cmd.txt\n}\n",
                        loader=loader, name="/etc/dovecot/dovecot.conf")
    assert loader.reads == []  # nothing read while parsing
    assert find_service(root, "s").command.script == "/from/file.sh"
    assert loader.reads == [("cmd.txt", "/etc/dovecot/dovecot.conf")]
    with pytest.raises(ConfigError) as info:
        root.get("ssl_key")
    assert info.value.message == (
        "/etc/dovecot/dovecot.conf line 1: Can't open file /nosuch.key: "
        "No such file or directory")
    assert root.settings[0] == ("ssl_key", "/nosuch.key", 1)


def test_file_values_without_a_loader() -> None:
    root = parse_config("a = <x.txt\n")
    with pytest.raises(ConfigError, match="values read from files are not followed here"):
        root.get("a")


def test_continuation_spans_an_include_end() -> None:
    # config-parser.c keeps the gathered text across the end of a file.
    loader = DictLoader({"a.conf": "a = one \\"})
    root = parse_config("!include a.conf\n  two\n", loader=loader)
    assert root.settings == [("a", "one two", 2)]


def test_nul_ends_a_line() -> None:
    assert parse_config("a = 1\0 ignored\nb = 2\n").settings == [("a", "1", 1), ("b", "2", 2)]


def test_many_lines_are_linear() -> None:
    # A large tree parses in one pass (no quadratic joins or rescans).
    text = "service s {\n" + "  a = b \\\n" * 20000 + "  c\n}\n"
    root = parse_config(text)
    assert root.sections[0].settings[0][1].count("b") == 20000


# --- 2.4 named filters, choosing among execute blocks --------------------------------------

QUOTA_24 = """\
quota "User quota" {
  warning warn-95 {
    quota_storage_percentage = 95
    execute quota-warning {
      args = 95 %{user}
    }
  }
  warning warn-80 {
    execute quota-warning {
      args = 80 %{user}
    }
  }
}
quota_warning other {
  execute quota-warning {
    args = other
  }
}
"""


def test_filter_kind_normalises_warning() -> None:
    root = parse_config(QUOTA_24)
    kinds = [(filter_kind(s), s.name) for s in root.walk() if s.kind in ("warning",
                                                                          "quota_warning")]
    assert kinds == [("quota_warning", "warn-95"), ("quota_warning", "warn-80"),
                     ("quota_warning", "other")]


def test_find_execute_ambiguous_lists_the_blocks() -> None:
    root = parse_config(QUOTA_24, name="90-quota.conf")
    with pytest.raises(ConfigError) as info:
        find_execute(root, "quota-warning")
    assert info.value.message == (
        "3 execute quota-warning { .. } blocks, choose one by its filters: "
        'quota "User quota" / quota_warning warn-95 / execute quota-warning '
        "(90-quota.conf line 4); "
        'quota "User quota" / quota_warning warn-80 / execute quota-warning '
        "(90-quota.conf line 9); "
        "quota_warning other / execute quota-warning (90-quota.conf line 15)")


@pytest.mark.parametrize(
    ("filters", "args"),
    [
        (["warn-95"], "95 %{user}"),
        (["quota_warning warn-80"], "80 %{user}"),
        (["warning warn-80"], "80 %{user}"),  # the short form as written
        (["User quota", "warn-80"], "80 %{user}"),
        (['quota "User quota"', "warn-95"], "95 %{user}"),
        (["other"], "other"),
    ],
)
def test_find_execute_filters(filters: list[str], args: str) -> None:
    root = parse_config(QUOTA_24)
    assert find_execute(root, "quota-warning", filters=filters).args == args


def test_find_execute_filters_match_in_order() -> None:
    root = parse_config(QUOTA_24)
    with pytest.raises(ConfigError, match=r"no execute quota-warning .* within warn-95 / quota"):
        find_execute(root, "quota-warning", filters=["warn-95", "quota"])
    with pytest.raises(ConfigError, match="3 execute quota-warning"):
        find_execute(root, "quota-warning", filters=["quota_warning"])


def test_list_executes() -> None:
    root = parse_config(QUOTA_24 + "welcome {\n  execute w {\n    driver = pipe\n  }\n}\n")
    found = list_executes(root)
    assert [where.split(" (")[0] for where, _ in found] == [
        'quota "User quota" / quota_warning warn-95 / execute quota-warning',
        'quota "User quota" / quota_warning warn-80 / execute quota-warning',
        "quota_warning other / execute quota-warning",
        "welcome / execute w",
    ]
    assert isinstance(found[3][1], ConfigError)


# --- Dovecot 2.3 forms --------------------------------------------------------------------------

PLUGIN_23 = """\
plugin {
  quota_warning = storage=95%% quota-warning 95 %u
  quota_warning2 = storage=80%% quota-warning 80 %n %d
  quota_warning3 = -storage=100%% unix:/run/qw.sock below %Lu
  welcome_script = welcome %u
  quota_warning4 = messages=10%% exec:/bin/qw x
  quota_warning5 = messages=1%% tcp:[::1]:4000 y
}
plugin {
  quota_warning4 = messages=20%% exec:/bin/qw later
}
"""


def test_legacy_executes() -> None:
    found = legacy_executes(parse_config(PLUGIN_23, name="90-quota.conf"))
    assert [(where, s.name, s.driver, s.args) for where, s in found] == [
        ("plugin / quota_warning (90-quota.conf line 2)", "quota-warning", "unix",
         "95 %{user}"),
        ("plugin / quota_warning2 (90-quota.conf line 3)", "quota-warning", "unix",
         "80 %{user | username} %{user | domain}"),
        ("plugin / quota_warning3 (90-quota.conf line 4)", "unix:/run/qw.sock", "unix",
         "below %{user | lower}"),
        ("plugin / welcome_script (90-quota.conf line 5)", "welcome", "unix", "%{user}"),
        ("plugin / quota_warning5 (90-quota.conf line 7)", "tcp:[::1]:4000", "tcp", "y"),
        # The later plugin block's value wins.
        ("plugin / quota_warning4 (90-quota.conf line 10)", "exec:/bin/qw", "fork", "later"),
    ]
    first = found[0][1]
    assert first.target(base_dir="/run/dovecot") == UnixTarget("/run/dovecot/quota-warning")
    assert first.expand_args({"user": "frank@example.org"}) == ("95", "frank@example.org")
    assert found[4][1].target() == TcpTarget("::1", 4000)


def test_legacy_target_paths_take_variables() -> None:
    # 2.3 expands the whole quota_warning string: %u in the socket path too.
    settings = legacy_target("unix:/run/qw/%n.sock", "unix:/run/qw/%n.sock", 1, None, "%u")
    assert settings.unix_socket_path == "/run/qw/%{user | username}.sock"
    assert settings.expand({"user": "frank@x"}).target() == UnixTarget("/run/qw/frank.sock")
    fork = legacy_target("exec:/bin/%u", "exec:/bin/%u", 1, None, "")
    assert fork.expand({"user": "u"}).fork_path == "/bin/u"


def test_find_execute_reads_2_3_settings() -> None:
    root = parse_config(PLUGIN_23)
    with pytest.raises(ConfigError, match=r"2 execute quota-warning .* plugin / quota_warning "):
        find_execute(root, "quota-warning")
    chosen = find_execute(root, "quota-warning", filters=["quota_warning2"])
    assert chosen.expand_args({"user": "frank@example.org"}) == ("80", "frank", "example.org")
    assert find_execute(root, "welcome").args == "%{user}"


@pytest.mark.parametrize(
    ("text", "converted"),
    [
        ("95 %u", "95 %{user}"),
        ("%n@%d", "%{user | username}@%{user | domain}"),
        ("100%% %Uu", "100% %{user | upper}"),
        ("%{user} %{home}", "%{user} %{home}"),
        ("a%%{b", "a%%{b"),  # a literal %{ stays literal in the 2.4 syntax
        ("plain", "plain"),
    ],
)
def test_convert_legacy_args(text: str, converted: str) -> None:
    assert convert_legacy_args(text) == converted


@pytest.mark.parametrize("text", ["%q", "100%", "%{user"])
def test_convert_legacy_args_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        convert_legacy_args(text)


# --- services -----------------------------------------------------------------------------------


def test_services_of_one_name_merge() -> None:
    root = parse_config(
        "service s {\n  executable = script /first\n  unix_listener a {\n  }\n}\n"
        "service s {\n  executable = script -p /second\n  unix_listener a {\n"
        "    mode = 0666\n  }\n  unix_listener b {\n  }\n}\n")
    service = find_service(root, "s")
    assert service.command == ScriptCommand((), True, "/second", ())
    assert service.unix_listeners == (("/run/dovecot/a", 0o666), ("/run/dovecot/b", 0o600))
    assert service.line == 1


def test_listener_listen_2_4() -> None:
    root = parse_config(
        "listen = 10.0.0.1\nservice s {\n  executable = script /x\n"
        "  inet_listener a {\n    port = 1\n    listen = 127.0.0.1 ::1\n  }\n"
        "  inet_listener b {\n    inet_listener_port = 2\n  }\n"
        "  unix_listener u {\n    unix_listener_mode = 0666\n  }\n}\n"
        "service t {\n  executable = script /t\n  listen = 127.0.0.2\n"
        "  inet_listener c {\n    port = 3\n  }\n}\n")
    assert find_service(root, "s").inet_listeners == (
        ("127.0.0.1", 1), ("::1", 1), ("10.0.0.1", 2))
    assert find_service(root, "s").unix_listeners == (("/run/dovecot/u", 0o666),)
    assert find_service(root, "t").inet_listeners == (("127.0.0.2", 3),)


def test_ambiguity_lists_at_most_twenty() -> None:
    text = "".join(f"w{i} {{\n  execute x {{\n  }}\n}}\n" for i in range(25))
    with pytest.raises(ConfigError) as info:
        find_execute(parse_config(text), "x")
    assert info.value.message.startswith("25 execute x { .. } blocks, choose one by its filters")
    assert info.value.message.endswith("w19 / execute x (line 78); and 5 more")


def test_deep_nesting_with_execute_blocks_is_not_quadratic() -> None:
    depth = 3000
    text = "execute x {\n" * depth + "}\n" * depth
    root = parse_config(text)
    assert len(root.walk()) == depth + 1
    with pytest.raises(ConfigError) as info:
        find_execute(root, "x")
    assert info.value.message.startswith("3000 execute x { .. } blocks")
    assert info.value.message.endswith("; and 2980 more")
    assert ".../ execute x / execute x / execute x / execute x / execute x / execute x / " \
        "execute x / execute x (line 20)" in info.value.message
    assert len(info.value.message) < 5000


# --- Pigeonhole extprograms ---------------------------------------------------------------------


def test_sieve_programs_2_3_and_2_4() -> None:
    old = parse_config("plugin {\n  sieve_pipe_socket_dir = sieve-pipe\n"
                       "  sieve_pipe_bin_dir = /usr/lib/dovecot/sieve-pipe\n}\n")
    new = parse_config("sieve_pipe_socket_dir = sieve-pipe\n"
                       "sieve_pipe_bin_dir = /usr/lib/dovecot/sieve-pipe\n")
    for root in (old, new):
        socket, binary = sieve_programs(root, "pipe", "do-something")
        assert socket.target(base_dir="/run/dovecot") == UnixTarget(
            "/run/dovecot/sieve-pipe/do-something")
        assert binary.target() == ForkTarget("/usr/lib/dovecot/sieve-pipe/do-something")


def test_sieve_programs_absolute_socket_dir_is_under_base_dir() -> None:
    root = parse_config("sieve_execute_socket_dir = /abs\n")
    (socket,) = sieve_programs(root, "execute", "p")
    assert socket.target(base_dir="/run/dovecot") == UnixTarget("/run/dovecot/abs/p")


@pytest.mark.parametrize(
    ("extension", "program", "message"),
    [
        ("pipe", "p", "vnd.dovecot.pipe extension is unconfigured"),
        ("fork", "p", "unknown sieve extension 'fork'"),
        ("pipe", "../p", "invalid sieve program name '../p'"),
        ("pipe", "", "invalid sieve program name ''"),
    ],
)
def test_sieve_programs_errors(extension: str, program: str, message: str) -> None:
    root = parse_config("sieve_filter_bin_dir = /x\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        sieve_programs(root, extension, program)


def test_missing_service_lists_script_services() -> None:
    root = parse_config("service a {\n  executable = /usr/libexec/dovecot/script /a\n}\n"
                        "service imap {\n  executable = imap\n}\nservice b {\n"
                        "  executable = script /b\n}\n")
    with pytest.raises(ConfigError) as info:
        find_service(root, "quota-warning")
    assert info.value.message == (
        "no service quota-warning { .. } block found (script services here: a, b)")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('a = "x\\\\y \\"q\\""', 'x\\y "q"'),
        ("a = 'plain'", "plain"),
        ('s "a\\\\b" {\n}\n', None),
    ],
)
def test_strict_escapes_accept(text: str, value: str | None) -> None:
    root = parse_config(text, strict_escapes=True)
    if value is not None:
        assert root.get("a") == value
    else:
        assert root.sections[0].name == "a\\b"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("x = 1\na = 'it\\'s'\n", "Unknown escape sequence \\'"),
        ('a = "tab\\t"\n', "Unknown escape sequence \\t"),
        ('"k\\ey" = v\n', "Unknown escape sequence \\e"),
        ('s "a\\b" {\n}\n', "Unknown escape sequence \\b"),
    ],
)
def test_strict_escapes_reject(text: str, reason: str) -> None:
    # Dovecot 2.4.4 and later; 2.3 and 2.4.1 take the character as itself.
    parse_config(text)
    with pytest.raises(ConfigError) as info:
        parse_config(text, strict_escapes=True, name="f.conf")
    assert (info.value.file, info.value.reason) == ("f.conf", reason)
    assert info.value.line == text.count("\n", 0, text.index("\\")) + 1
