"""Replay every input under tests/regressions/<target>/ through its fuzz target."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.targets import KNOWN_BUGS, TARGETS, InvariantError

_HERE = Path(__file__).parent
_KNOWN = {bug.id: bug for bug in KNOWN_BUGS}


def _cases() -> list[object]:
    cases: list[object] = []
    for target in sorted(TARGETS):
        for path in sorted((_HERE / target).glob("*")) if (_HERE / target).is_dir() else []:
            marks = []
            bug = _KNOWN.get(path.name)
            if bug is not None:
                marks.append(pytest.mark.xfail(strict=True, raises=InvariantError,
                                               reason=f"core bug: {bug.summary}"))
            cases.append(pytest.param(target, path, id=f"{target}/{path.name}", marks=marks))
    return cases


def test_every_known_bug_has_an_input() -> None:
    for bug in KNOWN_BUGS:
        assert (_HERE / bug.target / bug.id).is_file(), f"no regression input for {bug.id}"


@pytest.mark.parametrize(("target", "path"), _cases())
def test_regression(target: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXECPROTO_FUZZ_STRICT", "1")
    TARGETS[target](path.read_bytes())
