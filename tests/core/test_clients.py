"""What each Dovecot client sends (execproto._clients), per kind, without I/O."""

from __future__ import annotations

import pytest

from execproto import (
    CLIENT_KINDS,
    QUOTA_CONNECT_TIMEOUT,
    SIEVE_CONNECT_TIMEOUT,
    ClientCall,
    ClientConnection,
    ConfigError,
    Data,
    EndOfInput,
    ErrorKind,
    ExecuteSettings,
    ForkTarget,
    HeaderParser,
    LocalProtocolError,
    QuotaOverStatus,
    Request,
    SieveSettings,
    Status,
    TcpTarget,
    UnixTarget,
    Welcome,
    find_quota_over_status,
    find_welcome,
    parse_config,
    pick_quota_warning,
    quota_over_status_call,
    quota_warning_call,
    quota_warnings,
    sieve_call,
    sieve_extension_settings,
    sieve_programs,
    to_crlf,
    to_lf,
    welcome_call,
    with_alarm,
)

CONFIG_24 = """\
dovecot_config_version = 2.4.0
base_dir = /run/d
quota "User quota" {
  warning warn-95 {
    quota_storage_percentage = 95
    execute quota-warning {
      args = 95 %{user}
    }
  }
  warning warn-80 {
    quota_storage_percentage = 80
    execute quota-warning {
      unix_socket_path = /run/qw/%{user | username}.sock
      args = 80 %{user}
    }
  }
  warning back {
    threshold = under
    quota_message_percentage = 100
    execute quota-warning {
      args = below %{user}
    }
  }
  quota_over_status {
    quota_over_status_mask = TRUE
    execute over {
      args = mismatch %{user}
    }
  }
}
welcome {
  wait = yes
  execute welcome {
    driver = fork
    fork_path = /usr/local/bin/welcome.sh
    args = %{user | domain}
  }
}
sieve_pipe_socket_dir = sieve-pipe
sieve_pipe_exec_timeout = 2 mins
sieve_filter_bin_dir = /usr/lib/sieve
sieve_filter_input_eol = lf
"""

CONFIG_23 = """\
plugin {
  quota_warning = storage=95%% quota-warning 95 %u
  quota_warning2 = storage=80%% unix:/run/qw/%n.sock 80 %u
  quota_warning3 = -storage=100%% quota-warning below %u
  quota_warning5 = storage=1%% quota-warning not-read-after-a-gap
  quota_over_script = over mismatch %u
  quota_over_flag_value = TRUE
  welcome_script = welcome %u
  welcome_wait = yes
}
"""

USER = {"user": "frank@example.org"}


def wire(call: ClientCall) -> bytes:
    """What execproto's client puts on a unix socket for the call."""
    args, payload = call.for_client()
    conn = ClientConnection()
    sent = conn.send(Request(args=list(args), env=list(call.env), noreply=call.noreply))
    if payload is not None:
        sent += conn.send(Data(data=payload))
    return sent + conn.send(EndOfInput())


def test_kinds() -> None:
    assert CLIENT_KINDS == ("quota-warning", "quota-over-status", "welcome", "sieve-pipe",
                            "sieve-filter", "sieve-execute")


# --- quota warnings ---------------------------------------------------------------------


@pytest.mark.parametrize("text", [CONFIG_24, CONFIG_23])
def test_quota_warnings_listed(text: str) -> None:
    found = quota_warnings(parse_config(text, name="d.conf"))
    assert [(w.under, w.limits) for w in found] == [
        (False, ("storage 95%",)), (False, ("storage 80%",)),
        (True, ("message 100%",) if "2.4" in text else ("storage 100%",))]
    assert {w.dovecot for w in found} == {"2.4" if "2.4" in text else "2.3"}


