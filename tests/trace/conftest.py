"""Fixtures of the trace tests: the interop harness's private Dovecots.

The Dovecot tests of ``execproto trace`` use the same fixtures as
``tests/interop`` (one module-wide Dovecot per installation: 2.3.19, 2.4.1,
2.4.5; skipped when missing, failed when ``CI`` is set), so they are
re-exported here.
"""

from tests.interop.conftest import (  # noqa: F401 (fixtures, found by name)
    installation,
    module_dir,
    no_stray_processes,
    start_dovecot,
    workspace,
)
