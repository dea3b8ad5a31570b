"""The ``ulma`` command: LightningCLI with subclass mode for the model and the data.

``ulma fit --config configs/ulma.yaml`` trains; ``validate``, ``test`` and ``predict`` work the same
way; ``ulma export --ckpt PATH --out DIR`` writes a checkpoint (a file or a sharded folder) as a
Hugging Face folder (:mod:`ulma_lightning.export_cli`). Research code passes its own classes by
``class_path``. The data module's tokenizer is linked to the policy's, so a config names it once.

``ulma predict`` writes generations, scored, as JSONL (settings: the config's ``evaluation:``
section, a :class:`~ulma_lightning.evaluation.PredictionWriter`). ``ulma evaluate`` runs ``test``
and ``predict`` for one checkpoint and prints and saves a table of everything
(:mod:`ulma_lightning.evaluation.evaluate`).
"""

from __future__ import annotations

import sys

from typing import Any

from lightning.pytorch.cli import LightningCLI

from ulma_lightning.data.datamodule import AlignmentDataModule
from ulma_lightning.evaluation.writer import PredictionWriter
from ulma_lightning.modules.base import AlignmentModule


def _tokenizer_of(policy: Any) -> str:
    tokenizer = policy.get("tokenizer") if isinstance(policy, dict) else getattr(policy, "tokenizer", None)
    model = policy.get("model") if isinstance(policy, dict) else getattr(policy, "model", None)
    return tokenizer or model


CLI_DEFAULTS: dict[str, Any] = {
    "subclass_mode_model": True,
    "subclass_mode_data": True,
    "seed_everything_default": 0,
    "save_config_kwargs": {"overwrite": True},
    "auto_configure_optimizers": False,
}


class ULMACLI(LightningCLI):
    """LightningCLI that links ``data.tokenizer`` to ``model.policy.tokenizer`` (or its model), and
    adds the ``evaluation:`` section (a :class:`PredictionWriter` callback, active in ``predict``)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model.init_args.policy", "data.init_args.tokenizer", compute_fn=_tokenizer_of)
        parser.add_lightning_class_args(PredictionWriter, "evaluation")


def main(args: list[str] | None = None) -> Any:
    """Entry point of the ``ulma`` console script (``ulma evaluate`` and ``ulma export`` are
    dispatched here)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:
        from ulma_lightning.export_cli import main as export_main

        return export_main(argv[1:])
    if argv[:1] == ["evaluate"]:
        from ulma_lightning.evaluation.evaluate import evaluate_main

        return evaluate_main(argv[1:])
    if argv[:1] == ["compare"]:
        from ulma_lightning.compare.runner import compare_main

        return compare_main(argv[1:])
    return ULMACLI(AlignmentModule, AlignmentDataModule, args=args, **CLI_DEFAULTS)


def run() -> None:
    """The ``ulma`` console script: :func:`main`, with exit status 0 on success."""
    main()


if __name__ == "__main__":  # pragma: no cover
    run()
