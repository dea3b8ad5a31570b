"""``policy.compile``: the transformer blocks of the policy, its reference and a reward model through
``torch.compile``.

Each block (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ... found as for sharding) is compiled in
place with ``nn.Module.compile``: its norms, rotary embedding, SwiGLU and residual adds fuse into a
few kernels, while the state-dict keys stay those of the eager model (no ``_orig_mod.``), so
checkpoints, resume and ``ulma export`` are unchanged. All blocks share one compiled function (its
variants, e.g. training and validation, count against ``torch._dynamo.config.recompile_limit``,
raised to :data:`RECOMPILE_LIMIT`). With
``dynamic`` unset (torch's default), the first new sequence length or batch size recompiles once
with dynamic shapes, and later lengths reuse that graph. The chunked log-prob head stays eager (it is
two matmuls per chunk; see docs/benchmarks.md). Generation runs eager (:func:`eager`): each decoding
step has its own shapes and KV cache.

DDP and FSDP2 (``fully_shard`` per block, whose hooks run outside the compiled graph) work; torch's
FSDP1 (``configs/strategy/fsdp.yaml``) is refused by :func:`check_strategy`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

import ulma_lightning._compat as _compat

#: the ``torch.compile`` keyword arguments ``policy.compile`` may set, and the values each accepts
KEYS = {
    "mode": "null, 'default', 'reduce-overhead', 'max-autotune' or 'max-autotune-no-cudagraphs'",
    "dynamic": "null (recompile with dynamic shapes when a shape changes), true or false",
    "backend": "a torch.compile backend name, e.g. 'inductor' (default) or 'aot_eager'",
    "fullgraph": "true or false",
}
RECOMPILE_LIMIT = 64  # variants of the blocks' compiled function (torch's default: 8), see compile_blocks
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(value: Any) -> dict[str, Any] | None:
    """The ``torch.compile`` keyword arguments of a ``policy.compile`` value, or None (off).

    ``false``/null: off; ``true``: torch's defaults; a mapping: some of :data:`KEYS`. Raises
    ``ValueError`` naming the bad key or value.
    """
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"policy.compile must be true, false or a mapping of {sorted(KEYS)}, got {value!r}")
    for key, option in value.items():
        if key not in KEYS:
            raise ValueError(f"policy.compile: unknown key {key!r}; allowed keys: {', '.join(sorted(KEYS))}")
        ok = {
            "mode": option in MODES,
            "dynamic": option is None or isinstance(option, bool),
            "backend": isinstance(option, str) and bool(option),
            "fullgraph": isinstance(option, bool),
        }[key]
        if not ok:
            raise ValueError(f"policy.compile.{key} must be {KEYS[key]}, got {option!r}")
    return dict(value)


def compile_blocks(model: nn.Module, options: dict[str, Any]) -> int:
    """Compile each transformer block of ``model`` in place (``nn.Module.compile``); the number compiled.

    Idempotent: a block compiled already is left as it is.
    """
    from ulma_lightning.blocks import decoder_layer_classes

    # every block of every model shares one compiled function, whose variants (train / eval, grad /
    # no grad, adapters on / off, static / dynamic shapes) would pass torch's default limit of 8
    _compat.raise_recompile_limit(RECOMPILE_LIMIT)
    classes = decoder_layer_classes(model)
    blocks = [m for m in model.modules() if isinstance(m, classes)]
    for block in blocks:
        if not _compat.is_compiled(block):
            block.compile(**options)
    return len(blocks)


def is_compiled(model: nn.Module | None) -> bool:
    """Whether any submodule of ``model`` was compiled in place."""
    return model is not None and any(_compat.is_compiled(m) for m in model.modules())


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules eagerly inside the block (generation: new shapes every step)."""
    with torch.compiler.set_stance("force_eager"):
        yield


def check_strategy(strategy: Any) -> None:
    """Refuse ``policy.compile`` under torch's FSDP1 (``FSDPStrategy``, ``configs/strategy/fsdp.yaml``)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        raise ValueError(
            f"policy.compile is not supported with {type(strategy).__name__} (torch FSDP1, "
            "configs/strategy/fsdp.yaml): use configs/strategy/fsdp2.yaml (FSDP2) or ddp.yaml, or set "
            "model.init_args.policy.compile: false"
        )
