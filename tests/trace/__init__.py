"""Tests of execproto trace: the observer, the tap, and Dovecot's clients through it."""
