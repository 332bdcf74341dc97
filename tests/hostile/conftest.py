"""Fixtures for the hostile-client suite.

* ``served``: the worker script behind one flavour's service on unix or tcp,
  with a short header timeout, a small header limit and few slots.  One
  service per test module and combination (pytest groups the tests by it);
  every test ends by checking that the service still answers a normal
  request correctly.
* ``flavour`` and ``transport``: for tests that start services of their own.
* Around every test: descriptors back to their count before it, no zombie
  and no stray child process (bounded settling time).
* Around the whole directory: at the end no child process, descriptors at
  the baseline taken before the first service started, and the growth of
  this process's RSS (it hosts every service thread) within
  :data:`RSS_GROWTH_KIB`.  The figures are printed in the terminal summary.

Resource warnings and exceptions in service threads are errors here.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from execproto.adapters import TcpListener, UnixListener
from tests.adapters.flavours import (
    FLAVOUR_NAMES,
    LogCapture,
    children,
    get_flavour,
    open_fds,
)

from .clients import Served, assert_alive, rss_kib, worker_script

_HERE = Path(__file__).parent

#: serve() options of the shared services.
OPTIONS: dict[str, Any] = {
    "header_timeout": 1.0,
    "max_header_bytes": 4096,
    "max_connections": 4,
    "env_allowlist": ("FOO",),
    "kill_timeout": 1.0,
}
#: How long descriptors and children may take to settle after a test.
SETTLE = 5.0
#: Allowed growth of this process's RSS over the whole suite.
RSS_GROWTH_KIB = 32 * 1024

COMBINATIONS = [(f, t) for f in FLAVOUR_NAMES for t in ("unix", "tcp")]

_STRICT_WARNINGS = (
    "error::ResourceWarning",
    "error::pytest.PytestUnraisableExceptionWarning",
    "error::pytest.PytestUnhandledThreadExceptionWarning",
    "error:coroutine .* was never awaited:RuntimeWarning",
)

_measured: dict[str, str] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Make resource warnings and exceptions in threads errors in this directory."""
    for item in items:
        if _HERE in Path(str(item.path)).parents:
            for spec in _STRICT_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the resource figures of the suite."""
    if _measured:
        terminalreporter.write_sep("-", "hostile suite resources")
        for key, value in _measured.items():
            terminalreporter.write_line(f"{key}: {value}")


def _settle(fds_before: int, children_before: dict[int, str]) -> list[str]:
    deadline = time.monotonic() + SETTLE
    collected = False
    while True:
        fds = open_fds()
        new = {pid: s for pid, s in children().items()
               if pid not in children_before or s == "Z"}
        if (len(fds) <= fds_before and not new) or time.monotonic() > deadline:
            break
        if not collected:
            gc.collect()
            collected = True
            continue
        time.sleep(0.02)
    problems = []
    if len(fds) > fds_before:
        problems.append(f"{len(fds) - fds_before} descriptor(s) more than before: {fds}")
    zombies = sorted(pid for pid, s in new.items() if s == "Z")
    if zombies:
        problems.append(f"zombies: {zombies}")
    running = sorted(pid for pid, s in new.items() if s != "Z")
    if running:
        problems.append(f"child processes still running: {running}")
    return problems


@pytest.fixture(scope="package", autouse=True)
def suite_resources() -> Iterator[None]:
    """Baseline before the first service; at the end: no leak, bounded RSS growth."""
    for name in FLAVOUR_NAMES:  # imported up front: their code is not growth
        with contextlib.suppress(Exception):
            importlib.import_module(f"execproto.adapters.{name}")
    gc.collect()
    fds_before = len(open_fds())
    children_before = children()
    rss_before, _ = rss_kib()
    started = time.monotonic()
    yield
    problems = _settle(fds_before, children_before)
    gc.collect()
    rss_after, hwm = rss_kib()
    growth = rss_after - rss_before
    _measured["duration"] = f"{time.monotonic() - started:.1f} s"
    _measured["descriptors"] = f"{fds_before} before, {len(open_fds())} after"
    _measured["RSS"] = (f"{rss_before / 1024:.1f} MiB before, {rss_after / 1024:.1f} MiB after "
                        f"(growth {growth / 1024:.1f} MiB, bound {RSS_GROWTH_KIB / 1024:.0f} "
                        f"MiB), peak {hwm / 1024:.1f} MiB")
    assert not problems, "; ".join(problems)
    assert growth <= RSS_GROWTH_KIB, _measured["RSS"]


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves descriptors, zombies or child processes behind."""
    fds_before = len(open_fds())
    children_before = children()
    yield
    problems = _settle(fds_before, children_before)
    assert not problems, "; ".join(problems)


@pytest.fixture(scope="module", params=COMBINATIONS, ids=[f"{f}-{t}" for f, t in COMBINATIONS])
def served(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The worker script served by one flavour on one transport."""
    name, transport = request.param
    flavour = get_flavour(name)
    directory = tmp_path_factory.mktemp(f"{name}-{transport}")
    log = LogCapture()
    listener = (UnixListener(str(directory / "sock")) if transport == "unix"
                else TcpListener("127.0.0.1", 0))
    with flavour.serving([listener], worker_script(directory), logger=log.logger,
                         **OPTIONS) as addresses:
        served = Served(name, transport, addresses[0], log, dict(OPTIONS))
        # Fully up (the blocking service makes its selector after it has
        # reported its addresses): the first test's baseline includes it all.
        assert_alive(served)
        yield served


@pytest.fixture
def record() -> Callable[[str, str], None]:
    """Note a figure for the terminal summary (``record(key, text)``)."""

    def put(key: str, text: str) -> None:
        _measured[key] = text

    return put


@pytest.fixture(params=FLAVOUR_NAMES)
def flavour_name(request: pytest.FixtureRequest) -> str:
    """Each flavour's name in turn."""
    name: str = request.param
    get_flavour(name)  # skips (fails in CI) if it does not import
    return name


@pytest.fixture(params=["unix", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    """``unix`` and ``tcp`` in turn."""
    value: str = request.param
    return value
