"""Sphinx configuration for the flask_datastar documentation.

The build must work offline and without warnings (``sphinx-build -W -n``): CI
reaches PyPI only, so intersphinx has no remote inventory, and the references
to other projects' types that it would have resolved are listed in
``nitpick_ignore_regex`` below.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import sys
import typing
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst.directives.images import Image
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.nodes import make_refnode
from sphinx.util.typing import stringify_annotation

PACKAGE = "flask_datastar"
DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# Import the package and the examples from this work tree, installed or not.
sys.path.insert(0, str(ROOT))

project = "flask_datastar"
author = "flask_datastar contributors"
copyright = "flask_datastar contributors"
try:
    release = package_version("flask_datastar")
except PackageNotFoundError:  # run from a checkout that is not installed
    release = "dev"
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    # Only for docs/deployment-redis.md, which deployment.rst includes.
    "myst_parser",
]

root_doc = "index"
exclude_patterns = ["_build", "deployment-redis.md"]
# Nitpicky by default, so that a plain `sphinx-build` shows what CI would fail on.
nitpicky = True
default_role = "code"

# -- autodoc ------------------------------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True}


def _import_type_checking_names() -> None:
    """Run each module's ``if TYPE_CHECKING:`` imports, as a type checker would see them.

    The annotations are strings (``from __future__ import annotations``);
    autodoc evaluates them, and one name imported only for type checking
    (``Bus`` in ``extension.py``, to avoid an import cycle) would leave every
    annotation of that function unevaluated and unlinked. Only the docs build
    does this; an import that fails (redis-py not installed) is skipped.
    """
    importlib.import_module(PACKAGE)
    for name, module in sorted(sys.modules.items()):
        if not name.startswith(PACKAGE + ".") or not hasattr(module, "__file__"):
            continue
        for node in ast.parse(inspect.getsource(module)).body:
            if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
                code = compile(ast.Module(body=node.body, type_ignores=[]), module.__file__, "exec")
                try:
                    exec(code, vars(module))
                except ImportError:
                    pass


_import_type_checking_names()

# -- intersphinx: no inventory is ever downloaded ------------------------------------------

# CI reaches PyPI only: a remote inventory would fail the build (or, worse, be
# fetched from somewhere at every build). Keep this empty, or point it at
# inventory files committed beside this file: ("https://...", "python.inv").
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
intersphinx_disabled_reftypes = ["*"]

# References to the types of Python and of other projects: correct, but with no
# inventory to resolve them against. Only these, so that a reference to a
# misspelt or undocumented name of flask_datastar still fails the build.
nitpick_ignore_regex = [
    (r"py:.*", r"(flask|werkzeug|markupsafe|redis)\..+"),
    (r"py:.*", r"(collections\.abc|socket|json)\..+"),
]

# -- HTML ---------------------------------------------------------------------------------

html_theme = "alabaster"
html_title = f"flask_datastar {release}"
html_theme_options = {
    "description": "Datastar for Flask: Server-Sent Event streams from plain views.",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "240px",
}
html_sidebars = {"**": ["about.html", "navigation.html", "searchbox.html"]}
html_show_sourcelink = False


# -- an image that is shown only when it exists -------------------------------------------


class OptionalImage(Image):
    """``.. optional-image:: path``: an image, or nothing when the file is absent.

    The two-tab screenshot is taken by the browser tests (``tests/browser/``);
    a checkout where they have not run yet builds without it, and without a
    warning.
    """

    def run(self) -> list[nodes.Node]:
        env = self.state.document.settings.env
        _, path = env.relfn2path(self.arguments[0], env.docname)
        if not os.path.isfile(path):
            return []
        return super().run()


def skip_reexported(
    app: Sphinx, what: str, name: str, obj: object, skip: bool, options: Any
) -> bool | None:
    """Leave out of a module's page the names that ``flask_datastar`` re-exports.

    They are documented once, under the name users import (``flask_datastar.Stream``);
    autodoc records the defining module's name (``flask_datastar.stream.Stream``) as
    its canonical alias, so references to either resolve.
    """
    import flask_datastar

    if what == "module" and any(
        getattr(flask_datastar, public) is obj for public in flask_datastar.__all__
    ):
        return True
    return None


def reexported_data_doc(
    app: Sphinx, what: str, name: str, obj: object, options: Any, lines: list[str]
) -> None:
    """Give a re-exported constant (``flask_datastar.SSE_HEADERS``) its ``#:`` comment.

    autodoc reads such comments in the module where the name is documented,
    ``flask_datastar/__init__.py``, which only imports it; without this it
    would show the docstring of the value's type (``dict``).
    """
    if what != "data" or name.count(".") != 1 or not name.startswith(PACKAGE + "."):
        return
    attr = name.rpartition(".")[2]
    package = importlib.import_module(PACKAGE)
    for module_name in sorted(sys.modules):
        module = sys.modules[module_name]
        if not module_name.startswith(PACKAGE + ".") or getattr(module, attr, None) is not obj:
            continue
        docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
        if ("", attr) in docs and getattr(package, attr) is obj:
            lines[:] = list(docs[("", attr)])
            return


def record_init_typehints(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, signature: Any, retann: Any
) -> None:
    """Type a class's parameters from its ``__init__``, not from the class's annotations.

    autodoc shows a class's signature from ``__init__`` but evaluates the string
    annotations (``from __future__ import annotations``) with
    :func:`typing.get_type_hints` on the class, which reads the annotations of the
    class and its bases: ``DatastarResponse(headers=...)`` would be typed as
    werkzeug's ``Response.headers`` attribute, and the other parameters would
    stay unevaluated strings. This records the types of ``__init__`` instead.
    """
    init = vars(obj).get("__init__") if inspect.isclass(obj) else None
    if what not in ("class", "exception") or not inspect.isfunction(init):
        return
    if not name.startswith(PACKAGE + "."):
        return
    try:
        hints = typing.get_type_hints(init)
    except NameError:
        return  # left as strings: the build then names what it cannot resolve
    document = getattr(app.env, "current_document", None)  # Sphinx >= 8.2
    store = getattr(document, "autodoc_annotations", None)
    if store is None:
        store = app.env.temp_data.setdefault("annotations", {})
    mode = "smart" if app.config.autodoc_typehints_format == "short" else "fully-qualified"
    recorded = store.setdefault(name, {})
    for param, hint in hints.items():
        if param != "return":
            recorded[param] = stringify_annotation(hint, mode)


# -- references to the defining module's name of a re-exported object ---------------------


def _lookup(dotted: str) -> object:
    """Import the object called *dotted* (``package.module.Class.attr``), or raise."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise LookupError(dotted)


