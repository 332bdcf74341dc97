"""Run the fuzz targets for a long time (the CI-sized run is part of ``pytest``).

From the repository root::

    python -m tests.fuzz.run --target header --seconds 600    # one target, 10 minutes
    python -m tests.fuzz.run --target all --seconds 3600      # every target, equal shares
    python -m tests.fuzz.run --target config --engine hypothesis --seconds 600
    python -m tests.fuzz.run --target header --reproduce FILE [FILE...]
    python -m tests.fuzz.run --list

Engines: ``atheris`` (coverage-guided libFuzzer, the default when
``pip install atheris`` worked) mutates raw inputs starting from the seed
corpus ``tests/fuzz/corpus/<target>/``; ``hypothesis`` runs the property
tests of ``test_fuzz.py`` in rounds (profile ``fuzz-round``) until the time
is up; a round is not interrupted, so the last one may overrun a little.

New corpus entries go to ``WORK/<target>/corpus`` and crashing inputs to
``WORK/<target>/crash-*`` (WORK is ``--work``, default ``build/fuzz``);
check a crash with ``--reproduce``, then keep it under
``tests/regressions/<target>/`` (see the README there).

Known core bugs (``targets.KNOWN_BUGS``) are tolerated unless ``--strict``.
Exit status: 0 when nothing broke, 1 on a crash or an invariant violation.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

# Nothing here imports execproto at module level: the atheris engine must
# import it inside its instrumentation context.

TARGET_NAMES = ("header", "reply", "dot", "unescape", "config", "target")
#: libFuzzer's -max_len per target (bytes of raw input).
MAX_LEN = {"header": 16384, "reply": 4096, "dot": 4096, "unescape": 1024, "config": 8192,
           "target": 256}
CORPUS = Path(__file__).parent / "corpus"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=(*TARGET_NAMES, "all"), default="all")
    parser.add_argument("--seconds", type=float, default=600.0,
                        help="time budget (all targets share it with --target all)")
    parser.add_argument("--runs", type=int, default=None,
                        help="atheris: stop after this many inputs (smoke runs)")
    parser.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    parser.add_argument("--work", type=Path, default=Path("build/fuzz"),
                        help="where new corpus entries and crashes go")
    parser.add_argument("--strict", action="store_true",
                        help="known core bugs fail too (EXECPROTO_FUZZ_STRICT=1)")
    parser.add_argument("--reproduce", nargs="+", type=Path, metavar="FILE",
                        help="run these raw inputs through --target once and report")
    parser.add_argument("--list", action="store_true", help="list the targets")
    return parser


def _engine(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        import atheris  # noqa: F401
    except ImportError:
        return "hypothesis"
    return "atheris"


def _reproduce(target: str, files: Sequence[Path]) -> int:
    from .targets import TARGETS, KnownBugHit

    failed = 0
    for path in files:
        try:
            TARGETS[target](path.read_bytes())
        except KnownBugHit as exc:
            print(f"{path}: {exc}")
        except BaseException:
            failed += 1
            print(f"{path}: FAILED")
            traceback.print_exc()
        else:
            print(f"{path}: ok")
    return 1 if failed else 0


def _run_each(ns: argparse.Namespace) -> int:
    """``--target all``: one child process per target (libFuzzer exits when done)."""
    share = ns.seconds / len(TARGET_NAMES)
    worst = 0
    for target in TARGET_NAMES:
        command = [sys.executable, "-m", "tests.fuzz.run", "--target", target,
                   "--seconds", str(share), "--engine", ns.engine, "--work", str(ns.work)]
        if ns.runs is not None:
            command += ["--runs", str(ns.runs)]
        if ns.strict:
            command.append("--strict")
        print(f"== {target}: {' '.join(command[1:])}", flush=True)
        code = subprocess.call(command)
        print(f"== {target}: exit status {code}", flush=True)
        worst = max(worst, 1 if code else 0)
    return worst


def _run_atheris(ns: argparse.Namespace) -> int:
    import atheris

    with atheris.instrument_imports(include=["execproto"]):
        import execproto  # noqa: F401
    from .targets import TARGETS, KnownBugHit

    check = TARGETS[ns.target]
    strict = ns.strict

    def one_input(data: bytes) -> None:
        try:
            check(data)
        except KnownBugHit:
            if strict:
                raise

    work = ns.work / ns.target
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], f"-artifact_prefix={work}/", f"-max_len={MAX_LEN[ns.target]}",
            "-timeout=30", "-rss_limit_mb=2048", "-print_final_stats=1"]
    args.append(f"-runs={ns.runs}" if ns.runs is not None
                else f"-max_total_time={max(1, int(ns.seconds))}")
    args += [str(work / "corpus"), str(CORPUS / ns.target)]
    atheris.Setup(args, one_input)
    atheris.Fuzz()  # exits the process
    return 0


def _hypothesis_tests(target: str) -> list[Callable[[], None]]:
    from . import test_fuzz as t

    def reply(dot: bool, noreply: bool) -> Callable[[], None]:
        return lambda: t.test_reply(dot=dot, noreply=noreply)

    tests: dict[str, list[Callable[[], None]]] = {
        "header": [t.test_header, t.test_header_memory],
        "reply": [reply(d, n) for d in (False, True) for n in (False, True)],
        "dot": [t.test_dot],
        "unescape": [t.test_unescape],
        "config": [t.test_config],
        "target": [t.test_target],
    }
    return tests[target]


def _run_hypothesis(ns: argparse.Namespace) -> int:
    os.environ.setdefault("EXECPROTO_FUZZ_PROFILE", "fuzz-round")
    tests = _hypothesis_tests(ns.target)
    deadline = time.monotonic() + ns.seconds
    rounds = 0
    while time.monotonic() < deadline:
        for test in tests:
            try:
                test()
            except BaseException:
                traceback.print_exc()
                print(f"{ns.target}: FAILED in round {rounds + 1} (see the falsifying "
                      "example above)", flush=True)
                return 1
        rounds += 1
        print(f"{ns.target}: round {rounds} passed", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and fuzz."""
    ns = _parser().parse_args(argv)
    if ns.list:
        print("\n".join(TARGET_NAMES))
        return 0
    if ns.strict:
        os.environ["EXECPROTO_FUZZ_STRICT"] = "1"
    if ns.reproduce:
        if ns.target == "all":
            raise SystemExit("--reproduce needs one --target")
        return _reproduce(ns.target, ns.reproduce)
    ns.engine = _engine(ns.engine)
    if ns.target == "all":
        return _run_each(ns)
    if ns.engine == "atheris":
        return _run_atheris(ns)
    return _run_hypothesis(ns)


if __name__ == "__main__":
    sys.exit(main())
