"""The CI-sized fuzz run: hypothesis over every target, the seed corpus, memory stress.

The long run is ``python -m tests.fuzz.run`` (see its docstring) or
``EXECPROTO_FUZZ_PROFILE=fuzz pytest tests/fuzz``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from execproto import ClientConnection, Data, DotDecoder, EndOfInput, Output, Request

from .corpus import corpus_files
from .strategies import (
    config_inputs,
    cut_lists,
    dot_streams,
    header_inputs,
    header_limits,
    profile_settings,
    reply_inputs,
    target_texts,
)
from .targets import (
    TARGETS,
    KnownBugHit,
    MemoryProbe,
    check_config,
    check_dot,
    check_header,
    check_reply,
    check_target,
    check_unescape,
)

_ROOT = Path(__file__).parents[2]


def _tolerating_known_bugs(check: object, *args: object, **kwargs: object) -> None:
    assert callable(check)
    with contextlib.suppress(KnownBugHit):  # each is pinned by a strict xfail in tests/regressions
        check(*args, **kwargs)


# --- hypothesis ------------------------------------------------------------------


@profile_settings(3)
@given(data=st.data(), payload=header_inputs(), limit=header_limits())
def test_header(data: st.DataObject, payload: bytes, limit: int) -> None:
    check_header(payload, limit, data.draw(cut_lists(payload), label="cuts"))


@profile_settings(0.3)
@given(data=st.data(), payload=header_inputs(), limit=header_limits())
def test_header_memory(data: st.DataObject, payload: bytes, limit: int) -> None:
    cuts = data.draw(cut_lists(payload), label="cuts")
    check_header(payload, limit, cuts[:1], memory=True)


@pytest.mark.parametrize("dot", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("noreply", [False, True], ids=["reply", "noreply"])
@profile_settings(0.75)
@given(data=st.data(), reset=st.booleans())
def test_reply(data: st.DataObject, dot: bool, noreply: bool, reset: bool) -> None:
    reply = data.draw(reply_inputs(dot), label="reply")
    check_reply(reply, dot=dot, noreply=noreply, reset=reset,
                cut_lists=data.draw(cut_lists(reply), label="cuts"))


@profile_settings(3)
@given(data=st.data(), stream=dot_streams())
def test_dot(data: st.DataObject, stream: bytes) -> None:
    check_dot(stream, data.draw(cut_lists(stream), label="cuts"))


@profile_settings(5)
@given(value=st.binary(max_size=300) | st.lists(
    st.sampled_from([b"\x01", b"0", b"1", b"t", b"n", b"r", b"a", b"\t", b"\n"])).map(b"".join))
def test_unescape(value: bytes) -> None:
    check_unescape(value)


@profile_settings(1)
@given(config=config_inputs(), base_dir=st.sampled_from(["/run/dovecot", "run", ""]))
def test_config(config: tuple[str, list[str]], base_dir: str) -> None:
    text, includes = config
    _tolerating_known_bugs(check_config, text, includes, base_dir)


@profile_settings(5)
@given(text=target_texts(), base_dir=st.sampled_from([None, "/run/dovecot", "rel"]))
def test_target(text: str, base_dir: str | None) -> None:
    check_target(text, base_dir)


# --- the seed corpus ------------------------------------------------------------


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_corpus(target: str) -> None:
    files = [path for name, path in corpus_files() if name == target]
    assert files, f"no seed corpus for {target}: run python -m tests.fuzz.corpus"
    for path in files:
        try:
            TARGETS[target](path.read_bytes())
        except KnownBugHit:
            pass
        except AssertionError as exc:
            raise AssertionError(f"{path}: {exc}") from exc


# --- memory over long streams ------------------------------------------------------

#: Peak traced memory of one feed, per byte of the chunk.  The dot decoder
#: keeps one memoryview (about 180 bytes) per dot-stuffed line of a chunk:
#: about 30 times the chunk when every 10th byte starts a stuffed line, the
#: worst case.  Between feeds almost nothing may stay: the stream is not kept.
CHUNK_FACTOR = 40
HELD_BETWEEN_FEEDS = 16 * 1024


def _check_stream_memory(feed: object, chunk: bytes, chunks: int = 8) -> None:
    """Feed *chunk* repeatedly (output dropped); check the peak and what stays."""
    assert callable(feed)
    probe = MemoryProbe()
    probe.start()
    try:
        for index in range(chunks):
            probe.reset_peak()
            feed(chunk)
            peak, held = probe.peak(), probe.retained()
            assert peak <= CHUNK_FACTOR * len(chunk) + 64 * 1024, (index, peak)
            assert held <= HELD_BETWEEN_FEEDS, (index, held)
    finally:
        probe.stop()


@pytest.mark.parametrize("dot", [False, True], ids=["unix", "tcp"])
def test_reply_memory_is_per_chunk(dot: bool) -> None:
    """A long reply: the client holds a chunk's worth while decoding, not the stream."""
    conn = ClientConnection(dot=dot)
    conn.send(Request(args=["x"]))
    conn.send(Data(data=b"x"))
    conn.send(EndOfInput())

    def feed(data: bytes) -> None:
        conn.receive_data(data)
        while isinstance(conn.next_event(), Output):
            pass

    _check_stream_memory(feed, (b"line\r\n.dotted\r\n" * 1024)[: 16 * 1024])


@pytest.mark.parametrize("pattern", [b"..x\r\n\r\n.\r", b"x" * 64, b"\r", b"\n.\r"])
def test_dot_decoder_memory_is_per_chunk(pattern: bytes) -> None:
    decoder = DotDecoder()
    _check_stream_memory(decoder.decode, (pattern * (16 * 1024))[: 16 * 1024])


# --- the atheris harnesses still run ----------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_atheris_harnesses_smoke(tmp_path: Path) -> None:
    """Each atheris harness starts, runs its seeds and a few hundred mutations."""
    env = dict(os.environ, PYTHONPATH=str(_ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", "--target", "all", "--runs", "300",
         "--work", str(tmp_path)],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
