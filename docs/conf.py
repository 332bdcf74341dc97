"""Sphinx configuration: the API reference and the task pages.

Built by ``make docs`` with ``-W --keep-going -n``: every warning, and every
cross-reference that does not resolve (nitpicky), fails the build.  The build
reads nothing from the network; see ``intersphinx_mapping`` below.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import trio_inventory  # noqa: E402  (lives next to this file)

project = "execproto"
author = "execproto contributors"
copyright = "execproto contributors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
templates_path: list[str] = []
html_theme = "alabaster"
html_static_path: list[str] = []

# The code uses Google-style "Args:/Returns:/Raises:" sections.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Dataclasses list their fields under "Fields:", the TypedDicts of keyword
# arguments theirs under "Keys:": rendered like "Args:".
napoleon_custom_sections = [("Fields", "params_style"), ("Keys", "params_style")]
# The signature already shows each field's type.
napoleon_attr_annotations = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autosummary_generate = False

myst_heading_anchors = 3

# Intersphinx without a network: CI has none but the package registries.
#
# * Python: Debian's python3-doc package (.ci/run installs it) ships the HTML
#   documentation with its objects.inv; links still point at docs.python.org.
# * trio: no Debian package ships trio's documentation, and building trio's
#   own docs from its sdist would cost more than the whole docs build.  So
#   trio_inventory.py writes a small inventory of exactly the trio objects
#   these pages link to (trio_inventory.OBJECTS: name, role and the page of
#   trio's reference documentation that holds it), after checking that each
#   one still exists in the installed trio: a name that trio dropped or
#   moved fails the build there, before Sphinx starts.
#
# A reference to a Python or trio object that is in neither inventory stays
# unresolved, which nitpicky mode turns into a warning and -W into an error.
PYTHON_INVENTORY = "/usr/share/doc/python3/html/objects.inv"
if not Path(PYTHON_INVENTORY).is_file():
    raise RuntimeError(f"{PYTHON_INVENTORY} is missing: apt-get install python3-doc")
TRIO_INVENTORY = trio_inventory.write(HERE / "_build" / "trio-objects.inv")
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", PYTHON_INVENTORY),
    "trio": (trio_inventory.BASE_URL, str(TRIO_INVENTORY)),
}
intersphinx_timeout = 1

nitpicky = True
# NEED_DATA's base: a private metaclass trick (the class is its own
# instance), nothing a user names.
nitpick_ignore = [("py:class", "execproto._util.Sentinel")]


# The public names are defined in private modules (execproto._clients,
# execproto.adapters._common...) and re-exported: type hints and docstrings
# name them by where they are defined, or unqualified.  Such a reference
# resolves to the public name it is documented under; a name documented
# nowhere stays unresolved and fails the build.
OWN_NAMESPACES = (
    "execproto",
    "execproto.adapters",
    "execproto.adapters._common",
    "execproto.adapters._procedures",
)


def _own_reference(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    if target.startswith("execproto.") or "." not in target.lstrip("."):
        name = target.rsplit(".", 1)[-1]
        domain = env.get_domain("py")
        for namespace in OWN_NAMESPACES:
            full = f"{namespace}.{name}"
            if full != target and full in domain.objects:
                return domain.resolve_xref(
                    env, node["refdoc"], app.builder, node["reftype"], full, node, contnode
                )
    return None


# typing_extensions back-ports names that Python 3.11's inventory does not
# know under that module: Unpack is typing.Unpack, Buffer (PEP 688) is what
# the glossary calls a bytes-like object.
BACKPORTS = {
    "typing_extensions.Unpack": ("py:data", "typing.Unpack"),
    "typing_extensions.Buffer": ("std:term", "bytes-like object"),
}


def _backport_reference(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    found = BACKPORTS.get(node.get("reftarget", ""))
    if node.get("refdomain") != "py" or found is None:
        return None
    kind, name = found
    item = env.intersphinx_named_inventory["python"][kind][name]
    reference = nodes.reference("", "", internal=False, refuri=item.uri, reftitle=name)
    reference.append(contnode)
    return reference


def _factory_defaults(
    app: Any, what: str, name: str, obj: object, options: Any, signature: str | None,
    return_annotation: str | None,
) -> tuple[str, str | None] | None:
    # A dataclass field's default_factory shows as "<factory>", which is no
    # Python expression: the signature parser would then split the whole
    # signature at every comma (list[tuple[str, ...]] included).
    if signature and "<factory>" in signature:
        return signature.replace("<factory>", "...", -1), return_annotation
    return None


class ReexportedData(SphinxDirective):
    """``.. reexported-data:: PACKAGE``: the constants and type aliases of ``__all__``.

    autodoc documents only data assigned in the module it reads, and the
    packages re-export theirs from private modules; this documents each one
    under the package, with the ``#:`` comment of the module that defines it.
    """

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        """The ``py:data`` entries, parsed in place."""
        package = importlib.import_module(self.arguments[0])
        comments: dict[str, list[str]] = {}
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            if not info.ispkg and not info.name.endswith(".__main__"):
                analyzer = ModuleAnalyzer.for_module(info.name)
                for (scope, attr), lines in analyzer.find_attr_docs().items():
                    if scope == "":
                        comments.setdefault(attr, lines)
        text: list[str] = []
        for name in package.__all__:
            obj = getattr(package, name)
            if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj):
                continue
            # Classes by their name alone, not the private module they are in.
            value = re.sub(r"\bexecproto(?:\.\w+)*\.(?=[A-Z])", "", repr(obj))
            text += [f".. py:data:: {name}", f"   :module: {package.__name__}",
                     f"   :value: {value}", ""]
            text += ["   " + line for line in comments.get(name, [])] + [""]
        node = nodes.section()
        self.state.nested_parse(StringList(text), self.content_offset, node)
        return node.children


def setup(app: Any) -> None:
    """Sphinx's hook for this project's own extensions."""
    app.connect("missing-reference", _own_reference)
    app.connect("missing-reference", _backport_reference)
    app.connect("autodoc-process-signature", _factory_defaults)
    app.add_directive("reexported-data", ReexportedData)