def _is_type_variable(name: str) -> bool:
    """Whether *name* (``P``, ``~P``, ``flask_datastar.response.F``) is one of our
    type variables, a placeholder in a signature rather than an object to document."""
    short = name.lstrip("~.").rpartition(".")[2]
    return any(
        isinstance(getattr(module, short, None), (typing.TypeVar, typing.ParamSpec))
        for module_name, module in list(sys.modules.items())
        if module_name.startswith(PACKAGE + ".")
    )


def resolve_alias(app: Sphinx, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve a reference to one of our objects under another of its names.

    ``:meth:`SSERegistry.broadcast``` written in ``flask_datastar/registry.py``
    means ``flask_datastar.registry.SSERegistry.broadcast``, which is documented
    as ``flask_datastar.SSERegistry.broadcast``; and ``SSE`` is
    ``ServerSentEventGenerator``. autodoc's canonical aliases cover classes but
    not their members: this covers the members too. It looks the names up as
    Python objects, so only real aliases resolve, and only within flask_datastar.
    A type variable of ours (the decorators' ``F``, ``P``) is shown unlinked.
    """
    if node.get("refdomain") != "py":
        return None
    if _is_type_variable(node["reftarget"]):
        return contnode  # shown as it is written, linking nowhere
    target = node["reftarget"].lstrip("~.")
    module, cls = node.get("py:module"), node.get("py:class")
    candidates = [target]
    if module:
        candidates.append(f"{module}.{target}")
        if cls:
            candidates.append(f"{module}.{cls}.{target}")
    domain = env.domains["py"]
    documented = domain.objects
    by_object: dict[int, str] = {}
    for name, entry in documented.items():
        kinds = ("class", "exception", "function")
        if name.startswith(PACKAGE + ".") and not entry.aliased and entry.objtype in kinds:
            try:
                by_object.setdefault(id(_lookup(name)), name)
            except (LookupError, AttributeError):
                pass
    for candidate in candidates:
        if not candidate.startswith(PACKAGE + "."):
            continue
        parts = candidate.split(".")
        # The longest prefix that is a documented class or function under another name.
        for split in range(len(parts), 1, -1):
            try:
                head = _lookup(".".join(parts[:split]))
            except (LookupError, AttributeError):
                continue
            name = by_object.get(id(head))
            if name is None:
                continue
            resolved = ".".join([name, *parts[split:]])
            if resolved in documented and resolved != node["reftarget"]:
                entry = documented[resolved]
                return make_refnode(
                    app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, resolved
                )
            break
    return None


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("optional-image", OptionalImage)
    app.connect("autodoc-skip-member", skip_reexported)
    app.connect("missing-reference", resolve_alias)
    app.connect("autodoc-process-docstring", reexported_data_doc)
    app.connect("autodoc-process-signature", record_init_typehints)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
