"""Atomic checkpoint writes: a process killed while saving leaves the previous checkpoint intact.

Lightning writes a checkpoint in place (``torch.save`` to the final path, or a sharded folder filled
file by file). :class:`AtomicModelCheckpoint` writes every checkpoint under a hidden ``.NAME.partial``
path beside the target and only then moves it into place: a file with ``os.replace``, a sharded
folder by atomically exchanging it with the old one (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere
two renames, with a moment in which only the ``.NAME.old`` copy exists).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

import ulma_lightning._compat as _compat
from ulma_lightning.importing import import_object
from ulma_lightning.options import UserError

# Lightning's own warning for a missing `last` suggests save_last=True, which the configs set already;
# AtomicModelCheckpoint says where it looked instead.
warnings.filterwarnings("ignore", message=r'.*ckpt_path="last"\) is set, but there is no last checkpoint available')

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the platform or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: fall back to two renames
        return False
    raise OSError(errno, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(errno)}")


def remove_path(path: Path) -> None:
    """Remove a file, link or folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def atomic_replace(src: str | Path, dst: str | Path) -> None:
    """Move the finished checkpoint ``src`` (file or folder) to ``dst``, replacing it atomically."""
    src, dst = Path(src), Path(dst)
    _fsync(src)
    exists = dst.exists() or dst.is_symlink()
    if not exists or (not src.is_dir() and not dst.is_dir()):
        os.replace(src, dst)  # into a free path, or a file over a file
        return
    if src.is_dir() and dst.is_dir() and _exchange(src, dst):
        remove_path(src)  # src now holds the previous checkpoint
        return
    old = dst.with_name(f".{dst.name}.old")
    remove_path(old)
    os.replace(dst, old)
    os.replace(src, dst)
    remove_path(old)


