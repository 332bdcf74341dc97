"""``execproto doctor`` against the sockets a real Dovecot creates (2.3.19, 2.4.1, 2.4.5).

A private Dovecot hosts three script services: ``qw-open`` (mode 0666),
``qw-private`` (mode 0600, root's) and ``pipe-small`` in a Sieve socket
directory with ``process_limit = 1`` and ``client_limit = 1``. The doctor's
configuration includes Dovecot's and adds the clients: two quota warnings
and ``sieve_pipe_socket_dir``. What doctor says about Dovecot's side is
checked against it: the mode it gave the socket (a connect as the mail
user really fails), the listen backlog it chose (process_limit x
client_limit, at least 4), and what is left once it stopped.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .dovecot import Installation, PrivateDovecot, ScriptService
from .tools import RUN_LIMIT, cli, unavailable, write_probe

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # one the mail user may run (the test's may be private)


def _clients(installation: Installation) -> str:
    if installation.version >= (2, 4):
        return """
quota "User quota" {
  warning warn-95 {
    execute qw-private {
      args = 95 %{user}
    }
  }
  warning warn-80 {
    execute qw-open {
      args = 80 %{user}
    }
  }
}
sieve_pipe_socket_dir = sieve-pipe
"""
    return """
plugin {
  quota_warning = storage=95%% qw-private 95 %u
  quota_warning2 = storage=80%% qw-open 80 %u
  sieve_pipe_socket_dir = sieve-pipe
}
"""


# Merged by Dovecot into the blocks the harness writes (a later value wins).
OVERRIDES = """
service qw-private {
  unix_listener qw-private {
    mode = 0600
  }
}
service pipe-small {
  process_limit = 1
  client_limit = 1
}
"""


class Setup:
    """The private Dovecot and the doctor's configuration around it."""

    def __init__(self, installation: Installation, directory: Path) -> None:
        directory.mkdir()
        probe = write_probe(directory / "probe.py", installation.python)
        records = directory / "records"
        records.mkdir()
        services = [
            ScriptService("qw-open", probe, args=(str(records), "raw")),
            ScriptService("qw-private", probe, args=(str(records), "raw")),
            ScriptService("pipe-small", probe, args=(str(records), "raw"),
                          env_allowlist=("USER",), unix_listener="sieve-pipe/small"),
        ]
        self.dovecot = PrivateDovecot(services, directory=directory / "dovecot",
                                      installation=installation, extra_config=OVERRIDES)
        self.config = directory / "doctor.conf"
        self.config.write_text(f"!include {self.dovecot.config_path}\n"
                               + _clients(installation))

    def doctor(self) -> tuple[int, dict[str, Any]]:
        done = cli("doctor", "--config", str(self.config), "--user", "nobody", "--json")
        assert done.returncode in (0, 1), done.stderr
        return done.returncode, json.loads(done.stdout)


@pytest.fixture(scope="module")
def setup(installation: Installation, workspace: Path) -> Iterator[Setup]:
    made = Setup(installation, workspace / "doctor")
    made.dovecot.start()
    try:
        yield made
    finally:
        made.dovecot.stop()


def _findings(report: dict[str, Any], code: str) -> list[dict[str, Any]]:
    return [f for f in report["findings"] if f["code"] == code]


def _connect_as_nobody(path: Path) -> str:
    """What a connect by uid 65534 meets: ``ok`` or the error's name."""
    if not Path(SYSTEM_PYTHON).exists():
        unavailable(f"{SYSTEM_PYTHON} is needed to connect as nobody")
    code = ("import socket\ns = socket.socket(socket.AF_UNIX)\n"
            f"try:\n    s.connect({str(path)!r})\n    print('ok')\n"
            "except OSError as e:\n    print(type(e).__name__)\n")
    done = subprocess.run([SYSTEM_PYTHON, "-c", code], capture_output=True, text=True,
                          timeout=RUN_LIMIT, check=False, user=NOBODY, group=NOBODY,
                          extra_groups=[], cwd="/")
    return done.stdout.strip() or done.stderr


