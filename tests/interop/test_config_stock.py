"""``serve --config`` and ``run --config`` on the stock trees of Dovecot 2.3.19, 2.4.1, 2.4.5.

Each version's stock ``/etc/dovecot`` is copied with its quota-warning
example enabled (2.3: the ``plugin { quota_warning* }`` lines and the
``service quota-warning`` block; 2.4: the ``quota "User quota" { warning
warn-95 { execute quota-warning { ... } } ... }`` block and the service),
then ``execproto serve --config ... --service quota-warning`` serves the
probe script on the listener the tree defines and ``execproto run --config
... --execute quota-warning`` runs it with the arguments the tree gives:
the same commands on every version.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from execproto.adapters.doctor import lookup_user

from .doveconf import VERSIONS, Doveconf, doveconf_for, enable_block, example_blocks
from .tools import ServeProcess, cli, read_records, unavailable, wait_records, write_probe

EX_USAGE = 64


@pytest.fixture(scope="module", params=VERSIONS)
def doveconf(request: pytest.FixtureRequest) -> Doveconf:
    """The Dovecot version whose stock tree is used (skip or, under CI, fail if absent)."""
    found = doveconf_for(request.param)
    if isinstance(found, str):
        unavailable(f"Dovecot {request.param}: {found}")
    return found


def _enable(path: Path, needle: str) -> None:
    """Enable the commented example block of *path* whose text contains *needle*."""
    text = path.read_text()
    lines = text.split("\n")
    for block in example_blocks(text):
        if any(needle in line for line in lines[block[0] : block[1] + 1]):
            path.write_text(enable_block(text, block))
            return
    raise AssertionError(f"no example block with {needle!r} in {path}")


@pytest.fixture
def tree(doveconf: Doveconf, tmp_path: Path) -> Path:
    """A copy of the stock tree with the quota-warning example enabled."""
    copy = tmp_path / "dovecot"
    shutil.copytree(doveconf.real(doveconf.stock()), copy, symlinks=True)
    quota = copy / "conf.d" / "90-quota.conf"
    _enable(quota, "service quota-warning")
    if doveconf.is_24:
        _enable(quota, "warn-95")
    else:
        quota.write_text(re.sub(r"(?m)^(\s*)#(quota_warning2? = )", r"\1\2", quota.read_text()))
    return copy


@pytest.fixture
def served(tree: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """``serve --config`` of the tree's quota-warning service (the probe as script)."""
    probe = write_probe(tmp_path / "probe")
    records = tmp_path / "records"
    records.mkdir()
    base = tmp_path / "run"
    base.mkdir()
    serve = ServeProcess(["--config", str(tree / "dovecot.conf"), "--service", "quota-warning",
                          "--base-dir", str(base), str(probe), str(records), "raw"],
                         tmp_path / "serve.log")
    with serve:
        assert serve.addresses == [str(base / "quota-warning")], serve.log()
        yield base, records
    assert serve.stop() == 0


def test_run_chooses_a_warning_level(doveconf: Doveconf, tree: Path,
                                     served: tuple[Path, Path]) -> None:
    base, records = served
    # 2.4 names the level by its filter, 2.3 by its setting.
    level = "warn-95" if doveconf.is_24 else "quota_warning"
    done = cli("run", "--config", str(tree / "dovecot.conf"), "--execute", "quota-warning",
               "--filter", level, "--var", "user=frank@example.org", "--base-dir", str(base),
               "--no-input")
    assert done.returncode == 0, done.stderr
    (record,) = read_records(records)
    assert record["argv"][3:] == ["95", "frank@example.org"]


def test_run_lists_ambiguous_blocks(doveconf: Doveconf, tree: Path) -> None:
    done = cli("run", "--config", str(tree / "dovecot.conf"), "--execute", "quota-warning",
               "--var", "user=frank", "--no-input")
    assert done.returncode == EX_USAGE
    message = done.stderr.decode()
    assert "2 execute quota-warning { .. } blocks, choose one with --filter" in message
    quota = str(tree / "conf.d" / "90-quota.conf")
    if doveconf.is_24:
        assert (f'quota "User quota" / quota_warning warn-95 / execute quota-warning '
                f"({quota} line ") in message
        assert "quota_warning warn-80 / execute quota-warning" in message
    else:
        assert f"plugin / quota_warning ({quota} line " in message
        assert f"plugin / quota_warning2 ({quota} line " in message


