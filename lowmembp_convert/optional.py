"""Optional dependencies (transformers, timm, ...): "not installed" is a normal case, a broken import is not.

``except ImportError`` around ``import transformers`` hides two different things: the package is
absent (fine: that family is not offered), or it is installed and its own import fails (a missing or
shadowed dependency: a folder named like one of its dependencies on ``sys.path``, a version clash).
The second must reach the user with its cause, never be read as "not installed".
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


class BrokenDependencyError(ImportError):
    """An installed optional dependency fails to import; the message names it, the cause and where
    the failing module was found."""


def optional_import(name: str) -> ModuleType | None:
    """``import name``; None only when the top-level package is not installed at all.

    Raises:
        BrokenDependencyError: the package is installed but importing it failed (the cause chained).
    """
    top = name.partition(".")[0]
    if importlib.util.find_spec(top) is None:
        return None
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise BrokenDependencyError(
            f"{name} is installed but fails to import: {exc}. {_where(exc)}"
            f"Check that no file or folder in the working directory shadows one of its dependencies, "
            f"or reinstall it (pip install -U {top})."
        ) from exc


def _where(exc: ImportError) -> str:
    module = getattr(exc, "name", None)
    path = getattr(exc, "path", None)
    if module and path:
        return f"({module!r} was found at {path}.) "
    return ""
