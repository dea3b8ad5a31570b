"""The one check of options that take one of a few values: a bad value stops with its name and the choices."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def choice_problem(name: str, value: Any, allowed: Collection[Any]) -> str | None:
    """None when ``value`` is in ``allowed``, else ``"name must be 'a', 'b' or 'c', got 'd'"``."""
    if value in allowed:
        return None
    shown = [repr(choice) for choice in allowed]
    listed = shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"
    return f"{name} must be {listed}, got {value!r}"


def check_choices(where: str = "", /, **options: tuple[Any, Collection[Any]]) -> None:
    """Raise ``ValueError("[where: ]name must be 'a' or 'b', got VALUE")`` for the first option
    ``name=(value, allowed)`` whose value is not one of the allowed ones."""
    for name, (value, allowed) in options.items():
        problem = choice_problem(name, value, allowed)
        if problem is not None:
            raise ValueError(f"{where}: {problem}" if where else problem)
