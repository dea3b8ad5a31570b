"""Every use of another library's private (or version-dependent) API, in one place.

Each function here was checked against the versions in :data:`CHECKED` (tests/test_compat.py tests
each one and fails when an installed version differs: re-check this file, then update it). The
private methods of Lightning classes that classes here override are listed in :data:`PRIVATE_HOOKS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: the versions (major.minor) every function of this module was checked against
CHECKED = {"lightning": "2.6", "torch": "2.13", "transformers": "5.25", "jsonargparse": "4.53"}

#: (class, private method) of another library that a class of this package overrides -> why
PRIVATE_HOOKS = {
    (
        "lightning.pytorch.cli.LightningCLI",
        "_run_subcommand",
    ): "ULMACLI: a run that fails before its first step leaves no log folder",
    (
        "lightning.pytorch.cli.LightningCLI",
        "_parse_ckpt_path",
    ): "ULMACLI: refuse another method's checkpoint before LightningCLI reads it",
    ("lightning.pytorch.cli.LightningCLI", "_add_subcommands"): "ULMACLI: list the extra commands in ulma --help",
    (
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "_find_last_checkpoints",
    ): "AtomicModelCheckpoint: --ckpt_path last finds earlier versions",
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_save_checkpoint"): "AtomicModelCheckpoint: atomic writes",
    ("lightning.pytorch.strategies.FSDPStrategy", "_setup_model"): "AutoWrapFSDPStrategy: wrap the policy's blocks",
}


def gguf_architectures() -> set[str]:
    """The GGUF ``general.architecture`` values transformers can load (both its GGUF loaders)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # metadata sections, not architectures
    try:  # transformers >= 5.2x: the loader that keeps weights in blocks has its own list
        from transformers.integrations.gguf.utils import GGUF_ARCHS
    except ImportError:
        return names
    return names | set(GGUF_ARCHS)


def gguf_dequantize_options() -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that dequantise a GGUF's weights to a plain float model.

    transformers 5.x keeps a GGUF's weights in their quantised blocks (``GgufConfig``) unless told to
    dequantise; earlier versions always dequantise and take no such option.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


# ----------------------------------------------------------------------------- Lightning


def attached_trainer(module: Any) -> Any:
    """The Trainer ``module`` (a LightningModule) is attached to, or None (``module.trainer`` raises
    instead of returning None)."""
    return module._trainer


def logs_this_step(trainer: Any) -> bool:
    """Whether Lightning writes this training step's logged values (every ``log_every_n_steps``)."""
    return bool(trainer._logger_connector.should_update_logs)


def batches_that_stepped(trainer: Any) -> int:
    """The step at which Lightning logs the metrics of now (``val/loss`` of a validation inside fit is
    logged one below ``global_step``)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def train_loader_built(trainer: Any) -> bool:
    """Whether the fit loop has built its train loader (``estimated_stepping_batches`` builds it)."""
    return trainer.fit_loop._combined_loader is not None


def forward_redirection(strategy: Any, module: Any, method: str, *args: Any) -> Any:
    """``module.<method>(*args)`` through the forward of the wrapper ``strategy`` put around the model
    (FSDP gathers the root's weights in its forward only)."""
    return strategy._forward_redirection(strategy.model, module, method, *args)


def save_last_checkpoint(callback: Any, trainer: Any) -> bool:
    """Save ``last`` now as ``ModelCheckpoint`` saves it (with its monitored values), unless it skips
    saving at this point (sanity check, ``fast_dev_run``, ...); whether it saved."""
    if callback._should_skip_saving_checkpoint(trainer):
        return False
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
    return True


def record_checkpoint_saved(callback: Any, global_step: int, filepath: str) -> None:
    """The bookkeeping of ``ModelCheckpoint._save_checkpoint``, for an override that writes the file itself."""
    callback._last_global_step_saved = global_step
    callback._last_checkpoint_saved = filepath


def set_activation_checkpointing(strategy: Any, policy: Any) -> None:
    """Make Lightning's ``FSDPStrategy`` checkpoint the activations of the blocks ``policy`` wraps."""
    strategy._activation_checkpointing_kwargs = {"auto_wrap_policy": policy}


def add_subcommand(parser: Any, name: str, description: str) -> None:
    """List ``name`` among the subcommands of a LightningCLI parser (jsonargparse) in ``--help``."""
    from jsonargparse import ArgumentParser

    parser._subcommands_action.add_subcommand(name, ArgumentParser(description=description), help=description)


def _init_args_of(spec: Any) -> dict[str, Any]:
    """A subclass spec's ``init_args`` as a plain dict of its top-level options."""
    init_args = spec.get("init_args") if hasattr(spec, "get") else None
    if init_args is None:
        return {}
    return dict(init_args.items(branches=True, nested=False)) if hasattr(init_args, "items") else dict(init_args)


@contextmanager
def on_class_path_change(check: Callable[[str, str, dict[str, Any], dict[str, Any]], None]) -> Iterator[None]:
    """While parsing, call ``check(old_class, new_class, before, after)`` after each ``class_path``
    change of a subclass spec (``--model.class_path X`` over a config's model, a callbacks list given
    whole): ``before`` and ``after`` are the old spec's ``init_args`` before and after jsonargparse kept
    only those the new class takes. It drops the others saying so only in a debug log; ``check`` may
    raise or warn. (jsonargparse calls its module function ``discard_init_args_on_class_path_change``
    by name, so replacing it there reaches every caller.)"""
    from jsonargparse import _typehints

    original = _typehints.discard_init_args_on_class_path_change

    def checked(parser_or_action: Any, prev_val: Any, value: Any) -> None:
        changed = bool(prev_val) and hasattr(prev_val, "get") and prev_val.get("class_path") != value.get("class_path")
        before = _init_args_of(_typehints.subclass_spec_as_namespace(prev_val)) if changed else {}
        original(parser_or_action, prev_val, value)
        if changed:
            after = _init_args_of(_typehints.subclass_spec_as_namespace(prev_val))
            check(str(prev_val.get("class_path")), str(value.get("class_path")), before, after)

    _typehints.discard_init_args_on_class_path_change = checked
    try:
        yield
    finally:
        _typehints.discard_init_args_on_class_path_change = original


# ----------------------------------------------------------------------------- torch


def raise_recompile_limit(limit: int) -> None:
    """Let ``torch.compile`` keep at least ``limit`` variants of one compiled function."""
    import torch._dynamo.config

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


def is_compiled(module: Any) -> bool:
    """Whether ``module.compile()`` was called on ``module`` (the module itself, not its children)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def load_sharded_state_dict(path: Any, keys: set[str]) -> dict[str, Any]:
    """The entries ``keys`` of a sharded (torch.distributed.checkpoint) checkpoint folder, read whole
    into this one process without a process group."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(
        state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True
    )
    return state


# ----------------------------------------------------------------------------- transformers


def no_split_modules(module: Any) -> list[str]:
    """The block class names a Hugging Face model declares must not be split (``_no_split_modules``)."""
    return list(getattr(module, "_no_split_modules", None) or [])
