"""Soak test: a real ``execproto serve`` under steady load for minutes, watched over time.

Run from the repository root with the package installed::

    python benchmarks/soak.py --minutes 10 --flavour asyncio
    python benchmarks/soak.py --minutes 1 --flavour trio --interval 5 --concurrency 64

The service is a separate process, started the way systemd's socket
activation starts it: this script binds a unix socket and a tcp socket
(127.0.0.1, a free port) and hands them over as ``LISTEN_FDS`` to
``python -m execproto serve --adapter FLAVOUR /bin/cat``.  Clients of the same
flavour (``--client`` picks another) keep ``--concurrency`` requests in flight,
alternating unix and tcp, each with a distinct random payload of up to
``--max-payload`` bytes.  Every reply is checked byte for byte (over tcp
``cat`` echoes the dot-encoded payload, which is valid dot-framed output, so
the client sees the payload after a dot-framing round trip).

Every ``--interval`` seconds one line reports the requests and latency
percentiles of that interval, and the service's open descriptors, resident
memory (RSS), threads and running scripts.  A summary follows at the end.

Exit status 1, with a ``WRONG REPLY`` or ``FAILED`` message, when a reply is
wrong or any request fails, when the service dies, or when after the load
the idle service holds more descriptors, or any zombie, than before it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import trio

from execproto import Status
from execproto.adapters import RunResult

FLAVOURS = ("blocking", "asyncio", "trio")

#: Seconds a single request may take before it counts as a failure.
RUN_TIMEOUT = 60.0

# Runs in the service's process before it becomes ``execproto serve``: put the
# passed listening sockets at fds 3, 4, ... and announce them like systemd.
_BOOT = """\
import fcntl, os, sys
adapter, fds, rest = sys.argv[1], [int(f) for f in sys.argv[2].split(",")], sys.argv[3:]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(fds))
os.execv(sys.executable, [sys.executable, "-m", "execproto", "serve", "--adapter", adapter,
                          "--log-level", "WARNING", *rest, "/bin/cat"])
"""


class Failed(Exception):
    """The soak failed (wrong reply, dead service, leak)."""


# --- payloads --------------------------------------------------------------------------


def dot_roundtrip(data: bytes) -> bytes:
    """The tcp client's output for CR-free *data* echoed by ``cat``.

    Dot framing turns LF into CRLF and trims the last line break.
    """
    crlf = data.replace(b"\n", b"\r\n")
    return crlf[:-2] if data.endswith(b"\n") else crlf


def make_payload(rng: random.Random, index: int, max_size: int) -> bytes:
    """A distinct payload without CR: a counter line, then random bytes or dotted text."""
    size = int(math.exp(rng.uniform(0, math.log(max(max_size, 2)))))
    head = b"soak request %d\n" % index
    if index % 2:
        body = rng.randbytes(size).replace(b"\r", b"")
    else:
        line = b".dotted line %d\n" % index
        body = (line * (size // len(line) + 1))[:size]
    return head + body


# --- the service process -------------------------------------------------------------


@dataclass
class ServiceStats:
    """One sample of the service process (from /proc)."""

    fds: int
    rss_kib: int
    threads: int
    scripts: int
    zombies: int


def sample(pid: int) -> ServiceStats:
    """Read the service's descriptors, RSS, threads and child processes."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    scripts = zombies = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == pid:
            scripts += 1
            zombies += fields[0] == b"Z"
    return ServiceStats(fds, rss, threads, scripts, zombies)


def start_service(flavour: str, directory: str, max_connections: int,
                  ) -> tuple[subprocess.Popen[bytes], str, int]:
    """Bind the listeners, start the service on them; return (process, unix path, tcp port)."""
    path = os.path.join(directory, "soak.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        unix.bind(path)
        unix.listen(128)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(128)
        port = tcp.getsockname()[1]
        fds = (unix.fileno(), tcp.fileno())
        with open(os.path.join(directory, "service.log"), "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, flavour, ",".join(map(str, fds)),
                 "--max-connections", str(max_connections), "--grace", "2"],
                pass_fds=fds, stdin=subprocess.DEVNULL, stderr=log)
    finally:
        unix.close()
        tcp.close()
    return process, path, port


# --- clients -----------------------------------------------------------------------------


