"""``execproto trace`` between Dovecot's own clients and a real ``script`` service.

Each test runs once per installation (2.3.19, 2.4.1, 2.4.5).  The tap runs
on the host as ``python -m execproto trace --json``; the clients
(``doveadm`` for quota warnings, Pigeonhole's ``sieve-test``) run in the
installation, and the service behind the tap is Dovecot's own ``script``
binary (and ``execproto serve`` once).  No Dovecot client can use tcp
(a synchronous tcp run crashes it: Q13), so the dot-framed tap runs between
execproto's client and Dovecot's service on its ``inet_listener``.  With and without the tap the
client's outcome and what the script receives must be the same, and the
record must show exactly what the client sent.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from execproto.adapters import blocking
from tests.interop.dovecot import Installation, PrivateDovecot, ScriptService, StartDovecot
from tests.interop.test_dovecot_clients import (  # noqa: F401 (fixtures, found by name)
    ALLOW,
    MAIL_ORIG_RECIPIENT,
    MAIL_RECIPIENT,
    MAIL_SENDER,
    NOBODY,
    PROGRAMS,
    SIEVE_USER,
    Sieve,
    SieveRun,
    public_dir,
    run_in,
    sieve,
    sieve_reference,
    tool,
)
from tests.interop.tools import RUN_LIMIT, ServeProcess, read_records, wait_records, write_probe
from tests.trace.helpers import TraceProcess

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@dataclass
class Quota:
    """A private Dovecot whose quota warnings go to ``unix:<root>/<user>.sock``.

    ``qw-direct.sock`` is Dovecot's own script service (running the probe);
    the other users' sockets are free for taps.
    """

    installation: Installation
    dovecot: PrivateDovecot
    root: Path
    probe: Path
    records: Path

    def save(self, user: str) -> tuple[int, str, dict[str, Any]]:
        """Cross the warning threshold of *user*; doveadm's status, stderr, the probe's record."""
        for old in self.records.iterdir():
            old.unlink()
        message = b"From: a@example.com\r\nSubject: quota\r\n\r\n" + b"x" * 1500 + b"\r\n"
        done = run_in(self.installation, [tool(self.installation, "doveadm"), "-c",
                                          str(self.dovecot.config_path), "save", "-u", user],
                      input=message)
        (record,) = wait_records(self.records)
        return done.returncode, done.stderr.decode(errors="replace"), record


@pytest.fixture(scope="module")
def quota(installation: Installation, public_dir: Path) -> Iterator[Quota]:  # noqa: F811
    root = public_dir / "quota"
    mail = root / "mail"
    mail.mkdir(parents=True)
    os.chown(mail, NOBODY, NOBODY)
    users = root / "users"
    users.write_text("".join(
        f"qw-{name}:{{PLAIN}}secret:{NOBODY}:{NOBODY}::{mail}/qw-{name}::\n"
        for name in ("direct", "traced", "serve")))
    records = root / "records"
    records.mkdir()
    probe = write_probe(root / "probe.py", installation.python)
    service = ScriptService("qw-direct", probe, args=(str(records), "raw"),
                            unix_listener=str(root / "qw-direct.sock"))
    dovecot = PrivateDovecot([service], directory=root / "dovecot", installation=installation,
                             extra_config=installation.config.quota(users, sockets=root),
                             wait_for=["auth-userdb"])
    dovecot.start()
    try:
        yield Quota(installation, dovecot, root, probe, records)
    finally:
        dovecot.stop()


def check_quota_record(record: dict[str, Any], user: str, upstream: Path) -> None:
    """The tap's record of one quota warning (PROTOCOL.md 2.11, CV-04)."""
    # doveadm may be gone before the tap reads /proc/PID/comm: the warning is
    # sent and the socket closed at once.
    assert record["client_command"] in ("doveadm", None)
    assert isinstance(record["client_pid"], int)
    assert record["upstream"] == f"unix:{upstream}"
    assert (record["version"], record["noreply"], record["alarm"]) == ("4.0", True, None)
    assert record["args"] == ["10", user]
    assert record["env"] == []
    header = f"VERSION\tscript\t4\t0\nnoreply\n10\n{user}\n\n"
    assert (record["request_bytes"], record["header_bytes"]) == (len(header), len(header))
    assert (record["payload_bytes"], record["payload_sha256"]) == (0, EMPTY_SHA256)
    assert (record["result"], record["detail"]) == ("noreply", "")


def test_quota_warning_through_trace(quota: Quota) -> None:
    """doveadm's quota warning -> trace -> Dovecot's script service, and directly."""
    direct = quota.save("qw-direct")
    upstream = quota.root / "qw-direct.sock"
    with TraceProcess(["--listen", f"unix:{quota.root / 'qw-traced.sock'}", "--mode", "0666",
                       "--to", f"unix:{upstream}", "--json"], quota.root) as tap:
        traced = quota.save("qw-traced")
        (record,) = tap.wait_records(1)
        assert tap.stop() == 0
    assert (traced[0], traced[1]) == (direct[0], direct[1]) == (0, "")
    for (_, _, probe), user in ((direct, "qw-direct"), (traced, "qw-traced")):
        assert probe["argv"] == [str(quota.probe), str(quota.records), "raw", "10", user]
        assert (probe["env"], probe["stdin"]) == ({}, "")
    check_quota_record(record, "qw-traced", upstream)
    assert not (quota.root / "qw-traced.sock").exists()


