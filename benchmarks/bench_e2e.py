"""End-to-end benchmark: execproto's service and clients against Dovecot's own.

Run from the repository root, as root (a private Dovecot master needs it)::

    python benchmarks/bench_e2e.py            # 6 rounds, about 8 minutes
    python benchmarks/bench_e2e.py --quick    # 2 short rounds, about 1 minute
    python benchmarks/bench_e2e.py --baseline ../old/.venv/bin/python
        # every execproto row also for the checkout that interpreter imports

With ``--baseline PYTHON``, every flavour's service and client are also
started with PYTHON (the interpreter of another checkout's venv): those
rows are the "before", this checkout's the "after".  Each before/after pair
runs back to back, in an order that alternates from round to round, and a
last section gives the after/before ratios.

In one process tree, on unix sockets in a temporary directory and on
127.0.0.1, it starts

* Dovecot 2.3.19's ``script`` service under a private master
  (``tests/interop/dovecot.py``), tuned for 64 concurrent clients
  (:func:`dovecot_tuning`);
* ``execproto serve --adapter X`` for every flavour that imports, as a
  subprocess of the CLI, logging at WARNING;
* a *ceiling*: the least a Python service can do (:func:`ceiling_main`, one
  epoll loop: peek the header, ``posix_spawn`` the script on the socket,
  wait on a pidfd, send the result code);
* a load generator in its own process (``benchmarks/_load.py``).

Each service serves two scripts: ``#!/bin/sh`` + ``exit 0`` (no payload),
and ``/bin/cat`` itself (1 KiB echoed; bulk streams over unix and tcp).  Over
tcp the client dot-encodes its payload, which therefore ends with the
``.\\r\\n`` end line, and ``cat`` echoes it verbatim: the reply is a valid
dot stream, so ``cat`` is the "cat-like script" for tcp too.

Every round measures every cell once, services in a rotating order, and the
tables show the median over the rounds.  A request cell is a closed loop of
C clients; its window opens after a warm-up that includes 2 x
``process_min_avail`` + C replies, so that Dovecot's pre-started processes
are used up and every service is measured in its steady state.  A cell's
server CPU time is the change of utime+stime+cutime+cstime summed over the
service's process tree (/proc), from before the load to after the tree is
quiet again, so Dovecot's re-forking of its pre-started processes counts.
Every service runs in its own session, as the Dovecot master does: with
scheduler autogroups each session competes for the CPUs as one group.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import random
import re
import select
import selectors
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._load import MiB, b64  # noqa: E402
from tests.interop.dovecot import (  # noqa: E402
    DovecotConfig,
    PrivateDovecot,
    ScriptService,
    _free_port,
    _listening,
    dovecot_binary,
    script_binary,
)

FLAVOURS = ("blocking", "asyncio", "trio")

#: Per-service settings of Dovecot's script services.  A script process
#: serves one connection and exits (``service_count = 1``; the binary sets it
#: itself too), so each concurrent client needs its own process:
#: ``process_limit`` leaves room for 64 busy plus 64 pre-started ones plus
#: those still exiting, and ``process_min_avail`` keeps a whole burst's worth
#: of processes forked ahead of the connections.  Of 0, 16 and 64, 0 gave
#: Dovecot clearly lower rates and 16 and 64 were alike.
DOVECOT_MIN_AVAIL = 64
DOVECOT_PROCESS_LIMIT = 256


def dovecot_tuning(min_avail: int) -> tuple[str, ...]:
    """The ``service { }`` settings used for Dovecot's script services."""
    return (
        "service_count = 1",
        "client_limit = 1",
        f"process_limit = {DOVECOT_PROCESS_LIMIT}",
        f"process_min_avail = {min_avail}",
    )


#: ``execproto serve --max-connections``: the same head room as process_limit.
EXECPROTO_MAX_CONNECTIONS = DOVECOT_PROCESS_LIMIT

HEADER = b"VERSION\tscript\t4\t0\n-\n\n"
ECHO_PAYLOAD = random.Random(1).randbytes(1024)
#: 1 KiB of CRLF text for tcp, where the payload is dot-framed: no line
#: starts with a dot, so the framed payload is the text plus the end line.
TCP_TEXT = b"".join(
    bytes(random.Random(2).choices(b"abcdefghijklmnopqrstuvwxyz0123456789 ", k=62)) + b"\r\n"
    for _ in range(16))
CONCURRENCY = (1, 16, 64)

#: Every flavour's requests/s, at least this fraction of the ceiling's in the same run.
GOAL_CEILING = 0.90
#: Every flavour's server CPU per request, at most this multiple of the ceiling's.
GOAL_CEILING_CPU = 1.15
GOAL_STREAM = 0.95
GOAL_FORK = 1.2

CLK_TCK = os.sysconf("SC_CLK_TCK")

#: ``--baseline``: server CPU per request may grow at most this much (after/before).
GOAL_SERVER_CPU = 1.03
#: ``--baseline``: asyncio/trio client CPU per run over a raw socket, at most (s).
GOAL_CLIENT_OVERHEAD = 250e-6
#: The side of a row measured with ``--baseline``'s interpreter.
BEFORE = "before"


def sided(name: str, side: str) -> str:
    """The key of a service or client variant on *side* ("" is this checkout)."""
    return f"{name}-{side}" if side else name


def side_label(label: str, side: str) -> str:
    """A row label, marked if it is the baseline's."""
    return f"{label} ({side})" if side else label


# --- the ceiling service -----------------------------------------------------------

_UNESCAPE = {b"1": b"\x01", b"t": b"\t", b"r": b"\r", b"n": b"\n", b"0": b"\0"}


