"""The one importer of dotted paths (a config's ``class_path``, a scorer's ``module``, a command)."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str) -> Any:
    """The object ``path`` names: ``package.module.Name`` (as a ``class_path``) or ``package.module:name``
    (as an entry point). :class:`ImportError` when the module cannot be imported or has no such name."""
    module_name, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not name:
        raise ImportError(f"{path!r} is not a dotted path; write package.module.Name")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, name)
    except AttributeError:
        raise ImportError(f"cannot import {path!r}: module {module_name!r} has no {name!r}") from None