def test_quota_warning_through_trace_to_serve(quota: Quota) -> None:
    """The same warning, with ``execproto serve`` behind the tap."""
    upstream = quota.root / "serve.sock"
    serve_args = ["--unix", str(upstream), "--mode", "0666", sys.executable, str(quota.probe),
                  str(quota.records), "raw"]
    with ServeProcess(serve_args, quota.root / "serve.log") as serve, \
            TraceProcess(["--listen", f"unix:{quota.root / 'qw-serve.sock'}", "--mode", "0666",
                          "--to", f"unix:{upstream}", "--json"], quota.root, "serve") as tap:
        status, stderr, probe = quota.save("qw-serve")
        (record,) = tap.wait_records(1)
    assert serve.stop() == 0
    assert (status, stderr) == (0, "")
    assert probe["argv"] == [str(quota.probe), str(quota.records), "raw", "10", "qw-serve"]
    check_quota_record(record, "qw-serve", upstream)


def test_sieve_through_trace(sieve: Sieve, sieve_reference: SieveRun) -> None:  # noqa: F811
    """sieve-test's filter, execute and pipe -> trace -> Dovecot's script services."""
    base = sieve.root / "trace"
    taps = []
    try:
        for directory, program, _ in PROGRAMS:
            (base / directory).mkdir(parents=True, exist_ok=True)
            taps.append(TraceProcess(
                ["--listen", f"unix:{base / directory / program}", "--mode", "0666",
                 "--to", f"unix:{sieve.dovecot.base_dir / directory / program}",
                 "-e", ALLOW, "--json"], sieve.root, program))
        ours = sieve.run(base, "trace")
        records = {program: tap.wait_records(1) for (_, program, _), tap in zip(
            PROGRAMS, taps, strict=True)}
    finally:
        codes = [tap.stop() for tap in taps]
        for tap in taps:
            tap.kill()
    assert codes == [0] * len(PROGRAMS)
    reference = sieve_reference

    def normal(text: str, base_dir: Path) -> str:
        return text.replace(str(base_dir), "BASE_DIR")

    # The client's outcome, and what the scripts got, are the same as directly.
    assert ours.returncode == reference.returncode == 0, ours.stderr
    assert ours.stdout == reference.stdout
    assert normal(ours.stderr, base) == normal(reference.stderr, sieve.dovecot.base_dir)
    assert ours.records == reference.records
    assert ours.stored == reference.stored
    user = SIEVE_USER if sieve.installation.version < (2, 4) else "nobody"
    for (_, program, action), (record,) in zip(PROGRAMS, records.values(), strict=True):
        probe = ours.records[action]
        assert record["client_command"] == "sieve-test"
        assert (record["version"], record["noreply"], record["result"]) == ("4.0", False, "+")
        # The args as sent: the probe's argv after the service's own.
        assert record["args"] == [a.replace("\t", "\\t") for a in probe["argv"][4:]]
        # Every env line, and the ones the service's -e kept: exactly the script's env.
        env = {e["name"]: e["value"] for e in record["env"]}
        assert {"USER", "HOME", "SENDER", "RECIPIENT", "ORIG_RECIPIENT"} <= set(env)
        assert (env["USER"], env["SENDER"], env["RECIPIENT"], env["ORIG_RECIPIENT"]) == (
            user, MAIL_SENDER, MAIL_RECIPIENT, MAIL_ORIG_RECIPIENT)
        kept = {e["name"]: e["value"] for e in record["env"] if e["status"] == "kept"}
        assert kept == probe["env"]
        assert {e["status"] for e in record["env"]} == {"kept", "dropped"}
        assert record["payload_sha256"] == probe["stdin_sha256"]
        assert record["payload_bytes"] == len(probe["stdin"].encode("latin-1"))
        assert record["notes"] == [], program


def test_tcp_through_trace_to_dovecot(installation: Installation, start_dovecot: StartDovecot,
                                      workspace: Path) -> None:
    """Over tcp: execproto's client -> trace -> Dovecot's script service (dot framing)."""
    probe = write_probe(workspace / "tcp-probe.py", installation.python,
                        installation.provide_execproto(workspace))
    records = workspace / "tcp-records"
    records.mkdir()
    dovecot = start_dovecot([ScriptService("dot", probe, args=(str(records), "dot"),
                                           env_allowlist=("USER",), inet_listener=True)])
    upstream = f"tcp:127.0.0.1:{dovecot.port('dot')}"
    payload = b"line one\n.dot line\nlast"
    options: dict[str, Any] = {"input": payload, "env": {"USER": "u", "HOME": "/h"},
                               "timeout": RUN_LIMIT, "connect_timeout": RUN_LIMIT}
    direct = blocking.run(upstream, ["echo", "a b"], **options)
    direct_probe = wait_records(records)[0]
    for old in records.iterdir():
        old.unlink()
    with TraceProcess(["--listen", "tcp:127.0.0.1:0", "--to", upstream, "-e", "USER",
                       "--json", "--show-payload", "12"], workspace, "tcp") as tap:
        traced = blocking.run(f"tcp:{tap.address}", ["echo", "a b"], **options)
        (record,) = tap.wait_records(1)
    (traced_probe,) = read_records(records)
    assert direct.ok and (traced.status, traced.output) == (direct.status, direct.output)
    assert traced_probe == direct_probe
    assert record["args"] == ["echo", "a b"]
    assert record["env"] == [
        {"name": "USER", "value": "u", "status": "kept", "escaped": False},
        {"name": "HOME", "value": "/h", "status": "dropped", "escaped": False}]
    assert record["payload_head"] == "line one\\r\\n.."
    assert (record["payload_dot_end"], record["output_dot_end"]) == (True, True)
    assert (record["result"], record["notes"]) == ("+", [])
