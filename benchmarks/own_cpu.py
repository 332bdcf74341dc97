"""Own CPU per request: each flavour's service process beside the minimal one.

A service's *own* CPU is its process's utime + stime, without the scripts it
reaps: the part of a request that is the service's Python.  Each service
(``execproto serve --adapter X`` and the ceiling of ``bench_e2e.py``) serves
``/bin/true`` on a unix socket in a temporary directory; a client process
sends N requests, C at a time, after a warm-up of 300.  Plain standard
library, no Dovecot, every wait bounded.

    python benchmarks/own_cpu.py                     # C = 1, 3,000 requests, two rounds
    python benchmarks/own_cpu.py --concurrency 16 --requests 5000
    python benchmarks/own_cpu.py --waits             # the CPU of one wait, per flavour
    python benchmarks/own_cpu.py --fork              # where a fork-driver run spends its CPU

``--waits`` times what each flavour's answer to one ``Wait`` costs, without
a service: a procedure writes a byte to a pipe, waits for the other end to
be readable (it is already) and reads the byte, 20,000 times; the same loop
with a bare ``epoll`` register, poll and unregister is the floor.  A
request waits three or four times (accept, header, the script's exit, the
client's close), so this cost, times four, is what an event loop adds to a
request beyond the blocking flavour's.

``--fork`` splits the CPU of ``blocking.run("fork:/bin/true")`` (the calling
thread's, not the child's) into phases, by wrapping the procedures' spawn,
pidfd and wait-for-exit steps, over 2,000 runs; a bare ``posix_spawn`` +
``waitpid`` is timed beside it.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REQUEST = b"VERSION\tscript\t4\t0\n-\n\n"
TICK = os.sysconf("SC_CLK_TCK")


def load(path: str, concurrency: int, total: int) -> float:
    """Send *total* requests, *concurrency* at a time; requests/s."""
    left = [total]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not left[0]:
                    return
                left[0] -= 1
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10.0)
                sock.connect(path)
                sock.sendall(REQUEST)
                sock.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := sock.recv(64):
                    reply += chunk
                if reply != b"+\n":
                    raise RuntimeError(f"unexpected reply {reply!r}")

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return total / (time.monotonic() - started)


def own_cpu(pid: int) -> float:
    """utime + stime of *pid* in seconds (its reaped children not included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def measure(argv: list[str], path: str, concurrency: int, total: int) -> tuple[float, float]:
    """Own CPU µs per request and requests/s of the service *argv* listening on *path*."""
    service = subprocess.Popen(argv, cwd=HERE.parent, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20.0
        while not os.path.exists(path):
            if time.monotonic() > deadline or service.poll() is not None:
                raise RuntimeError(f"{argv} did not listen on {path}")
            time.sleep(0.05)
        load(path, concurrency, 300)
        before = own_cpu(service.pid)
        rate = load(path, concurrency, total)
        return (own_cpu(service.pid) - before) / total * 1e6, rate
    finally:
        service.terminate()
        service.wait(30)


def _pings(r: int, w: int, n: int, timeout: float | None) -> Any:
    from execproto.adapters import _procedures as proc

    for _ in range(n):
        os.write(w, b"x")
        if not (yield proc.Wait(read=(r,), timeout=timeout)):
            raise RuntimeError("the wait timed out")
        os.read(r, 1)


def _bare(r: int, w: int, n: int, timeout: float | None) -> None:
    poller = select.epoll()
    for _ in range(n):
        os.write(w, b"x")
        poller.register(r, select.EPOLLIN)
        if not poller.poll(-1 if timeout is None else timeout):
            raise RuntimeError("the wait timed out")
        poller.unregister(r)
        os.read(r, 1)
    poller.close()


def wait_cost(flavour: str, n: int, timeout: float | None) -> float:
    """CPU µs per wait of *flavour* for an fd that is ready at once."""
    r, w = os.pipe()
    try:
        started = time.process_time()
        if flavour == "epoll (floor)":
            _bare(r, w, n, timeout)
        elif flavour == "blocking":
            from execproto.adapters.blocking import _Loop

            loop = _Loop({})
            loop.start(_pings(r, w, n, timeout), lambda _: None)
            loop.run()
            loop.close()
        elif flavour == "asyncio":
            import asyncio

            from execproto.adapters import _procedures as proc
            from execproto.adapters import asyncio as flavour_module

            asyncio.run(proc.drive(_pings(r, w, n, timeout), flavour_module._ANSWERS))
        else:
            import trio

            from execproto.adapters import _procedures as proc
            from execproto.adapters import trio as trio_module

            trio.run(proc.drive, _pings(r, w, n, timeout), trio_module._ANSWERS)
        return (time.process_time() - started) / n * 1e6
    finally:
        os.close(r)
        os.close(w)


def fork_phases(n: int) -> list[tuple[str, float]]:
    """CPU µs per phase of a fork-driver run, and of a bare spawn; see the module's text."""
    from execproto.adapters import _procedures as proc
    from execproto.adapters import blocking

    marks: list[tuple[str, int]] = []
    names = ("spawn", "open_pidfd", "wait_child")
    saved: dict[str, Any] = {name: getattr(proc, name) for name in names}
    spawn, open_pidfd, wait_child = (saved[name] for name in names)

    def timed_spawn(*args: Any, **kwargs: Any) -> int:
        marks.append(("start_run, /dev/null and the output pipe", time.thread_time_ns()))
        pid: int = spawn(*args, **kwargs)
        marks.append(("posix_spawn", time.thread_time_ns()))
        return pid

    def timed_open_pidfd(pid: int) -> int:
        fd: int = open_pidfd(pid)
        marks.append(("close the child's ends, pidfd_open", time.thread_time_ns()))
        return fd

    def timed_wait_child(*args: Any) -> Any:
        marks.append(("read the output to its end (one wait)", time.thread_time_ns()))
        code = yield from wait_child(*args)
        marks.append(("wait for the exit, reap", time.thread_time_ns()))
        return code

    totals: dict[str, int] = {}
    timed: tuple[Any, ...] = (timed_spawn, timed_open_pidfd, timed_wait_child)
    for name, replacement in zip(names, timed, strict=True):
        setattr(proc, name, replacement)
    try:
        for i in range(n + 200):
            marks.clear()
            started = time.thread_time_ns()
            blocking.run("fork:/bin/true")
            ended = time.thread_time_ns()
            if i < 200:
                continue  # warm-up
            previous = started
            for name, at in [*marks, ("close, RunResult", ended)]:
                totals[name] = totals.get(name, 0) + at - previous
                previous = at
    finally:
        for name in names:
            setattr(proc, name, saved[name])
    rows = [(name, ns / n / 1000) for name, ns in totals.items()]
    rows.append(("total", sum(ns for ns in totals.values()) / n / 1000))
    started = time.thread_time_ns()
    for _ in range(n):
        os.waitpid(os.posix_spawn(b"/bin/true", [b"/bin/true"], {}), 0)
    rows.append(("bare posix_spawn + waitpid", (time.thread_time_ns() - started) / n / 1000))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--flavours", default="blocking,asyncio,trio")
    ap.add_argument("--waits", action="store_true", help="time one wait per flavour instead")
    ap.add_argument("--fork", action="store_true", help="split a fork-driver run into phases")
    args = ap.parse_args()
    if args.fork:
        print("| phase of `blocking.run(\"fork:/bin/true\")` | CPU µs per run |  (2,000 runs, "
              f"{args.rounds} rounds, each listed)")
        print("| --- | ---: |")
        results = [fork_phases(2000) for _ in range(args.rounds)]
        for i, (name, _) in enumerate(results[0]):
            print(f"| {name} | {' / '.join(f'{r[i][1]:.0f}' for r in results)} |")
        return 0
    if args.waits:
        print("| waiter | CPU µs per wait, no timeout | with a timeout |  (20,000 waits, "
              f"{args.rounds} rounds, each listed)")
        print("| --- | ---: | ---: |")
        for name in ["epoll (floor)", *args.flavours.split(",")]:
            cells = [" / ".join(f"{wait_cost(name, 20000, t):.1f}" for _ in range(args.rounds))
                     for t in (None, 10.0)]
            print(f"| {name} | {cells[0]} | {cells[1]} |")
        return 0
    names = ["ceiling", *args.flavours.split(",")]
    print(f"| service | own CPU µs/request | requests/s |  (C = {args.concurrency}, "
          f"{args.requests} requests, each round listed)")
    print("| --- | ---: | ---: |")
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="execproto-own-") as tmp:
        for round_ in range(args.rounds):
            for name in names:
                path = os.path.join(tmp, f"{name}-{round_}.sock")
                if name == "ceiling":
                    argv = [sys.executable, str(HERE / "bench_e2e.py"), "--ceiling", path,
                            "/bin/true"]
                else:
                    argv = [sys.executable, "-m", "execproto", "serve", "--unix", path,
                            "--adapter", name, "--log-level", "WARNING", "/bin/true"]
                rows[name].append(measure(argv, path, args.concurrency, args.requests))
    for name, values in rows.items():
        print(f"| {name} | {' / '.join(f'{us:.0f}' for us, _ in values)} "
              f"| {' / '.join(f'{rate:,.0f}' for _, rate in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