@dataclass
class Shared:
    """State shared by the client workers and the reporter."""

    targets: list[str]
    max_payload: int
    seed: int
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_index: int = 0
    latencies: list[float] = field(default_factory=list)
    all_latencies: list[float] = field(default_factory=list)
    done: int = 0
    wrong: list[str] = field(default_factory=list)

    def take(self) -> int:
        with self.lock:
            self.next_index += 1
            return self.next_index - 1

    def job(self, index: int) -> tuple[str, bytes, bytes]:
        """(target, payload, expected output) of request *index*."""
        rng = random.Random(self.seed * 1_000_003 + index)
        target = self.targets[index % len(self.targets)]
        payload = make_payload(rng, index, self.max_payload)
        return target, payload, dot_roundtrip(payload) if target.startswith("tcp:") else payload

    def record(self, index: int, target: str, payload: bytes, expected: bytes,
               result: RunResult, seconds: float) -> None:
        problem = ""
        if result.status is not Status.SUCCESS:
            problem = f"{result.status.name} {result.kind.name}: {result.detail}"
        elif result.output != expected:
            got = result.output or b""
            at = next((k for k, (a, b) in enumerate(zip(got, expected, strict=False))
                       if a != b), min(len(got), len(expected)))
            problem = (f"output of {len(got)} bytes, expected {len(expected)}; first "
                       f"difference at byte {at}: got {got[at:at + 20]!r}, "
                       f"expected {expected[at:at + 20]!r}")
        with self.lock:
            self.done += 1
            self.latencies.append(seconds)
            if problem:
                self.wrong.append(f"request {index} to {target} ({len(payload)} bytes "
                                  f"of payload): {problem}")
                self.stop.set()

    def interval(self) -> list[float]:
        with self.lock:
            taken, self.latencies = self.latencies, []
        self.all_latencies.extend(taken)
        return taken


def load_blocking(module: ModuleType, shared: Shared, concurrency: int) -> None:
    def worker() -> None:
        while not shared.stop.is_set():
            index = shared.take()
            target, payload, expected = shared.job(index)
            started = time.monotonic()
            result = module.run(target, input=payload, timeout=RUN_TIMEOUT)
            shared.record(index, target, payload, expected, result, time.monotonic() - started)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def load_asyncio(module: ModuleType, shared: Shared, concurrency: int) -> None:
    async def worker() -> None:
        while not shared.stop.is_set():
            index = shared.take()
            target, payload, expected = shared.job(index)
            started = time.monotonic()
            result = await module.run(target, input=payload, timeout=RUN_TIMEOUT)
            shared.record(index, target, payload, expected, result, time.monotonic() - started)

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(concurrency)))

    asyncio.run(main())


def load_trio(module: ModuleType, shared: Shared, concurrency: int) -> None:
    async def worker() -> None:
        while not shared.stop.is_set():
            index = shared.take()
            target, payload, expected = shared.job(index)
            started = time.monotonic()
            result = await module.run(target, input=payload, timeout=RUN_TIMEOUT)
            shared.record(index, target, payload, expected, result, time.monotonic() - started)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)

    trio.run(main)


LOADERS: dict[str, Callable[[ModuleType, Shared, int], None]] = {
    "blocking": load_blocking,
    "asyncio": load_asyncio,
    "trio": load_trio,
}


# --- reporting ---------------------------------------------------------------------------


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(math.ceil(fraction * len(sorted_values)) - 1, 0)
    return sorted_values[rank]


def latency_text(values: list[float]) -> str:
    ordered = sorted(values)
    parts = [f"{name} {percentile(ordered, q) * 1000:7.1f}"
             for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))]
    return " ".join(parts) + " ms"


def stats_text(stats: ServiceStats) -> str:
    return (f"fds {stats.fds:4d}  rss {stats.rss_kib / 1024:6.1f} MiB  threads {stats.threads:3d}  "
            f"scripts {stats.scripts:3d}")


def wait_idle(pid: int, timeout: float) -> ServiceStats:
    """Wait (bounded) until the service runs no script; return a sample."""
    deadline = time.monotonic() + timeout
    while True:
        stats = sample(pid)
        if stats.scripts == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def warm_up(module_name: str, module: ModuleType, targets: list[str]) -> None:
    """One request per target, so the service is known to answer before timing starts."""
    for target in targets:
        deadline = time.monotonic() + 15.0
        while True:
            if module_name == "blocking":
                result = module.run(target, input=b"warm\n", timeout=10)
            elif module_name == "asyncio":
                result = asyncio.run(module.run(target, input=b"warm\n", timeout=10))
            else:
                result = trio.run(functools.partial(module.run, target, input=b"warm\n",
                                                    timeout=10))
            if result.ok:
                break
            if time.monotonic() > deadline:
                raise Failed(f"the service does not answer on {target}: {result.detail}")
            time.sleep(0.2)


