"""``execproto trigger``: errors, --dry-run, and the bytes it sends (no Dovecot needed).

``tests/interop/test_trigger_bytes.py`` compares the same bytes with what
Dovecot's own clients send.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from execproto.adapters.cli import main

LIMIT = 10.0


class Recorder:
    """A unix listener that keeps the raw bytes of one connection, then replies."""

    def __init__(self, path: Path, reply: bytes = b"+\n") -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(LIMIT)
        self.reply = reply
        self.data = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(LIMIT)
            while chunk := connection.recv(65536):
                self.data += chunk
            with contextlib.suppress(OSError):  # a noreply client has gone
                connection.sendall(self.reply)

    def received(self) -> bytes:
        self.thread.join(LIMIT)
        assert not self.thread.is_alive()
        self.listener.close()
        return self.data


@pytest.fixture
def conf(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "dovecot.conf"
    path.write_text(f"""\
dovecot_config_version = 2.4.0
base_dir = {tmp_path}
quota "User quota" {{
  warning warn-95 {{
    quota_storage_percentage = 95
    execute quota-warning {{
      args = 95 %{{user}}
    }}
  }}
  warning warn-back {{
    threshold = under
    execute quota-warning {{
      args = below %{{user | username}}
    }}
  }}
}}
sieve_pipe_socket_dir = sieve
""")
    (tmp_path / "sieve").mkdir()
    yield path


def trigger(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["trigger", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_unknown_kind(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = trigger(capsys, "quota", "--config", str(conf), "--user", "u")
    assert code == 64
    assert err == ("execproto trigger: unknown KIND 'quota' (one of: quota-warning, "
                   "quota-over-status, welcome, sieve-pipe, sieve-filter, sieve-execute)\n")


def test_ambiguous_level_lists_the_choices(conf: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = trigger(capsys, "quota-warning", "--config", str(conf), "--user", "u")
    assert code == 64
    assert err.startswith(f"execproto trigger: {conf}: several quota warnings, choose one "
                          "with --level NAME (a name, a percentage or 'below'): ")
    assert f'warn-95 (over storage 95%) at quota "User quota" / quota_warning warn-95 ({conf} ' \
           "line 4)" in err
    assert "warn-back (under no limit)" in err


def test_no_matching_block(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = trigger(capsys, "quota-warning", "--config", str(conf), "--user", "u",
                           "--level", "42")
    assert code == 64
    assert "no quota warning matches --level 42: warn-95" in err
    code, _, err = trigger(capsys, "welcome", "--config", str(conf), "--user", "u")
    assert code == 64
    assert "no welcome script found" in err
    code, _, err = trigger(capsys, "sieve-filter", "--config", str(conf), "--user", "u",
                           "--program", "p", "--message", str(conf))
    assert code == 64
    assert "vnd.dovecot.filter extension is unconfigured" in err


def test_sieve_needs_program_and_message(conf: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = trigger(capsys, "sieve-pipe", "--config", str(conf), "--user", "u")
    assert (code, err) == (64, "execproto trigger: sieve-pipe needs --program NAME [ARG...]\n")
    code, _, err = trigger(capsys, "sieve-pipe", "--config", str(conf), "--user", "u",
                           "--program", "p")
    assert code == 64
    assert "sieve-pipe needs --message FILE" in err


def test_dry_run(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = trigger(capsys, "quota-warning", "--config", str(conf), "--user", "f@x",
                           "--level", "below", "--dry-run")
    assert code == 0
    assert f"target:   unix:{conf.parent}/quota-warning\n" in out
    assert "header:   VERSION\\tscript\\t4\\t0\\nnoreply\\nbelow\\nf\\n\\n" in out
    assert "timeouts: connect 1.0 s, run None s" in out


def test_quota_warning_bytes(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recorder = Recorder(conf.parent / "quota-warning")
    code, out, err = trigger(capsys, "quota-warning", "--config", str(conf), "--user",
                             "frank@example.org", "--level", "95")
    assert recorder.received() == b"VERSION\tscript\t4\t0\nnoreply\n95\nfrank@example.org\n\n"
    assert (code, out) == (0, "")
    assert err.startswith(f"execproto trigger: quota-warning via unix:{conf.parent}/"
                          "quota-warning: sent; the quota plugin closes the connection")


@pytest.mark.parametrize(("reply", "code", "verdict"), [
    (b"piped\n+\n", 0, "piped message to program 'prog'"),
    (b"-\n", 1, "failed to execute to program 'prog': the pipe action fails"),
    (b"", 75, "failed to pipe message to program 'prog'"),
])
def test_sieve_pipe(conf: Path, capsys: pytest.CaptureFixture[str], reply: bytes, code: int,
                    verdict: str) -> None:
    message = conf.parent / "msg.eml"
    message.write_bytes(b"Subject: x\n\nbody\n")
    recorder = Recorder(conf.parent / "sieve" / "prog", reply)
    got, out, err = trigger(capsys, "sieve-pipe", "--config", str(conf), "--user", "frank",
                            "--program", "prog", "a", "b c", "--message", str(message),
                            "--sender", "s@x", "--recipient", "r@x", "--home", "/h",
                            "--host", "mx")
    assert recorder.received() == (
        b"VERSION\tscript\t4\t0\nenv_USER=frank\nenv_HOME=/h\nenv_HOST=mx\nenv_SENDER=s@x\n"
        b"env_RECIPIENT=r@x\n-\na\nb c\n\nSubject: x\r\n\r\nbody\r\n")
    assert got == code
    assert out == ("piped\n" if code == 0 else "")
    assert verdict in err


def test_connect_failure(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = trigger(capsys, "quota-warning", "--config", str(conf), "--user", "u",
                           "--level", "warn-95")
    assert code == 75
    assert "the quota plugin logs an error (io: " in err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["trigger", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "How can I force a quota notification?" in out
    assert "quota-warning, quota-over-status, welcome" in out
