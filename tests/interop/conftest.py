"""Fixtures for tests against private, real Dovecots.

Every test that uses a Dovecot runs once per :data:`dovecot.INSTALLATIONS`
entry (ids ``2.3.19``, ``2.4.1``, ``2.4.5``), so a failure names the
version. An installation that is missing (no chroot, no binary, no root) is
skipped, unless the environment variable ``CI`` is set: then its tests
fail, so they can never be skipped silently in CI.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import pytest

from .dovecot import (
    INSTALLATIONS,
    Installation,
    PrivateDovecot,
    ScriptService,
    StartDovecot,
)
from .tools import FLAVOURS, child_processes, load_flavour

SETTLE = 5.0
"""Seconds child processes may take to go away after a module."""

CHROOTS_SCRIPT = Path(__file__).parents[2] / ".ci" / "chroots"


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


def _mount(installation: Installation) -> None:
    """Mount /proc and /dev in a built chroot (``.ci/chroots`` only mounts then)."""
    root = installation.root
    if installation.chrooted and (root / ".ready").exists() and not os.path.ismount(
            root / "proc") and os.geteuid() == 0:
        subprocess.run(["bash", str(CHROOTS_SCRIPT), root.name], env={
            **os.environ, "EXECPROTO_CHROOTS": str(root.parent)}, timeout=60, check=False)


@pytest.fixture(scope="module", params=INSTALLATIONS, ids=[i.label for i in INSTALLATIONS])
def installation(request: pytest.FixtureRequest) -> Installation:
    """Each Dovecot in turn; skips (fails under CI) one that is unusable."""
    found: Installation = request.param
    _mount(found)
    problem = found.problem()
    if problem is not None:
        _unavailable(problem)
    return found


@pytest.fixture(scope="module")
def workspace(installation: Installation) -> Iterator[Path]:
    """A directory of the module shared with the installation (same path in both)."""
    path = installation.workspace()
    yield path
    installation.remove_workspace(path)


@pytest.fixture(scope="module")
def start_dovecot(installation: Installation, workspace: Path) -> Iterator[StartDovecot]:
    """Return a function that starts a :class:`PrivateDovecot` of the installation.

    Every instance started through it is stopped at the end of the module.
    """
    started: list[PrivateDovecot] = []

    def start(services: Sequence[ScriptService]) -> PrivateDovecot:
        directory = workspace / f"dovecot-{len(started)}"
        dovecot = PrivateDovecot(services, directory=directory, installation=installation)
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