def soak(args: argparse.Namespace) -> None:
    client_name = args.client or args.flavour
    module = importlib.import_module(f"execproto.adapters.{client_name}")
    with tempfile.TemporaryDirectory(prefix="execproto-soak-") as directory:
        process, path, port = start_service(args.flavour, directory, args.max_connections)
        try:
            targets = {"unix": [f"unix:{path}"], "tcp": [f"tcp:127.0.0.1:{port}"],
                       "both": [f"unix:{path}", f"tcp:127.0.0.1:{port}"]}[args.transport]
            warm_up(client_name, module, targets)
            idle_before = wait_idle(process.pid, 5.0)
            print(f"soak: service {args.flavour} (pid {process.pid}), clients {client_name} x "
                  f"{args.concurrency}, {' + '.join(targets)}, payloads up to "
                  f"{args.max_payload} bytes, {args.minutes} min", flush=True)
            print(f"[{0:6.0f} s] idle: {stats_text(idle_before)}", flush=True)
            run_load(args, module, client_name, targets, process, idle_before)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            with open(os.path.join(directory, "service.log"), "rb") as f:
                log = f.read().decode(errors="replace").strip()
            if log:
                print(f"service log (warnings and errors):\n{log}", file=sys.stderr)
        print(f"service exited with status {process.returncode}", flush=True)


def run_load(args: argparse.Namespace, module: ModuleType, client_name: str,
             targets: list[str], process: subprocess.Popen[bytes],
             idle_before: ServiceStats) -> None:
    shared = Shared(targets, args.max_payload, args.seed)
    crashed: list[BaseException] = []

    def load() -> None:
        try:
            LOADERS[client_name](module, shared, args.concurrency)
        except BaseException as exc:
            crashed.append(exc)
            shared.stop.set()

    loader = threading.Thread(target=load, name="soak-load", daemon=True)
    started = time.monotonic()
    end = started + args.minutes * 60
    loader.start()
    peak_rss = idle_before.rss_kib
    last = started
    try:
        while not shared.stop.is_set():
            shared.stop.wait(min(args.interval, max(end - time.monotonic(), 0)))
            if process.poll() is not None:
                raise Failed(f"the service died (status {process.returncode})")
            taken = shared.interval()
            stats = sample(process.pid)
            peak_rss = max(peak_rss, stats.rss_kib)
            now = time.monotonic()
            rate = len(taken) / max(now - last, 1e-9)
            last = now
            print(f"[{now - started:6.0f} s] {len(taken):6d} req {rate:7.1f}/s  "
                  f"{latency_text(taken)}  | {stats_text(stats)}  | wrong {len(shared.wrong)}",
                  flush=True)
            if time.monotonic() >= end:
                break
    finally:
        shared.stop.set()
        loader.join(RUN_TIMEOUT + 10)
    if crashed:
        raise Failed(f"the client load crashed: {crashed[0]!r}") from crashed[0]
    if shared.wrong:
        raise Failed("WRONG REPLY\n  " + "\n  ".join(shared.wrong[:20]))
    shared.interval()
    total = time.monotonic() - started
    idle_after = wait_idle(process.pid, 10.0)
    print(f"summary: {shared.done} requests in {total:.0f} s ({shared.done / total:.1f}/s), "
          f"0 wrong; latency {latency_text(shared.all_latencies)}", flush=True)
    print(f"summary: service idle before: {stats_text(idle_before)}; after: "
          f"{stats_text(idle_after)}; peak rss {peak_rss / 1024:.1f} MiB", flush=True)
    if idle_after.fds > idle_before.fds:
        raise Failed(f"descriptor leak: the idle service held {idle_before.fds} descriptors "
                     f"before the load and {idle_after.fds} after it")
    if idle_after.zombies or idle_after.scripts:
        raise Failed(f"{idle_after.scripts} scripts ({idle_after.zombies} zombies) left "
                     "after the load")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    parser.add_argument("--flavour", choices=FLAVOURS, default="blocking",
                        help="the service's adapter (default blocking)")
    parser.add_argument("--client", choices=FLAVOURS, default=None,
                        help="the clients' adapter (default: the service's)")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="seconds between report lines (default 10)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="requests in flight (default 32)")
    parser.add_argument("--transport", choices=("both", "unix", "tcp"), default="both")
    parser.add_argument("--max-payload", type=int, default=64 * 1024,
                        help="largest payload in bytes (default 65536)")
    parser.add_argument("--max-connections", type=int, default=64,
                        help="the service's --max-connections (default 64)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        soak(args)
    except Failed as exc:
        print(f"FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
