"""``execproto doctor`` on broken setups made here: each finding, and a clean setup.

Every test writes a dovecot.conf, scripts and sockets (bare
``socket.bind``/``listen``) into a directory of its own and runs the CLI.
The mail user of the permission checks is ``nobody``; the checks compute
permissions from the mode bits, so the tests need not run as root (they do
in CI, where root would pass every plain access check).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from execproto.adapters.cli import _read_config, main
from execproto.adapters.doctor import diagnose, listening_unix

NOBODY = "nobody"


@pytest.fixture
def home() -> Iterator[Path]:
    """A directory everyone may enter (pytest's own tree is mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="execproto-doctor-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Listening sockets a test opens; closed at its end."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def listen(path: Path, opened: list[socket.socket], backlog: int = 16,
           mode: int = 0o666) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.listen(backlog)
    path.chmod(mode)
    opened.append(sock)
    return sock


def script(path: Path, text: str = "#!/bin/sh\nexit 0\n", mode: int = 0o755) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def doctor(capsys: pytest.CaptureFixture[str], config: Path, *options: str
           ) -> tuple[int, list[str]]:
    code = main(["doctor", "--config", str(config), *options])
    out = capsys.readouterr().out.splitlines()
    return code, out


def lines_with(out: list[str], needle: str) -> list[str]:
    return [line for line in out if needle in line]


def one(out: list[str], needle: str) -> str:
    found = lines_with(out, needle)
    assert len(found) == 1, "\n".join(out)
    return found[0]


def quota_setup(home: Path, opened: list[socket.socket], *, mode: int = 0o666,
                script_text: str = "#!/bin/sh\nlogger -t quota \"$1\"\n",
                extra: str = "") -> Path:
    """A 2.4 quota warning to service qw, served by a listening socket."""
    run = home / "run"
    run.mkdir()
    qw = script(home / "qw.sh", script_text)
    config = home / "dovecot.conf"
    config.write_text(f"""\
base_dir = {run}
quota "User quota" {{
  warning warn-95 {{
    execute qw {{
      args = 95 %{{user}}
    }}
  }}
}}
service qw {{
  executable = script {qw}
  unix_listener qw {{
    mode = 0666
  }}
}}
{extra}""")
    listen(run / "qw", opened, mode=mode)
    return config


# --- a clean setup ---------------------------------------------------------------------


def test_clean_setup_exits_0(home: Path, sockets: list[socket.socket],
                             capsys: pytest.CaptureFixture[str]) -> None:
    config = quota_setup(home, sockets)
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 0, "\n".join(out)
    assert out == [
        f"{config}:4: note: quota \"User quota\" / quota_warning warn-95 / execute qw: sends "
        "nothing; the script of service qw gets an empty environment (no PATH either)",
        "1 script service, 1 client: 0 errors, 0 warnings, 1 note",
    ]


def test_json(home: Path, sockets: list[socket.socket],
              capsys: pytest.CaptureFixture[str]) -> None:
    config = quota_setup(home, sockets)
    code, out = doctor(capsys, config, "--user", NOBODY, "--json")
    assert code == 0
    report = json.loads("\n".join(out))
    assert (report["errors"], report["warnings"], report["notes"]) == (0, 0, 1)
    assert report["findings"][0]["code"] == "environment"
    assert report["findings"][0]["line"] == 4


# --- sockets ---------------------------------------------------------------------------


def test_socket_missing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = home / "dovecot.conf"
    config.write_text(f"base_dir = {home}\nplugin {{\n"
                      "  quota_warning = storage=95%% quota-warning 95 %u\n}\n")
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    assert one(out, "socket") == (
        f"{config}:3: error: plugin / quota_warning: no socket at {home}/quota-warning and no "
        "script service here listens there — fix: add a script service with a unix_listener "
        "at that path, or correct the client's target")


def test_socket_missing_names_the_service(home: Path, capsys: pytest.CaptureFixture[str],
                                          sockets: list[socket.socket]) -> None:
    config = quota_setup(home, sockets)
    (home / "run" / "qw").unlink()
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    assert one(out, "error:").startswith(
        f"{config}:4: error: quota \"User quota\" / quota_warning warn-95 / execute qw: no "
        f"socket at {home}/run/qw — fix: start Dovecot (or execproto serve) with service qw "
        f"({config}:10)")


