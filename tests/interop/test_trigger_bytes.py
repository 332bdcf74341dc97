"""``execproto trigger`` against Dovecot's own clients, byte for byte.

For each installation (2.3.19, 2.4.1, 2.4.5) a :class:`tools.RecordingService`
listens where the client connects, behind one generated configuration. The
client runs once for real and once as ``execproto trigger KIND --config <the
same file>``; the recorded requests must be the same bytes:

* quota-warning: ``doveadm save`` crosses the warning's threshold;
* quota-over-status: ``doveadm quota get`` for a user whose userdb flag says
  over quota while the user is not (the flag is given to trigger with
  ``--current``: it comes from the userdb, which trigger does not read), and
  for a user over quota without a flag (2.4 appends an empty argument, an
  empty line: quirk Q21; 2.3 appends nothing);
* welcome (``wait = no`` and ``yes``): ``doveadm save`` creates a new user's
  INBOX;
* sieve-pipe, sieve-filter, sieve-execute: ``sieve-test`` runs ``pipe``,
  ``filter`` and ``execute :pipe`` with the envelope options; trigger gets
  the same user, home and envelope.

Both runs use the same user, so the configuration's ``%u`` / ``%{user}``
expand alike. Nothing needs normalizing: HOST too is the same.

For the Sieve programs the verdict is compared too: behind a service that
answers ``-`` or nothing at all, sieve-test's words and its final result
are what trigger reports; with ``sieve_pipe_exec_timeout = 1s`` and a slow
script both give up after that second.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .dovecot import Installation, PrivateDovecot
from .test_dovecot_clients import NOBODY, SIEVE_USER, run_in, tool
from .tools import RecordingService, cli

USER = "qw-trigger"
MESSAGE = b"From: a@example.com\nTo: rcpt@example.com\nSubject: hello\n\nbody line\n.dot\n"
SENDER = "sender@example.com"
RECIPIENT = "rcpt@example.com"
ORIG_RECIPIENT = "orig@example.com"
# Literal Sieve strings: a space, a TAB (sent tab-escaped), and an empty one,
# which Pigeonhole sends as an empty line: the header ends there for the
# service (quirk Q5); trigger sends the same bytes.
PROGRAM_ARGS = ["one", "two words", "tab\there", "", "after"]


def trigger(*args: str) -> tuple[int, str]:
    """``execproto trigger ARGS``: exit status and stderr."""
    done = cli("trigger", *args)
    return done.returncode, done.stderr.decode(errors="replace")


# --- quota warnings through doveadm ----------------------------------------------------


@dataclass
class Quota:
    installation: Installation
    dovecot: PrivateDovecot
    root: Path


@pytest.fixture(scope="module")
def quota(installation: Installation, workspace: Path) -> Iterator[Quota]:
    root = workspace / "quota"
    mail = root / "mail"
    mail.mkdir(parents=True)
    os.chown(mail, NOBODY, NOBODY)
    users = root / "users"
    users.write_text(f"{USER}:{{PLAIN}}secret:{NOBODY}:{NOBODY}::{mail}/{USER}::\n")
    # The warning goes to unix:ROOT/<user>.sock (2.3: %u, 2.4: %{user}).
    extra = installation.config.quota(users, sockets=root)
    dovecot = PrivateDovecot([], directory=root / "dovecot", installation=installation,
                             extra_config=extra, wait_for=["auth-userdb"])
    dovecot.start()
    try:
        yield Quota(installation, dovecot, root)
    finally:
        dovecot.stop()


def test_quota_warning(quota: Quota) -> None:
    message = b"From: a@example.com\r\nSubject: quota\r\n\r\n" + b"x" * 1500 + b"\r\n"
    config = str(quota.dovecot.config_path)
    with RecordingService(quota.root / f"{USER}.sock", reply=None) as recorder:
        saved = run_in(quota.installation, [tool(quota.installation, "doveadm"), "-c", config,
                                            "save", "-u", USER], input=message)
        assert saved.returncode == 0, saved.stderr.decode(errors="replace")
        (dovecot,) = recorder.wait(1)
        code, stderr = trigger("quota-warning", "--config", config, "--user", USER)
        _, ours = recorder.wait(2)
    assert dovecot == b"VERSION\tscript\t4\t0\nnoreply\n10\nqw-trigger\n\n"
    assert ours == dovecot
    assert code == 0, stderr
    assert "sent; the quota plugin closes the connection without waiting" in stderr


# --- welcome and quota_over_status through doveadm ------------------------------------------


@dataclass
class Plugins:
    installation: Installation
    dovecot: PrivateDovecot
    root: Path
    users: Path

    def config(self, extra: str, name: str) -> Path:
        """The private Dovecot's configuration with ``extra`` as its mail settings."""
        path = self.root / f"{name}.conf"
        path.write_text(self.dovecot.config_text().replace(self.dovecot.extra_config, extra))
        return path

    def doveadm(self, config: Path, *args: str) -> None:
        done = run_in(self.installation,
                      [tool(self.installation, "doveadm"), "-c", str(config), *args],
                      input=b"From: a@example.com\r\nSubject: hi\r\n\r\nhi\r\n")
        assert done.returncode == 0, done.stderr.decode(errors="replace")


