"""Fixtures for tests against a private, real Dovecot.

Without a Dovecot binary, Dovecot's ``script`` binary or root privileges the
interop tests are skipped, unless the environment variable ``CI`` is set:
then they fail, so they can never be skipped silently in CI.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import pytest

from .dovecot import (
    PrivateDovecot,
    ScriptService,
    StartDovecot,
    dovecot_binary,
    script_binary,
)
from .tools import FLAVOURS, child_processes, load_flavour

SETTLE = 5.0
"""Seconds child processes may take to go away after a module."""


def _unavailable(reason: str) -> NoReturn:
    if "CI" in os.environ:
        pytest.fail(f"interop tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(params=FLAVOURS)
def flavour(request: pytest.FixtureRequest) -> str:
    """Each adapter flavour's name in turn.

    A flavour whose module does not import (yet) is skipped, or failed when
    ``CI`` is set.
    """
    name: str = request.param
    load_flavour(name)
    return name


@pytest.fixture(scope="session")
def dovecot_path() -> str:
    """Path of the ``dovecot`` binary; skips (fails under CI) if unusable."""
    binary = dovecot_binary()
    if binary is None:
        _unavailable("dovecot binary not found")
    if script_binary() is None:
        _unavailable("Dovecot's script binary not found")
    if os.geteuid() != 0:
        _unavailable("a private Dovecot needs root")
    return binary


@pytest.fixture(scope="module")
def start_dovecot(
    dovecot_path: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartDovecot]:
    """Return a function that starts a :class:`PrivateDovecot`.

    Every instance started through it is stopped at the end of the module.
    """
    started: list[PrivateDovecot] = []

    def start(services: Sequence[ScriptService]) -> PrivateDovecot:
        dovecot = PrivateDovecot(
            services, directory=tmp_path_factory.mktemp("dovecot"), binary=dovecot_path
        )
        started.append(dovecot)
        dovecot.start()
        return dovecot

    yield start
    for dovecot in started:
        dovecot.stop()


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary directory shared by the tests of one module."""
    return tmp_path_factory.mktemp("interop")


@pytest.fixture(scope="module", autouse=True)
def no_stray_processes() -> Iterator[None]:
    """Fail a module that leaves child processes (zombies included) behind.

    Autouse, so it is set up before and torn down after the module's other
    fixtures (the Dovecot masters, the ``serve`` processes).
    """
    before = set(child_processes())
    yield
    deadline = time.monotonic() + SETTLE
    while (left := {p: s for p, s in child_processes().items() if p not in before}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert not left, f"child processes left behind (pid: state): {left}"