@pytest.mark.parametrize(("text", "names"), [
    (CONFIG_24, ("warn-95", "warn-80", "back")),
    (CONFIG_23, ("quota_warning", "quota_warning2", "quota_warning3")),
])
def test_pick_quota_warning(text: str, names: tuple[str, ...]) -> None:
    root = parse_config(text, name="d.conf")
    for level, name in [(names[0], names[0]), ("80", names[1]), ("80%", names[1]),
                        ("below", names[2]), ("under", names[2])]:
        assert pick_quota_warning(root, level).name == name
    with pytest.raises(ConfigError) as info:
        pick_quota_warning(root)
    message = info.value.message
    assert message.startswith("several quota warnings, choose one with --level NAME")
    assert all(f"{name} (" in message for name in names)
    assert "d.conf line" in message
    with pytest.raises(ConfigError, match="no quota warning matches --level 42: "):
        pick_quota_warning(root, "42")


def test_pick_quota_warning_alone_and_none() -> None:
    root = parse_config("plugin {\n  quota_warning = storage=5%% qw 5 %u\n}\n")
    assert pick_quota_warning(root).name == "quota_warning"
    with pytest.raises(ConfigError, match="no quota warning found"):
        pick_quota_warning(parse_config("base_dir = /x\n"))


def test_pick_quota_warning_bad_execute() -> None:
    text = "quota_warning w {\n  execute a {\n  }\n  execute b {\n  }\n}\n"
    with pytest.raises(ConfigError, match="only one execution is allowed"):
        pick_quota_warning(parse_config(text))


@pytest.mark.parametrize("text", [CONFIG_24, CONFIG_23])
def test_quota_warning_call(text: str) -> None:
    root = parse_config(text)
    call = quota_warning_call(pick_quota_warning(root, "95"), USER, base_dir="/run/d")
    assert call.target == UnixTarget("/run/d/quota-warning")
    assert call.args == ("95", "frank@example.org")
    assert (call.env, call.input, call.noreply, call.read_output) == ((), None, True, False)
    assert (call.connect_timeout, call.timeout) == (QUOTA_CONNECT_TIMEOUT, None)
    # Measured from 2.3.19 (PROTOCOL.md 2.11).
    assert call.header() == b"VERSION\tscript\t4\t0\nnoreply\n95\nfrank@example.org\n\n"
    assert wire(call) == call.header()
    per_user = quota_warning_call(pick_quota_warning(root, "80"), USER, base_dir="/run/d")
    assert per_user.target == UnixTarget("/run/qw/frank.sock")


def test_quota_warning_call_plain_settings() -> None:
    call = quota_warning_call(ExecuteSettings("q", driver="tcp", tcp_host="h", tcp_port=4,
                                              args="%{user}"), {"user": "u"})
    assert (call.target, call.args, call.dovecot) == (TcpTarget("h", 4), ("u",), "")


def test_quota_warning_unknown_variable() -> None:
    root = parse_config(CONFIG_24)
    with pytest.raises(ConfigError, match="unknown variable 'user'"):
        quota_warning_call(pick_quota_warning(root, "95"), {})


@pytest.mark.parametrize("status", list(Status))
def test_quota_judge_ignores_the_script(status: Status) -> None:
    call = quota_warning_call(pick_quota_warning(parse_config(CONFIG_24), "95"), USER)
    verdict = call.judge(status, ErrorKind.IO if status is Status.INTERNAL_FAILURE
                         else ErrorKind.NONE, "refused" if status < 0 else "")
    if status is Status.INTERNAL_FAILURE:
        assert not verdict.ok
        assert verdict.message.startswith("the quota plugin logs an error (io: refused)")
    else:
        assert verdict.ok and verdict.status is Status.SUCCESS
        assert "never known" in verdict.message


def test_quota_judge_fork() -> None:
    call = quota_warning_call(ExecuteSettings("/bin/qw", driver="fork"), USER)
    verdict = call.judge(Status.FAILURE, detail="exit 3")
    assert verdict.ok
    assert verdict.message == ("the program ran (a failure: exit 3); the quota plugin ignores "
                               "its exit status")


# --- quota_over_status ---------------------------------------------------------------------


