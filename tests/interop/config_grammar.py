"""Configurations generated from a grammar of dovecot.conf (a fixed seed)."""

from __future__ import annotations

from .doveconf import Case

__all__ = ["generated_cases"]


def generated_cases(version: str) -> list[Case]:
    """Generated cases for *version*."""
    return []
