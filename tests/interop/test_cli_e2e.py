"""The ``execproto`` command line end to end: ``run`` against ``serve``.

Every process is a real subprocess (``python -m execproto``). ``serve`` runs
the probe script (:data:`tools.PROBE_SOURCE`), raw behind its unix socket
and dot-framed behind its TCP port, plus a passthrough script that answers
without a result code (a truncated reply). Exit statuses of ``run``: 0
success, 1 failure, 75 internal failure, 64 usage error.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

import execproto

from .dovecot import write_script
from .tools import (
    FLAVOURS,
    ServeProcess,
    cli,
    dot_transform,
    free_port,
    load_flavour,
    read_records,
    wait_records,
    write_probe,
)

EX_TEMPFAIL = 75
EX_USAGE = 64
PAYLOAD = b"first line\n.dot line\nlast line without LF"
# Over TCP the probe decodes the payload, the client decodes the answer:
# both apply the dot transformation (PROTOCOL.md 5.4).
TCP_ECHO = dot_transform(dot_transform(PAYLOAD))
TRUNCATE = "#!/bin/sh\n/bin/cat >/dev/null\nprintf partial\n"
# A systemd-like launcher: the socket to fd 3, LISTEN_PID = its own pid
# (kept by exec), then the CLI.
LAUNCHER = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.executable, [sys.executable, "-m", "execproto", *sys.argv[2:]])
"""


@dataclass
class Files:
    """Scripts and record directories shared by the module."""

    root: Path
    probe: Path
    truncate: Path

    def records(self, name: str) -> Path:
        """A record directory, created empty."""
        path = self.root / f"records-{name}"
        path.mkdir(exist_ok=True)
        for old in path.iterdir():
            old.unlink()
        return path


@pytest.fixture(scope="module")
def files(module_dir: Path) -> Files:
    return Files(module_dir, write_probe(module_dir / "probe.py"),
                 write_script(module_dir / "truncate.sh", TRUNCATE))


@dataclass
class Served:
    """The ``serve`` processes of one flavour."""

    flavour: str
    unix: str
    tcp: str
    truncated_unix: str
    truncated_tcp: str
    records: Path


@pytest.fixture(scope="module", params=FLAVOURS)
def served(request: pytest.FixtureRequest, files: Files) -> Iterator[Served]:
    """``execproto serve --adapter FLAVOUR``: the probe and the truncating script.

    The probe listens on a unix socket and a TCP port at once ("auto"
    framing: dot over TCP). Stopping checks SIGTERM's promises: exit 0, the
    unix socket files and the private bind directories gone, the port closed.
    """
    flavour: str = request.param
    load_flavour(flavour)
    records = files.records(f"serve-{flavour}")
    sock = files.root / f"{flavour}.sock"
    truncated = files.root / f"{flavour}-truncated.sock"
    ports = [free_port(), free_port()]
    processes = [
        ServeProcess(["--adapter", flavour, "-e", "FOO,TABBY", "--unix", str(sock), "--tcp",
                      f"127.0.0.1:{ports[0]}", str(files.probe), str(records), "auto"],
                     files.root / f"{flavour}.log"),
        ServeProcess(["--adapter", flavour, "-p", "--unix", str(truncated), "--tcp",
                      f"127.0.0.1:{ports[1]}", str(files.truncate)],
                     files.root / f"{flavour}-p.log"),
    ]
    started: list[ServeProcess] = []
    try:
        for process in processes:
            started.append(process.start())
        assert [p.addresses for p in processes] == [
            [str(sock), f"127.0.0.1:{ports[0]}"], [str(truncated), f"127.0.0.1:{ports[1]}"]]
        yield Served(flavour, f"unix:{sock}", f"tcp:127.0.0.1:{ports[0]}",
                     f"unix:{truncated}", f"tcp:127.0.0.1:{ports[1]}", records)
    finally:
        codes = [process.stop() for process in started]
    assert codes == [0, 0], [p.log() for p in processes]
    assert not sock.exists() and not truncated.exists()
    assert not list(files.root.glob(".execproto-*"))  # no private bind directory left
    for port in ports:
        with socket.socket() as client:
            assert client.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more