def partial_path(path: str | Path) -> Path:
    """Where a checkpoint for ``path`` is written before it is moved into place (hidden, not ``last*.ckpt``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def atomic_save(
    write: Callable[[str], None],
    path: str | Path,
    *,
    is_writer: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> None:
    """Call ``write(partial)`` on every process, then (on ``is_writer`` only) move the result to ``path``.

    A leftover partial from a killed save is removed first, and a failed save removes its own (a
    full disk stays no fuller than before); ``barrier`` separates the steps when several processes
    write one sharded checkpoint.
    """
    partial = partial_path(path)
    if is_writer:
        remove_path(partial)
    barrier()
    try:
        write(str(partial))
        barrier()
        if is_writer:
            if not partial.exists():
                raise FileNotFoundError(f"the checkpoint writer produced nothing at {partial}")
            atomic_replace(partial, path)
    except BaseException:
        if is_writer:
            remove_path(partial)
        raise
    barrier()


METADATA_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint folder


def read_checkpoint_metadata(path: str | Path) -> dict:
    """A checkpoint's contents without loading sharded tensors: a file's whole dict (memory-mapped),
    or a sharded folder's ``meta.pt`` (loops, callbacks, hyper-parameters, data module state)."""
    import torch

    path = Path(path)
    if path.is_dir():
        return torch.load(path / METADATA_FILE, map_location="cpu", weights_only=False)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def keep_unfinished_epoch(checkpoint: dict) -> None:
    """Record an epoch that fit left before its last batch (``max_steps``, ``max_time``, a callback's
    stop) as unfinished, so that ``--ckpt_path`` continues it instead of starting the next one.

    Lightning runs its end-of-epoch bookkeeping whenever the epoch loop ends, and a checkpoint saved
    then (``on_train_epoch_end``, ``on_train_end``) counts the cut epoch as completed: a resumed run
    would skip the rest of it. Here its progress goes back to "started, mid-epoch", as in a
    checkpoint saved at a mid-epoch validation; the data loader's saved position (the batches done)
    then resumes with exactly the unseen samples.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop or loop.get("epoch_loop.batch_progress", {}).get("is_last_batch", True):
        return
    if not loop["epoch_loop.batch_progress"]["current"]["ready"]:
        return  # no batch of this epoch was trained: nothing to continue
    progress = loop["epoch_progress"]
    for counts in (progress["total"], progress["current"]):
        if counts["started"] and counts["processed"] == counts["started"]:  # the epoch-end bookkeeping ran
            counts["processed"] = counts["completed"] = counts["started"] - 1
    checkpoint["epoch"] = progress["current"]["completed"]


MODULE_CLASS_KEY = "ulma_module_class"  # the LightningModule class that wrote a checkpoint
DATA_CLASS_KEY = "ulma_data_class"  # and its data module's class


def class_path(cls: type | None) -> str | None:
    return None if cls is None else f"{cls.__module__}.{cls.__qualname__}"


def _resolve(path: str | type | None) -> type | str | None:
    if not isinstance(path, str):
        return path
    try:
        return import_object(path)
    except ImportError:
        return path


def check_same_classes(checkpoint: dict, model: str | type, data: str | type | None, source: str) -> None:
    """Refuse to resume from a checkpoint written by another module or data module class.

    Resuming ULMA from a DPO run's checkpoint would put DPO's module on point-wise batches (or,
    through ``--ckpt_path last``, load its state into ULMA); say what does not match instead.
    ``model`` and ``data`` are this run's classes (or their import paths).
    """
    saved_model = checkpoint.get(MODULE_CLASS_KEY) or checkpoint.get("hyper_parameters", {}).get("_class_path")
    saved_data = checkpoint.get(DATA_CLASS_KEY)
    mismatches = [
        f"{what} {_name(saved)} (this run: {_name(ours)})"
        for what, saved, ours in (("module", saved_model, model), ("data module", saved_data, data))
        if saved is not None and ours is not None and _resolve(saved) != _resolve(ours)
    ]
    if mismatches:
        raise ValueError(
            f"--ckpt_path {source}: the checkpoint was written by another run's {' and '.join(mismatches)}. "
            "Resume with the config that run used (its config.yaml beside the checkpoints folder), or give "
            "this config a checkpoint of its own method"
        )


class ResumeConflict(UserError):
    """``--ckpt_path`` with options that differ from the ones the checkpoint was trained with."""


#: init options of a module a resumed run may change: how the model runs, not what it is or how it
#: learns (dotted below the module's ``init_args``)
RESUME_FREE_OPTIONS = (
    "policy.compile",
    "policy.gradient_checkpointing",
    "policy.attn_implementation",
    "policy.logits_chunk_size",
    "policy.length_groups",
)
_UNSET = "(not set)"


def _plain(value: Any) -> Any:
    """Hyper-parameters as plain data: dataclasses and namespaces as dicts, tuples as lists, any other
    object (a scorer given as an instance) as its class, which is what a checkpoint can compare."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif hasattr(value, "as_dict") and callable(value.as_dict):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {
            k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}.{key}" if prefix else key).items()
        }
    return {prefix: value}


def resume_conflicts(saved: Any, given: Any) -> list[tuple[str, Any, Any]]:
    """``(option, checkpoint's value, given value)`` for each init option of the module where ``given``
    (this run's) differs from ``saved`` (the checkpoint's ``hyper_parameters``). Not compared: the
    :data:`RESUME_FREE_OPTIONS`, the CLI's own ``_class_path``-like keys, and an option only one side
    has at the top level (written by another version of the class)."""
    saved = {k: v for k, v in (_plain(saved) or {}).items() if not k.startswith("_")}
    given = {k: v for k, v in (_plain(given) or {}).items() if not k.startswith("_")}
    flat_saved, flat_given = _flat(saved), _flat(given)
    conflicts = []
    for key in sorted(set(flat_saved) | set(flat_given)):
        if key.split(".")[0] not in saved or key.split(".")[0] not in given:
            continue
        if any(key == free or key.startswith(free + ".") for free in RESUME_FREE_OPTIONS):
            continue
        old, new = flat_saved.get(key, _UNSET), flat_given.get(key, _UNSET)
        if old != new:
            conflicts.append((key, old, new))
    return conflicts