def test_trigger_a_stock_quota_warning(doveconf: Doveconf, tree: Path,
                                       served: tuple[Path, Path]) -> None:
    """``trigger quota-warning`` on the stock tree: --level by percentage, else a list."""
    base, records = served
    config = str(tree / "dovecot.conf")
    done = cli("trigger", "quota-warning", "--config", config, "--user", "frank@example.org",
               "--base-dir", str(base))
    assert done.returncode == EX_USAGE
    message = done.stderr.decode()
    assert "several quota warnings, choose one with --level NAME" in message
    names = ("warn-95", "warn-80") if doveconf.is_24 else ("quota_warning", "quota_warning2")
    assert all(f"{name} (over storage " in message for name in names), message
    done = cli("trigger", "quota-warning", "--config", config, "--user", "frank@example.org",
               "--base-dir", str(base), "--level", "95")
    assert done.returncode == 0, done.stderr
    (record,) = wait_records(records)
    assert record["argv"][3:] == ["95", "frank@example.org"]
    assert record["stdin"] == ""


def test_error_names_the_included_file(doveconf: Doveconf, tree: Path) -> None:
    mailboxes = tree / "conf.d" / "15-mailboxes.conf"
    lines = mailboxes.read_text().split("\n")
    number = next(i for i, line in enumerate(lines) if '"Sent Messages"' in line) + 1
    lines[number - 1] = lines[number - 1].replace("{", "{ garbage")
    mailboxes.write_text("\n".join(lines))
    done = cli("serve", "--config", str(tree / "dovecot.conf"), "--service", "quota-warning")
    assert done.returncode == EX_USAGE
    assert done.stderr.decode() == (
        f"execproto serve: {mailboxes} line {number}: Garbage after '{{'\n")


def test_sieve_pipe_program(doveconf: Doveconf, tmp_path: Path) -> None:
    """The extprograms example: serve do-something, run it as a Sieve pipe would."""
    copy = tmp_path / "dovecot"
    shutil.copytree(doveconf.real(doveconf.stock()), copy, symlinks=True)
    extprograms = copy / "conf.d" / "90-sieve-extprograms.conf"
    _enable(extprograms, "service do-something")
    extprograms.write_text(re.sub(r"(?m)^(\s*)#(sieve_pipe_socket_dir = )", r"\1\2",
                                  extprograms.read_text()))
    probe = write_probe(tmp_path / "probe")
    records = tmp_path / "records"
    records.mkdir()
    base = tmp_path / "run"
    (base / "sieve-pipe").mkdir(parents=True)
    config = str(copy / "dovecot.conf")
    serve = ServeProcess(["--config", config, "--service", "do-something", "--base-dir",
                          str(base), str(probe), str(records), "raw"], tmp_path / "serve.log")
    with serve:
        assert serve.addresses == [str(base / "sieve-pipe" / "do-something")], serve.log()
        done = cli("run", "--config", config, "--sieve", "pipe", "do-something",
                   "--base-dir", str(base), "--env", "USER=frank", "action", "arg",
                   input=b"message\n")
        assert done.returncode == 0, done.stderr
    assert serve.stop() == 0
    (record,) = read_records(records)
    assert record["argv"][3:] == ["action", "arg"]
    assert record["stdin"] == "message\n"
    # The filter extension is not configured in the example.
    done = cli("run", "--config", config, "--sieve", "filter", "do-something", "--no-input")
    assert done.returncode == EX_USAGE
    assert b"vnd.dovecot.filter extension is unconfigured" in done.stderr


def _line_of(path: Path, pattern: str, after: int = 0) -> int:
    """The 1-based number of the first line from *after* on matching *pattern*."""
    lines = path.read_text().split("\n")
    return next(i for i in range(after, len(lines)) if re.search(pattern, lines[i])) + 1


