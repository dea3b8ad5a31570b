"""``ulma export --ckpt PATH --out DIR``: a Lightning checkpoint to a Hugging Face folder.

Reads a single-file checkpoint (single device, DDP, ``FSDP2Strategy(save_distributed_checkpoint=
False)``, FSDP with ``state_dict_type: full``) or a sharded checkpoint folder (FSDP2 and FSDP
``state_dict_type: sharded``: one ``.distcp`` file per process and ``meta.pt``), rebuilds the module
from the checkpoint's ``hyper_parameters`` (class and init arguments; weights are not loaded from
their source), and writes safetensors weights, the config, the tokenizer and its chat template.
LoRA adapters are merged unless ``--keep_adapter`` (or ``--keep-adapter``). Runs in one process
on the CPU; the full weights must fit in memory. Checkpoints are unpickled: export only checkpoints you trust.
"""

from __future__ import annotations

import argparse
import errno
import logging
from pathlib import Path
from typing import Any

import torch

import ulma_lightning._compat as _compat
from ulma_lightning.checkpointing import (
    METADATA_FILE,
    MODULE_CLASS_KEY,
    atomic_replace,
    partial_path,
    read_checkpoint_metadata,
    remove_path,
)
from ulma_lightning.export import _point_adapter_at
from ulma_lightning.importing import import_object

log = logging.getLogger(__name__)

POLICY_PREFIX = "policy.model."


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata and its model ``state_dict`` (optimizer states are not read)."""
    path = Path(path)
    if path.is_file():
        return read_checkpoint_metadata(path)
    if not (path / METADATA_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is neither a checkpoint file nor a sharded checkpoint folder (no {METADATA_FILE} in it); pass a "
            ".ckpt file or folder written by `ulma fit` (e.g. runs/ulma/checkpoints/last.ckpt)"
        )
    weights = _compat.load_sharded_state_dict(path, {"state_dict", "model"})
    checkpoint = read_checkpoint_metadata(path)
    checkpoint["state_dict"] = weights.get("state_dict", weights.get("model", {}))  # FSDP2 | FSDP names
    return checkpoint


def module_from_checkpoint(checkpoint: dict[str, Any]) -> Any:
    """The LightningModule the checkpoint was written by: its class (the CLI's ``_class_path``, or
    the ``ulma_module_class`` every method module records) and its init arguments."""
    from lightning.pytorch.cli import instantiate_module

    from ulma_lightning.modules import METHOD_BASES, AlignmentModule

    if "hyper_parameters" not in checkpoint:
        raise KeyError("the checkpoint has no hyper_parameters; export needs a checkpoint of an ulma-lightning module")
    hparams = dict(checkpoint["hyper_parameters"])
    class_path = hparams.get("_class_path") or checkpoint.get(MODULE_CLASS_KEY)
    if class_path is None:
        raise ValueError(
            "the checkpoint does not name its module class; load it with YourModule.load_from_checkpoint and call "
            "ulma_lightning.export.export_hf"
        )
    cls = import_object(class_path)
    if hparams.pop("_instantiator", None) is not None:  # written by `ulma fit` (LightningCLI)
        hparams["_class_path"] = class_path
        return instantiate_module(cls if issubclass(cls, METHOD_BASES) else AlignmentModule, hparams)
    hparams.pop("_class_path", None)
    return cls(**hparams)


def policy_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The policy's weights from a checkpoint's ``state_dict``, keyed like ``policy.model.state_dict()``."""
    state = {k[len(POLICY_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(POLICY_PREFIX)}
    if not state:
        raise KeyError(f"no `{POLICY_PREFIX}*` weights in the checkpoint; is it an ulma-lightning module's?")
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state.items()}


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that holds anything (unless ``overwrite``): export would replace the folder."""
    if overwrite or not (out.exists() or out.is_symlink()) or (out.is_dir() and not any(out.iterdir())):
        return
    what = "a folder that is not empty" if out.is_dir() else "a file"
    raise FileExistsError(
        f"--out {out} is {what}; export writes a whole Hugging Face folder there. Choose a new or empty folder, or "
        "pass --overwrite to replace it"
    )


def export_checkpoint(ckpt: str | Path, out: str | Path, *, merge_lora: bool = True, overwrite: bool = False) -> Path:
    """Write the policy of checkpoint ``ckpt`` as a Hugging Face folder ``out`` (the module's
    ``export_hf``, with the checkpoint's weights).

    ``out`` must be new or empty unless ``overwrite``. The folder is written under a hidden
    ``.NAME.partial`` beside it and then moved into place (replacing the old one whole), so a failed
    export leaves ``out`` as it was and no partial folder.
    """
    out = Path(out)
    check_out(out, overwrite)
    checkpoint = read_checkpoint(ckpt)
    module = module_from_checkpoint(checkpoint)
    module.policy.build(empty=True)
    partial = partial_path(out)
    remove_path(partial)
    try:
        module.export_hf(partial, merge_lora=merge_lora, state_dict=policy_state(checkpoint))
        _point_adapter_at(partial, out)
        atomic_replace(partial, out)
    except BaseException as err:
        remove_path(partial)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise OSError(
                err.errno, f"no space left on the device to export to {out}; free space there or choose another --out"
            ) from err
        raise
    return out


def export_parser() -> argparse.ArgumentParser:
    """The options of ``ulma export``."""
    parser = argparse.ArgumentParser(
        prog="ulma export",
        description=(
            "Write the policy of a Lightning checkpoint (a file, or a sharded FSDP/FSDP2 folder) as a Hugging Face "
            "folder: safetensors weights, config, tokenizer and chat template."
        ),
    )
    parser.add_argument(
        "--ckpt",
        required=True,
        help="checkpoint file or sharded folder, e.g. runs/ulma/version_0/checkpoints/last.ckpt",
    )
    parser.add_argument("--out", required=True, help="output folder (created; must be new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    parser.add_argument(
        "--keep_adapter",
        "--keep-adapter",
        dest="keep_adapter",
        action="store_true",
        help="save LoRA adapters as an adapter folder instead of merging them",
    )
    return parser


def main(argv: list[str] | None = None) -> Path:
    """``ulma export --ckpt PATH --out DIR [--keep_adapter]`` (``--keep-adapter`` also works)."""
    args = export_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = export_checkpoint(args.ckpt, args.out, merge_lora=not args.keep_adapter, overwrite=args.overwrite)
    log.info("wrote %s", out)
    print(out)
    return out


if __name__ == "__main__":  # pragma: no cover
    main()
