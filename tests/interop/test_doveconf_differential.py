"""execproto's config reader judged by Dovecot's own ``doveconf``.

For every configuration of a corpus, run on each Dovecot version:

* both accept it, or both reject it, and then execproto names the same file
  and line as doveconf;
* when both accept it, the script services (``service``, ``unix_listener``,
  ``inet_listener``) and the ``execute`` blocks (2.4) or 2.3 program
  settings execproto reads carry the same values in the file as in what
  ``doveconf -n`` prints for it (whose names are 2.4's normalised ones:
  ``quota_warning`` for ``warning``).

The corpus: the stock ``/etc/dovecot`` tree of each version, as is and with
each commented example block enabled in turn; the hand-written cases under
``config_corpus/`` (``common/`` on every version, ``2.3/`` and ``2.4/`` on
theirs; 2.4 runs get the ``dovecot_config_version`` lines prepended); and
configurations generated from a grammar (:mod:`.config_grammar`).

doveconf also checks what settings mean (names, types, references), which
execproto's reader does not: such rejections are the known differences
listed in :data:`SEMANTIC`, each with its reason, and reported.

A missing doveconf fails the test when ``CI`` is set; locally a missing 2.4
chroot skips its version.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from execproto import ConfigError

from .config_grammar import generated_cases
from .doveconf import (
    HEADER_24,
    VERSIONS,
    Case,
    Doveconf,
    Outcome,
    Verdict,
    doveconf_for,
    drop_default_listeners,
    enable_block,
    example_blocks,
    execproto_verdict,
    observed,
    parse_printed,
)

CORPUS = Path(__file__).parent / "config_corpus"

#: doveconf rejections about what settings mean, which the reader does not
#: check (it keeps any key and value): (pattern of doveconf's reason, why).
SEMANTIC: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r'Unknown setting: "'),
     "a quoted key is 2.4 syntax; 2.3 keeps the quotes as part of the name"),
    (re.compile(r"Unknown setting|Unknown section name|not found either"),
     "doveconf knows every setting name; the reader keeps any key"),
    (re.compile(r"Invalid port number|Invalid .*number|Invalid (size|time|boolean)"),
     "doveconf checks value types of settings execproto does not read"),
    (re.compile(r"refers to non-?existent exporter"),
     "a metric example names an exporter that only another example defines"),
    (re.compile(r"is required to have .* setting"),
     "a named filter lacks a setting Dovecot requires"),
    (re.compile(r"Conflict in setting"),
     "doveconf checks that two filters do not both match with different values"),
    (re.compile(r"duplicate listener"),
     "doveconf checks that no two services listen on one port; the reader reads one service"),
    (re.compile(r"not allowed|Section not allowed here"),
     "doveconf knows which filters may nest; the reader keeps any nesting"),
]


def _reason(outcome: Outcome) -> str | None:
    for pattern, why in SEMANTIC:
        if pattern.search(outcome.reason):
            return why
    return None


def corpus_cases(version: str) -> list[Case]:
    """The hand-written cases that apply to *version*."""
    groups = ["common", "2.4" if version.startswith("2.4") else "2.3"]
    cases: list[Case] = []
    for group in groups:
        for entry in sorted((CORPUS / group).iterdir()):
            if entry.is_dir():
                files = {str(p.relative_to(entry)): p.read_bytes().decode(
                    "utf-8", "surrogateescape") for p in sorted(entry.rglob("*")) if p.is_file()}
                cases.append(Case(f"{group}/{entry.name}", files))
            else:
                cases.append(Case(f"{group}/{entry.name}", {
                    "dovecot.conf": entry.read_bytes().decode("utf-8", "surrogateescape")}))
    if version.startswith("2.4"):
        cases = [Case(c.name, {**c.files, c.main: HEADER_24 + c.files[c.main]}) for c in cases]
    return cases


def stock_cases(doveconf: Doveconf) -> list[Case]:
    """The stock tree, and the stock tree with each commented example block enabled."""
    stock = doveconf.stock()
    real = doveconf.real(stock)
    cases = [Case("stock", {}, base=stock)]
    for path in sorted(real.rglob("*")):
        if not path.is_file() or path.suffix not in (".conf", ".ext"):
            continue
        relative = str(path.relative_to(real))
        text = path.read_text(errors="surrogateescape")
        for block in example_blocks(text):
            cases.append(Case(f"stock {relative}:{block[0] + 1}",
                              {relative: enable_block(text, block)}, base=stock))
    return cases


@dataclass
class Result:
    """One case's outcome on both sides."""

    case: Case
    path: str
    doveconf: Outcome
    execproto: Verdict