def run(adapter: Served | str, *args: str, input: bytes = b"") -> tuple[int, bytes, str]:
    """``execproto run --adapter FLAVOUR ARGS`` with bounded timeouts."""
    flavour = adapter.flavour if isinstance(adapter, Served) else adapter
    done = cli("run", "--adapter", flavour, "--connect-timeout", "10", "--timeout", "20",
               *args, input=input)
    return done.returncode, done.stdout, done.stderr.decode(errors="replace")


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_run_success(served: Served, transport: str) -> None:
    records = served.records
    for old in records.iterdir():
        old.unlink()
    target = served.unix if transport == "unix" else served.tcp

    code, out, err = run(served, "--env", "FOO=foo", "--env", "TABBY=a\tb", "--env", "NO=x",
                         target, "echo", "two words", "tab\tx", "", input=PAYLOAD)

    assert (code, err) == (0, "")
    assert out == (PAYLOAD if transport == "unix" else TCP_ECHO)
    (record,) = read_records(records)
    assert record["argv"][2:] == ["auto", "echo", "two words", "tab\tx", ""]
    # execproto's service implements the fixed (2.4.3+) env handling: an
    # entry that needed escaping is kept, unlike Dovecot 2.3.19 (quirk Q6).
    assert record["env"] == {"FOO": "foo", "TABBY": "a\tb"}


def test_run_failure(served: Served) -> None:
    code, out, err = run(served, served.tcp, "fail", input=b"x")

    assert (code, out) == (1, b"failing")
    # The script said "-": no detail to print.
    assert err == ""


def test_run_noreply(served: Served) -> None:
    code, out, err = run(served, "--noreply", served.unix, "record", input=b"data")

    assert (code, out, err) == (0, b"recorded\n", "")


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_run_truncated_reply(served: Served, transport: str) -> None:
    target = served.truncated_unix if transport == "unix" else served.truncated_tcp

    code, out, err = run(served, target, input=b"x")

    assert code == EX_TEMPFAIL, err
    assert f"execproto: {target}: internal failure (protocol)" in err
    if transport == "unix":
        assert out == b"partia"  # everything but the held-back byte (PROTOCOL.md 4.2.1)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_run_connect_refused(flavour: str, files: Files, transport: str) -> None:
    # A socket that is bound but does not listen refuses connections.
    family = socket.AF_UNIX if transport == "unix" else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as dead:
        if transport == "unix":
            path = files.root / f"dead-{flavour}.sock"
            path.unlink(missing_ok=True)
            dead.bind(str(path))
            target = f"unix:{path}"
        else:
            dead.bind(("127.0.0.1", 0))
            target = f"tcp:127.0.0.1:{dead.getsockname()[1]}"

        code, out, err = run(flavour, target, "record", input=b"x")

    assert (code, out) == (EX_TEMPFAIL, b"")
    assert f"execproto: {target}: internal failure (" in err
    assert "refused" in err.lower()


def test_run_exec_target(flavour: str, files: Files) -> None:
    records = files.records(f"exec-{flavour}")

    code, out, err = run(flavour, "--env", "FOO=bar", f"exec:{files.probe}", str(records),
                         "auto", "record", "a b", input=b"payload")

    assert (code, out, err) == (0, b"recorded\n", "")
    (record,) = read_records(records)
    assert record["argv"] == [str(files.probe), str(records), "auto", "record", "a b"]
    assert record["env"] == {"FOO": "bar"}  # the fork driver's whole environment
    assert record["stdin"] == "payload"


def test_run_exec_target_failure() -> None:
    code, out, err = run("blocking", "exec:/bin/sh", "-c", "echo out; exit 3")

    assert (code, out) == (1, b"out\n")
    assert "terminated with non-zero exit code 3" in err


# --- configuration files ---------------------------------------------------------------


# Reading the configuration does not depend on the flavour: one is enough.
@pytest.mark.parametrize("served", ["blocking"], indirect=True)
def test_run_with_execute_config(served: Served, files: Files) -> None:
    for old in served.records.iterdir():
        old.unlink()
    unix_path = served.unix.removeprefix("unix:")
    config = files.root / f"execute-{served.flavour}.conf"
    config.write_text(f"""\
# 2.4 style
base_dir = {os.path.dirname(unix_path)}
execute probe {{
  driver = unix
  unix_socket_path = {os.path.basename(unix_path)}
  args = record %{{user}}  %{{user | domain}}
}}
execute {served.tcp.removeprefix("tcp:")} {{
  driver = tcp
  args = echo %{{user | username}}
}}
""")

    code, out, err = run(served, "--config", str(config), "--execute", "probe",
                         "--var", "user=alice@example.com", "extra", input=b"in")
    assert (code, out, err) == (0, b"recorded\n", "")
    (record,) = wait_records(served.records)
    assert record["argv"][3:] == ["record", "alice@example.com", "example.com", "extra"]

    code, out, err = run(served, "--config", str(config), "--execute",
                         served.tcp.removeprefix("tcp:"), "--var", "user=bob@example.com",
                         input=PAYLOAD)
    assert (code, out, err) == (0, TCP_ECHO, "")

    # Two execute blocks and no --execute: Dovecot's rule, a usage error.
    code, out, err = run(served, "--config", str(config), input=b"")
    assert (code, out) == (EX_USAGE, b"")
    assert "only one execution is allowed" in err


