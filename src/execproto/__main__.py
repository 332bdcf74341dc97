"""``python -m execproto``: the command line (it lives in the adapters)."""

from execproto.adapters.cli import main

raise SystemExit(main())
