"""Which modules of a model are its transformer blocks: the unit that FSDP shards, activation
checkpointing wraps and ``policy.compile`` compiles."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

import ulma_lightning._compat as _compat


def _declared_block_names(root: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in root.modules():
        names.update(_compat.no_split_modules(module))
    return names


def _largest_module_list(root: nn.Module) -> set[str]:
    lists = [m for m in root.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return set()
    longest = max(lists, key=len)
    return {type(longest[0]).__name__}


def decoder_layer_classes(root: nn.Module, names: Sequence[str] | None = None) -> tuple[type[nn.Module], ...]:
    """The block classes to shard (and checkpoint) in ``root``.

    Args:
        root: a model, or any module containing models (e.g. a LightningModule).
        names: class names to use; by default the ``_no_split_modules`` of every Hugging Face model
            inside ``root``, or else the class of the longest ``nn.ModuleList``'s elements.
    """
    wanted = set(names) if names else _declared_block_names(root) or _largest_module_list(root)
    found = {type(m) for m in root.modules() if type(m).__name__ in wanted}
    if not found:
        raise ValueError(
            f"no module of class {sorted(wanted)} in {type(root).__name__}; set the strategy's `layer_classes` to the "
            "class name of the model's transformer block (e.g. [LlamaDecoderLayer])"
        )
    return tuple(sorted(found, key=lambda c: c.__name__))
