"""Interop tests against a private, real Dovecot."""
