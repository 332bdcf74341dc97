"""The docs' promises: their commands parse, their trio links name real objects.

The task pages under docs/ and the README's shell blocks are instructions to
copy: a renamed option or subcommand must fail here, not in a reader's shell.
``make docs`` links trio's names through docs/trio_inventory.py, whose list
must name objects the installed trio still has.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from execproto.adapters.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for block in re.findall(r"```(?:sh|ini)\n(.*?)```", page.read_text(), re.DOTALL):
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                line = line.split(" # ")[0].strip()
                # At the start, after "echo ... |" or as systemd's ExecStart.
                command = re.search(r"(?:^|\|\s*|^ExecStart=\S*/)(execproto .*)", line)
                if command is None or " ... " in line:
                    continue
                line = re.split(r"\s[<>|]\s", command.group(1))[0]   # redirections
                found.append((page.relative_to(ROOT).as_posix(), line))
    return found


COMMANDS = _commands()


def test_pages_show_commands() -> None:
    pages = {page for page, _ in COMMANDS}
    assert "README.md" in pages
    assert {"docs/tasks/quota-warning.md", "docs/tasks/sieve-pipe.md",
            "docs/tasks/script-service.md", "docs/tasks/dovecot-2.4.md"} <= pages


@pytest.mark.parametrize(("page", "command"), COMMANDS)
def test_command_parses(page: str, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = shlex.split(command)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{page}: {command!r}: {capsys.readouterr().err.strip()}")


def test_trio_inventory_names_existing_objects() -> None:
    spec = importlib.util.spec_from_file_location("trio_inventory", ROOT / "docs/trio_inventory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OBJECTS
    assert module.check() == []