def check_resume_options(saved: Any, given: Any, source: str, prefix: str = "model.init_args.") -> None:
    """Refuse to resume from ``source`` with module options other than the checkpoint's, naming each.

    Resuming continues a run: its weights, optimizer state and schedule were made with the
    checkpoint's options. Lightning's CLI used to replace the options given with the checkpoint's
    (``--ckpt_path FILE``: ``--model.init_args.beta 0.5`` dropped without a word), and ``--ckpt_path
    last`` kept the given ones (a size mismatch for another ``hidden_size``); both now stop here,
    before training.
    """
    conflicts = resume_conflicts(saved, given)
    if not conflicts:
        return
    lines = "\n".join(f"  {prefix}{key}: the checkpoint's {old!r}, given {new!r}" for key, old, new in conflicts)
    raise ResumeConflict(
        f"--ckpt_path {source}: {len(conflicts)} option(s) differ from the ones the checkpoint was trained "
        f"with:\n{lines}\n"
        "Resuming continues that training as it was set up. To resume, drop these options (the run's "
        "config.yaml, beside its checkpoints folder, holds its own); to train with them, start a new run without "
        "--ckpt_path (to start from the trained weights, set model.init_args.policy.model to the run's hf_model "
        "folder)"
    )


def _name(cls: str | type) -> str:
    return cls.rpartition(".")[2] if isinstance(cls, str) else cls.__name__


def _is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _is_last(path: Path) -> bool:
    """ModelCheckpoint's test for a ``last`` checkpoint name (``last.ckpt``, ``last-v1.ckpt``)."""
    return (
        path.suffix == ModelCheckpoint.FILE_EXTENSION
        and re.match(rf"^{ModelCheckpoint.CHECKPOINT_NAME_LAST}", path.stem) is not None
    )


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose writes are atomic (see the module docstring); same arguments.

    ``--ckpt_path last`` also finds the last checkpoint of earlier runs: without ``dirpath``,
    checkpoints live in each run's log folder (``<save_dir>/<name>/version_N/checkpoints``) and a new
    run gets a new version, so every version's ``last*.ckpt`` is a candidate (the newest is used).
    Remote paths (``s3://...``) are written as ``ModelCheckpoint`` does.
    """

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        found = set(super()._find_last_checkpoints(trainer))
        where = self.dirpath
        if self.dirpath is None and trainer.loggers:
            logger = trainer.loggers[0]
            root = Path(logger.save_dir if logger.save_dir is not None else trainer.default_root_dir) / str(logger.name)
            where = f"{root}/*/checkpoints"
            if _is_local(str(root)) and root.is_dir():
                found |= {os.path.normpath(p) for p in root.glob("*/checkpoints/*") if _is_last(p)}
        if not found:
            warnings.warn(
                f"--ckpt_path last: no last*.ckpt in {where}, so this run starts from the initial weights. To continue "
                "a run, use the trainer.default_root_dir and logger name it ran with, or pass --ckpt_path FILE",
                stacklevel=2,
            )
        return found

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save ``last`` at the end of fit unless it holds the final step already (ModelCheckpoint
        saves it only when nothing was saved, so a fit stopped by ``max_steps`` after a validation
        kept the validation's step as ``last``)."""
        if self.save_last and self.save_last != "link" and _compat.save_last_checkpoint(self, trainer):
            return
        super().on_train_end(trainer, pl_module)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if not _is_local(filepath):
            return super()._save_checkpoint(trainer, filepath)
        filepath = str(filepath).removeprefix("file://")
        atomic_save(
            lambda partial: trainer.save_checkpoint(partial, self.save_weights_only),
            filepath,
            is_writer=trainer.is_global_zero,
            barrier=trainer.strategy.barrier,
        )
        _compat.record_checkpoint_saved(self, trainer.global_step, filepath)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
