"""The README's Python examples run as written (those needing a live Dovecot only compile)."""

from __future__ import annotations

import re
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from execproto import Status
from execproto.adapters import ServiceConfig, UnixListener
from execproto.adapters.blocking import Service

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_block_compiles(index: int) -> None:
    compile(BLOCKS[index], f"README block {index}", "exec")


# The pytest section's test file needs its scripts and the fixture:
# tests/plugin/test_pytest_plugin.py runs it under pytester instead.
@pytest.mark.parametrize(
    "index",
    [i for i, block in enumerate(BLOCKS)
     if "/run/dovecot" not in block and "dovecot_script" not in block],
)
def test_block_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    source = BLOCKS[index]
    for name in ("x.sock", "y.sock"):
        source = source.replace(f"/tmp/{name}", str(tmp_path / name))
    exec(compile(source, f"README block {index}", "exec"), {"__name__": "readme"})


def test_sans_io_example_against_a_service(tmp_path: Path) -> None:
    namespace: dict[str, Any] = {}
    (block,) = [b for b in BLOCKS if "def run_over" in b]
    exec(compile(block, "README: the sans-IO example", "exec"), namespace)
    path = str(tmp_path / "s.sock")
    with Service([UnixListener(path)], ServiceConfig(script="/bin/cat")) as service:
        thread = threading.Thread(target=service.serve_forever)
        thread.start()
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(path)
                output, result = namespace["run_over"](sock, [], b"payload")
        finally:
            service.stop()
            thread.join(20)
    assert (output, result.status) == (b"payload", Status.SUCCESS)
