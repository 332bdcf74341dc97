"""The core is pure: no I/O, clock, randomness or adapters (STYLE.md section 4)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typing_extensions

import execproto

CORE = Path(execproto.__file__).parent
CORE_FILES = sorted(p for p in CORE.glob("*.py") if p.name != "__main__.py")

#: Modules no core file may import, at any level.
FORBIDDEN_IMPORTS = frozenset(
    {
        "socket", "subprocess", "os", "asyncio", "trio", "time", "signal", "select",
        "selectors", "threading", "random", "logging", "ssl", "anyio", "adapters",
    }
)
#: Modules that must not be loaded by ``import execproto``.
FORBIDDEN_AT_RUNTIME = frozenset(
    {"socket", "subprocess", "asyncio", "trio", "selectors", "threading", "signal"}
)


def imported_modules(tree: ast.AST) -> set[str]:
    """Every module name an import statement (or __import__/import_module) names."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.module:  # absolute, or relative as in "from .adapters import x"
                names.add(node.module)
            else:  # "from . import adapters"
                names.update(alias.name for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Name, ast.Attribute))
            and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr)
            in ("__import__", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value.lstrip("."))
    return names


def forbidden(names: set[str]) -> set[str]:
    return {
        name
        for name in names
        if any(part in FORBIDDEN_IMPORTS for part in name.split("."))
    }


def test_core_files_found() -> None:
    found = {p.name for p in CORE_FILES}
    assert {"__init__.py", "_client.py", "_service.py", "_header.py", "_dot.py"} <= found


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_no_forbidden_imports(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = forbidden(imported_modules(tree))
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_checker_catches_every_form() -> None:
    source = (
        "import os\n"
        "import os.path as p\n"
        "from time import monotonic\n"
        "from . import adapters\n"
        "from .adapters import cli\n"
        "from execproto.adapters.blocking import run\n"
        "import importlib\n"
        "importlib.import_module('socket')\n"
        "__import__('threading')\n"
        "def f():\n"
        "    import random\n"
    )
    assert forbidden(imported_modules(ast.parse(source))) == {
        "os", "os.path", "time", "adapters", "execproto.adapters.blocking", "socket",
        "threading", "random",
    }
    assert forbidden({"re", "enum", "dataclasses", "collections.abc", "typing"}) == set()


def loaded_modules(code: str, *flags: str) -> set[str]:
    """The module names loaded after running *code* in a fresh interpreter."""
    env = dict(os.environ)
    # The core's one dependency must be importable without site-packages too.
    deps = os.path.dirname(typing_extensions.__file__)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(CORE.parent), deps, *filter(None, [env.get("PYTHONPATH")])]
    )
    result = subprocess.run(
        [sys.executable, *flags, "-c", f"{code}\nimport json, sys\n"
         "print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return set(json.loads(result.stdout))


@pytest.mark.parametrize("flags", [(), ("-S",)], ids=["site", "no-site"])
def test_import_loads_no_io_module(flags: tuple[str, ...]) -> None:
    bare = loaded_modules("", *flags)
    after = loaded_modules("import execproto", *flags)
    assert "execproto" in after
    assert not any(m.startswith("execproto.adapters") for m in after)
    added = after - bare
    assert not (added & FORBIDDEN_AT_RUNTIME), sorted(added & FORBIDDEN_AT_RUNTIME)
    if flags == ("-S",):
        # Without site.py nothing preloads them: the core loads none at all.
        assert not (after & FORBIDDEN_AT_RUNTIME), sorted(after & FORBIDDEN_AT_RUNTIME)


def test_every_public_name_imports_without_io() -> None:
    after = loaded_modules(
        "import execproto\nfor name in execproto.__all__: getattr(execproto, name)", "-S"
    )
    assert not (after & FORBIDDEN_AT_RUNTIME)
