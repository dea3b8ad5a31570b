"""Checks of numeric options where a class is built: a bad value stops with its name and the rule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


class UserError(ValueError):
    """A mistake in the user's input or options (a bad record, grid, option or resume) whose message
    says where it is and how to fix it: the ``ulma`` command prints it without a traceback."""


#: The torch dtypes a config names (``policy.dtype``, FSDP2's ``param_dtype`` and ``reduce_dtype``).
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

RULES: dict[str, Callable[[float], bool]] = {
    ">= 1": lambda v: v >= 1,
    ">= 0": lambda v: v >= 0,
    "> 0": lambda v: v > 0,
    "finite and > 0": lambda v: math.isfinite(v) and v > 0,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
}


def check_numbers(**options: tuple[Any, str]) -> None:
    """Raise ``ValueError("name must be RULE, got VALUE")`` for the first option ``name=(value,
    rule)`` that breaks its rule (a key of :data:`RULES`); None values are unset options and pass."""
    for name, (value, rule) in options.items():
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or math.isnan(value)
            or not RULES[rule](value)
        ):
            raise ValueError(f"{name} must be {rule}, got {value!r}")
