"""Writing the trained policy as a Hugging Face folder that ``from_pretrained`` loads."""

from __future__ import annotations

import copy
import errno
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ulma_lightning.logprobs import is_fsdp2


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _unwrapped_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class (FSDP2's ``fully_shard`` swaps in a subclass ``FSDP<Name>``)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if issubclass(cls, FSDPModule):
        cls = next(base for base in cls.__mro__[1:] if not issubclass(base, FSDPModule) and issubclass(base, nn.Module))
    return cls


def plain_copy(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A CPU model with ``model``'s architecture (and LoRA adapters) holding ``state_dict``.

    ``model`` may be sharded (FSDP2), wrapped, or on the meta device: only its class, config and
    adapter config are used. ``state_dict`` is its full (gathered) state, keyed as
    ``model.state_dict()`` is. Tied embeddings are re-tied.
    """
    base = model.get_base_model() if _is_peft(model) else model
    with torch.device("meta"):
        out = _unwrapped_class(base)(copy.deepcopy(base.config))
        if _is_peft(model):
            from peft import get_peft_model

            out = get_peft_model(out, model.peft_config[model.active_adapter])
    dtypes = Counter(v.dtype for v in state_dict.values() if torch.is_floating_point(v))
    out.to_empty(device="cpu")
    if dtypes:
        out.to(dtypes.most_common(1)[0][0])
    (out.get_base_model() if _is_peft(out) else out).tie_weights()
    missing, unexpected = out.load_state_dict(state_dict, strict=False)
    primary = {name for name, _ in out.named_parameters()} | {name for name, _ in out.named_buffers()}
    missing = [k for k in missing if k in primary]  # the second name of a tied weight may be absent
    if missing or unexpected:
        raise KeyError(
            f"the state dict does not fit {type(out).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return out


def export_hf(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    merge_lora: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save ``model`` (LoRA merged into a copy when ``merge_lora``, else the adapter) and ``tokenizer``.

    Writes safetensors weights, the config, the tokenizer files and its chat template. An adapter
    of a base built from a config comes with that base in ``base_model/``. With
    ``state_dict`` (a full state of a sharded or meta ``model``), that state is written instead of
    ``model``'s own tensors.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        model = plain_copy(model, state_dict)
    elif hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model)
    if hasattr(model, "merge_and_unload"):
        if merge_lora:
            model = model.merge_and_unload()
        else:
            _save_adapter(model, out)
            tokenizer.save_pretrained(out)
            return out
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _point_adapter_at(partial: Path, out: Path) -> None:
    """An adapter saved with its base model (``base_model/``) names that folder by absolute path:
    make it the path the folder will have once moved from ``partial`` to ``out``."""
    config_file = partial / "adapter_config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    base = str(config.get("base_model_name_or_path") or "")
    if base.startswith(str(partial.resolve())):
        config["base_model_name_or_path"] = str(out.resolve()) + base[len(str(partial.resolve())) :]
        config_file.write_text(json.dumps(config, indent=2))


def export_atomically(write: Callable[[Path], Any], out: str | Path, *, what: str = "export") -> Path:
    """Call ``write(partial)`` to fill a hidden ``.NAME.partial`` folder beside ``out``, then move it
    into place (replacing an earlier ``out`` whole): a write that fails midway (a full disk, a
    tokenizer that cannot be saved) leaves no half-written folder that ``from_pretrained`` would
    take for a whole one, and removes its partial. The error names ``out``."""
    from ulma_lightning.checkpointing import atomic_replace, partial_path, remove_path

    out = Path(out)
    partial = partial_path(out)
    remove_path(partial)
    try:
        write(partial)
        _point_adapter_at(partial, out)
        atomic_replace(partial, out)
    except Exception as err:
        remove_path(partial)
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC
        message = (
            f"{what}: writing the Hugging Face folder {out} failed ({type(err).__name__}: {err}); nothing was written "
            "there"
            + (" (an earlier export there is kept)" if out.exists() else "")
            + (". Free space on that device or write elsewhere" if full else "")
        )
        if isinstance(err, OSError):
            raise (OSError(err.errno, message) if err.errno is not None else OSError(message)) from err
        raise RuntimeError(message) from err
    return out


def _save_adapter(model: nn.Module, out: Path) -> None:
    """The LoRA adapter alone; a base model built from a config (no hub id or folder to point
    at) is saved beside it in ``out/base_model`` and the adapter config points there."""
    import json

    model.save_pretrained(out, safe_serialization=True)
    adapter = model.peft_config[model.active_adapter]
    if adapter.base_model_name_or_path:
        return
    base_dir = out / "base_model"
    model.unload().save_pretrained(base_dir, safe_serialization=True)
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(base_dir.resolve())
    config_file.write_text(json.dumps(config, indent=2))


def gather_policy_state(trainer: Any, pl_module: Any) -> tuple[bool, dict[str, torch.Tensor] | None]:
    """The policy's full state dict when it is sharded; call on every process (collective).

    Returns ``(sharded, state)``: ``sharded`` False means the policy's own tensors are whole (single
    device, DDP) and no gathering happened; else ``state`` is the full CPU state dict on rank 0 and
    None elsewhere. Handles FSDP2 (the policy is its own root) and FSDP (the wrapped module's root).
    """
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = pl_module.policy.model
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if is_fsdp2(model):
        state = get_model_state_dict(model, options=options)
    elif isinstance(trainer.strategy, FSDPStrategy):
        prefix = "policy.model."
        full = get_model_state_dict(trainer.strategy.model, options=options)
        state = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
    else:
        return False, None
    return True, (state if trainer.is_global_zero else None)