def _results(doveconf: Doveconf, cases: list[Case]) -> Iterator[Result]:
    workdir = doveconf.workdir()
    try:
        outcomes = doveconf.run(cases, workdir)
        for index, (case, outcome) in enumerate(zip(cases, outcomes, strict=True)):
            path = f"{workdir}/{index}/{case.main}"
            yield Result(case, path, outcome, execproto_verdict(doveconf, path))
    finally:
        shutil.rmtree(doveconf.real(workdir), ignore_errors=True)


def check(doveconf: Doveconf, result: Result) -> str | None:
    """A problem with one case, or None; a known difference returns its reason prefixed."""
    ours, theirs = result.execproto, result.doveconf
    name = f"{doveconf.version} {result.case.name}"
    if theirs.accepted and ours.error is not None:
        return f"FAIL {name}: doveconf accepts, execproto: {ours.error.message}"
    if not theirs.accepted and ours.error is None:
        why = _reason(theirs)
        if why is None:
            return f"FAIL {name}: execproto accepts, doveconf: {theirs.error}"
        return f"KNOWN {name}: {why} ({theirs.reason})"
    if not theirs.accepted:
        assert ours.error is not None
        why = _reason(theirs)
        if why is not None and (ours.error.file, ours.error.line) != (theirs.file, theirs.line):
            return (f"KNOWN {name}: both reject, doveconf first at a meaning error: {why} "
                    f"({theirs.reason}; execproto: {ours.error.message})")
        # Without a line, doveconf's error comes from checking the whole
        # configuration (a section left open, a bad execute block): then the
        # message itself must be the same.
        if theirs.line is None:
            same = theirs.reason == ours.error.reason
        else:
            same = (ours.error.file, ours.error.line) == (theirs.file, theirs.line)
        if not same:
            return (f"FAIL {name}: execproto says {ours.error.message!r}, "
                    f"doveconf {theirs.error!r}")
        return None
    assert ours.root is not None
    if not doveconf.is_24:
        drop_default_listeners(ours.root)
    mine = observed(ours.root)
    try:
        printed = parse_printed(theirs.output, doveconf, result.path)
    except ConfigError as exc:
        # doveconf -n prints a value that ends in a backslash bare (`a\` for
        # "a\\"): read back, by Dovecot too, it continues onto the next line.
        if re.search(r"^[^#\n]*\\$", theirs.output, re.MULTILINE):
            return f"KNOWN {name}: doveconf -n prints a value it cannot read back ({exc})"
        raise
    seen = observed(printed, set(mine.services))
    if mine != seen:
        return f"FAIL {name}: values differ:\n  execproto: {mine}\n  doveconf:  {seen}"
    return None


@pytest.fixture(scope="module", params=VERSIONS)
def doveconf(request: pytest.FixtureRequest) -> Doveconf:
    """The doveconf of each version; missing: fail under CI, else skip."""
    found = doveconf_for(request.param)
    if isinstance(found, str):
        if "CI" in os.environ:
            pytest.fail(f"Dovecot {request.param}: {found}", pytrace=False)
        pytest.skip(f"Dovecot {request.param}: {found}")
    return found


def _run(doveconf: Doveconf, cases: list[Case], label: str) -> None:
    problems: list[str] = []
    counts: Counter[str] = Counter()
    for result in _results(doveconf, cases):
        counts["doveconf accepts" if result.doveconf.accepted else "doveconf rejects"] += 1
        counts["execproto accepts" if result.execproto.error is None
               else "execproto rejects"] += 1
        problem = check(doveconf, result)
        if problem is not None:
            counts["known differences" if problem.startswith("KNOWN") else "failures"] += 1
            problems.append(problem)
    summary = (f"Dovecot {doveconf.version} {label}: {len(cases)} files, "
               + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(summary)
    for problem in problems:
        print("  " + problem)
    failures = [p for p in problems if p.startswith("FAIL")]
    assert not failures, summary + "\n" + "\n".join(failures)


def test_stock_tree_and_examples(doveconf: Doveconf) -> None:
    """The stock tree, and each commented example block enabled in turn."""
    _run(doveconf, stock_cases(doveconf), "stock tree")


def test_hand_written(doveconf: Doveconf) -> None:
    """Quoting, includes, <file values, continuations, comments, nesting, errors."""
    cases = corpus_cases(doveconf.version)
    assert len(cases) > 30
    _run(doveconf, cases, "hand-written")


def test_generated(doveconf: Doveconf) -> None:
    """Configurations generated from a grammar (fixed seed)."""
    _run(doveconf, generated_cases(doveconf.version), "generated")