def test_quota_over_status_24_appends_even_empty() -> None:
    over = find_quota_over_status(parse_config(CONFIG_24))
    assert (over.mask, over.current, over.dovecot) == ("TRUE", None, "2.4")
    call = quota_over_status_call(over, USER, base_dir="/run/d")
    assert call.target == UnixTarget("/run/d/over")
    assert call.args == ("mismatch", "frank@example.org", "")
    # Q21: the empty last argument is an empty line that ends the header.
    assert call.header() == b"VERSION\tscript\t4\t0\nnoreply\nmismatch\nfrank@example.org\n\n\n"
    assert wire(call) == call.header()
    assert quota_over_status_call(over, USER, "TRUE").args[-1] == "TRUE"


def test_quota_over_status_23_appends_only_a_flag() -> None:
    over = find_quota_over_status(parse_config(CONFIG_23))
    assert (over.mask, over.current, over.dovecot) == ("TRUE", None, "2.3")
    assert quota_over_status_call(over, USER).args == ("mismatch", "frank@example.org")
    assert quota_over_status_call(over, USER, "").args == ("mismatch", "frank@example.org", "")
    flagged = parse_config(CONFIG_23.replace("}", "  quota_over_flag = yes\n}"))
    assert quota_over_status_call(find_quota_over_status(flagged), USER).args[-1] == "yes"


def test_quota_over_status_errors() -> None:
    with pytest.raises(ConfigError, match="no quota_over_status script found"):
        find_quota_over_status(parse_config("a = b\n"))
    two = "quota a {\n  quota_over_status {\n  }\n}\nquota b {\n  quota_over_status {\n  }\n}\n"
    with pytest.raises(ConfigError, match="several quota_over_status"):
        find_quota_over_status(parse_config(two))
    with pytest.raises(ConfigError, match="named list filter is missing"):
        find_quota_over_status(parse_config("quota_over_status {\n}\n"))


def test_empty_argument_cannot_go_over_tcp() -> None:
    call = ClientCall("quota-over-status", TcpTarget("h", 1), ("a", ""), noreply=True)
    with pytest.raises(ConfigError, match="over tcp"):
        call.for_client()
    fork = ClientCall("quota-over-status", ForkTarget("/bin/x"), ("a", ""), noreply=True)
    assert fork.for_client() == (("a", ""), None)


def test_empty_argument_in_the_middle() -> None:
    call = ClientCall("sieve-pipe", UnixTarget("/s"), ("a", "", "b\tc"), input=b"MSG")
    assert call.for_client() == (("a",), b"b\x01tc\n\nMSG")
    assert wire(call) == call.header() + b"MSG"


# --- welcome -------------------------------------------------------------------------------


def test_welcome_24() -> None:
    welcome = find_welcome(parse_config(CONFIG_24))
    assert (welcome.wait, welcome.dovecot) == (True, "2.4")
    call = welcome_call(welcome, USER)
    assert call.target == ForkTarget("/usr/local/bin/welcome.sh")
    assert (call.args, call.noreply, call.read_output, call.half_close) == (
        ("example.org",), False, True, True)
    assert call.judge(Status.SUCCESS).ok
    failed = call.judge(Status.FAILURE)
    assert not failed.ok and 'logs "Execution failed: 0"' in failed.message
    nowait = welcome_call(find_welcome(parse_config(CONFIG_24.replace("wait = yes", ""))), USER)
    assert (nowait.noreply, nowait.read_output) == (True, False)
    assert nowait.judge(Status.SUCCESS).ok
    assert not nowait.judge(Status.INTERNAL_FAILURE, ErrorKind.IO).ok


def test_welcome_23() -> None:
    welcome = find_welcome(parse_config(CONFIG_23))
    assert (welcome.wait, welcome.dovecot) == (True, "2.3")
    call = welcome_call(welcome, USER, base_dir="/run/d")
    assert call.target == UnixTarget("/run/d/welcome")
    assert call.header() == b"VERSION\tscript\t4\t0\n-\nfrank@example.org\n\n"
    assert (call.half_close, call.timeout) == (False, 30.0)
    # One read() of the reply: the first byte must be '+'.
    assert call.judge(Status.SUCCESS, output=b"").ok
    printed = call.judge(Status.SUCCESS, output=b"hello\n")
    assert not printed.ok and "Script returned error" in printed.message
    assert not call.judge(Status.FAILURE).ok
    assert not call.judge(Status.INTERNAL_FAILURE).ok