@pytest.fixture(scope="module")
def plugins(installation: Installation, workspace: Path) -> Iterator[Plugins]:
    root = workspace / "plugins"
    mail = root / "mail"
    mail.mkdir(parents=True)
    os.chown(mail, NOBODY, NOBODY)
    users = root / "users"
    flag = f"userdb_{installation.config.over_status_field}=TRUE"
    users.write_text("".join(
        f"{name}:{{PLAIN}}secret:{NOBODY}:{NOBODY}::{mail}/{name}::{extra}\n"
        for name, extra in (("wl-no", ""), ("wl-yes", ""), ("qo-flag", flag), ("qo-over", ""))))
    extra = installation.config.welcome(users, root / "welcome.sock", wait=False)
    dovecot = PrivateDovecot([], directory=root / "dovecot", installation=installation,
                             extra_config=extra, wait_for=["auth-userdb"])
    dovecot.start()
    try:
        yield Plugins(installation, dovecot, root, users)
    finally:
        dovecot.stop()


@pytest.mark.parametrize("wait", [False, True], ids=["wait-no", "wait-yes"])
def test_welcome(plugins: Plugins, wait: bool) -> None:
    """Creating the INBOX (doveadm save to a new user) runs the welcome script."""
    user = "wl-yes" if wait else "wl-no"
    socket = plugins.root / "welcome.sock"
    config = plugins.config(plugins.installation.config.welcome(plugins.users, socket, wait),
                            f"welcome-{user}")
    # 2.3's welcome client never half-closes: answer once the header is in.
    with RecordingService(socket, b"+\n" if wait else None, header_only=True) as recorder:
        plugins.doveadm(config, "save", "-u", user)
        (dovecot,) = recorder.wait(1)
        code, stderr = trigger("welcome", "--config", str(config), "--user", user)
        _, ours = recorder.wait(2)
    options = b"-" if wait else b"noreply"
    assert dovecot == b"VERSION\tscript\t4\t0\n" + options + f"\nhello\n{user}\n\n".encode()
    assert ours == dovecot
    assert code == 0, stderr
    assert ("success" if wait else "does not learn the script's exit status") in stderr


def test_quota_over_status(plugins: Plugins) -> None:
    """A user flagged over quota who is not: the status script runs at login."""
    socket = plugins.root / "over.sock"
    config = plugins.config(plugins.installation.config.quota_over_status(plugins.users, socket),
                            "over")
    with RecordingService(socket, reply=None) as recorder:
        plugins.doveadm(config, "quota", "get", "-u", "qo-flag")
        (dovecot,) = recorder.wait(1)
        # The flag comes from the userdb, which trigger does not read.
        code, stderr = trigger("quota-over-status", "--config", str(config), "--user",
                               "qo-flag", "--current", "TRUE")
        _, ours = recorder.wait(2)
    assert dovecot == b"VERSION\tscript\t4\t0\nnoreply\nmismatch\nqo-flag\nTRUE\n\n"
    assert ours == dovecot
    assert code == 0, stderr