def ceiling_main(unix_path: str, tcp_port: int | None, script: str) -> None:
    """The least work a Python ``script`` service can do; runs until killed.

    One epoll loop, no threads: accept, peek the header (it comes in one
    segment from these clients; an incomplete one is simply peeked again),
    consume exactly the header, ``posix_spawn`` the script with the socket
    as fds 0 and 1 and an empty environment, wait on a pidfd, send
    ``+\\n``/``-\\n`` and close.  No limits, no logging, no deadlines.
    """
    listeners = []
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_path)
    os.chmod(unix_path, 0o666)
    listeners.append(unix)
    if tcp_port is not None:
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", tcp_port))
        listeners.append(tcp)
    sel = selectors.EpollSelector()
    for sock in listeners:
        sock.listen(socket.SOMAXCONN)  # capped by net.core.somaxconn
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, None)
    path = os.fsencode(script)
    while True:
        for key, _ in sel.select():
            data = key.data
            if data is None:
                listener = key.fileobj
                assert isinstance(listener, socket.socket)
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, (conn,))
            elif len(data) == 1:
                conn = data[0]
                try:
                    head = conn.recv(65536, socket.MSG_PEEK)
                except BlockingIOError:
                    continue
                end = head.find(b"\n\n")
                if end < 0 and head and len(head) < 65536:
                    continue  # incomplete: peek again when more arrives
                sel.unregister(conn)
                lines = head[:end].split(b"\n")
                if end < 0 or not lines[0].startswith(b"VERSION\tscript\t4\t"):
                    conn.close()
                    continue
                conn.recv(end + 2)
                i = 1
                if i < len(lines) and lines[i].startswith(b"alarm="):
                    i += 1
                while i < len(lines) and lines[i].startswith(b"env_"):
                    i += 1
                args = [re.sub(rb"\x01(.)", lambda m: _UNESCAPE.get(m[1], m[1]), a)
                        for a in lines[i + 1 :]]
                conn.setblocking(True)
                fd = conn.fileno()
                pid = os.posix_spawn(path, [path, *args], {}, file_actions=[
                    (os.POSIX_SPAWN_DUP2, fd, 0), (os.POSIX_SPAWN_DUP2, fd, 1)])
                pidfd = os.pidfd_open(pid)
                sel.register(pidfd, selectors.EVENT_READ, (conn, pid))
            else:
                conn, pid = data
                sel.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):
                    conn.send(b"+\n" if status == 0 else b"-\n")
                conn.close()


# --- process trees ------------------------------------------------------------------


@dataclass(frozen=True)
class TreeCpu:
    """CPU seconds used by process trees (live members plus reaped ones)."""

    cpu: float
    processes: int


def tree_cpu(roots: Sequence[int]) -> TreeCpu:
    """Sum utime+stime+cutime+cstime over *roots* and all their descendants.

    A reaped process's time is in its parent's cutime/cstime, a live one's
    in its own utime/stime, so every CPU second of the tree counts once.
    """
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue  # gone
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    total = count = 0
    todo = [pid for pid in roots if pid in ticks]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        count += 1
        todo.extend(children.get(pid, ()))
    return TreeCpu(total / CLK_TCK, count)


def own_cpu(roots: Sequence[int]) -> dict[tuple[int, int], int]:
    """Nanoseconds each thread of the *roots* themselves has run (``schedstat``).

    The services' own share of a request, without the scripts they reap,
    at a finer grain than the clock ticks of ``stat``.
    """
    times: dict[tuple[int, int], int] = {}
    for pid in roots:
        with contextlib.suppress(OSError):
            for task in os.scandir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError), \
                        open(f"/proc/{pid}/task/{task.name}/schedstat", "rb") as f:
                    times[(pid, int(task.name))] = int(f.read().split()[0])
    return times


def own_cpu_used(before: dict[tuple[int, int], int], after: dict[tuple[int, int], int]) -> float:
    """Seconds run between two :func:`own_cpu` readings (a thread that ended is not counted)."""
    return sum(ns - before.get(task, 0) for task, ns in after.items()) / 1e9


def settle(roots: Sequence[int], limit: float = 5.0) -> TreeCpu:
    """Wait until the trees use no CPU and keep their size; return the final reading."""
    deadline = time.monotonic() + limit
    previous = tree_cpu(roots)
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(0.025)
        current = tree_cpu(roots)
        still = (current.processes == previous.processes
                 and current.cpu - previous.cpu < 0.5 / CLK_TCK)
        quiet = quiet + 1 if still else 0
        previous = current
    return previous


# --- services -------------------------------------------------------------------------


@dataclass(frozen=True)
class TunedService(ScriptService):
    """A :class:`ScriptService` with extra settings in its ``service { }`` block."""

    settings: tuple[str, ...] = ()

    def config(self, script_binary: Path, port: int | None,
               syntax: DovecotConfig | None = None) -> str:
        """The harness's block with :attr:`settings` added before the closing brace."""
        head, _, _ = super().config(script_binary, port, syntax).rpartition("}")
        return head + "".join(f"  {line}\n" for line in self.settings) + "}\n"


@dataclass
class Server:
    """One service under test: where its two scripts listen, which trees it owns."""

    key: str
    label: str
    noop: str
    cat: str
    cat_tcp: tuple[str, int]
    roots: list[int] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    #: The adapter for an execproto service, else "".
    flavour: str = ""
    #: "" for this checkout, :data:`BEFORE` for the ``--baseline`` one.
    side: str = ""

    def target(self, name: str) -> list[Any]:
        """The load generator's address of script *name*."""
        if name == "noop":
            return ["unix", self.noop]
        if name == "cat":
            return ["unix", self.cat]
        return ["tcp", *self.cat_tcp]  # "tcp": the cat script over tcp