def test_listening_services(setup: Setup) -> None:
    """Every socket is found listening: none is missing or stale, no script is missing."""
    code, report = setup.doctor()
    assert code == 1
    # Only the three problems made on purpose (and the environment notes).
    codes = sorted((f["level"], f["code"]) for f in report["findings"])
    assert codes == [("error", "cannot-connect"), ("error", "listener-permission"),
                     ("note", "environment"), ("note", "environment"),
                     # the probe is Python: whether it writes output is not known
                     ("note", "noreply-output-unknown"), ("note", "noreply-output-unknown"),
                     ("warning", "backlog-small"), ("warning", "environment-dropped")], (
        json.dumps(report, indent=1))


def test_mail_user_cannot_connect(setup: Setup) -> None:
    """Dovecot created qw-private 0600 root:root: the mail user's connect fails."""
    _, report = setup.doctor()
    socket_path = setup.dovecot.socket_path("qw-private")
    (static,) = _findings(report, "listener-permission")
    assert static["file"] == str(setup.dovecot.config_path)
    assert static["message"].startswith(
        f"service qw-private: unix_listener {socket_path} is created mode 0600, root:root: "
        "mail user nobody cannot connect")
    (live,) = _findings(report, "cannot-connect")
    assert live["file"] == str(setup.config)
    assert live["message"].endswith(
        f"mail user nobody cannot connect to {socket_path}: no write permission on "
        f"{socket_path} (mode 0600, root:root)")
    assert _connect_as_nobody(socket_path) == "PermissionError"
    # qw-open is 0666: no finding about it but the (empty) environment.
    open_path = str(setup.dovecot.socket_path("qw-open"))
    assert [f["code"] for f in report["findings"] if open_path in f["message"]] == []
    assert _connect_as_nobody(setup.dovecot.socket_path("qw-open")) == "ok"


def test_sieve_backlog_dovecot_chose(setup: Setup) -> None:
    """process_limit = 1, client_limit = 1: Dovecot listens with its minimum backlog, 4."""
    _, report = setup.doctor()
    path = setup.dovecot.socket_path("pipe-small")
    (finding,) = _findings(report, "backlog-small")
    assert finding["level"] == "warning"
    assert (f"sieve_pipe_socket_dir program small: {path} listens with a backlog of 4, below "
            "the 100 deliveries") in finding["message"]
    (dropped,) = _findings(report, "environment-dropped")
    assert "its -e list is USER: the script gets USER" in dropped["message"]


def test_after_dovecot_stopped(installation: Installation, workspace: Path) -> None:
    """Nothing listens any more: each client says so (no socket, or a stale one)."""
    made = Setup(installation, workspace / "doctor-stopped")
    made.dovecot.start()
    made.dovecot.stop()
    code, report = made.doctor()
    assert code == 1
    gone = _findings(report, "socket-missing") + _findings(report, "not-listening")
    assert len(gone) == 3, json.dumps(report, indent=1)
    assert not _findings(report, "backlog-small")


SIEVE_PIPE = 'require ["vnd.dovecot.pipe"];\npipe "full";\nkeep;\n'
MESSAGE = b"From: a@example.com\nTo: rcpt@example.com\nSubject: hello\n\nbody\n"