def test_not_listening(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A socket file left behind by a service that is gone."""
    opened: list[socket.socket] = []
    config = quota_setup(home, opened)
    opened[0].close()  # the file stays: a stale socket
    assert str(home / "run" / "qw") not in listening_unix()
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    assert one(out, "error:") == (
        f"{config}:4: error: quota \"User quota\" / quota_warning warn-95 / execute qw: nothing "
        f"listens on {home}/run/qw (a socket file left by a service that is gone: Connection "
        "refused) — fix: start service qw (" + f"{config}:10), or remove the stale file")


def test_target_is_a_file(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's socket name confused with a script path (no service names it here)."""
    target = script(home / "quota-warning.sh")
    config = home / "dovecot.conf"
    config.write_text(f"plugin {{\n  quota_warning = storage=95%% {target} 95 %u\n}}\n")
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    assert out[0] == (
        f"{config}:2: error: plugin / quota_warning: {target} is a file, not a socket: Dovecot "
        f"connects to it and fails (net_connect_unix({target}) failed: Permission denied) — "
        "fix: point the client at the script service's socket, or run the program directly "
        "(exec:PATH in 2.3, driver = fork in 2.4)")


def test_target_is_the_services_script(home: Path, capsys: pytest.CaptureFixture[str],
                                       sockets: list[socket.socket]) -> None:
    """Reported once, from the configuration, when the path is a service's script."""
    config = quota_setup(home, sockets)
    text = config.read_text().replace("execute qw {", f"execute {home}/qw.sh {{")
    config.write_text(text)
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    assert one(out, "error:").startswith(
        f"{config}:4: error: quota \"User quota\" / quota_warning warn-95 / execute "
        f"{home}/qw.sh: unix:{home}/qw.sh is the script of service qw, not its socket")


def test_mail_user_cannot_connect(home: Path, sockets: list[socket.socket],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    config = quota_setup(home, sockets, mode=0o600)
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    owner = os.getuid()
    line = one(out, "cannot connect")
    assert line.startswith(
        f"{config}:4: error: quota \"User quota\" / quota_warning warn-95 / execute qw: mail "
        f"user nobody cannot connect to {home}/run/qw: no write permission on {home}/run/qw "
        f"(mode 0600, ")
    assert f"{owner}" in line or "root" in line
    # As the owner, it may.
    code, out = doctor(capsys, config, "--user", str(owner))
    assert code == 0, "\n".join(out)


def test_mail_user_cannot_reach_the_directory(home: Path, sockets: list[socket.socket],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = quota_setup(home, sockets)
    (home / "run").chmod(0o700)
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    assert f"no search permission on the directory {home}/run (mode 0700" in one(
        out, "cannot connect")


def test_listener_mode_from_the_configuration(home: Path, sockets: list[socket.socket],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Dovecot creates the socket 0600 root:root unless told otherwise."""
    config = quota_setup(home, sockets)
    config.write_text(config.read_text().replace("    mode = 0666\n", ""))
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    assert one(out, "is created mode") == (
        f"{config}:11: error: service qw: unix_listener {home}/run/qw is created mode 0600, "
        f"root:root: mail user nobody cannot connect (net_connect_unix({home}/run/qw) failed: "
        "Permission denied) — fix: in unix_listener set user = nobody (mode 0600), or a group "
        "of nobody with mode 0660")
    # user = nobody fixes it (the live socket is 0666 here).
    config.write_text(config.read_text().replace("unix_listener qw {",
                                                 "unix_listener qw {\n    user = nobody"))
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 0, "\n".join(out)


def test_listener_owner_unknown(home: Path, sockets: list[socket.socket],
                                capsys: pytest.CaptureFixture[str]) -> None:
    config = quota_setup(home, sockets)
    config.write_text(config.read_text().replace(
        "    mode = 0666\n",
        "    mode = 0666\n    user = no-such-user-x\n    group = no-such-group-x\n"))
    code, out = doctor(capsys, config)
    assert code == 1
    assert one(out, "user no-such-user-x") == (
        f"{config}:13: error: service qw: unix_listener {home}/run/qw: user no-such-user-x does "
        "not exist: Dovecot refuses to start — fix: create the user or change the setting")
    assert one(out, "group no-such-group-x").startswith(f"{config}:14: error: ")


def test_socket_directory_missing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Dovecot creates base_dir, not a listener's own directory below it."""
    config = home / "dovecot.conf"
    config.write_text(f"base_dir = {home}/run\nservice s {{\n  executable = script /bin/true\n"
                      "  unix_listener sub/s {\n  }\n  unix_listener s2 {\n  }\n}\n")
    code, out = doctor(capsys, config)
    assert code == 1
    assert out[0] == (
        f"{config}:4: error: service s: the directory {home}/run/sub of its socket does not "
        f"exist: Dovecot does not create it and fails to start its listeners (bind({home}/run/"
        f"sub/s) failed: No such file or directory) — fix: mkdir {home}/run/sub (e.g. "
        "tmpfiles.d if under /run)")
    assert not lines_with(out, f"{home}/run of its socket")


def test_socket_directory_24(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """2.4 makes a listener's directory below base_dir, one level only."""
    config = home / "dovecot.conf"
    config.write_text(f"dovecot_config_version = 2.4.0\nbase_dir = {home}/run\n"
                      "service s {\n  executable = script /bin/true\n"
                      "  unix_listener sub/s {\n  }\n  unix_listener a/b/s {\n  }\n"
                      f"  unix_listener {home}/elsewhere/s {{\n  }}\n}}\n")
    code, out = doctor(capsys, config)
    assert code == 1
    found = lines_with(out, "error: service s: the directory")
    assert found == [
        f"{config}:7: error: service s: the directory {home}/run/a above its socket "
        f"{home}/run/a/b/s does not exist: Dovecot 2.4 creates only the last directory and "
        f"fails to start (mkdir({home}/run/a/b) failed: No such file or directory) — fix: "
        f"mkdir {home}/run/a (e.g. tmpfiles.d if under /run)",
        f"{config}:9: error: service s: the directory {home}/elsewhere of its socket does not "
        f"exist: outside base_dir, Dovecot does not create it and fails to start its listeners "
        f"(bind({home}/elsewhere/s) failed: No such file or directory) — fix: mkdir "
        f"{home}/elsewhere (e.g. tmpfiles.d if under /run)",
    ]


# --- scripts ---------------------------------------------------------------------------


def service_only(home: Path, executable: str, user: str = "") -> Path:
    config = home / "dovecot.conf"
    setting = f"  user = {user}\n" if user else ""
    config.write_text(f"service s {{\n  executable = script {executable}\n{setting}}}\n")
    return config


def test_script_missing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = service_only(home, f"{home}/nothing.sh")
    code, out = doctor(capsys, config)
    assert code == 1
    assert out[0] == (
        f"{config}:2: error: service s: script {home}/nothing.sh: No such file or directory — "
        f"fix: install it at {home}/nothing.sh or correct the path")


def test_relative_script_under_libexec(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script(home / "rel.sh")
    config = service_only(home, "rel.sh")
    assert doctor(capsys, config, "--libexec-dir", str(home))[0] == 0
    code, out = doctor(capsys, config, "--libexec-dir", str(home / "elsewhere"))
    assert code == 1
    assert f"script {home}/elsewhere/rel.sh: No such file" in out[0]


def test_script_not_a_file(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = service_only(home, str(home))
    code, out = doctor(capsys, config)
    assert code == 1
    assert f"script {home} is not a regular file" in out[0]


def test_script_lost_its_x_bit(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = script(home / "qw.sh", mode=0o644)
    config = service_only(home, str(path))
    code, out = doctor(capsys, config)
    assert code == 1
    assert out[0].startswith(
        f"{config}:2: error: service s: script {path} is not executable for root (mode 0644, ")
    assert out[0].endswith(f"the exec fails with Permission denied — fix: chmod +x {path}")


def test_script_executable_but_not_readable(home: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The service runs as nobody: x without r is not enough for an interpreter."""
    path = script(home / "qw.sh", mode=0o711)
    config = service_only(home, str(path), user=NOBODY)
    code, out = doctor(capsys, config)
    assert code == 1
    assert f"script {path}: nobody may execute it but the interpreter cannot read it" in out[0]


def test_interpreter_missing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = script(home / "qw.py", "#!/usr/bin/no-such-python3\nprint()\n")
    config = service_only(home, str(path))
    code, out = doctor(capsys, config)
    assert code == 1
    assert out[0] == (
        f"{config}:2: error: service s: script {path}: its interpreter /usr/bin/no-such-python3 "
        "does not exist (the exec fails with No such file or directory) — fix: install "
        "/usr/bin/no-such-python3 or correct the #! line")


def test_interpreter_not_executable(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    interpreter = script(home / "interp", mode=0o744)
    path = script(home / "qw", f"#!{interpreter}\n")
    config = service_only(home, str(path), user=NOBODY)
    code, out = doctor(capsys, config)
    assert code == 1
    assert f"its interpreter {interpreter} is not executable for nobody" in out[0]


def test_env_interpreter_without_path(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = script(home / "qw", "#!/usr/bin/env no-such-interpreter-x\n")
    config = service_only(home, str(path))
    code, out = doctor(capsys, config)
    assert code == 1
    assert ("#!/usr/bin/env no-such-interpreter-x: the script runs without PATH, so env looks "
            "in /bin:/usr/bin only") in out[0]
    script(path, "#!/usr/bin/env sh\n")
    assert doctor(capsys, config)[0] == 0


def test_service_user_unknown(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = service_only(home, "/bin/true", user="no-such-user-x")
    code, out = doctor(capsys, config)
    assert code == 1
    assert out[0] == (f"{config}:3: error: service s: user no-such-user-x does not exist: "
                      "Dovecot refuses to start — fix: create no-such-user-x or set another "
                      "user")


def test_fork_program_as_the_mail_user(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    program = script(home / "warn.sh", mode=0o700)
    config = home / "dovecot.conf"
    config.write_text(f"plugin {{\n  quota_warning = storage=95%% exec:{program} 95 %u\n}}\n")
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    assert one(out, "error:").startswith(
        f"{config}:2: error: plugin / quota_warning: program {program} is not executable for "
        "nobody (mode 0700")
    program.chmod(0o755)
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 0
    assert one(out, "note:") == (f"{config}:2: note: plugin / quota_warning: the program runs "
                                 "directly and gets an empty environment (no PATH)")


# --- noreply clients and output ----------------------------------------------------------


def test_noreply_client_script_writes_output(home: Path, sockets: list[socket.socket],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    text = "#!/bin/sh\nset -e\necho \"quota warning for $2\"\nlogger -t quota \"$1\"\n"
    config = quota_setup(home, sockets, script_text=text)
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    assert one(out, "warning:") == (
        f"{config}:4: warning: quota \"User quota\" / quota_warning warn-95 / execute qw: asks "
        f"for no reply and reads nothing, but {home}/qw.sh writes to its output (line 3, read "
        "without running it): the output is lost, and once the client has closed the write "
        "fails (EPIPE: Dovecot starts scripts with SIGPIPE ignored), which stops a set -e "
        "script there — fix: send the output to a log "
        "(>>FILE, logger) or start the script with exec >/dev/null")


def test_noreply_client_script_not_shell(home: Path, sockets: list[socket.socket],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    config = quota_setup(home, sockets, script_text=f"#!{sys.executable}\nprint('x')\n")
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 0  # a note only: doctor does not run scripts
    assert f"whether {home}/qw.sh writes to its output is not known" in one(out, "not known")


def test_reply_client_output_is_fine(home: Path, sockets: list[socket.socket],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """welcome with wait = yes reads the output: no finding."""
    config = quota_setup(home, sockets, script_text="#!/bin/sh\necho hi\n",
                         extra="welcome {\n  wait = yes\n  execute qw {\n  }\n}\n")
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert len(lines_with(out, "writes to its output")) == 1  # the quota warning only
    assert code == 1


# --- Sieve ------------------------------------------------------------------------------


def sieve_setup(home: Path, opened: list[socket.socket], backlog: int = 200,
                allow: str = "-e USER,HOME,HOST,SENDER,RECIPIENT,ORIG_RECIPIENT ",
                extra: str = "") -> Path:
    run = home / "run"
    (run / "sieve-pipe").mkdir(parents=True)
    program = script(home / "do-something.sh")
    config = home / "dovecot.conf"
    config.write_text(f"""\
base_dir = {run}
plugin {{
  sieve_plugins = sieve_extprograms
  sieve_extensions = +vnd.dovecot.pipe
  sieve_pipe_socket_dir = sieve-pipe
}}
service do-something {{
  executable = script {allow}{program}
  unix_listener sieve-pipe/do-something {{
    mode = 0666
  }}
}}
{extra}""")
    listen(run / "sieve-pipe" / "do-something", opened, backlog=backlog)
    return config


def test_sieve_clean(home: Path, sockets: list[socket.socket],
                     capsys: pytest.CaptureFixture[str]) -> None:
    config = sieve_setup(home, sockets)
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 0, "\n".join(out)


def test_sieve_environment_dropped(home: Path, sockets: list[socket.socket],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    config = sieve_setup(home, sockets, allow="")
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    assert one(out, "warning:").startswith(
        f"{config}:5: warning: sieve_pipe_socket_dir: sends USER, HOME, HOST, SENDER, "
        "RECIPIENT, ORIG_RECIPIENT; service do-something")


def test_sieve_backlog_small(home: Path, sockets: list[socket.socket],
                             capsys: pytest.CaptureFixture[str]) -> None:
    config = sieve_setup(home, sockets, backlog=8)
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    path = f"{home}/run/sieve-pipe/do-something"
    assert one(out, "backlog") == (
        f"{config}:5: warning: sieve_pipe_socket_dir program do-something: {path} listens with "
        "a backlog of 8, below the 100 deliveries that may run Sieve at once (lmtp "
        "process_limit, the default): once 8 wait, a connect that finds the queue full is "
        "retried by Dovecot after 100 ms, and the sieve pipe socket client gives up after 5 "
        "ms — fix: raise the service's process_limit and client_limit (Dovecot's backlog is "
        "process_limit x client_limit, at least 4, at most net.core.somaxconn), or execproto "
        "serve --max-connections; make the script quicker")
    # Fewer deliveries at once: no finding.
    config.write_text(config.read_text() + "service lmtp {\n  process_limit = 8\n}\n")
    assert doctor(capsys, config, "--user", NOBODY)[0] == 0


def test_sieve_backlog_full(home: Path, sockets: list[socket.socket],
                            capsys: pytest.CaptureFixture[str]) -> None:
    config = sieve_setup(home, sockets, backlog=1,
                         extra="service lmtp {\n  process_limit = 1\n}\n")
    path = home / "run" / "sieve-pipe" / "do-something"
    waiting = []
    try:
        while True:  # nobody accepts: fill the queue until the kernel refuses
            client = socket.socket(socket.AF_UNIX)
            client.setblocking(False)
            waiting.append(client)
            try:
                client.connect(str(path))
            except BlockingIOError:
                break
            assert len(waiting) < 10
        code, out = doctor(capsys, config, "--user", NOBODY)
    finally:
        for client in waiting:
            client.close()
    assert code == 1
    assert (f"{path} is full now (2 waiting, backlog 1): a connect that finds the queue full "
            "is retried by Dovecot after 100 ms") in one(out, "error:")


def test_sieve_socket_outside_the_configuration(home: Path, sockets: list[socket.socket],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = sieve_setup(home, sockets)
    listen(home / "run" / "sieve-pipe" / "other", sockets, backlog=500)
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 0
    assert one(out, "note: sieve_pipe_socket_dir program other") == (
        f"{config}:5: note: sieve_pipe_socket_dir program other: {home}/run/sieve-pipe/other is "
        "served by something outside this configuration: its script and -e list are not "
        "checked")


def test_sieve_socket_directory_missing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = home / "dovecot.conf"
    config.write_text(f"base_dir = {home}\nplugin {{\n  sieve_pipe_socket_dir = gone\n}}\n")
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    assert out[0] == (f"{config}:3: error: sieve_pipe_socket_dir: {home}/gone does not exist: "
                      f"no program is found there — fix: mkdir {home}/gone, or start the "
                      "services listening in it")


def test_sieve_bin_directory(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bin_dir = home / "sieve-filter"
    config = home / "dovecot.conf"
    config.write_text(f"plugin {{\n  sieve_filter_bin_dir = {bin_dir}\n}}\n")
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    assert out[0].startswith(f"{config}:2: warning: sieve_filter_bin_dir: {bin_dir} does not "
                             "exist: every program looked up there is \"not found\"")
    bin_dir.mkdir()
    script(bin_dir / "good")
    writable = script(bin_dir / "writable", mode=0o777)
    private = script(bin_dir / "private", mode=0o700)
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    assert one(out, "world-writable") == (
        f"{config}:2: error: sieve_filter_bin_dir: program {writable} is world-writable: "
        f"Pigeonhole refuses to run it — fix: chmod o-w {writable}")
    assert one(out, f"program {private} is not executable for nobody")


def test_sieve_unconfigured(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = home / "dovecot.conf"
    config.write_text("plugin {\n  sieve_plugins = sieve_extprograms\n"
                      "  sieve_extensions = +vnd.dovecot.execute\n}\n")
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    assert out[0].startswith(f"{config}:3: error: vnd.dovecot.execute is enabled but "
                             "unconfigured")


# --- who ------------------------------------------------------------------------------------


def test_mail_user(home: Path, sockets: list[socket.socket],
                   capsys: pytest.CaptureFixture[str]) -> None:
    config = quota_setup(home, sockets, mode=0o600)
    code, out = doctor(capsys, config)
    assert code == 0  # without a mail user, permissions are not checked
    assert one(out, "no mail user") == (
        f"{config}: note: no mail user (no --user, mail_uid not set): whether clients may "
        "connect or run programs is not checked — fix: give --user MAILUSER (the uid mail "
        "processes run as, e.g. vmail)")
    config.write_text(config.read_text() + "mail_uid = nobody\n")
    code, out = doctor(capsys, config)
    assert code == 1
    assert lines_with(out, "mail user nobody cannot connect")
    code, out = doctor(capsys, config, "--user", "no-such-user-x")
    assert code == 1
    assert one(out, "does not exist") == (
        f"{config}: error: mail user no-such-user-x does not exist — fix: create the user or "
        "name an existing one (--user, mail_uid)")


def test_tcp_target_is_noted(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = home / "dovecot.conf"
    config.write_text("plugin {\n  welcome_script = tcp:127.0.0.1:9 %u\n}\n")
    code, out = doctor(capsys, config)
    assert code == 0
    assert one(out, "tcp") == (f"{config}:2: note: plugin / welcome_script: tcp:127.0.0.1:9 "
                               "is not checked (tcp)")


def test_bad_config_is_a_usage_error(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = home / "dovecot.conf"
    config.write_text("service x {\n")
    assert main(["doctor", "--config", str(config)]) == 64
    assert "Missing '}'" in capsys.readouterr().err


def test_service_no_client_reaches(home: Path, sockets: list[socket.socket],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A service is checked on its own: something must listen on its socket."""
    config = home / "dovecot.conf"
    config.write_text(f"base_dir = {home}\nservice s {{\n  executable = script /bin/true\n"
                      "  unix_listener s {\n  }\n}\n")
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 1
    assert out[0] == (f"{config}:4: error: service s: no socket at {home}/s: the service is not "
                      "running — fix: start Dovecot (or execproto serve) with this service")
    stale = listen(home / "s", sockets, mode=0o600)
    stale.close()
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert out[0].startswith(f"{config}:4: error: service s: nothing listens on {home}/s")
    (home / "s").unlink()
    listen(home / "s", sockets, mode=0o600)
    code, out = doctor(capsys, config, "--user", NOBODY)
    # Listening; 0600 root's, but no mail client connects to it: not a finding.
    assert code == 0, "\n".join(out)


def test_numeric_mail_uid_without_passwd_entry(home: Path, sockets: list[socket.socket],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = quota_setup(home, sockets, mode=0o660, extra="mail_uid = 54321\nmail_gid = 54321\n")
    os.chown(home / "run" / "qw", 0, 54321)
    code, out = doctor(capsys, config)
    assert code == 0, "\n".join(out)  # group 54321 may write
    os.chown(home / "run" / "qw", 0, 0)
    code, out = doctor(capsys, config)
    assert code == 1
    assert "mail user 54321 cannot connect" in one(out, "error:")


def test_target_with_variables_is_noted(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """2.3 expands %u in a unix: path: one socket per user, not checked."""
    config = home / "dovecot.conf"
    config.write_text(f"plugin {{\n  quota_warning = storage=9%% unix:{home}/%u.sock 9 %u\n}}\n")
    code, out = doctor(capsys, config, "--user", NOBODY)
    assert code == 0
    assert one(out, "depends") == (
        # The 2.3 target's %u is read as 2.4's %{user}, the form the reader expands.
        f"{config}:2: note: plugin / quota_warning: unix:{home}/%{{user}}.sock depends on "
        "variables of the mail user (%...): one socket per user, not checked")


def test_backlog_unknown_without_sock_diag(home: Path, sockets: list[socket.socket]) -> None:
    """From /proc/net/unix alone the backlog is not known: said, not guessed."""
    config = sieve_setup(home, sockets, backlog=1)
    path = str(home / "run" / "sieve-pipe" / "do-something")
    _, findings = diagnose(_read_config(str(config)), str(config), mail_user=NOBODY,
                           listening={path: (-1, -1)})
    assert sorted((f.level, f.code, f.line) for f in findings) == [
        ("note", "backlog-unknown", 5), ("note", "environment", 5)]


def test_fork_program_without_mail_user(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = home / "dovecot.conf"
    config.write_text(f"plugin {{\n  quota_warning = storage=95%% exec:{home}/gone 95 %u\n}}\n")
    code, out = doctor(capsys, config)
    assert code == 1
    assert f"plugin / quota_warning: program {home}/gone: No such file" in one(out, "error:")