def _wait_listening(paths: Sequence[str], ports: Sequence[int],
                    processes: Sequence[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        # execproto binds under a private name and renames the listening
        # socket into place, so /proc/net/unix shows the private name: a
        # socket file at the path means it is listening.
        listening_paths, listening_ports = _listening()
        if (all(p in listening_paths or _is_socket(p) for p in paths)
                and all(p in listening_ports for p in ports)):
            return
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not listening within {timeout} s: {paths} {ports}")
        time.sleep(0.05)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _spawn_python(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        # Own session, like the Dovecot master: with scheduler autogroups
        # each session is one group, so every service tree gets the same
        # share of the CPUs as Dovecot's does.
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                cwd=REPO, start_new_session=True)


def start_execproto(flavour: str, tmp: Path, noop_script: Path, python: str = sys.executable,
                    side: str = "") -> Server:
    """``execproto serve --adapter FLAVOUR`` run by *python*: one process per script."""
    port = _free_port()
    key = sided(flavour, side)
    server = Server(key, side_label(f"execproto {flavour}", side), str(tmp / f"{key}-noop.sock"),
                    str(tmp / f"{key}-cat.sock"), ("127.0.0.1", port), flavour=flavour,
                    side=side)
    common = [python, "-m", "execproto", "serve", "--adapter", flavour,
              "--log-level", "WARNING", "--max-connections", str(EXECPROTO_MAX_CONNECTIONS),
              "--mode", "0666"]
    for argv, name in (
        ([*common, "--unix", server.noop, str(noop_script)], "noop"),
        ([*common, "--unix", server.cat, "--tcp", f"127.0.0.1:{port}", "/bin/cat"], "cat"),
    ):
        log = tmp / f"{key}-{name}.log"
        server.logs.append(log)
        server.processes.append(_spawn_python(argv, log))
    server.roots = [p.pid for p in server.processes]
    try:
        _wait_listening([server.noop, server.cat], [port], server.processes)
    except RuntimeError:
        stop_processes(server.processes)
        raise
    return server


def start_ceiling(tmp: Path, noop_script: Path) -> Server:
    """Two ceiling processes (:func:`ceiling_main`), one per script."""
    port = _free_port()
    server = Server("ceiling", "ceiling (minimal Python)", str(tmp / "ceiling-noop.sock"),
                    str(tmp / "ceiling-cat.sock"), ("127.0.0.1", port))
    me = [sys.executable, str(Path(__file__).resolve()), "--ceiling"]
    for argv, name in (
        ([*me, server.noop, str(noop_script)], "noop"),
        ([*me, server.cat, "/bin/cat", "--tcp-port", str(port)], "cat"),
    ):
        log = tmp / f"ceiling-{name}.log"
        server.logs.append(log)
        server.processes.append(_spawn_python(argv, log))
    server.roots = [p.pid for p in server.processes]
    try:
        _wait_listening([server.noop, server.cat], [port], server.processes)
    except RuntimeError:
        stop_processes(server.processes)
        raise
    return server


def start_dovecot(tmp: Path, noop_script: Path, min_avail: int) -> tuple[PrivateDovecot, Server]:
    """A private Dovecot master with two tuned script services."""
    tuning = dovecot_tuning(min_avail)
    dovecot = PrivateDovecot(
        [TunedService("noop", noop_script, settings=tuning),
         TunedService("cat", Path("/bin/cat"), inet_listener=True, settings=tuning)],
        directory=tmp / "dovecot",
    )
    dovecot.start()
    master = int((dovecot.base_dir / "master.pid").read_text().split()[0])
    server = Server("dovecot", "Dovecot 2.3.19 script", str(dovecot.socket_path("noop")),
                    str(dovecot.socket_path("cat")), ("127.0.0.1", dovecot.port("cat")),
                    roots=[master], logs=[dovecot.log_path])
    return dovecot, server


def stop_processes(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM, bounded wait, SIGKILL; always reaped."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


# --- the load generator process -----------------------------------------------------------


class LoadGenerator:
    """``benchmarks/_load.py`` as a child process, driven by JSON lines."""

    def __init__(self, python: str = sys.executable) -> None:
        self.process = subprocess.Popen(
            [python, str(HERE / "_load.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, cwd=REPO)

    def call(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run one job; raise if it fails or takes longer than *timeout*."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(job).encode() + b"\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise BenchError(f"load generator: no answer within {timeout:.0f} s to {job['job']}")
        line = self.process.stdout.readline()
        if not line:
            raise BenchError("load generator exited")
        result: dict[str, Any] = json.loads(line)
        if not result.pop("ok"):
            raise BenchError(f"{job['job']} job failed: {result['error']}")
        return result

    def close(self) -> None:
        """Let it finish (stdin EOF), or kill it."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


class BenchError(Exception):
    """A wrong reply, a failed service or a hung job: the benchmark fails."""


# --- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Sizes and durations of one run."""

    rounds: int
    warmup: float
    duration: float
    drain: int  # replies before a request cell's window opens (plus C)
    stream_unix: int
    stream_tcp: int
    micro: float
    sections: frozenset[str]
    workloads: tuple[str, ...] = ("noop", "cat")
    concurrency: tuple[int, ...] = CONCURRENCY


FULL = Plan(rounds=6, warmup=0.2, duration=1.0, drain=2 * DOVECOT_MIN_AVAIL,
            stream_unix=256 * MiB, stream_tcp=64 * MiB, micro=0.6,
            sections=frozenset({"requests", "stream", "fork", "client"}))
QUICK = Plan(rounds=2, warmup=0.05, duration=0.25, drain=2 * DOVECOT_MIN_AVAIL,
             stream_unix=32 * MiB, stream_tcp=8 * MiB, micro=0.2, sections=FULL.sections)

#: Request workloads (``--workloads``): the script's name and the rows' title.
WORKLOADS = (
    ("noop", "`exit 0`, no payload"),
    ("cat", "1 KiB echoed by `cat`"),
    ("tcp", "1 KiB of text echoed by `cat` over tcp"),
)


def workloads(plan: Plan) -> list[tuple[str, str]]:
    """The request workloads of this run, in the table's order."""
    return [(script, title) for script, title in WORKLOADS if script in plan.workloads]


def request_job(script: str, server: Server, concurrency: int, plan: Plan) -> dict[str, Any]:
    """The load generator job of one request cell."""
    if script == "noop":
        request, expect = HEADER, b"+\n"
    elif script == "tcp":
        request, expect = HEADER + TCP_TEXT + b".\r\n", TCP_TEXT + b".\r\n+\n"
    else:
        request, expect = HEADER + ECHO_PAYLOAD, ECHO_PAYLOAD + b"+\n"
    return {"job": "requests", "target": server.target(script), "request": b64(request),
            "expect": b64(expect), "concurrency": concurrency, "warmup": plan.warmup,
            "warmup_requests": plan.drain + concurrency, "duration": plan.duration}


def warm_up(load: LoadGenerator, server: Server) -> None:
    """One request per listener, checked, before anything is measured."""
    for script in ("noop", "cat"):
        job = request_job(script, server, 1, FULL)
        job.update(count=1)
        load.call(job, 30)
    load.call({"job": "requests", "target": server.target("tcp"), "count": 1,
               "request": b64(HEADER + b"hello\r\n.\r\n"),
               "expect": b64(b"hello\r\n.\r\n+\n")}, 30)


Results = dict[tuple[str, ...], list[dict[str, Any]]]


def rotate(items: Sequence[Any], r: int) -> list[Any]:
    """*items* starting at index r (mod len): who goes first changes every round."""
    r %= len(items)
    return [*items[r:], *items[:r]]


def alternate(groups: Sequence[Sequence[Any]], r: int) -> list[Any]:
    """The groups rotated for round *r*, each (a before/after pair) reversed every other round."""
    return [item for group in rotate(groups, r)
            for item in (group[::-1] if r % 2 else group)]


def server_groups(servers: Sequence[Server]) -> list[list[Server]]:
    """Each service alone, except a flavour's two sides, which go together."""
    groups: dict[str, list[Server]] = {}
    for server in servers:
        groups.setdefault(server.flavour or server.key, []).append(server)
    return list(groups.values())


#: A fork or client variant: (side, "bare"/"raw" or a flavour).
Variant = tuple[str, str]


def variant_groups(first: str, clients: Sequence[str],
                   before: Sequence[str] | None) -> list[list[Variant]]:
    """*first* (the reference) and every flavour, each with its baseline twin if measured."""
    groups: list[list[Variant]] = []
    for name in [first, *clients, *(c for c in before or () if c not in clients)]:
        group: list[Variant] = [("", name)] if name == first or name in clients else []
        if before is not None and (name == first or name in before):
            group.append((BEFORE, name))
        groups.append(group)
    return groups


@dataclass
class Side:
    """The clients of one checkout: its load generator and the flavours it imports."""

    load: LoadGenerator
    clients: list[str]
    #: The directory its ``execproto.adapters`` is imported from.
    adapters: str


def _checked(result: dict[str, Any], side: Side) -> dict[str, Any]:
    module = result.pop("module", None)
    if module is not None and Path(module).resolve().parent != Path(side.adapters):
        raise BenchError(f"a client imported {module}, not from {side.adapters}")
    return result


def server_cell(load: LoadGenerator, server: Server, job: dict[str, Any],
                timeout: float) -> dict[str, Any]:
    """Run one job against *server* and add its tree's (and its own) CPU time to the result."""
    own = own_cpu(server.roots)
    before = tree_cpu(server.roots)
    result = load.call(job, timeout)
    after = settle(server.roots)
    result["server_cpu"] = after.cpu - before.cpu
    result["own_cpu"] = own_cpu_used(own, own_cpu(server.roots))
    return result


def run_rounds(sides: dict[str, Side], servers: Sequence[Server], plan: Plan, ceiling: Server,
               progress: bool) -> Results:
    """Every cell once per round; services and variants in a rotating order.

    *sides* maps "" (this checkout) and, with a baseline, :data:`BEFORE` to
    the clients measured for it; a flavour's two sides run back to back,
    which of them first alternates from round to round.
    """
    results: Results = {}
    cell_timeout = plan.warmup + plan.duration + 120
    load = sides[""].load  # one load generator drives every service
    clients = sides[""].clients
    before = sides[BEFORE].clients if BEFORE in sides else None
    for r in range(plan.rounds):
        started = time.monotonic()
        order = alternate(server_groups(servers), r)
        if "requests" in plan.sections:
            for script, _ in workloads(plan):
                for concurrency in plan.concurrency:
                    for server in order:
                        job = request_job(script, server, concurrency, plan)
                        result = server_cell(load, server, job, cell_timeout)
                        result["cpu_per_req"] = result["server_cpu"] / result["completed"]
                        result["own_per_req"] = result["own_cpu"] / result["completed"]
                        result["client_util"] = result["client_cpu"] / result["wall"]
                        results.setdefault(("requests", script, str(concurrency), server.key),
                                           []).append(result)
        if "stream" in plan.sections:
            for kind, total in (("unix", plan.stream_unix), ("tcp", plan.stream_tcp)):
                for server in order:
                    job = {"job": "stream", "header": b64(HEADER), "total": total,
                           "dot": kind == "tcp",
                           "target": server.target("cat" if kind == "unix" else "tcp")}
                    result = server_cell(load, server, job, 300)
                    results.setdefault(("stream", kind, server.key), []).append(result)
        if "fork" in plan.sections:
            for side, variant in alternate(variant_groups("bare", clients, before), r):
                job = {"job": "fork", "variant": variant, "warmup": plan.micro / 4,
                       "duration": plan.micro}
                results.setdefault(("fork", sided(variant, side)), []).append(
                    _checked(sides[side].load.call(job, 120), sides[side]))
        if "client" in plan.sections:
            for script, payload in (("noop", b""), ("cat", ECHO_PAYLOAD)):
                for side, variant in alternate(variant_groups("raw", clients, before), r):
                    job = {"job": "client", "variant": variant,
                           "target": ceiling.target(script), "payload": b64(payload),
                           "request": b64(HEADER + payload), "expect": b64(payload),
                           "warmup": plan.micro / 4, "duration": plan.micro}
                    results.setdefault(("client", script, sided(variant, side)), []).append(
                        _checked(sides[side].load.call(job, 120), sides[side]))
        if progress:
            print(f"  round {r + 1}/{plan.rounds} done in {time.monotonic() - started:.0f} s",
                  file=sys.stderr, flush=True)
    return results


# --- report ----------------------------------------------------------------------------------


def med(results: Results, key: tuple[str, ...], metric: str) -> float:
    """The median of *metric* over the rounds of cell *key*."""
    return float(statistics.median(r[metric] for r in results[key]))


def _goal(ok: bool, text: str) -> str:
    return f"{text} pass" if ok else f"{text} **MISS**"


def report(results: Results, servers: Sequence[Server], clients: Sequence[str],
           plan: Plan, before: Sequence[str] | None = None) -> tuple[str, list[str]]:
    """The markdown tables and the list of missed goals.

    *before*: the flavours measured with the baseline's interpreter, if any;
    their rows are marked and held to no goal of their own.
    """
    out: list[str] = []
    missed: list[str] = []
    forks = [v for g in variant_groups("bare", clients, before) for v in g]
    runs = [v for g in variant_groups("raw", clients, before) for v in g]
    if "requests" in plan.sections:
        out += ["### Requests (closed loop, C requests in flight)", "",
                "| workload | C | service | req/s | × Dovecot | × ceiling | p50 ms | p99 ms "
                "| server CPU ms/req | goal |",
                "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for script, title in workloads(plan):
            for c in plan.concurrency:
                base = med(results, ("requests", script, str(c), "dovecot"), "rate")
                rates = {s.key: med(results, ("requests", script, str(c), s.key), "rate")
                         for s in servers}
                cpus = {s.key: med(results, ("requests", script, str(c), s.key), "cpu_per_req")
                        for s in servers}
                for s in servers:
                    key = ("requests", script, str(c), s.key)
                    ratio = rates[s.key] / base
                    goal = ""
                    if s.key in FLAVOURS:
                        share = rates[s.key] / rates["ceiling"]
                        cpu = cpus[s.key] / cpus["ceiling"]
                        goal = (_goal(share >= GOAL_CEILING, f"≥ {GOAL_CEILING:.2f}× ceiling")
                                + "; " + _goal(cpu <= GOAL_CEILING_CPU,
                                               f"CPU {cpu:.2f}× ≤ {GOAL_CEILING_CPU:.2f}×"))
                        if share < GOAL_CEILING:
                            missed.append(f"{s.label}, {title}, C={c}: {share:.2f}× the "
                                          f"ceiling's requests/s (goal {GOAL_CEILING:.2f}×)")
                        if cpu > GOAL_CEILING_CPU:
                            missed.append(f"{s.label}, {title}, C={c}: {cpu:.2f}× the "
                                          f"ceiling's CPU per request "
                                          f"(goal {GOAL_CEILING_CPU:.2f}×)")
                    out.append(
                        f"| {title} | {c} | {s.label} | {rates[s.key]:,.0f} | {ratio:.2f} "
                        f"| {rates[s.key] / rates['ceiling']:.2f} "
                        f"| {med(results, key, 'p50') * 1e3:.2f} "
                        f"| {med(results, key, 'p99') * 1e3:.2f} "
                        f"| {med(results, key, 'cpu_per_req') * 1e3:.2f} | {goal} |")
        util = max(r["client_util"] for k, v in results.items() if k[0] == "requests" for r in v)
        out += ["", f"The load generator used at most {util:.0%} of one core in any cell.", ""]
    if "stream" in plan.sections:
        out += ["### Streaming through `cat` (one request)", "",
                "| transport | service | MB/s | × Dovecot | server CPU s | goal |",
                "| --- | --- | ---: | ---: | ---: | --- |"]
        for kind, total in (("unix", plan.stream_unix), ("tcp", plan.stream_tcp)):
            base = med(results, ("stream", kind, "dovecot"), "mbps")
            for s in servers:
                skey = ("stream", kind, s.key)
                rate = med(results, skey, "mbps")
                goal = ""
                if s.key in FLAVOURS:
                    goal = _goal(rate / base >= GOAL_STREAM, f"≥ {GOAL_STREAM:.0%}")
                    if rate / base < GOAL_STREAM:
                        missed.append(f"{s.label}, streaming over {kind}: {rate / base:.0%} "
                                      f"of Dovecot (goal {GOAL_STREAM:.0%})")
                out.append(f"| {kind}, {total // MiB} MiB | {s.label} | {rate:,.0f} "
                           f"| {rate / base:.2f} | {med(results, skey, 'server_cpu'):.2f} "
                           f"| {goal} |")
        out.append("")
    if "fork" in plan.sections:
        out += ["### Fork driver: `run(\"exec:/bin/true\")` per call", "",
                "| variant | µs/call | × bare spawn | p99 µs | client CPU µs/call | goal |",
                "| --- | ---: | ---: | ---: | ---: | --- |"]
        base = med(results, ("fork", "bare"), "per_call")
        for side, variant in forks:
            fkey = ("fork", sided(variant, side))
            per_call = med(results, fkey, "per_call")
            label = side_label("bare `os.posix_spawn` + `os.waitpid`" if variant == "bare"
                               else f"execproto {variant}", side)
            goal = ""
            if variant != "bare" and not side:
                goal = _goal(per_call / base <= GOAL_FORK, f"≤ {GOAL_FORK}×")
                if per_call / base > GOAL_FORK:
                    missed.append(f"fork driver, {variant}: {per_call / base:.2f}× a bare spawn "
                                  f"(goal {GOAL_FORK}×)")
            out.append(f"| {label} | {per_call * 1e6:,.0f} | {per_call / base:.2f} "
                       f"| {med(results, fkey, 'p99') * 1e6:,.0f} "
                       f"| {med(results, fkey, 'cpu_per_call') * 1e6:,.0f} | {goal} |")
        out.append("")
    if "client" in plan.sections:
        out += ["### Client overhead: sequential requests to the ceiling service", "",
                "| workload | client | µs/call | × raw | client CPU µs/call "
                "| client CPU over raw µs |",
                "| --- | --- | ---: | ---: | ---: | ---: |"]
        for script, title in WORKLOADS[:2]:
            for side, variant in runs:
                base = med(results, ("client", script, sided("raw", side)), "per_call")
                base_cpu = med(results, ("client", script, sided("raw", side)), "cpu_per_call")
                ckey = ("client", script, sided(variant, side))
                per_call = med(results, ckey, "per_call")
                cpu = med(results, ckey, "cpu_per_call")
                label = side_label("raw socket" if variant == "raw"
                                   else f"execproto {variant} `run()`", side)
                out.append(f"| {title} | {label} | {per_call * 1e6:,.0f} "
                           f"| {per_call / base:.2f} | {cpu * 1e6:,.0f} "
                           f"| {(cpu - base_cpu) * 1e6:+,.0f} |")
        out.append("")
    if before is not None:
        text, worse = before_after(results, clients, plan, before)
        out.append(text)
        missed += worse
    return "\n".join(out), missed


def _ratios(after: list[dict[str, Any]], before: list[dict[str, Any]],
            value: Any) -> tuple[float, str]:
    """after/before of the medians of *value*, and the range of the per-round ratios."""
    a = statistics.median(value(r) for r in after)
    b = statistics.median(value(r) for r in before)
    rounds = sorted(value(x) / value(y) for x, y in zip(after, before, strict=True)
                    if value(y))
    spread = f"{rounds[0]:.2f}–{rounds[-1]:.2f}" if rounds else "—"
    return (a / b if b else math.nan), spread


def before_after(results: Results, clients: Sequence[str], plan: Plan,
                 before: Sequence[str]) -> tuple[str, list[str]]:
    """The after/before table of every flavour measured on both sides; goals missed."""
    both = [c for c in clients if c in before]
    out = ["### Before (baseline) and after (this checkout)", "",
           "Medians over the rounds; after/before is the ratio of the medians, *rounds* the "
           "range of the ratios of the pairs measured back to back in each round.", ""]
    missed: list[str] = []
    if "requests" in plan.sections:
        out += ["#### Server CPU per request (closed loop, C requests in flight)", "",
                "*CPU* is the whole tree's, scripts included (the goal's measure); *own* is the "
                "service processes' own threads only, without the scripts they reap.", "",
                "| workload | C | flavour | CPU ms/req before | after | after/before | rounds "
                "| own µs/req before | after | after/before | rounds "
                "| req/s before | after | after/before | goal |",
                "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- "
                "| ---: | ---: | ---: | --- |"]
        for script, title in workloads(plan):
            for c in plan.concurrency:
                for flavour in both:
                    a = results[("requests", script, str(c), flavour)]
                    b = results[("requests", script, str(c), sided(flavour, BEFORE))]
                    cpu, spread = _ratios(a, b, lambda r: r["cpu_per_req"])
                    own, own_spread = _ratios(a, b, lambda r: r["own_per_req"])
                    rate, _ = _ratios(a, b, lambda r: r["rate"])
                    goal = _goal(cpu <= GOAL_SERVER_CPU, f"≤ {GOAL_SERVER_CPU:.2f}")
                    if cpu > GOAL_SERVER_CPU:
                        missed.append(f"server CPU per request, {flavour}, {title}, C={c}: "
                                      f"{cpu:.3f}× before (goal ≤ {GOAL_SERVER_CPU:.2f}×)")
                    out.append(
                        f"| {title} | {c} | {flavour} "
                        f"| {statistics.median(r['cpu_per_req'] for r in b) * 1e3:.3f} "
                        f"| {statistics.median(r['cpu_per_req'] for r in a) * 1e3:.3f} "
                        f"| {cpu:.3f} | {spread} "
                        f"| {statistics.median(r['own_per_req'] for r in b) * 1e6:,.0f} "
                        f"| {statistics.median(r['own_per_req'] for r in a) * 1e6:,.0f} "
                        f"| {own:.3f} | {own_spread} "
                        f"| {statistics.median(r['rate'] for r in b):,.0f} "
                        f"| {statistics.median(r['rate'] for r in a):,.0f} | {rate:.2f} "
                        f"| {goal} |")
        out.append("")
    if "client" in plan.sections:
        out += ["#### Client overhead per run: `run()` minus a raw-socket client, sequential "
                "requests to the ceiling service", "",
                "Client CPU per run minus that of the raw client run by the same interpreter in "
                "the same round; the raw row is that client's own CPU per run.  The last columns "
                "are wall time per run (the service's time included).", "",
                "| workload | client | CPU over raw µs before | after | after/before | rounds "
                "| µs/run before | after | after/before | goal |",
                "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
        for script, title in WORKLOADS[:2]:
            for flavour in ["raw", *both]:
                rows = {}
                for side in ("", BEFORE):
                    raw = results[("client", script, sided("raw", side))]
                    run = results[("client", script, sided(flavour, side))]
                    rows[side] = [{"cpu": x["cpu_per_call"] - (y["cpu_per_call"]
                                                               if flavour != "raw" else 0.0),
                                   "wall": x["per_call"]}
                                  for x, y in zip(run, raw, strict=True)]
                cpu_a = statistics.median(r["cpu"] for r in rows[""])
                cpu_b = statistics.median(r["cpu"] for r in rows[BEFORE])
                wall_a = statistics.median(r["wall"] for r in rows[""])
                wall_b = statistics.median(r["wall"] for r in rows[BEFORE])
                _, spread = _ratios(rows[""], rows[BEFORE], lambda r: r["cpu"])
                goal = ""
                if flavour not in ("raw", "blocking"):
                    goal = _goal(cpu_a <= GOAL_CLIENT_OVERHEAD,
                                 f"≤ +{GOAL_CLIENT_OVERHEAD * 1e6:.0f} µs")
                    if cpu_a > GOAL_CLIENT_OVERHEAD:
                        missed.append(f"client overhead per run, {flavour}, {title}: "
                                      f"+{cpu_a * 1e6:.0f} µs (goal ≤ "
                                      f"+{GOAL_CLIENT_OVERHEAD * 1e6:.0f} µs)")
                sign = "" if flavour == "raw" else "+"
                out.append(
                    f"| {title} | {'raw socket (CPU itself)' if flavour == 'raw' else flavour} "
                    f"| {cpu_b * 1e6:{sign},.0f} | {cpu_a * 1e6:{sign},.0f} "
                    f"| {cpu_a / cpu_b if cpu_b else math.nan:.2f} | {spread} "
                    f"| {wall_b * 1e6:,.0f} | {wall_a * 1e6:,.0f} "
                    f"| {wall_a / wall_b:.2f} | {goal} |")
        out.append("")
    if "fork" in plan.sections:
        out += ["#### Fork driver: `run(\"exec:/bin/true\")`", "",
                "| flavour | client CPU µs/call before | after | after/before | rounds "
                "| µs/call before | after | after/before |",
                "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
        for flavour in both:
            a = results[("fork", flavour)]
            b = results[("fork", sided(flavour, BEFORE))]
            cpu, spread = _ratios(a, b, lambda r: r["cpu_per_call"])
            wall, _ = _ratios(a, b, lambda r: r["per_call"])
            out.append(f"| {flavour} "
                       f"| {statistics.median(r['cpu_per_call'] for r in b) * 1e6:,.0f} "
                       f"| {statistics.median(r['cpu_per_call'] for r in a) * 1e6:,.0f} "
                       f"| {cpu:.3f} | {spread} "
                       f"| {statistics.median(r['per_call'] for r in b) * 1e6:,.0f} "
                       f"| {statistics.median(r['per_call'] for r in a) * 1e6:,.0f} "
                       f"| {wall:.3f} |")
        out.append("")
    return "\n".join(out), missed


def machine_text(plan: Plan, quick: bool, min_avail: int, loads: Sequence[float],
                 baseline: str = "") -> str:
    """Date, machine and settings of this run, for the report."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    version = subprocess.run([dovecot_binary() or "dovecot", "--version"], capture_output=True,
                             text=True, check=False).stdout.strip()
    package = Path(importlib.import_module("execproto").__file__ or "?").parent.parent
    return (
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; execproto from {package}; "
        f"{model}, {os.cpu_count()} "
        f"cores; Linux {platform.release()}; {platform.python_implementation()} "
        f"{platform.python_version()}; Dovecot {version}; load average "
        f"{' → '.join(f'{x:.1f}' for x in loads)} (start → end); {plan.rounds} rounds"
        f"{' (--quick)' if quick else ''}, medians; Dovecot services: "
        f"{', '.join(dovecot_tuning(min_avail))}; execproto serve "
        f"--max-connections {EXECPROTO_MAX_CONNECTIONS} --log-level WARNING{baseline}"
    )


def log_problems(server: Server) -> list[str]:
    """Warning/error lines the services wrote during the run."""
    lines: list[str] = []
    for log in server.logs:
        with contextlib.suppress(OSError):
            for line in log.read_text(errors="replace").splitlines():
                if re.search(r"warning|error|fatal|traceback", line, re.IGNORECASE):
                    lines.append(f"{server.label}: {line}")
    return lines


# --- main --------------------------------------------------------------------------------------


def available_flavours(wanted: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Flavours that import and have ``run`` and ``serve``; why the others do not."""
    ok: list[str] = []
    missing: dict[str, str] = {}
    for name in wanted:
        try:
            module = importlib.import_module(f"execproto.adapters.{name}")
        except Exception as exc:
            missing[name] = f"{type(exc).__name__}: {exc}"
            continue
        absent = [n for n in ("run", "serve") if not hasattr(module, n)]
        if absent:
            missing[name] = f"no {', '.join(absent)}"
        else:
            ok.append(name)
    return ok, missing


_BASELINE_CHECK = """
import importlib, json, sys
found = {}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module("execproto.adapters." + name)
    except Exception as exc:
        found[name] = [None, type(exc).__name__ + ": " + str(exc)]
        continue
    absent = [n for n in ("run", "serve") if not hasattr(module, n)]
    found[name] = [module.__file__, ("no " + ", ".join(absent)) if absent else ""]
print(json.dumps(found))
"""


def baseline_flavours(python: str, wanted: Sequence[str]) -> tuple[list[str], dict[str, str],
                                                                   str]:
    """:func:`available_flavours` as seen by *python*, and where its adapters come from.

    Run from this checkout's root, as its services and load generator are.
    """
    done = subprocess.run([python, "-c", _BASELINE_CHECK, *wanted], capture_output=True,
                          text=True, cwd=REPO, timeout=60, check=False)
    if done.returncode != 0:
        raise BenchError(f"--baseline {python} failed: {done.stderr.strip()[-400:]}")
    ok: list[str] = []
    missing: dict[str, str] = {}
    where = ""
    for name, (module, problem) in json.loads(done.stdout).items():
        if module is None or problem:
            missing[side_label(name, BEFORE)] = problem
        else:
            ok.append(name)
            where = str(Path(module).resolve().parent)
    return ok, missing, where


@contextlib.contextmanager
def services(tmp: Path, flavours: Sequence[str], min_avail: int,
             missing: dict[str, str], baseline: str | None = None,
             before: Sequence[str] = ()) -> Iterator[tuple[list[Server], Server]]:
    """Start Dovecot, every flavour's service and the ceiling; stop them all on exit.

    With *baseline* (an interpreter), each flavour of *before* is also
    started with it, after this checkout's.
    """
    noop = tmp / "noop.sh"
    noop.write_text("#!/bin/sh\nexit 0\n")
    noop.chmod(0o755)
    started: list[Server] = []
    dovecot: PrivateDovecot | None = None
    try:
        dovecot, server = start_dovecot(tmp, noop, min_avail)
        started.append(server)
        sides = [(flavour, sys.executable, "") for flavour in flavours]
        if baseline is not None:
            sides += [(flavour, baseline, BEFORE) for flavour in before]
        for flavour, python, side in sorted(sides, key=lambda x: FLAVOURS.index(x[0])):
            try:
                started.append(start_execproto(flavour, tmp, noop, python, side))
            except RuntimeError as exc:
                logs = " / ".join(p.read_text(errors="replace")[-400:]
                                  for p in tmp.glob(f"{sided(flavour, side)}-*.log"))
                missing[side_label(flavour, side)] = f"serve did not start: {exc}: {logs}"
        ceiling = start_ceiling(tmp, noop)
        started.append(ceiling)
        yield started, ceiling
    finally:
        for server in started:
            stop_processes(server.processes)
        if dovecot is not None:
            dovecot.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, run the rounds, print the report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="2 short rounds (about 1 minute)")
    ap.add_argument("--rounds", type=int, help="number of rounds (default 6, --quick 2)")
    ap.add_argument("--flavours", default=",".join(FLAVOURS),
                    help="comma-separated adapters to include if they import (default: all)")
    ap.add_argument("--sections", default=",".join(sorted(FULL.sections)),
                    help="comma-separated subset of requests,stream,fork,client")
    ap.add_argument("--dovecot-min-avail", type=int, default=DOVECOT_MIN_AVAIL,
                    help=f"process_min_avail of Dovecot's services (default {DOVECOT_MIN_AVAIL})")
    ap.add_argument("--json", metavar="FILE", help="also write every round's raw results here")
    ap.add_argument("--baseline", metavar="PYTHON",
                    help="also measure every flavour with this interpreter (another checkout's "
                         "venv) as the 'before' rows, side by side, and compare")
    ap.add_argument("--workloads", default="noop,cat",
                    help="comma-separated request workloads of noop,cat,tcp (default noop,cat)")
    ap.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)),
                    help="comma-separated C of the request cells (default 1,16,64)")
    ap.add_argument("--ceiling", nargs=2, metavar=("SOCKET", "SCRIPT"), help=argparse.SUPPRESS)
    ap.add_argument("--tcp-port", type=int, help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.ceiling:
        ceiling_main(ns.ceiling[0], ns.tcp_port, ns.ceiling[1])
        return 0
    plan = QUICK if ns.quick else FULL
    plan = dataclasses.replace(plan, rounds=ns.rounds or plan.rounds,
                               drain=2 * ns.dovecot_min_avail,
                               sections=frozenset(ns.sections.split(",")),
                               workloads=tuple(w for w in ns.workloads.split(",") if w),
                               concurrency=tuple(int(c) for c in ns.concurrency.split(",") if c))
    unknown = set(plan.workloads) - {w for w, _ in WORKLOADS}
    if unknown or not plan.concurrency or min(plan.concurrency) < 1:
        ap.error(f"bad --workloads or --concurrency: {sorted(unknown) or ns.concurrency}")
    if os.geteuid() != 0 or dovecot_binary() is None or script_binary() is None:
        print("bench_e2e: needs root and Debian's dovecot-core (dovecot, script)",
              file=sys.stderr)
        return 2
    package = Path(importlib.import_module("execproto").__file__ or "?").resolve()
    if REPO not in package.parents:
        print(f"bench_e2e: warning: execproto is imported from {package.parent}, "
              f"not from this checkout ({REPO})", file=sys.stderr)
    wanted = [f for f in ns.flavours.split(",") if f]
    clients, missing = available_flavours(wanted)
    before: list[str] | None = None
    baseline_note = ""
    adapters = str(Path(importlib.import_module("execproto.adapters").__file__ or "?")
                   .resolve().parent)
    if ns.baseline:
        try:
            before, lost, where = baseline_flavours(ns.baseline, wanted)
        except (BenchError, OSError, subprocess.TimeoutExpired, ValueError) as exc:
            print(f"bench_e2e: {exc}", file=sys.stderr)
            return 2
        missing.update(lost)
        if before and where == adapters:
            print(f"bench_e2e: --baseline imports this checkout's adapters ({where})",
                  file=sys.stderr)
            return 2
        baseline_note = f"; before: {ns.baseline}, adapters from {where}"
    print(f"bench_e2e: flavours {', '.join(clients) or 'none'}"
          + (f"; before: {', '.join(before) or 'none'}" if before is not None else "")
          + "".join(f"; {k} missing ({v})" for k, v in missing.items()), file=sys.stderr)
    loads = [os.getloadavg()[0]]
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    load = LoadGenerator()
    sides = {"": Side(load, clients, adapters)}
    if before is not None:
        assert ns.baseline is not None
        sides[BEFORE] = Side(LoadGenerator(ns.baseline), before, where)
    try:
        with services(tmp, clients, ns.dovecot_min_avail, missing, ns.baseline,
                      before or ()) as (servers, ceiling):
            clients[:] = [c for c in clients if c not in missing]
            if before is not None:
                before[:] = [c for c in before if side_label(c, BEFORE) not in missing]
            for server in servers:
                warm_up(load, server)
                settle(server.roots)
            print(f"bench_e2e: {len(servers)} services up, {plan.rounds} rounds",
                  file=sys.stderr, flush=True)
            results = run_rounds(sides, servers, plan, ceiling, progress=True)
            if ns.json:
                Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
                Path(ns.json).write_text(json.dumps(
                    {"|".join(k): v for k, v in results.items()}, indent=1))
            problems = [line for s in servers for line in log_problems(s)]
            loads.append(os.getloadavg()[0])
            text, missed = report(results, servers, clients, plan, before)
    except BenchError as exc:
        print(f"bench_e2e: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        for side in sides.values():
            side.load.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(machine_text(plan, ns.quick, ns.dovecot_min_avail, loads, baseline_note))
    print()
    if missing:
        print("Flavours not measured: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))
        print()
    print(text)
    print("Goals missed:" + (" none" if not missed else ""))
    for line in missed:
        print(f"- {line}")
    if problems:
        print(f"\nService log lines with warnings/errors ({len(problems)}):")
        for line in problems[:20]:
            print(f"    {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