def test_welcome_23_bool_and_errors() -> None:
    nowait = parse_config("plugin {\n  welcome_script = w\n  welcome_wait = no\n}\n")
    assert not find_welcome(nowait).wait
    assert welcome_call(find_welcome(nowait), {}).args == ()
    with pytest.raises(ConfigError, match="no welcome script found"):
        find_welcome(parse_config("a = b\n"))
    with pytest.raises(ConfigError, match="welcome_script: no socket"):
        find_welcome(parse_config("plugin {\n  welcome_script = \n}\n"))
    with pytest.raises(ConfigError, match="several welcome"):
        find_welcome(parse_config("welcome {\n}\nprotocol imap {\n  welcome {\n  }\n}\n"))


# --- Sieve -------------------------------------------------------------------------------

MESSAGE = b"From: a@example.org\nSubject: x\r\n\nbody\r.\n"


def test_sieve_pipe() -> None:
    root = parse_config(CONFIG_24)
    (settings,) = sieve_programs(root, "pipe", "prog")
    call = sieve_call("sieve-pipe", settings, ["one", "two words"], user="frank",
                      message=MESSAGE, home="/home/frank", host="mx.example.org",
                      sender="s@example.org", recipient="r@example.org",
                      orig_recipient="o@example.org",
                      extension=sieve_extension_settings(root, "pipe"), base_dir="/run/d")
    assert call.target == UnixTarget("/run/d/sieve-pipe/prog")
    assert call.env == (("USER", "frank"), ("HOME", "/home/frank"), ("HOST", "mx.example.org"),
                        ("SENDER", "s@example.org"), ("RECIPIENT", "r@example.org"),
                        ("ORIG_RECIPIENT", "o@example.org"))
    assert call.input == b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r.\r\n"
    assert (call.noreply, call.read_output) == (False, True)
    assert (call.connect_timeout, call.timeout) == (SIEVE_CONNECT_TIMEOUT, 120)
    assert call.header() == (
        b"VERSION\tscript\t4\t0\nenv_USER=frank\nenv_HOME=/home/frank\nenv_HOST=mx.example.org\n"
        b"env_SENDER=s@example.org\nenv_RECIPIENT=r@example.org\n"
        b"env_ORIG_RECIPIENT=o@example.org\n-\none\ntwo words\n\n")
    assert wire(call) == call.header() + call.input
    assert call.judge(Status.SUCCESS).message == "piped message to program 'prog'"
    assert "the pipe action fails" in call.judge(Status.FAILURE).message
    assert call.judge(Status.INTERNAL_FAILURE, detail="x").message.startswith(
        "failed to pipe message to program 'prog'")


def test_sieve_env_leaves_out_unknown_values() -> None:
    call = sieve_call("sieve-execute", ExecuteSettings("p"), [], user="u", message=None,
                      sender="<>", recipient="")
    assert call.env == (("USER", "u"),)
    assert call.input is None
    assert call.timeout == 10.0
    assert call.judge(Status.FAILURE).message == ("execute action: program indicated false "
                                                  "result (as a test: false)")


def test_sieve_filter_lf_and_fork() -> None:
    root = parse_config(CONFIG_24)
    (settings,) = sieve_programs(root, "filter", "up")
    call = sieve_call("sieve-filter", settings, [], user="u", message=MESSAGE,
                      extension=sieve_extension_settings(root, "filter"))
    assert call.target == ForkTarget("/usr/lib/sieve/up")
    assert call.input == b"From: a@example.org\nSubject: x\n\nbody\r.\n"
    assert call.judge(Status.SUCCESS).ok
    assert "message stays as it was" in call.judge(Status.FAILURE).message


def test_sieve_unknown_kind() -> None:
    with pytest.raises(ConfigError, match="unknown Sieve client"):
        sieve_call("sieve-nope", ExecuteSettings("p"), [], user="u", message=None)


