"""Messages of other libraries that a user of ``ulma`` cannot act on, silenced one by one.

Each is matched by its source and its text, never a whole category: any other warning still shows.

- Lightning 2.6's ``utilities/_pytree.py`` builds ``LeafSpec()``, which torch 2.10+ deprecates
  (a ``FutureWarning`` per batch transfer: Lightning's to fix, not the user's).
- Lightning's tip to install ``litlogger`` (an advertisement, at every ``Trainer`` start).
- transformers 5's ``is_gradient_checkpointing`` ``FutureWarning``, raised when peft reads the
  deprecated property while wrapping a model in LoRA adapters (silenced around that call only,
  :func:`peft_wrapping`).
- ``v_num`` in the progress bar: the run's version number, not a metric (its folder is runs/NAME/version_N).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

LEAFSPEC_MESSAGE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
LEAFSPEC_MODULE = r"lightning\.pytorch\.utilities\._pytree"
LITLOGGER_TIP = "try installing [litlogger]"
GRADIENT_CHECKPOINTING_MESSAGE = r"`is_gradient_checkpointing` is deprecated"
#: the loggers Lightning's ``rank_zero_info`` writes through (fabric's or pytorch's, by import order)
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return LITLOGGER_TIP not in record.getMessage()


_TIP_FILTER = _DropLitLoggerTip()


def silence_known_noise() -> None:
    """Install the filters of this module's list (idempotent); ``ulma`` calls it at start."""
    warnings.filterwarnings("ignore", message=LEAFSPEC_MESSAGE, category=FutureWarning, module=LEAFSPEC_MODULE)
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _TIP_FILTER not in logger.filters:
            logger.addFilter(_TIP_FILTER)


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around ``get_peft_model``: peft reads transformers' deprecated ``is_gradient_checkpointing``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_MESSAGE, category=FutureWarning)
        yield


def without_version_in_progress_bar(trainer: Any) -> None:
    """Drop ``v_num`` from the items of ``trainer``'s progress bar (if it has one)."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or getattr(bar, "_ulma_no_version", False):
        return
    get_metrics = bar.get_metrics

    def metrics(*args: Any, **kwargs: Any) -> Any:
        items = get_metrics(*args, **kwargs)
        items.pop("v_num", None)
        return items

    bar.get_metrics = metrics
    bar._ulma_no_version = True