def test_quota_over_status_without_flag(plugins: Plugins) -> None:
    """A user over quota without a flag: 2.4 appends an empty argument, 2.3 none.

    2.4's empty last argument is an empty line that ends the header early
    (quirk Q21); trigger sends the same bytes. The message is put into the
    Maildir directly, past the 10 KB quota the plugin would enforce.
    """
    socket = plugins.root / "over-empty.sock"
    config = plugins.config(plugins.installation.config.quota_over_status(plugins.users, socket),
                            "over-empty")
    maildir = plugins.root / "mail" / "qo-over" / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "new" / "1.big").write_bytes(b"Subject: big\r\n\r\n" + b"x" * 20000 + b"\r\n")
    for path in (maildir.parent, *maildir.glob("**"), maildir / "new" / "1.big"):
        os.chown(path, NOBODY, NOBODY)
    with RecordingService(socket, reply=None) as recorder:
        plugins.doveadm(config, "quota", "get", "-u", "qo-over")
        (dovecot,) = recorder.wait(1, timeout=5)
        code, stderr = trigger("quota-over-status", "--config", str(config), "--user",
                               "qo-over")
        _, ours = recorder.wait(2)
    last = b"\n" if plugins.installation.version >= (2, 4) else b""
    assert dovecot == b"VERSION\tscript\t4\t0\nnoreply\nmismatch\nqo-over\n" + last + b"\n"
    assert ours == dovecot
    assert code == 0, stderr


# --- Pigeonhole's programs through sieve-test -----------------------------------------------

SCRIPTS = {
    "sieve-pipe": 'require "vnd.dovecot.pipe";\npipe "prog" {args};\n',
    "sieve-filter": 'require "vnd.dovecot.filter";\nfilter "prog" {args};\n',
    "sieve-execute": 'require "vnd.dovecot.execute";\nexecute :pipe "prog" {args};\n',
}


def sieve_list(values: list[str]) -> str:
    return "[" + ", ".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                           for v in values) + "]"


