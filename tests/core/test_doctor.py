"""The pure half of ``execproto doctor``: plan_checks and its arithmetic."""

from __future__ import annotations

import pytest

from execproto import ForkTarget, TcpTarget, UnixTarget, parse_config
from execproto._clients import SIEVE_ENV
from execproto._doctor import (
    ClientPlan,
    DoctorPlan,
    Finding,
    may_access,
    parse_shebang,
    plan_checks,
    script_environment,
    stdout_writes,
)

V24 = "dovecot_config_version = 2.4.0\ndovecot_storage_version = 2.4.0\n"


def plan(text: str, base_dir: str = "/run/dovecot") -> DoctorPlan:
    return plan_checks(parse_config(text, name="dovecot.conf"), base_dir=base_dir)


def codes(found: DoctorPlan) -> list[tuple[str, str, int | None]]:
    return [(f.level, f.code, f.line) for f in found.findings]


def only(found: DoctorPlan, code: str) -> Finding:
    (finding,) = [f for f in found.findings if f.code == code]
    return finding


# --- which clients, which services ------------------------------------------------------

QUOTA_23 = """\
plugin {
  quota_warning = storage=95%% quota-warning 95 %u
  quota_warning2 = storage=80%% unix:/var/run/qw 80 %u
  quota_over_script = quota-over %u
  welcome_script = welcome %u
  welcome_wait = yes
}
service quota-warning {
  executable = script -e USER /usr/local/bin/quota-warning.sh
  user = $default_internal_user
  unix_listener quota-warning {
    user = vmail
    mode = 0660
    group = mail
  }
}
"""


def test_23_clients() -> None:
    found = plan(QUOTA_23)
    kinds = [(c.kind, c.label, c.target, c.line, c.noreply) for c in found.clients]
    assert kinds == [
        ("quota warning", "plugin / quota_warning", UnixTarget("/run/dovecot/quota-warning"),
         2, True),
        ("quota warning", "plugin / quota_warning2", UnixTarget("/var/run/qw"), 3, True),
        ("welcome", "plugin / welcome_script", UnixTarget("/run/dovecot/welcome"), 5, False),
        ("quota_over_status", "plugin / quota_over_script",
         UnixTarget("/run/dovecot/quota-over"), 4, True),
    ]
    (service,) = found.services
    assert (service.name, service.script, service.env_allowlist, service.user,
            service.line, service.user_at) == (
        "quota-warning", "/usr/local/bin/quota-warning.sh", ("USER",), "dovecot", 9,
        ("dovecot.conf", 10))
    (listener,) = service.listeners
    assert (listener.path, listener.mode, listener.user, listener.group, listener.line,
            listener.mode_at) == ("/run/dovecot/quota-warning", 0o660, "vmail", "mail", 11,
                                  ("dovecot.conf", 13))
    assert found.clients[0].services == (service,)
    assert found.clients[1].services == ()
    assert all(c.env == () and c.connect_timeout_ms == 1000 for c in found.clients)


QUOTA_24 = V24 + """\
quota "User quota" {
  warning warn-95 {
    quota_storage_percentage = 95
    execute quota-warning {
      args = 95 %{user}
    }
  }
  quota_over_status {
    execute over {
      driver = fork
      fork_path = /usr/local/bin/over.sh
    }
  }
}
welcome {
  execute welcome {
    unix_socket_path = /run/welcome.sock
  }
}
execute other {
}
"""


def test_24_clients() -> None:
    found = plan(QUOTA_24)
    kinds = [(c.kind, c.target, c.line, c.noreply) for c in found.clients]
    assert kinds == [
        ("quota warning", UnixTarget("/run/dovecot/quota-warning"), 6, True),
        ("quota_over_status", ForkTarget("/usr/local/bin/over.sh"), 13, True),
        ("welcome", UnixTarget("/run/welcome.sock"), 19, True),
        ("execute", UnixTarget("/run/dovecot/other"), 22, False),
    ]
    assert found.clients[0].label == 'quota "User quota" / quota_warning warn-95 / execute ' \
                                     "quota-warning"


def test_welcome_wait_24() -> None:
    found = plan(V24 + "welcome {\n  wait = yes\n  execute welcome {\n  }\n}\n")
    assert [c.noreply for c in found.clients] == [False]


