"""Dovecot's tab-escaping, byte-exact (PROTOCOL.md section 3).

Escaping maps SOH, TAB, CR, LF (and NUL) to two-byte sequences starting with
SOH, so an escaped value never contains LF and fits in one header line.
Unescaping never fails: an unknown escape yields the byte after the SOH and a
trailing lone SOH is dropped, exactly like ``str_tabunescape()``.
"""

from __future__ import annotations

import re

__all__ = ["tab_escape", "tab_unescape"]

_ESCAPE_MAP = {0x00: b"\x010", 0x01: b"\x011", 0x09: b"\x01t", 0x0A: b"\x01n", 0x0D: b"\x01r"}
_NEEDS_ESCAPE = re.compile(b"[\x00\x01\t\n\r]")
_UNESCAPE_MAP = {ord("0"): b"\x00", ord("1"): b"\x01", ord("t"): b"\t", ord("n"): b"\n",
                 ord("r"): b"\r"}
# SOH followed by any byte, or a lone SOH at the very end.
_ESCAPE_SEQ = re.compile(b"\x01(.)|\x01$", re.DOTALL)


def _escape_one(match: re.Match[bytes]) -> bytes:
    return _ESCAPE_MAP[match.group()[0]]


def _unescape_one(match: re.Match[bytes]) -> bytes:
    following = match.group(1)
    if following is None:  # lone trailing SOH: dropped
        return b""
    return _UNESCAPE_MAP.get(following[0], following)


def tab_escape(value: bytes) -> bytes:
    """Tab-escape *value* the way Dovecot's ``str_append_tabescaped`` does.

    NUL is escaped as ``\\x01 0`` (Dovecot's length-based variant); Dovecot's
    program client cannot send NUL at all, and :func:`encode_request` refuses it.

    Args:
        value: raw bytes.

    Returns:
        The escaped bytes; they contain no TAB, CR, LF or NUL.
    """
    if _NEEDS_ESCAPE.search(value) is None:
        return bytes(value)
    return _NEEDS_ESCAPE.sub(_escape_one, value)


def tab_unescape(value: bytes) -> bytes:
    """Undo :func:`tab_escape`, with Dovecot's handling of malformed escapes.

    ``\\x01`` followed by ``0 1 t n r`` gives NUL, SOH, TAB, LF, CR; followed by
    any other byte it gives that byte (the SOH is dropped); a lone trailing
    SOH is dropped.  Never fails.

    Args:
        value: escaped bytes (one header line, without its LF).

    Returns:
        The unescaped bytes, which may contain NUL.
    """
    if b"\x01" not in value:
        return bytes(value)
    return _ESCAPE_SEQ.sub(_unescape_one, value)
