"""Build the seed corpus (``tests/fuzz/corpus/<target>/``) from the conformance vectors.

Run ``python -m tests.fuzz.corpus`` from the repository root to rebuild it
after the vectors change.  Each file is one raw fuzz input (the format the
target's ``fuzz_<name>`` function documents), named after its vector.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from .targets import (
    TARGETS,
    encode_config,
    encode_dot,
    encode_header,
    encode_reply,
    encode_target,
)

__all__ = ["CORPUS", "build", "corpus_files", "seeds"]

CORPUS = Path(__file__).parent / "corpus"
_MAX_FILE = 4096


def _bytes(text: str) -> bytes:
    return text.encode("latin-1")  # the vectors' bytes_encoding


def _vectors() -> list[dict[str, Any]]:
    text = resources.files("execproto").joinpath("vectors.json").read_text("utf-8")
    vectors: list[dict[str, Any]] = json.loads(text)["vectors"]
    return vectors


def _config_from_block(vector: dict[str, Any]) -> str:
    lines = [f"execute {vector['name']} {{"]
    lines += [f"  {key} = {value}" for key, value in vector["block"].items()]
    lines.append("}")
    return "\n".join(lines) + "\n"


def seeds() -> Iterator[tuple[str, str, bytes]]:
    """Yield ``(target, name, raw input)`` for every seed the vectors give."""
    for v in _vectors():
        kind, name = v["kind"], v["id"]
        if kind in ("service_header", "service_result"):
            data = b"".join(_bytes(part) for part in v["input"])
            limit = v["config"].get("max_header_bytes") or 65536
            yield "header", name, encode_header(data, limit, seed=len(data))
            yield "header", f"{name}-limit64", encode_header(data, 64, seed=7)
        elif kind == "reply_decode":
            data = b"".join(_bytes(part) for part in v["input"])
            mode = v["mode"]
            yield "reply", name, encode_reply(data, dot=mode["dot"], noreply=mode["noreply"],
                                              reset=v["eof"] == "reset", seed=len(data))
        elif kind == "dot_decode":
            yield "dot", name, encode_dot(b"".join(_bytes(p) for p in v["input"]), seed=3)
        elif kind == "dot_encode":
            yield "dot", name, encode_dot(_bytes(v["output"]), seed=5)
        elif kind in ("escape", "unescape"):
            yield "unescape", f"{name}-in", _bytes(v["input"])
            yield "unescape", f"{name}-out", _bytes(v["output"])
        elif kind == "config_text":
            includes = list((v.get("includes") or {}).values())
            yield "config", name, encode_config(v["text"], includes)
        elif kind == "settings":
            yield "config", name, encode_config(_config_from_block(v))
        elif kind == "target_uri":
            yield "target", name, encode_target(v["uri"], v.get("base_dir"))


def build(directory: Path = CORPUS) -> int:
    """Rewrite *directory* from the vectors; return the number of files written."""
    count = 0
    for target in TARGETS:
        shutil.rmtree(directory / target, ignore_errors=True)
        (directory / target).mkdir(parents=True)
    for target, name, raw in seeds():
        if len(raw) > _MAX_FILE:
            continue
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        (directory / target / safe).write_bytes(raw)
        count += 1
    return count


def corpus_files(directory: Path = CORPUS) -> list[tuple[str, Path]]:
    """Every ``(target, file)`` of a corpus directory, sorted."""
    return [(target, path) for target in TARGETS
            for path in sorted((directory / target).glob("*")) if path.is_file()]


if __name__ == "__main__":
    written = build()
    print(f"wrote {written} seed files under {CORPUS}", file=sys.stderr)