def test_full_queue_fails_a_sieve_pipe(installation: Installation, workspace: Path) -> None:
    """What backlog-full means: Pigeonhole gives up before Dovecot's retry comes.

    A socket nobody accepts on, its queue filled: doctor says it is full,
    and ``sieve-test``'s ``pipe "full"`` fails with a connect timeout of 5 ms.
    """
    sieve_test = installation.tool("sieve-test")
    if sieve_test is None:
        unavailable(f"Dovecot {installation.label}: sieve-test not found")
    root = workspace / "sieve-full"
    base = root / "run"
    (base / "sieve-pipe").mkdir(parents=True)
    work = root / "work"
    (work / "mail").mkdir(parents=True)
    (work / "test.sieve").write_text(SIEVE_PIPE)
    (work / "msg.eml").write_bytes(MESSAGE)
    for path in (work, work / "mail", work / "test.sieve"):
        os.chown(path, NOBODY, NOBODY)  # sieve-test saves the compiled script
    config = work / "sieve.conf"
    config.write_text(installation.config.sieve(base, work / "mail"))
    path = base / "sieve-pipe" / "full"
    waiting: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)
        path.chmod(0o666)
        try:
            while len(waiting) < 10:
                client = socket.socket(socket.AF_UNIX)
                client.setblocking(False)
                waiting.append(client)
                try:
                    client.connect(str(path))
                except BlockingIOError:
                    break
            report = cli("doctor", "--config", str(config), "--user", "nobody", "--json")
            argv = [sieve_test, "-c", str(config), "-e", "-t", "-", str(work / "test.sieve"),
                    str(work / "msg.eml")]
            on_host = not installation.chrooted
            done = subprocess.run(
                installation.command(argv, user=None if on_host else NOBODY),
                capture_output=True, timeout=RUN_LIMIT, check=False,
                env={"USER": "nobody", "HOME": str(work), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                user=NOBODY if on_host else None, group=NOBODY if on_host else None,
                extra_groups=[] if on_host else None)
        finally:
            for client in waiting:
                client.close()
    findings = json.loads(report.stdout)["findings"]
    (full,) = [f for f in findings if f["code"] == "backlog-full"]
    assert f"{path} is full now (2 waiting, backlog 1)" in full["message"]
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode != 0, stderr
    assert "Connection timed out (> 5 msecs)" in stderr, stderr


# The quota warning's script: records its exit status, writes after the
# client is gone (doveadm closes once the request is sent), then marks "done".
ECHOING = """\
#!/bin/sh
set -e
trap 'echo $? >"$1/$3.status"' EXIT
sleep 1
echo "quota warning for $3"
touch "$1/$3.done"
"""
QUIET = ECHOING.replace("set -e\n", "set -e\nexec >/dev/null\n")


def test_noreply_quota_warning_and_output(installation: Installation,
                                          workspace: Path) -> None:
    """What noreply-output means: the quota warning's script dies at its echo.

    doctor warns about the echo; Dovecot's quota warning (noreply, through
    its own script service) then really stops the set -e script there,
    while the same script with ``exec >/dev/null`` first runs to its end.
    """
    doveadm = installation.tool("doveadm")
    if doveadm is None:
        unavailable(f"Dovecot {installation.label}: doveadm not found")
    root = workspace / "noreply"
    (root / "mail").mkdir(parents=True)
    os.chown(root / "mail", NOBODY, NOBODY)
    marks = root / "marks"
    marks.mkdir()
    marks.chmod(0o777)
    users = root / "users"
    users.write_text("".join(f"{name}:{{PLAIN}}secret:{NOBODY}:{NOBODY}::{root}/mail/{name}::\n"
                             for name in ("qw-echo", "qw-quiet")))
    script_path = root / "qw.sh"
    script_path.write_text(ECHOING)
    script_path.chmod(0o755)
    # One socket for every user (the harness's per-user %u path is one socket per user).
    extra = installation.config.quota(users, sockets=root)
    extra = extra.replace("%u.sock", "qw.sock").replace("%{user}.sock", "qw.sock")
    service = ScriptService("qw", script_path, args=(str(marks),),
                            unix_listener=str(root / "qw.sock"))
    dovecot = PrivateDovecot([service], directory=root / "dovecot", installation=installation,
                             extra_config=extra, wait_for=["auth-userdb"])
    dovecot.start()
    try:
        report = cli("doctor", "--config", str(dovecot.config_path), "--user", "nobody",
                     "--json")
        (warning,) = _findings(json.loads(report.stdout), "noreply-output")
        assert f"{script_path} writes to its output (line 5," in warning["message"]
        message = b"From: a@example.com\r\nSubject: quota\r\n\r\n" + b"x" * 1500 + b"\r\n"
        statuses = {}
        for user, text in (("qw-echo", ECHOING), ("qw-quiet", QUIET)):
            script_path.write_text(text)
            saved = subprocess.run(installation.command(
                [doveadm, "-c", str(dovecot.config_path), "save", "-u", user]), input=message,
                capture_output=True, timeout=RUN_LIMIT, check=False)
            assert saved.returncode == 0, saved.stderr
            status = marks / f"{user}.status"
            for _ in range(100):  # bounded: 10 s
                if status.exists() and status.read_text().strip():
                    break
                time.sleep(0.1)
            statuses[user] = (status.read_text().strip(), (marks / f"{user}.done").exists())
        report = cli("doctor", "--config", str(dovecot.config_path), "--user", "nobody",
                     "--json")
        assert not _findings(json.loads(report.stdout), "noreply-output")
    finally:
        dovecot.stop()
    assert statuses["qw-echo"][1] is False
    assert statuses["qw-echo"][0] != "0"
    assert statuses["qw-quiet"] == ("0", True)


def _listener_in(path: str) -> str:
    return (f"service qw-open {{\n  unix_listener {path} {{\n    mode = 0666\n  }}\n}}\n")


def _refusal(code: str, installation: Installation) -> tuple[str, str]:
    """What the configuration adds for *code*, and what Dovecot then says."""
    if code == "listener-owner":
        return ("service qw-open {\n  unix_listener qw-open {\n    user = no-such-user-x\n"
                "  }\n}\n", "no-such-user-x")
    if code == "service-user":
        return "service qw-open {\n  user = no-such-user-x\n}\n", "no-such-user-x"
    # 2.3 makes no listener directory (bind fails), 2.4 one level below base_dir (mkdir fails).
    if installation.version >= (2, 4):
        return _listener_in("sub/deeper/qw-sub"), "mkdir("
    return _listener_in("sub/qw-sub"), "bind("


@pytest.mark.parametrize("code", ["listener-owner", "service-user", "socket-directory"])
def test_dovecot_refuses_what_doctor_reports(installation: Installation, workspace: Path,
                                             code: str) -> None:
    """The findings that say "Dovecot does not start": it does not."""
    added, needle = _refusal(code, installation)
    made = Setup(installation, workspace / f"refuses-{code}")
    made.dovecot.extra_config += added
    made.dovecot.config_path.parent.mkdir(parents=True, exist_ok=True)
    made.dovecot.config_path.write_text(made.dovecot.config_text())
    done = cli("doctor", "--config", str(made.config), "--user", "nobody", "--json")
    # (Dovecot has not made the harness's sieve-pipe directory yet: skip that one.)
    (finding,) = [f for f in _findings(json.loads(done.stdout), code)
                  if "sieve-pipe" not in f["message"]]
    assert finding["level"] == "error"
    assert "does not exist" in finding["message"]
    assert needle in finding["message"] or code != "socket-directory"
    try:
        with pytest.raises(RuntimeError) as refused:
            made.dovecot.start()
    finally:
        made.dovecot.stop()
    assert needle in str(refused.value)


def test_listener_one_directory_below_base_dir(installation: Installation,
                                               workspace: Path) -> None:
    """2.4 makes it and starts (doctor says nothing); 2.3 does not (doctor says so)."""
    made = Setup(installation, workspace / "one-level")
    made.dovecot.extra_config += _listener_in("sub/qw-sub")
    made.dovecot.config_path.parent.mkdir(parents=True, exist_ok=True)
    made.dovecot.config_path.write_text(made.dovecot.config_text())
    done = cli("doctor", "--config", str(made.config), "--user", "nobody", "--json")
    reported = [f for f in _findings(json.loads(done.stdout), "socket-directory")
                if "sieve-pipe" not in f["message"]]
    try:
        if installation.version >= (2, 4):
            assert not reported
            made.dovecot.start()
            assert (made.dovecot.base_dir / "sub").is_dir()
        else:
            assert len(reported) == 1
            with pytest.raises(RuntimeError, match="bind"):
                made.dovecot.start()
    finally:
        made.dovecot.stop()
