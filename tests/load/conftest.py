"""Fixtures for the load suite: the adapter suite's, reused.

``flavour`` runs a test once per adapter flavour; ``no_leaks`` (autouse)
fails a test that leaves descriptors, child processes or zombies behind.
Resource warnings and exceptions in threads are errors here too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ..adapters.conftest import _STRICT_WARNINGS, flavour, no_leaks

__all__ = ["flavour", "no_leaks"]

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Make resource warnings and stray exceptions errors in this directory."""
    for item in items:
        if _HERE in Path(str(item.path)).parents:
            for spec in _STRICT_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))
