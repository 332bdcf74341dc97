"""Bursts: N clients at once, each running a script that sleeps 1 s.

How long until the last of N clients has its result, how many of them met
a full listen backlog (EAGAIN on a unix connect, retried every 100 ms as
Dovecot's clients do), and what the service cost in memory and threads,
for ``execproto serve`` in each flavour (``--max-connections N``), for the
minimal Python service of ``bench_e2e.py`` (the *ceiling*: the floor a
Python service has on this machine) and for Dovecot's own ``script``
service (``process_limit = N + 100``).

    python benchmarks/bench_burst.py                 # N = 100, 1000, 5000
    python benchmarks/bench_burst.py --sizes 1000 --rounds 3

Plain standard library; every wait is bounded.  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import errno
import os
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_e2e import TunedService  # noqa: E402
from tests.interop.dovecot import PrivateDovecot  # noqa: E402

HEADER = b"VERSION\tscript\t4\t0\n-\n\n"
RETRY = 0.1  # Dovecot retries a unix connect that says EAGAIN every 100 ms
FLAVOURS = ("blocking", "asyncio", "trio")


def burst(path: str, clients: int, limit: float,
          sample: Callable[[], None] = lambda: None) -> tuple[float, int, int]:
    """Start *clients* at once; return (seconds until the last result, EAGAINs, failures).

    *sample* is called about every 0.1 s meanwhile (to track memory).
    """
    sel = selectors.DefaultSelector()
    pending: dict[int, tuple[socket.socket, bytearray]] = {}
    retry: list[int] = []
    eagain = failures = done = 0
    started = time.monotonic()

    def connect() -> None:
        nonlocal eagain, failures, done
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError as exc:
            sock.close()
            if exc.errno == errno.EAGAIN:
                eagain += 1
                retry.append(1)
                return
            failures += 1
            done += 1
            return
        except OSError:
            sock.close()
            failures += 1
            done += 1
            return
        sock.sendall(HEADER)
        sock.shutdown(socket.SHUT_WR)
        pending[sock.fileno()] = (sock, bytearray())
        sel.register(sock, selectors.EVENT_READ)

    for _ in range(clients):
        connect()
    next_retry = time.monotonic() + RETRY
    while done < clients:
        sample()
        now = time.monotonic()
        if now - started > limit:
            raise TimeoutError(f"{clients - done} clients unanswered after {limit} s")
        if retry and now >= next_retry:
            waiting, retry[:] = len(retry), []
            for _ in range(waiting):
                connect()
            next_retry = now + RETRY
        for key, _ in sel.select(max(0.0, min(next_retry - now, 0.1)) if retry else 0.1):
            sock, got = pending[key.fd]
            try:
                chunk = sock.recv(4096)
            except OSError:
                chunk = b""
                got.clear()
            if chunk:
                got += chunk
                continue
            sel.unregister(sock)
            del pending[key.fd]
            sock.close()
            done += 1
            if bytes(got) != b"+\n":
                failures += 1
    sel.close()
    return time.monotonic() - started, eagain, failures


def tree(pid: int) -> list[int]:
    """*pid* and its descendants."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def status(pid: int, key: str) -> int:
    """A number from /proc/PID/status (VmHWM in kB, Threads...), 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def wait_socket(path: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return
        except OSError:
            time.sleep(0.05)
        finally:
            probe.close()
    raise TimeoutError(f"{path} does not accept connections")


def measure_execproto(flavour: str, tmp: Path, script: Path, size: int,
                      limit: float) -> dict[str, float]:
    """``execproto serve`` in one flavour, ``--max-connections`` covering the burst."""
    path = str(tmp / f"{flavour}.sock")
    return measure_process(
        [sys.executable, "-m", "execproto", "serve", "--unix", path, "--max-connections",
         str(size), "--adapter", flavour, "--log-level", "WARNING", "--grace", "5", str(script)],
        path, size, limit)


def measure_ceiling(tmp: Path, script: Path, size: int, limit: float) -> dict[str, float]:
    """The minimal service of bench_e2e.py: the least a Python service does per request."""
    path = str(tmp / "ceiling.sock")
    return measure_process([sys.executable, str(HERE / "bench_e2e.py"), "--ceiling", path,
                            str(script)], path, size, limit)


def measure_process(argv: list[str], path: str, size: int, limit: float) -> dict[str, float]:
    """Start a service process listening on *path*, burst it, stop it (SIGTERM, then SIGKILL)."""
    log = Path(path).with_suffix(".log")
    Path(path).unlink(missing_ok=True)  # the ceiling, killed, leaves its socket file
    with log.open("wb") as stderr:
        service = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        try:
            wait_socket(path)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; exit status {service.poll()}; stderr: "
                               f"{log.read_text(errors='replace')[-2000:]}") from None
        seconds, eagain, failures = burst(path, size, limit)
        return {"seconds": seconds, "eagain": eagain, "failures": failures,
                "rss_mb": status(service.pid, "VmHWM") / 1024,
                "threads": status(service.pid, "Threads")}
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait(30)


def measure_dovecot(tmp: Path, script: Path, size: int, limit: float) -> dict[str, float]:
    service = TunedService("burst", script, settings=(
        "service_count = 1", "client_limit = 1", f"process_limit = {size + 100}"))
    dovecot = PrivateDovecot([service], directory=tmp / f"dovecot-{size}",
                             extra_config=f"default_process_limit = {size + 100}\n")
    dovecot.start()
    try:
        path = str(dovecot.socket_path("burst"))
        wait_socket(path)
        master = int((dovecot.base_dir / "master.pid").read_text().split()[0])
        peak = [0]

        def sample() -> None:  # the script processes, not the scripts they run
            pids = [p for p in tree(master) if _comm(p) != "sleep"]
            peak[0] = max(peak[0], sum(status(pid, "VmRSS") for pid in pids))

        seconds, eagain, failures = burst(path, size, limit, sample)
        return {"seconds": seconds, "eagain": eagain, "failures": failures,
                "rss_mb": peak[0] / 1024, "threads": 0}
    finally:
        dovecot.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sizes", default="100,1000,5000", help="burst sizes, comma separated")
    ap.add_argument("--rounds", type=int, default=1, help="rounds per cell (median shown)")
    ap.add_argument("--flavours", default=",".join(FLAVOURS))
    ap.add_argument("--no-dovecot", action="store_true", help="leave Dovecot out")
    ap.add_argument("--no-ceiling", action="store_true",
                    help="leave out the minimal Python service (the floor on this machine)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * max(sizes) + 1000)), hard))
    services = [f for f in args.flavours.split(",") if f]
    if not args.no_ceiling:
        services.append("ceiling")
    if not args.no_dovecot:
        services.append("dovecot")
    print(f"| burst (scripts sleeping 1 s) | {' | '.join(services)} |")
    print("| --- |" + " ---: |" * len(services))
    with tempfile.TemporaryDirectory(prefix="execproto-burst-") as tmpdir:
        tmp = Path(tmpdir)
        os.chmod(tmp, 0o755)
        script = tmp / "sleep1"
        script.write_text("#!/bin/sh\nexec /bin/sleep 1\n")
        script.chmod(0o755)
        for size in sizes:
            limit = 60.0 + size / 20
            cells: dict[str, list[dict[str, float]]] = {s: [] for s in services}
            for _ in range(args.rounds):
                for name in services:
                    if name == "dovecot":
                        cells[name].append(measure_dovecot(tmp, script, size, limit))
                    elif name == "ceiling":
                        cells[name].append(measure_ceiling(tmp, script, size, limit))
                    else:
                        cells[name].append(measure_execproto(name, tmp, script, size, limit))

            for label, key, fmt in (
                    ("seconds until the last result", "seconds", "{:.2f}"),
                    ("EAGAIN retries at the clients", "eagain", "{:.0f}"),
                    ("failed requests", "failures", "{:.0f}"),
                    ("service peak RSS, MB (Dovecot: its processes)", "rss_mb", "{:.0f}"),
                    ("service threads at the end", "threads", "{:.0f}")):
                values = [fmt.format(statistics.median(c[key] for c in cells[name]))
                          for name in services]
                print(f"| {size:,}: {label} | {' | '.join(values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
