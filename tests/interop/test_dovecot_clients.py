"""Dovecot's own clients against ``execproto serve`` (every flavour, over unix).

Each test runs once per installation (2.3.19, 2.4.1, 2.4.5); the tools
(``doveadm``, ``sieve-test``) run in the installation, ``execproto serve``
on the host, with its sockets in the shared workspace.

* The quota plugin's warning (``doveadm save`` crosses a tiny quota's
  threshold; 2.3's ``quota_warning`` string or 2.4's ``quota`` filter with an
  ``execute`` block): a synchronous ``noreply`` request, then close. The
  same warning through the fork driver shows which uids the program gets.
* Dovecot's dot encoder, seen through ``dovecot-lda``'s Sieve redirect to an
  SMTP sink: a bare CR before a dot (PROTOCOL.md 5.2.3).
* Pigeonhole's ``sieve-test`` with ``vnd.dovecot.filter``, ``.execute`` and
  ``.pipe``, which use the program client in reply mode with a payload and
  ``env_`` lines. The same sieve script runs once against Dovecot's own
  ``script`` services and once per flavour against ``execproto serve``; the
  results must be the same.

Dovecot's mail processes refuse to run as root, so the mail user is uid
65534 and everything it touches (the maildir, the sockets, the sieve
script) lives in a directory outside pytest's private temporary tree.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .dovecot import Installation, PrivateDovecot, ScriptService, write_script
from .tools import (
    FLAVOURS,
    RUN_LIMIT,
    ServeProcess,
    free_port,
    read_records,
    unavailable,
    wait_records,
    write_probe,
)

NOBODY = 65534
MAIL_SENDER = "sender@example.com"
MAIL_RECIPIENT = "rcpt@example.com"
MAIL_ORIG_RECIPIENT = "orig@example.com"
SIEVE_USER = "sieveuser"


def tool(installation: Installation, name: str) -> str:
    """Path of a Dovecot tool; skips the test (fails it under CI) if missing."""
    found = installation.tool(name)
    if found is None:
        unavailable(f"Dovecot {installation.label}: {name} not found")
    return found


def run_in(installation: Installation, argv: Sequence[str], *, as_nobody: bool = False,
           input: bytes = b"", env: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess[bytes]:
    """Run a Dovecot tool of ``installation`` (bounded); output is captured."""
    nobody = as_nobody and not installation.chrooted  # chroot switches itself
    return subprocess.run(
        installation.command(argv, user=NOBODY if as_nobody and installation.chrooted else None),
        input=input, capture_output=True, timeout=RUN_LIMIT, check=False, env=env,
        user=NOBODY if nobody else None, group=NOBODY if nobody else None,
        extra_groups=[] if nobody else None,
    )


@pytest.fixture(scope="module")
def public_dir(workspace: Path) -> Path:
    """The workspace: uid 65534 can enter it (pytest's tree is mode 0700)."""
    return workspace


def serve_args(flavour: str, socket: Path, probe: Path, *script_args: str,
               allow: str = "") -> list[str]:
    """``execproto serve`` arguments: the probe on a unix socket anyone may use.

    The probe runs with the test's interpreter: its shebang names the
    installation's, which may be a chroot's. Its argv is the same either way.
    """
    options = ["--adapter", flavour, "--unix", str(socket), "--mode", "0666"]
    if allow:
        options += ["-e", allow]
    return [*options, sys.executable, str(probe), *script_args]


# --- quota warnings ---------------------------------------------------------------


@dataclass
class Quota:
    """A private Dovecot with quota warnings to ``unix:<root>/<user>.sock``."""

    installation: Installation
    dovecot: PrivateDovecot
    root: Path
    probe: Path
    users: Path

    def records(self, backend: str) -> Path:
        path = self.root / f"records-{backend}"
        path.mkdir(exist_ok=True)
        return path

    def save(self, user: str, config: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        """Deliver a 1.5 KB message (15% of the 10 KB quota) with doveadm."""
        message = b"From: a@example.com\r\nSubject: quota\r\n\r\n" + b"x" * 1500 + b"\r\n"
        config = config or self.dovecot.config_path
        return run_in(self.installation,
                      [tool(self.installation, "doveadm"), "-c", str(config), "save", "-u", user],
                      input=message)


@pytest.fixture(scope="module")
def quota(installation: Installation, public_dir: Path) -> Iterator[Quota]:
    root = public_dir / "quota"
    mail = root / "mail"
    mail.mkdir(parents=True)
    os.chown(mail, NOBODY, NOBODY)
    users = root / "users"
    users.write_text("".join(
        f"qw-{name}:{{PLAIN}}secret:{NOBODY}:{NOBODY}::{mail}/qw-{name}::\n"
        for name in ("dovecot", "raw", "fork", "tcp", *FLAVOURS)))
    probe = write_probe(root / "probe.py", installation.python)
    # Each backend gets its own user: the warning's socket path has the user.
    extra = installation.config.quota(users, sockets=root)
    service = ScriptService("qw-dovecot", probe, args=(str(root / "records-dovecot"), "raw"),
                            unix_listener=str(root / "qw-dovecot.sock"))
    dovecot = PrivateDovecot([service], directory=root / "dovecot", installation=installation,
                             extra_config=extra, wait_for=["auth-userdb"])
    dovecot.start()
    try:
        yield Quota(installation, dovecot, root, probe, users)
    finally:
        dovecot.stop()


def check_quota_warning(quota: Quota, backend: str, records: Path) -> None:
    user = f"qw-{backend}"
    saved = quota.save(user)
    assert saved.returncode == 0, saved.stderr.decode(errors="replace")
    (record,) = wait_records(records)
    # Request b"VERSION\tscript\t4\t0\nnoreply\n10\n<user>\n\n", then close.
    assert record["argv"] == [str(quota.probe), str(records), "raw", "10", user]
    assert record["env"] == {}
    assert record["stdin"] == ""


def test_quota_warning_reference(quota: Quota) -> None:
    """The same warning through Dovecot's own script service."""
    check_quota_warning(quota, "dovecot", quota.records("dovecot"))


def test_quota_warning_request_bytes(quota: Quota) -> None:
    """The exact request, seen by a passthrough (``-p``) service."""
    records = quota.records("raw")
    args = ["-p", *serve_args("blocking", quota.root / "qw-raw.sock", quota.probe,
                              str(records), "raw", "request")]
    with ServeProcess(args, quota.root / "serve-raw.log") as serve:
        saved = quota.save("qw-raw")
        assert saved.returncode == 0, saved.stderr.decode(errors="replace")
        (record,) = wait_records(records)
    assert serve.stop() == 0
    # Synchronous, noreply, no env, no payload (PROTOCOL.md 2.11, CV-04).
    assert record["stdin"] == "VERSION\tscript\t4\t0\nnoreply\n10\nqw-raw\n\n"
    assert record["argv"] == [str(quota.probe), str(records), "raw", "request"]


def test_quota_warning(quota: Quota, flavour: str) -> None:
    records = quota.records(flavour)
    log = quota.root / f"serve-{flavour}.log"
    args = serve_args(flavour, quota.root / f"qw-{flavour}.sock", quota.probe, str(records),
                      "raw")
    with ServeProcess(args, log) as serve:
        check_quota_warning(quota, flavour, records)
    assert serve.stop() == 0
    assert f"args=[10 qw-{flavour}]" in serve.log(), serve.log()


# The fork driver's program: its args, its ids from /proc (an exec does not
# change them) and what its descriptor 0 is. A shell script: it runs as the
# mail user, who cannot use the test's interpreter.
IDS_SCRIPT = """\
#!/bin/sh
out="$1"; shift
{
  echo "args: $*"
  /bin/grep -E '^(Uid|Gid|Groups):' /proc/self/status
  echo "stdin: $(/bin/readlink /proc/$$/fd/0) $(/bin/grep flags: /proc/$$/fdinfo/0)"
} >"$out.tmp" 2>/dev/null
/bin/mv "$out.tmp" "$out"
"""
# Real, effective, saved and filesystem uid (then gid) of the fork driver's
# program, a /bin/sh script, when doveadm (root) delivers for uid 65534.
NO_ROOT = [f"Uid:\t{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}",
           f"Gid:\t{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}"]
# 2.4.0 to 2.4.3 exec it with the real uid 0 kept (effective 65534); dash,
# Debian's /bin/sh, then sets its effective uid to the real one: root.
AS_ROOT = ["Uid:\t0\t0\t0\t0", f"Gid:\t{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}"]


def stdin_of(lines: list[str]) -> tuple[str, int]:
    """What the ids script found as its descriptor 0: target, access mode."""
    _, target, _, flags = lines[-1].split()
    return target, int(flags, 8) & os.O_ACCMODE


def fork_ids(installation: Installation) -> list[str]:
    """The ids of the fork driver's program on ``installation`` (measured)."""
    return AS_ROOT if (2, 4) <= installation.version < (2, 4, 4) else NO_ROOT


def test_quota_warning_fork_uids(quota: Quota) -> None:
    """The warning through the fork driver: the program's uids and gids.

    ``doveadm`` for a user mask (``-u 'qw-fork*'``) runs as root and reaches
    each user's mail with effective ids only. 2.3 applies the user's ids in
    full before exec; 2.4.0 keeps real root, which 2.4.4 drops again ("Drop
    any real root privileges before program execvp()", PROTOCOL.md 8.1).
    """
    records = quota.records("fork")
    records.chmod(0o777)  # the program does not run as root
    script = write_script(quota.root / "ids.sh", IDS_SCRIPT)
    out = records / "ids.txt"
    config = quota.root / "fork.conf"
    config.write_text(quota.dovecot.config_text().replace(
        quota.dovecot.extra_config,
        quota.installation.config.quota(quota.users, fork=[str(script), str(out)])))

    saved = quota.save("qw-fork*", config)

    assert saved.returncode == 0, saved.stderr.decode(errors="replace")
    deadline = time.monotonic() + RUN_LIMIT
    while not out.exists():  # the warning runs synchronously: a formality
        assert time.monotonic() < deadline, saved.stderr.decode(errors="replace")
        time.sleep(0.02)
    lines = out.read_text().splitlines()
    assert lines[0] == "args: 10 qw-fork"
    assert lines[1:3] == fork_ids(quota.installation)
    # No input: descriptor 0 is /dev/null opened write-only, so reading it
    # fails with EBADF instead of giving EOF (every version).
    assert stdin_of(lines) == ("/dev/null", os.O_WRONLY)


# --- Pigeonhole extprograms ----------------------------------------------------------

SIEVE_SCRIPT = """\
require ["vnd.dovecot.filter", "vnd.dovecot.execute", "vnd.dovecot.pipe", "variables"];
filter "upper" ["one", "two words"];
execute :pipe :output "out" "exec" ["x", "y z"];
if header :is "x-filtered" "one two words" {
  pipe "pipe" ["p1\tliteral tab", "${out}"];
}
keep;
"""
MESSAGE = b"From: a@example.com\nTo: rcpt@example.com\nSubject: hello\n\nbody line\n.dot\n"
# socket directory (relative to base_dir), program name, probe action
PROGRAMS = [
    ("sieve-filter", "upper", "filter"),
    ("sieve-execute", "exec", "exec"),
    ("sieve-pipe", "pipe", "pipe"),
]
ALLOW = "USER,SENDER,RECIPIENT"


@dataclass
class SieveRun:
    """What one ``sieve-test`` run produced."""

    returncode: int
    stdout: str
    stderr: str
    records: dict[str, dict[str, Any]]
    stored: list[bytes]


@dataclass
class Sieve:
    """Files for the sieve-test runs, and Dovecot's own services for them."""

    installation: Installation
    root: Path
    probe: Path
    records: Path
    dovecot: PrivateDovecot

    def run(self, base_dir: Path, name: str) -> SieveRun:
        """Run the sieve script on the message with sockets under ``base_dir``."""
        for old in self.records.iterdir():
            old.unlink()
        work = self.root / f"work-{name}"
        work.mkdir()
        (work / "test.sieve").write_text(SIEVE_SCRIPT)
        (work / "msg.eml").write_bytes(MESSAGE)
        (work / "mail").mkdir()
        for path in (work, work / "mail", work / "test.sieve"):
            os.chown(path, NOBODY, NOBODY)  # sieve-test saves the compiled script
        config = work / "sieve.conf"
        config.write_text(self.installation.config.sieve(base_dir, work / "mail"))
        # Mail processes do not run as root: run it as uid 65534. Without -u
        # it takes USER and HOME from the environment, and no userdb.
        done = run_in(
            self.installation,
            [tool(self.installation, "sieve-test"), "-c", str(config), "-e", "-t", "-",
             "-T", "level=commands", "-f", MAIL_SENDER, "-r", MAIL_RECIPIENT,
             "-a", MAIL_ORIG_RECIPIENT, str(work / "test.sieve"), str(work / "msg.eml")],
            as_nobody=True,
            env={"USER": SIEVE_USER, "HOME": str(work), "PATH": os.environ.get("PATH", "")},
        )
        records = {}
        for record in read_records(self.records):
            action = record["argv"][3]
            assert action not in records, f"{action} ran twice"
            records[action] = record
        # 2.4.5 files the message under cur/ with the $HasNoAttachment keyword.
        stored = [p.read_bytes() for p in sorted((work / "mail").glob("**/[nc][eu][wr]/*"))]
        return SieveRun(done.returncode, done.stdout.decode(errors="replace"),
                        done.stderr.decode(errors="replace"), records, stored)


@pytest.fixture(scope="module")
def sieve(installation: Installation, public_dir: Path) -> Iterator[Sieve]:
    tool(installation, "sieve-test")
    root = public_dir / "sieve"
    records = root / "records"
    records.mkdir(parents=True)
    probe = write_probe(root / "probe.py", installation.python)
    services = [
        ScriptService(f"{directory}-{program}", probe, args=(str(records), "raw", action),
                      env_allowlist=ALLOW.split(","), unix_listener=f"{directory}/{program}")
        for directory, program, action in PROGRAMS
    ]
    dovecot = PrivateDovecot(services, directory=root / "dovecot", installation=installation)
    dovecot.start()
    try:
        yield Sieve(installation, root, probe, records, dovecot)
    finally:
        dovecot.stop()


@pytest.fixture(scope="module")
def sieve_reference(sieve: Sieve) -> SieveRun:
    """The sieve-test run against Dovecot's own script services."""
    return sieve.run(sieve.dovecot.base_dir, "dovecot")


def test_sieve_reference(sieve: Sieve, sieve_reference: SieveRun) -> None:
    """What Pigeonhole and Dovecot's script service do, pinned."""
    run = sieve_reference
    assert run.returncode == 0, run.stderr
    prefix = [str(sieve.probe), str(sieve.records), "raw"]
    # env_ lines for USER, HOME, HOST, SENDER, RECIPIENT, ORIG_RECIPIENT
    # (PROTOCOL.md 2.11); the service keeps the -e names.
    # USER: 2.3's sieve-test passes on its USER environment variable, 2.4's
    # the name of its uid (measured on 2.4.1 and 2.4.5).
    user = SIEVE_USER if sieve.installation.version < (2, 4) else "nobody"
    env = {"USER": user, "SENDER": MAIL_SENDER, "RECIPIENT": MAIL_RECIPIENT}
    crlf = MESSAGE.replace(b"\n", b"\r\n")
    filtered = b"X-Filtered: one two words\r\n" + crlf
    assert run.records["filter"] == {
        "argv": [*prefix, "filter", "one", "two words"], "env": env,
        "stdin": crlf.decode(), "stdin_sha256": run.records["filter"]["stdin_sha256"],
    }
    assert run.records["exec"]["argv"] == [*prefix, "exec", "x", "y z"]
    assert run.records["exec"]["stdin"] == filtered.decode()
    # Sieve allows TAB (not CR, LF) in program arguments; both the literal
    # one and the one in the execute output are sent tab-escaped.
    assert run.records["pipe"]["argv"] == [*prefix, "pipe", "p1\tliteral tab", "exec\toutput"]
    assert run.records["pipe"]["stdin"] == filtered.decode()
    assert all(r["env"] == env for r in run.records.values())
    # keep stored the filtered message (maildir: LF line ends).
    assert run.stored == [filtered.replace(b"\r\n", b"\n")]
    assert "executed program successfully" in run.stdout
    assert "changed message" in run.stdout
    assert "final result: success" in run.stderr


def test_sieve_against_serve(sieve: Sieve, sieve_reference: SieveRun, flavour: str) -> None:
    base = sieve.root / f"serve-{flavour}"
    servers = []
    try:
        for directory, program, action in PROGRAMS:
            args = serve_args(flavour, base / directory / program, sieve.probe,
                              str(sieve.records), "raw", action, allow=ALLOW)
            (base / directory).mkdir(parents=True, exist_ok=True)
            servers.append(ServeProcess(args, sieve.root / f"{flavour}-{program}.log").start())
        ours = sieve.run(base, flavour)
    finally:
        codes = [serve.stop() for serve in servers]
    assert codes == [0] * len(PROGRAMS)
    reference = sieve_reference

    def normal(text: str, base_dir: Path) -> str:
        return text.replace(str(base_dir), "BASE_DIR")

    assert ours.returncode == reference.returncode, ours.stderr
    assert ours.stdout == reference.stdout
    assert normal(ours.stderr, base) == normal(reference.stderr, sieve.dovecot.base_dir)
    assert ours.records == reference.records
    assert ours.stored == reference.stored
    for serve in servers:
        # The socket files are gone after SIGTERM.
        assert not any(Path(a).exists() for a in serve.addresses)



# --- Dovecot's dot encoder -------------------------------------------------------------
#
# No Dovecot client sends a payload through the program client's tcp driver
# (quota warnings and welcome have none, Pigeonhole's extprograms use unix
# or fork, and a synchronous tcp run crashes: Q13), so its dot encoder
# (ostream-dot, PROTOCOL.md 5.2.3) is observed where it is shared: SMTP DATA.
# dovecot-lda runs a Sieve "redirect" and submits the message to a sink.

REDIRECT_MESSAGE = b"From: a@example.com\r\nSubject: dots\r\n\r\na\r.b\r\n\r.c\r\nend\r\n"
# Upstream, a bare CR + "." is copied up to 2.4.4 and stuffed from 2.4.5
# (CVE-2026-33604). Debian backported the fix to both of its older builds
# (2.3.19.1+deb12u7, 2.4.1+dfsg1-6+deb13u7), measured here.
BODY_STUFFED = b"a\r\n..b\r\n\r\n..c\r\nend\r\n.\r\n"
BODY_COPIED = b"a\r.b\r\n\r.c\r\nend\r\n.\r\n"
BARE_CR_DOT = {"2.3.19": BODY_STUFFED, "2.4.1": BODY_STUFFED, "2.4.5": BODY_STUFFED}


class SmtpSink:
    """A one-connection SMTP server on 127.0.0.1 that keeps the DATA bytes as sent."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(RUN_LIMIT)
        self.port: int = self.listener.getsockname()[1]
        self.data = b""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
            with connection, connection.makefile("rb") as lines:
                connection.settimeout(RUN_LIMIT)
                connection.sendall(b"220 sink ESMTP\r\n")
                while line := lines.readline():
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        connection.sendall(b"250-sink\r\n250 8BITMIME\r\n")
                    elif verb == b"DATA":
                        connection.sendall(b"354 go on\r\n")
                        while (part := lines.readline()) and part != b".\r\n":
                            self.data += part
                        self.data += part
                        connection.sendall(b"250 kept\r\n")
                    elif verb == b"QUIT":
                        connection.sendall(b"221 bye\r\n")
                        return
                    else:
                        connection.sendall(b"250 ok\r\n")
        except BaseException as exc:  # reported by body()
            self.error = exc
        finally:
            self.listener.close()

    def body(self) -> bytes:
        """The DATA bytes after the header (up to and with the end line)."""
        self.thread.join(RUN_LIMIT)
        assert not self.thread.is_alive(), "SMTP sink still running"
        assert self.error is None, self.error
        return self.data.partition(b"\r\n\r\n")[2]


def test_dot_encoder_bare_cr(installation: Installation, public_dir: Path) -> None:
    script_binary = installation.script_binary()
    assert script_binary is not None
    lda = script_binary.parent / "dovecot-lda"
    if not os.access(installation.host_path(lda), os.X_OK):
        unavailable(f"Dovecot {installation.label}: {lda} not found")
    work = public_dir / "lda"
    (work / "mail").mkdir(parents=True)
    script = work / "redirect.sieve"
    script.write_text('redirect "to@example.com";\n')
    for path in (work, work / "mail", script):
        os.chown(path, NOBODY, NOBODY)  # the compiled script is saved next to it
    sink = SmtpSink()
    config = work / "lda.conf"
    config.write_text(installation.config.lda_redirect(work / "run", work / "mail", script,
                                                       sink.port))

    done = run_in(installation, [str(lda), "-c", str(config), "-f", "s@example.com"],
                  as_nobody=True, input=REDIRECT_MESSAGE,
                  env={"USER": "nobody", "HOME": str(work), "PATH": os.environ.get("PATH", "")})

    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert sink.body() == BARE_CR_DOT[installation.label]


def test_quota_warning_tcp_crashes(quota: Quota) -> None:
    """A warning to ``execproto serve`` over tcp: doveadm crashes first (Q13).

    A synchronous run of the tcp program client calls a NULL ioloop-switch
    hook, on every version so far; nothing reaches the service.
    """
    records = quota.records("tcp")
    port = free_port()
    config = quota.root / "tcp.conf"
    config.write_text(quota.dovecot.config_text().replace(
        quota.dovecot.extra_config, quota.installation.config.quota(quota.users, tcp_port=port)))
    args = ["--adapter", "blocking", "--tcp", f"127.0.0.1:{port}", sys.executable,
            str(quota.probe), str(records), "dot"]
    with ServeProcess(args, quota.root / "serve-tcp.log") as serve:
        saved = quota.save("qw-tcp", config)
    assert serve.stop() == 0
    assert saved.returncode == -signal.SIGSEGV, saved.stderr.decode(errors="replace")
    assert read_records(records) == []
    assert "args=" not in serve.log(), serve.log()  # no request was logged


# The same question for execproto's own fork driver, asked of a caller in
# the state doveadm is in: real uid 0, effective uid 65534.
FORK_CALLER = """\
import os, sys
from execproto.adapters import blocking  # imported as root: the tree is private

script, out = sys.argv[1:3]
os.setgroups([])
os.setresgid({nobody}, {nobody}, 0)
os.setresuid(0, {nobody}, 0)
result = blocking.run("exec:" + script, [out], timeout=20, connect_timeout=20)
sys.exit(0 if result.ok else 1)
"""


def test_execproto_fork_driver_uids() -> None:
    # Real root is dropped before exec, as Dovecot 2.4.4+ does (PROTOCOL.md 8.1).
    if os.geteuid() != 0:
        unavailable("needs root")
    directory = Path(tempfile.mkdtemp(prefix="execproto-fork-"))
    try:
        directory.chmod(0o777)  # the script writes as uid 65534
        script = write_script(directory / "ids.sh", IDS_SCRIPT)
        out = directory / "ids.txt"

        done = subprocess.run([sys.executable, "-c", FORK_CALLER.format(nobody=NOBODY),
                               str(script), str(out)], capture_output=True, timeout=RUN_LIMIT,
                              check=False)

        assert done.returncode == 0, done.stderr.decode(errors="replace")
        lines = out.read_text().splitlines()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert lines[0] == "args: "
    assert lines[1:3] == NO_ROOT


# --- the configuration text ------------------------------------------------------------


def test_configs_are_clean(installation: Installation, public_dir: Path) -> None:
    """Every dovecot.conf the tests write is read by the version's doveconf without a warning."""
    work = public_dir / "doveconf"
    work.mkdir()
    users = work / "users"
    users.write_text("")
    config = installation.config
    service = ScriptService("svc", work / "probe.py", args=("a",), env_allowlist=("FOO",),
                            unix_listener="sub/svc", inet_listener=True)
    dovecot = PrivateDovecot([service], directory=work / "dovecot", installation=installation)
    texts = {
        "services": dovecot.config_text(),
        "quota": dovecot.config_text() + config.quota(users, sockets=work),
        "quota-fork": dovecot.config_text() + config.quota(users, fork=["/bin/true", "x"]),
        "welcome": dovecot.config_text() + config.welcome(users, work / "w.sock", wait=True),
        "quota-over-status": dovecot.config_text() + config.quota_over_status(users,
                                                                              work / "o.sock"),
        "sieve": config.sieve(work / "run", work / "mail"),
        "sieve-timeout": config.sieve(work / "run", work / "mail", exec_timeout="1s"),
        "lda": config.lda_redirect(work / "run", work / "mail", work / "x.sieve", 25),
    }
    doveconf = tool(installation, "doveconf")
    for name, text in texts.items():
        path = work / f"{name}.conf"
        path.write_text(text)
        done = run_in(installation, [doveconf, "-n", "-c", str(path)])
        stderr = done.stderr.decode(errors="replace")
        assert (done.returncode, stderr) == (0, ""), f"{name}.conf:\n{text}"
