"""Fixtures for the adapter suite: flavours, leak checks, shared payloads.

Every test that takes the ``flavour`` fixture runs once per flavour
(blocking, asyncio, trio).  A flavour whose module does not import yet is
skipped with the import error as the reason, unless the environment variable
``CI`` is set: then the test fails, so nothing is skipped silently in CI.

Around every test an autouse fixture compares the open descriptors and the
child processes (zombies included) before and after.  Resource warnings,
unraisable exceptions and exceptions in threads are errors here.
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .flavours import FLAVOUR_NAMES, Flavour, children, get_flavour, open_fds

_HERE = Path(__file__).parent

#: Size of the big-payload scenario (once per flavour and driver).
BIG = 50 * 1024 * 1024
#: How long descriptors and processes may take to settle after a test.
SETTLE = 3.0

_STRICT_WARNINGS = (
    "error::ResourceWarning",
    "error::pytest.PytestUnraisableExceptionWarning",
    "error::pytest.PytestUnhandledThreadExceptionWarning",
    "error:coroutine .* was never awaited:RuntimeWarning",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Make resource warnings and stray exceptions errors in this directory."""
    for item in items:
        if _HERE in Path(str(item.path)).parents:
            for spec in _STRICT_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))


@pytest.fixture(params=FLAVOUR_NAMES)
def flavour(request: pytest.FixtureRequest) -> Flavour:
    """Each adapter flavour in turn (skipped, or failed in CI, if it does not import)."""
    name: str = request.param
    return get_flavour(name)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves descriptors, child processes or zombies behind."""
    fds_before = open_fds()
    children_before = children()
    yield
    deadline = time.monotonic() + SETTLE
    collected = False
    while True:
        fds_after = open_fds()
        new_children = {pid: state for pid, state in children().items()
                        if pid not in children_before or state == "Z"}
        if (len(fds_after) <= len(fds_before) and not new_children) or \
                time.monotonic() > deadline:
            break
        if not collected:
            # Only now: a full collection costs about 0.1 s.  Anything it
            # frees that still owned a descriptor is a ResourceWarning, an error.
            gc.collect()
            collected = True
            continue
        time.sleep(0.02)
    problems = []
    if len(fds_after) > len(fds_before):
        extra = {fd: target for fd, target in fds_after.items()
                 if fds_before.get(fd) != target}
        problems.append(f"{len(fds_after) - len(fds_before)} descriptor(s) leaked: {extra}")
    zombies = sorted(pid for pid, state in new_children.items() if state == "Z")
    if zombies:
        problems.append(f"zombie children left: {zombies}")
    running = {pid: state for pid, state in new_children.items() if state != "Z"}
    if running:
        problems.append(f"child processes still running: {running}")
    assert not problems, "; ".join(problems)


@pytest.fixture(scope="session")
def big_payload() -> bytes:
    """50 MB of reproducible random bytes (all 256 values)."""
    return random.Random(20260512).randbytes(BIG)