def test_doctor_on_the_stock_tree(doveconf: Doveconf, tree: Path, tmp_path: Path) -> None:
    """Only what is really wrong here: no service runs, the example's script and user are
    not installed; the quota warnings send no environment (notes)."""
    base = tmp_path / "run"
    base.mkdir()
    done = cli("doctor", "--config", str(tree / "dovecot.conf"), "--base-dir", str(base),
               "--json")
    report = json.loads(done.stdout)
    quota = tree / "conf.d" / "90-quota.conf"
    service = _line_of(quota, r"^service quota-warning")
    if doveconf.is_24:
        clients = [_line_of(quota, r"^\s*execute quota-warning", _line_of(quota, "warn-95")),
                   _line_of(quota, r"^\s*execute quota-warning", _line_of(quota, "warn-80"))]
    else:
        clients = [_line_of(quota, r"^\s*quota_warning ="), _line_of(quota, r"^\s*quota_warning2")]
    expected: set[tuple[str, int | None, str, str]] = {
        (str(quota), line, "error", "socket-missing") for line in clients}
    expected |= {(str(quota), line, "note", "environment") for line in clients}
    expected.add((str(tree / "dovecot.conf"), None, "note", "mail-user"))
    script = "/usr/local/bin/quota-warning.sh"
    if not Path(script).exists():
        expected.add((str(quota), service + 1, "error", "script-missing"))
    if lookup_user("vmail") is None:
        expected.add((str(quota), service + 4, "error", "listener-owner"))
    found = {(f["file"], f["line"], f["level"], f["code"]) for f in report["findings"]}
    assert found == expected, json.dumps(report, indent=1)
    assert done.returncode == 1
    assert (report["services"], report["clients"]) == (1, 2)
    # The socket of a quota warning: named by the service, one line per client.
    message = next(f["message"] for f in report["findings"] if f["code"] == "socket-missing")
    assert f"no socket at {base}/quota-warning" in message


def test_doctor_on_the_stock_sieve_example(doveconf: Doveconf, tmp_path: Path) -> None:
    """The extprograms example: do-something behind sieve_pipe_socket_dir.

    Really wrong here: nothing was installed or made (the script, the
    socket directory, the vmail user of its listener), and the service has
    no -e list, so its script would get none of what Pigeonhole sends. 2.3
    also fails to start, the listener's directory missing; 2.4 makes it.
    """
    copy = tmp_path / "dovecot"
    shutil.copytree(doveconf.real(doveconf.stock()), copy, symlinks=True)
    extprograms = copy / "conf.d" / "90-sieve-extprograms.conf"
    _enable(extprograms, "service do-something")
    extprograms.write_text(re.sub(r"(?m)^(\s*)#(sieve_pipe_socket_dir = )", r"\1\2",
                                  extprograms.read_text()))
    base = tmp_path / "run"
    base.mkdir()
    done = cli("doctor", "--config", str(copy / "dovecot.conf"), "--base-dir", str(base),
               "--json")
    report = json.loads(done.stdout)
    name = str(extprograms)
    socket_dir = _line_of(extprograms, r"^\s*sieve_pipe_socket_dir =")
    service = _line_of(extprograms, r"^service do-something")
    listener = _line_of(extprograms, r"^\s*unix_listener sieve-pipe/do-something")
    expected: set[tuple[str, int | None, str, str]] = {
        (name, socket_dir, "error", "sieve-directory"),
        (name, socket_dir, "warning", "environment-dropped"),
        (str(copy / "dovecot.conf"), None, "note", "mail-user"),
    }
    if not Path("/usr/lib/dovecot/sieve-pipe/do-something.sh").exists():
        expected.add((name, _line_of(extprograms, r"^\s*executable =", service), "error",
                      "script-missing"))
    if lookup_user("dovenull") is None:
        expected.add((name, _line_of(extprograms, r"^\s*user = dovenull"), "error",
                      "service-user"))
    if lookup_user("vmail") is None:
        expected.add((name, _line_of(extprograms, r"^\s*user = vmail"), "error",
                      "listener-owner"))
    if not doveconf.is_24:
        expected.add((name, listener, "error", "socket-directory"))
    found = {(f["file"], f["line"], f["level"], f["code"]) for f in report["findings"]}
    assert found == expected, json.dumps(report, indent=1)
    assert done.returncode == 1