SIEVE_23 = """\
plugin {
  sieve_plugins = sieve_extprograms
  sieve_extensions = +vnd.dovecot.pipe +vnd.dovecot.filter
  sieve_pipe_socket_dir = sieve-pipe
  sieve_pipe_bin_dir = /usr/lib/dovecot/sieve-pipe
}
service do-something {
  executable = script /usr/lib/dovecot/sieve-pipe/do-something.sh
  unix_listener sieve-pipe/do-something {
    mode = 0666
  }
}
"""


def test_sieve_clients_and_unconfigured_extension() -> None:
    found = plan(SIEVE_23)
    (service,) = found.services
    assert [(c.kind, c.target, c.line, c.directory, c.env, c.connect_timeout_ms, c.services)
            for c in found.clients] == [
        ("sieve pipe socket", UnixTarget("/run/dovecot/sieve-pipe"), 4, True, SIEVE_ENV, 5,
         (service,)),
        ("sieve pipe bin", ForkTarget("/usr/lib/dovecot/sieve-pipe"), 5, True, SIEVE_ENV, 5,
         ()),
    ]
    finding = only(found, "sieve-unconfigured")
    assert (finding.level, finding.file, finding.line) == ("error", "dovecot.conf", 3)
    assert "vnd.dovecot.filter is enabled but unconfigured" in finding.message
    assert "sieve_filter_socket_dir" in finding.fix


def test_sieve_unconfigured_24() -> None:
    text = V24 + ("sieve_plugins {\n  sieve_extprograms = yes\n}\n"
                  "sieve_global_extensions {\n  vnd.dovecot.execute = yes\n"
                  "  vnd.dovecot.pipe = no\n}\n")
    finding = only(plan(text), "sieve-unconfigured")
    assert finding.line == 7
    assert finding.message.startswith("vnd.dovecot.execute is enabled but unconfigured")


# --- findings from the configuration alone ----------------------------------------------


def test_target_is_script_23() -> None:
    """The issue's net_connect_unix(/usr/.../quota-warning.sh) failed: Permission denied."""
    text = QUOTA_23.replace("storage=95%% quota-warning 95",
                            "storage=95%% /usr/local/bin/quota-warning.sh 95")
    finding = only(plan(text), "target-is-script")
    assert (finding.level, finding.line) == ("error", 2)
    assert finding.message == (
        "plugin / quota_warning: unix:/usr/local/bin/quota-warning.sh is the script of service "
        "quota-warning, not its socket: Dovecot connects to it and fails "
        "(net_connect_unix(/usr/local/bin/quota-warning.sh) failed)")
    assert finding.fix.startswith("point the client at the socket /run/dovecot/quota-warning")


def test_target_is_script_24() -> None:
    text = V24 + """\
quota_warning warn-95 {
  execute /usr/local/bin/qw.sh {
    args = 95 %{user}
  }
}
service qw {
  executable = script /usr/local/bin/qw.sh
}
"""
    finding = only(plan(text), "target-is-script")
    assert finding.line == 4


def test_environment_dropped_without_e() -> None:
    text = SIEVE_23.replace("sieve_extensions = +vnd.dovecot.pipe +vnd.dovecot.filter",
                            "sieve_extensions = +vnd.dovecot.pipe")
    found = plan(text)
    finding = only(found, "environment-dropped")
    assert (finding.level, finding.line) == ("warning", 4)
    assert finding.message == (
        "sieve_pipe_socket_dir: sends USER, HOME, HOST, SENDER, RECIPIENT, ORIG_RECIPIENT; "
        "service do-something (dovecot.conf:8) keeps only the -e names and it has no -e "
        "list: the script gets an empty environment")
    assert finding.fix == ("executable = script -e USER,HOME,HOST,SENDER,RECIPIENT,"
                           "ORIG_RECIPIENT /usr/lib/dovecot/sieve-pipe/do-something.sh at "
                           "dovecot.conf:8")
    # The bin directory: the program gets what Pigeonhole sends.
    (note,) = [f for f in found.findings if f.code == "environment"]
    assert note.message == ("sieve_pipe_bin_dir: the program runs directly and gets USER, "
                            "HOME, HOST, SENDER, RECIPIENT, ORIG_RECIPIENT (no PATH)")


def test_environment_with_e() -> None:
    text = SIEVE_23.replace("script /usr", "script -e USER,SENDER /usr")
    finding = only(plan(text), "environment-dropped")
    assert "its -e list is USER,SENDER: the script gets USER, SENDER" in finding.message
    assert finding.fix.startswith("executable = script -e USER,SENDER,HOME,HOST,RECIPIENT,"
                                  "ORIG_RECIPIENT ")