def passwd(installation: Installation, uid: int) -> tuple[str, str]:
    """Name and home of ``uid`` in the installation's /etc/passwd."""
    for line in installation.host_path("/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 5 and fields[2] == str(uid):
            return fields[0], fields[5]
    raise AssertionError(f"uid {uid} not in {installation.label}'s /etc/passwd")


def host_line(request: bytes) -> bytes:
    found = re.search(rb"^env_HOST=.*$", request, re.MULTILINE)
    assert found is not None, request
    return found.group()


@dataclass
class SieveRun:
    """One sieve-test run against a recording service, and trigger's run after it."""

    dovecot: bytes
    ours: bytes
    user: str
    home: str
    sieve_test: str
    code: int
    stderr: str
    elapsed: float


def run_both(installation: Installation, work: Path, kind: str,
             reply: bytes | None = b"+\n", args: list[str] = PROGRAM_ARGS,
             exec_timeout: str = "", delay: float = 0.0) -> SieveRun:
    """``sieve-test`` with the script of ``kind``, then ``execproto trigger kind``."""
    tool(installation, "sieve-test")
    extension = kind.removeprefix("sieve-")
    (work / "mail").mkdir(parents=True)
    script = work / "test.sieve"
    script.write_text(SCRIPTS[kind].format(args=sieve_list(args)))
    message = work / "msg.eml"
    message.write_bytes(MESSAGE)
    for path in (work, work / "mail", script):
        os.chown(path, NOBODY, NOBODY)  # sieve-test saves the compiled script
    base_dir = work / "run"
    config = work / "sieve.conf"
    config.write_text(installation.config.sieve(base_dir, work / "mail", exec_timeout))
    # 2.3's sieve-test passes its USER and HOME environment variables, 2.4's
    # the name and home of its uid (PROTOCOL.md appendix B).
    user, home = (SIEVE_USER, str(work)) if installation.version < (2, 4) else passwd(
        installation, NOBODY)
    with RecordingService(base_dir / f"sieve-{extension}" / "prog", reply,
                          delay=delay) as recorder:
        done = run_in(
            installation,
            [tool(installation, "sieve-test"), "-c", str(config), "-e", "-t", "-",
             "-T", "level=actions", "-f", SENDER, "-r", RECIPIENT, "-a", ORIG_RECIPIENT,
             str(script), str(message)],
            as_nobody=True,
            env={"USER": SIEVE_USER, "HOME": str(work), "PATH": os.environ.get("PATH", "")})
        (dovecot,) = recorder.wait(1)
        started = time.monotonic()
        code, stderr = trigger(kind, "--config", str(config), "--user", user, "--home",
                               home, "--program", "prog", *args, "--message",
                               str(message), "--sender", SENDER, "--recipient", RECIPIENT,
                               "--orig-recipient", ORIG_RECIPIENT)
        elapsed = time.monotonic() - started
        _, ours = recorder.wait(2)
    said = (done.stdout + done.stderr).decode(errors="replace").replace("`", "'")
    return SieveRun(dovecot, ours, user, home, said, code, stderr, elapsed)


@pytest.mark.parametrize("kind", list(SCRIPTS))
def test_sieve(installation: Installation, workspace: Path, kind: str) -> None:
    run = run_both(installation, workspace / kind, kind)
    dovecot = run.dovecot
    header = (f"VERSION\tscript\t4\t0\nenv_USER={run.user}\nenv_HOME={run.home}\n").encode()
    assert dovecot.startswith(header), dovecot
    # HOST: trigger's default follows Dovecot's my_hostdomain() (the
    # canonical name of the host name); the chroots resolve it alike.
    assert host_line(run.ours) == host_line(dovecot)
    assert run.ours == dovecot
    assert dovecot.endswith(
        f"env_SENDER={SENDER}\nenv_RECIPIENT={RECIPIENT}\nenv_ORIG_RECIPIENT={ORIG_RECIPIENT}\n"
        "-\none\ntwo words\ntab\x01there\n\nafter\n\n".encode() + MESSAGE.replace(b"\n", b"\r\n"))
    assert "final result: success" in run.sieve_test
    assert run.code == 0, run.stderr
    assert ("piped message to program 'prog'" if kind == "sieve-pipe"
            else "executed program successfully") in run.stderr


# What Pigeonhole says for a script's "-" and for a reply without a result
# code (an internal failure), and trigger's exit status for it.
VERDICTS = {
    ("sieve-pipe", b"-\n"): ("failed to execute to program 'prog'", 1),
    ("sieve-pipe", b""): ("failed to pipe message to program 'prog'", 75),
    ("sieve-filter", b"-\n"): ("filter action: program indicated false result", 1),
    ("sieve-filter", b""): ("filter action: failed to execute to program 'prog'", 75),
    ("sieve-execute", b"-\n"): ("execute action: program indicated false result", 1),
    ("sieve-execute", b""): ("execute action: failed to execute to program 'prog'", 75),
}


@pytest.mark.parametrize(("kind", "reply"), list(VERDICTS),
                         ids=[f"{k}-{'minus' if r else 'none'}" for k, r in VERDICTS])
def test_sieve_verdict(installation: Installation, workspace: Path, kind: str,
                       reply: bytes) -> None:
    """trigger judges a failure as sieve-test does, in Pigeonhole's words."""
    run = run_both(installation, workspace / f"{kind}-{len(reply)}", kind, reply, ["a"])
    assert run.ours == run.dovecot
    said, code = VERDICTS[kind, reply]
    assert said in run.sieve_test, run.sieve_test
    assert said in run.stderr
    assert run.code == code, run.stderr
    # A false result lets the script go on; an error (or a failed pipe) fails it.
    failed = kind == "sieve-pipe" or not reply
    assert ("final result: failed" if failed else "final result: success") in run.sieve_test


def test_sieve_exec_timeout(installation: Installation, workspace: Path) -> None:
    """sieve_pipe_exec_timeout = 1s and a script that takes 3 s: both give up after 1 s."""
    run = run_both(installation, workspace / "exec-timeout", "sieve-pipe", args=["a"],
                   exec_timeout="1s", delay=3.0)
    assert run.ours == run.dovecot
    assert "failed to pipe message to program 'prog'" in run.sieve_test, run.sieve_test
    assert "final result: failed" in run.sieve_test
    assert run.code == 75, run.stderr
    assert "execution timed out (> 1 s)" in run.stderr
    # The CLI's own start takes a part of it; the script's 3 s are not waited for.
    assert 1.0 <= run.elapsed < 2.9, run.elapsed