def test_serve_with_dovecot_config(files: Files) -> None:
    flavour = "blocking"  # the configuration is read before any flavour starts
    records = files.records(f"config-{flavour}")
    base = files.root / f"base-{flavour}"
    base.mkdir(exist_ok=True)
    port = free_port()
    config = files.root / f"dovecot-{flavour}.conf"
    # 2.3 style; the raw probe's "echo" also works over TCP: it returns the
    # dot-encoded payload as it came, which is a valid dot stream.
    config.write_text(f"""\
base_dir = {base}
service probe {{
  executable = script -e FOO {files.probe} {records} raw
  unix_listener probe-socket {{
    mode = 0666
  }}
  inet_listener probe-tcp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
""")
    serve = ServeProcess(["--adapter", flavour, "--config", str(config), "--service", "probe"],
                         files.root / f"config-{flavour}.log")
    with serve:
        sock = base / "probe-socket"
        assert serve.addresses == [str(sock), f"127.0.0.1:{port}"]
        assert sock.stat().st_mode & 0o777 == 0o666
        # Options go before TARGET: everything after it is the script's.
        done = cli("run", "--env", "FOO=1", "--env", "BAR=2", f"unix:{sock}", "record",
                   input=b"x")
        assert done.returncode == 0, done.stderr
        done = cli("run", f"tcp:127.0.0.1:{port}", "echo", input=PAYLOAD)
        assert (done.returncode, done.stdout) == (0, dot_transform(PAYLOAD))
    assert serve.stop() == 0
    assert not sock.exists()
    (record,) = read_records(records, "record-*.json")
    assert record["argv"] == [str(files.probe), str(records), "raw", "record"]
    assert record["env"] == {"FOO": "1"}


# --- process management -----------------------------------------------------------------


def test_socket_activation(files: Files, flavour: str) -> None:
    records = files.records(f"activation-{flavour}")
    launcher = files.root / "launcher.py"
    launcher.write_text(LAUNCHER)
    path = files.root / f"activated-{flavour}.sock"
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        listener.bind(str(path))
        listener.listen(16)
        fd = listener.fileno()
        command = [sys.executable, str(launcher), str(fd), "serve", "--adapter", flavour,
                   str(files.probe), str(records), "raw"]
        serve = ServeProcess([], files.root / f"activation-{flavour}.log", command=command,
                             pass_fds=[fd])
        with serve:
            listener.close()  # only the service holds it now
            assert serve.addresses == [str(path)]
            done = cli("run", f"unix:{path}", "record", "activated", input=b"x")
            assert (done.returncode, done.stdout) == (0, b"recorded\n"), done.stderr
        assert serve.stop() == 0
    (record,) = read_records(records)
    assert record["argv"][3:] == ["record", "activated"]
    assert record["env"] == {}  # LISTEN_* do not leak into scripts
    # The socket belongs to whoever passed it (systemd): serve leaves it.
    assert path.exists()
    path.unlink()


# --- the other commands ---------------------------------------------------------------------


def test_vectors_out(files: Files) -> None:
    out = files.root / "vectors.json"
    done = cli("vectors", "--out", str(out))
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    packaged = resources.files("execproto").joinpath("vectors.json").read_bytes()
    assert out.read_bytes() == packaged
    data = json.loads(packaged)
    assert (data["format"], data["version"]) == ("execproto-conformance", 1)
    assert cli("vectors").stdout == packaged


def test_version() -> None:
    done = cli("--version")
    version = f"execproto {execproto.__version__}"
    assert (done.returncode, done.stdout.decode().strip()) == (0, version)


@pytest.mark.parametrize("command", [[], ["run"], ["serve"], ["demo"], ["vectors"]],
                         ids=["top", "run", "serve", "demo", "vectors"])
def test_help(command: list[str]) -> None:
    done = cli(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().startswith(f"usage: {' '.join(['execproto', *command])} ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run"], "run needs a TARGET"),
        (["run", "bogus:x"], "bogus"),
        (["serve", "/bin/cat"], "nothing to listen on"),
    ],
    ids=["run-no-target", "run-bad-scheme", "serve-no-listener"],
)
def test_usage_errors(args: list[str], message: str) -> None:
    done = cli(*args)
    assert done.returncode == EX_USAGE, done.stderr
    assert message in done.stderr.decode()