def test_environment_passthrough() -> None:
    text = SIEVE_23.replace("script /usr", "script -p /usr")
    finding = only(plan(text), "environment-dropped")
    assert "has -p: the script gets no environment" in finding.message


def test_quota_environment_is_empty() -> None:
    found = plan(QUOTA_23)
    notes = [f.message for f in found.findings if f.code == "environment"]
    # Quota warnings send no environment: the -e USER of the service changes nothing.
    assert notes == ["plugin / quota_warning: sends nothing; the script of service "
                     "quota-warning gets an empty environment (no PATH either)"]


def test_tcp_quota_warning_crashes() -> None:
    found = plan("plugin {\n  quota_warning = storage=1%% tcp:localhost:9 1 %u\n}\n")
    finding = only(found, "tcp-synchronous")
    assert (finding.level, finding.line) == ("error", 2)
    assert found.clients[0].target == TcpTarget("localhost", 9)


def test_unreadable_settings_are_findings() -> None:
    found = plan(V24 + "execute x {\n  driver = carrier-pigeon\n}\n"
                 "service s {\n  executable = script -x /bin/true\n}\n")
    assert codes(found) == [("error", "service-command", 7), ("error", "execute-invalid", 3)]


def test_lmtp_process_limit() -> None:
    assert plan("").lmtp_process_limit == (100, (None, None))
    assert plan("default_process_limit = 7\n").lmtp_process_limit == (7, ("dovecot.conf", 1))
    text = "service lmtp {\n  process_limit = 3\n}\ndefault_process_limit = 7\n"
    assert plan(text).lmtp_process_limit == (3, ("dovecot.conf", 2))


def test_mail_uid() -> None:
    assert plan("mail_uid = vmail\n").mail_user == ("vmail", ("dovecot.conf", 1))
    assert plan("").mail_user == ("", (None, None))


# --- arithmetic -------------------------------------------------------------------------


def test_script_environment() -> None:
    sent = ("USER", "HOME")
    assert script_environment(sent, None) == (sent, ())
    service = plan(SIEVE_23.replace("script /usr", "script -e HOME /usr")).services[0]
    assert script_environment(sent, service) == (("HOME",), ("USER",))


@pytest.mark.parametrize(
    ("mode", "uid", "gids", "want", "allowed"),
    [
        (0o600, 0, (), 2, True),  # root writes anything
        (0o600, 0, (), 1, False),  # but executes only with an x bit
        (0o700, 0, (), 1, True),
        (0o600, 10, (), 2, True),  # the owner
        (0o060, 10, (20,), 2, False),  # the owner class decides, even if the group could
        (0o660, 11, (20,), 2, True),  # a group member
        (0o660, 11, (21,), 2, False),
        (0o666, 11, (21,), 2, True),
        (0o755, 11, (), 5, True),
        (0o711, 11, (), 5, False),
    ],
)
def test_may_access(mode: int, uid: int, gids: tuple[int, ...], want: int,
                    allowed: bool) -> None:
    assert may_access(mode, 10, 20, uid, gids, want) is allowed


def test_parse_shebang() -> None:
    assert parse_shebang(b"#!/bin/sh\necho") == ("/bin/sh", "")
    assert parse_shebang(b"#! /usr/bin/env  python3 -u\n") == ("/usr/bin/env", "python3 -u")
    assert parse_shebang(b"\x7fELF") is None


def test_stdout_writes() -> None:
    script = """\
#!/bin/sh
# echo in a comment
set -e
echo "sending warning"
logger -t quota "$1"
cat <<EOF | /usr/lib/dovecot/dovecot-lda -d "$2"
echo inside the message
EOF
printf 'x\\n' >>/var/log/quota.log
[ -n "$1" ] && echo done
if true; then printf hi; fi
echo "to the log" >&2
echo "both" 2>&1
cat /etc/motd 2>/dev/null
"""
    assert stdout_writes(script) == [4, 10, 11, 13, 14]
    assert stdout_writes("#!/bin/bash\nexec >/dev/null 2>&1\necho quiet\n") == []
    assert stdout_writes("#!/usr/bin/env bash\necho x\n") == [2]
    assert stdout_writes("#!/usr/bin/python3\nprint('x')\n") is None
    assert stdout_writes("no shebang\n") is None


def test_client_plan_is_frozen() -> None:
    client = plan(QUOTA_23).clients[0]
    assert isinstance(client, ClientPlan)
    with pytest.raises(AttributeError):
        client.kind = "x"  # type: ignore[misc]
