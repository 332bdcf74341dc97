"""Fuzz suite set-up: the hypothesis profiles and a report line saying how it runs.

The profiles are registered by ``strategies.py`` (imported here so they exist
before any test module) and picked with ``EXECPROTO_FUZZ_PROFILE``
(``fuzz-ci``, the default, or ``fuzz``).  ``EXECPROTO_FUZZ_STRICT=1`` makes
the known core bugs of ``targets.KNOWN_BUGS`` fail like any other.
"""

from __future__ import annotations

import importlib.util
import os

from .strategies import PROFILE
from .targets import KNOWN_BUGS, strict


def pytest_report_header() -> list[str]:
    """Say which profile, engine and known-bug policy this run uses."""
    profile = os.environ.get("EXECPROTO_FUZZ_PROFILE", "fuzz-ci")
    atheris = "installed" if importlib.util.find_spec("atheris") else "not installed"
    policy = "fail" if strict() else f"tolerated ({len(KNOWN_BUGS)}, pinned in tests/regressions)"
    return [f"fuzz: hypothesis profile {profile} ({PROFILE.max_examples} examples per unit "
            f"weight), atheris {atheris}, known core bugs {policy}"]
