"""The ``ulma`` command: LightningCLI with subclass mode for the model and the data.

``ulma fit --config configs/ulma.yaml`` trains; ``validate``, ``test`` and ``predict`` work the same
way; ``ulma export --ckpt PATH --out DIR`` writes a checkpoint (a file or a sharded folder) as a
Hugging Face folder (:mod:`ulma_lightning.export_cli`). Research code passes its own classes by
``class_path``. The data module's tokenizer is linked to the policy's, so a config names it once.
Commands beyond LightningCLI's are rows of :data:`EXTRA_COMMANDS`: ``ulma --help`` lists them.

A mistake in the input or the options (a bad record, grid or option) is printed as its one-line
message, without the traceback (``ULMA_DEBUG=1`` shows it).

``ulma predict`` writes generations, scored, as JSONL (settings: the config's ``evaluation:``
section, a :class:`~ulma_lightning.evaluation.PredictionWriter`). ``ulma evaluate`` runs ``test``
and ``predict`` for one checkpoint and prints and saves a table of everything
(:mod:`ulma_lightning.evaluation.evaluate`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch import LightningModule

from ulma_lightning.data.datamodule import AlignmentDataModule
from ulma_lightning.importing import import_object
from ulma_lightning.lightning_cli import CLI_DEFAULTS, EXTRA_COMMANDS, ULMACLI
from ulma_lightning.noise import silence_known_noise
from ulma_lightning.options import UserError


def main(args: list[str] | None = None) -> Any:
    """Entry point of the ``ulma`` console script (the :data:`EXTRA_COMMANDS` are dispatched here)."""
    silence_known_noise()
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in EXTRA_COMMANDS:
        return import_object(EXTRA_COMMANDS[argv[0]][0])(argv[1:])
    if argv and argv[0] == "predict":  # as `ulma evaluate`: the run's saved config, outputs in its folder
        from ulma_lightning.evaluation.evaluate import expected_warnings, with_run_checkpoint

        rest, run = with_run_checkpoint(argv[1:], "ulma predict")
        if rest != argv[1:]:
            defaults = (
                {**CLI_DEFAULTS, "save_config_callback": None} if run is not None else CLI_DEFAULTS
            )  # the run's config.yaml stays
            with expected_warnings():
                return ULMACLI(LightningModule, AlignmentDataModule, args=["predict", *rest], **defaults)
    return ULMACLI(LightningModule, AlignmentDataModule, args=args, **CLI_DEFAULTS)  # the parser: METHOD_BASES


#: set to 1 to see the traceback of a mistake in the input or the options (see :func:`run`)
DEBUG_ENV = "ULMA_DEBUG"


def run() -> None:
    """The ``ulma`` console script: :func:`main`, with exit status 0 on success. A mistake in the
    input or the options (a :class:`~ulma_lightning.options.UserError`: DataError, GridError,
    ConfigError, ResumeConflict) ends with its one-line message and exit status 2, not
    a traceback; ``ULMA_DEBUG=1`` shows the traceback too."""
    try:
        main()
    except UserError as err:
        if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
            raise
        print(
            f"ulma: stopped ({DEBUG_ENV}=1 shows the traceback):\n"
            f"{type(err).__module__}.{type(err).__qualname__}: {err}",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    run()
