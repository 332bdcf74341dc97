"""``python -m execproto``: the command line, which lives in the adapters.

Imported by name because ``execproto.adapters`` exists only once installed
(``src/adapters`` is mapped there), and the core never imports it statically.
"""

import importlib

raise SystemExit(importlib.import_module("execproto.adapters.cli").main())
