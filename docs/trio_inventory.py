"""A small Sphinx inventory of the trio objects these docs link to.

No Debian package ships trio's documentation and the docs build has no
network, so ``conf.py`` cannot read trio's own ``objects.inv``.  This module
writes one with only the entries in :data:`OBJECTS`, each pointing at its
anchor in trio's reference documentation, after checking that the object
still exists in the installed trio (a removed or renamed object fails the
build).  Add an entry when the docs start to reference a new trio name: an
unlisted one is an unresolved reference, which ``make docs`` rejects.

Run ``python docs/trio_inventory.py`` to check the list without building.
"""

from __future__ import annotations

import importlib
import sys
import zlib
from pathlib import Path

BASE_URL = "https://trio.readthedocs.io/en/stable/"

# (full name, Sphinx role, page of trio's reference docs that documents it)
OBJECTS: tuple[tuple[str, str, str], ...] = (
    ("trio.CancelScope", "class", "reference-core"),
    ("trio.Cancelled", "exception", "reference-core"),
    ("trio.Event", "class", "reference-core"),
    ("trio.Nursery", "class", "reference-core"),
    ("trio.TaskStatus", "class", "reference-core"),
    ("trio.TASK_STATUS_IGNORED", "data", "reference-core"),
    ("trio.move_on_after", "function", "reference-core"),
    ("trio.open_nursery", "function", "reference-core"),
    ("trio.run", "function", "reference-core"),
    ("trio.sleep", "function", "reference-core"),
)


def _resolve(name: str) -> object:
    """The object ``name`` (``trio.lowlevel.checkpoint``) in the installed trio."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def check() -> list[str]:
    """The entries of :data:`OBJECTS` that the installed trio lacks."""
    missing = []
    for name, _role, _page in OBJECTS:
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    return missing


def write(path: Path) -> Path:
    """Check :data:`OBJECTS` against the installed trio and write the inventory to ``path``."""
    missing = check()
    if missing:
        raise RuntimeError(
            "docs/trio_inventory.py lists trio objects the installed trio does not have: "
            + ", ".join(missing)
        )
    import trio

    lines = "".join(
        f"{name} py:{role} 1 {page}.html#$ -\n" for name, role, page in OBJECTS
    )
    header = (
        "# Sphinx inventory version 2\n"
        "# Project: Trio\n"
        f"# Version: {trio.__version__}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.encode() + zlib.compress(lines.encode()))
    return path


if __name__ == "__main__":
    gone = check()
    print("missing from the installed trio: " + ", ".join(gone) if gone else "all present")
    sys.exit(1 if gone else 0)