@pytest.mark.parametrize(("value", "seconds"), [
    ("30", 30), ("30s", 30), ("2 mins", 120), ("1h", 3600), ("500ms", 0.5), ("0", 0)])
def test_sieve_exec_timeout(value: str, seconds: float) -> None:
    root = parse_config(f"sieve_execute_exec_timeout = {value}\n")
    assert sieve_extension_settings(root, "execute") == SieveSettings(seconds, "crlf")


def test_sieve_settings_errors_and_2_3_form() -> None:
    with pytest.raises(ConfigError, match="invalid time interval"):
        sieve_extension_settings(parse_config("sieve_pipe_exec_timeout = soon\n"), "pipe")
    with pytest.raises(ConfigError, match="expected crlf or lf"):
        sieve_extension_settings(parse_config("sieve_pipe_input_eol = cr\n"), "pipe")
    legacy = parse_config("plugin {\n  sieve_pipe_exec_timeout = 5s\n}\n")
    assert sieve_extension_settings(legacy, "pipe").exec_timeout == 5


def test_line_ends() -> None:
    assert to_crlf(b"a\nb\r\nc\rd\n") == b"a\r\nb\r\nc\rd\r\n"
    assert to_lf(b"a\r\nb\nc\r") == b"a\nb\nc\r"


# --- without a configuration: a ready argument list, alarm= ---------------------------------


def test_a_ready_argument_list_replaces_the_template() -> None:
    settings = ExecuteSettings("qw", unix_socket_path="/run/%{user}.sock", args="ignored")
    call = quota_warning_call(settings, {"user": "u"}, args=["95", "two words", "%{user}"])
    # Sent as it is: no splitting, no expansion (the target still expands).
    assert (call.target, call.args) == (UnixTarget("/run/u.sock"), ("95", "two words", "%{user}"))
    assert call.header() == b"VERSION\tscript\t4\t0\nnoreply\n95\ntwo words\n%{user}\n\n"
    over = QuotaOverStatus(ExecuteSettings("o", unix_socket_path="/s"), None, None, "2.4")
    assert quota_over_status_call(over, {}, "", args=["a b"]).args == ("a b", "")
    assert quota_over_status_call(over, {}, args=[]).args == ("",)
    welcome = Welcome(ExecuteSettings("w", unix_socket_path="/s", args="x"), False, "2.4")
    assert welcome_call(welcome, {}, args=("a", "b")).args == ("a", "b")
    assert welcome_call(welcome, {}).args == ("x",)


@pytest.mark.parametrize("seconds", [0, 1, 2**32 - 1])
def test_with_alarm(seconds: int) -> None:
    call = quota_warning_call(ExecuteSettings("q", unix_socket_path="/s"), {}, args=["a"])
    header = with_alarm(call.header(), seconds)
    # fts-parser-script.c: "VERSION\tscript\t4\t0\nalarm=10\nnoreply\n".
    assert header == b"VERSION\tscript\t4\t0\nalarm=%d\nnoreply\na\n\n" % seconds
    parser = HeaderParser()
    parsed = parser.feed(header)
    assert parsed is not None
    assert (parsed.alarm, parsed.noreply, parsed.args) == (seconds, True, (b"a",))
    # execproto's own client's header takes it the same way.
    own = ClientConnection().send(Request(args=[b"x"], env=[(b"A", b"1")]))
    assert with_alarm(own, seconds).startswith(b"VERSION\tscript\t4\t0\nalarm=%d\nenv_A=1\n"
                                              % seconds)


def test_with_alarm_refuses() -> None:
    with pytest.raises(LocalProtocolError, match="out of range"):
        with_alarm(b"VERSION\tscript\t4\t0\n-\n\n", -1)
    with pytest.raises(LocalProtocolError, match="out of range"):
        with_alarm(b"VERSION\tscript\t4\t0\n-\n\n", 2**32)
    with pytest.raises(LocalProtocolError, match="no VERSION line"):
        with_alarm(b"-\n\n", 1)
