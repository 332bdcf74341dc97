"""The CLI's file loader for dovecot.conf: Dovecot's include and ``<file`` rules.

No Dovecot needed; ``tests/interop/test_doveconf_differential.py`` checks
the same rules against real doveconf.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from execproto import ConfigError, find_service, parse_config
from execproto.adapters.cli import _brace_expand, _FileLoader, _read_config, _relative_to


@pytest.mark.parametrize(
    ("pattern", "expanded"),
    [
        ("plain.conf", ["plain.conf"]),
        ("{a,b}.conf", ["a.conf", "b.conf"]),
        ("x{a,{b,c}}y", ["xay", "xby", "xcy"]),
        ("{single}.conf", ["single.conf"]),  # as glibc's glob()
        ("a{,b}", ["a", "ab"]),
        ("open{a,b", ["open{a,b"]),
    ],
)
def test_brace_expand(pattern: str, expanded: list[str]) -> None:
    assert _brace_expand(pattern) == expanded


@pytest.mark.parametrize(
    ("path", "parent", "resolved"),
    [
        ("conf.d/*.conf", "/etc/dovecot/dovecot.conf", "/etc/dovecot/conf.d/*.conf"),
        ("/abs.conf", "/etc/dovecot/dovecot.conf", "/abs.conf"),
        ("x.conf", "dovecot.conf", "x.conf"),  # no directory: as given (the cwd)
        ("../y.conf", "a/b/c.conf", "a/b/../y.conf"),
    ],
)
def test_relative_to(path: str, parent: str, resolved: str) -> None:
    assert _relative_to(path, parent) == resolved


def test_includes(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "20-b.conf").write_text("b = 2\n")
    (tmp_path / "conf.d" / "10-a.conf").write_text("a = 1\n!include ../extra/*.ext\n")
    (tmp_path / "conf.d" / ".hidden.conf").write_text("not read\n")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "x.ext").write_text("x = 1\n")
    main = tmp_path / "dovecot.conf"
    main.write_text("!include conf.d/*.conf\n!include_try nosuch.d/*.conf\n")
    root = _read_config(str(main))
    assert [k for k, _, _ in root.settings] == ["a", "x", "b"]
    assert root.where("x") == (f"{tmp_path}/conf.d/../extra/x.ext", 1)


def test_missing_include_is_an_error(tmp_path: Path) -> None:
    loader = _FileLoader()
    with pytest.raises(ConfigError, match=r"^No matches$"):
        loader.include("nosuch.conf", str(tmp_path / "dovecot.conf"), False)
    assert loader.include("nosuch.conf", str(tmp_path / "dovecot.conf"), True) == []


def test_unreadable_include(tmp_path: Path) -> None:
    (tmp_path / "dir.conf").mkdir()  # matches, but cannot be read
    loader = _FileLoader()
    with pytest.raises(ConfigError, match=r"^Couldn't open include file .*dir.conf: "):
        loader.include("dir.conf", str(tmp_path / "dovecot.conf"), False)
    assert loader.include("dir.conf", str(tmp_path / "dovecot.conf"), True) == []


def test_file_values_relative_to_their_file(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "cmd").write_text("script /from-file.sh\n")
    (tmp_path / "conf.d" / "s.conf").write_text(
        "service s {\n  executable = <cmd\n}\n")
    main = tmp_path / "dovecot.conf"
    main.write_text("!include conf.d/s.conf\n")
    assert find_service(_read_config(str(main)), "s").command.script == "/from-file.sh"


def test_root_maps_absolute_paths(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "inc.conf").write_text("a = 1\n")
    loader = _FileLoader(root=str(tmp_path))
    root = parse_config("!include /etc/inc.conf\n", loader=loader, name="/etc/dovecot.conf")
    assert root.where("a") == ("/etc/inc.conf", 1)  # the name inside the root
