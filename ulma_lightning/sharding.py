"""Sharded training: which blocks to shard, and the FSDP and FSDP2 strategies the configs use.

* :func:`decoder_layer_classes` finds a model's transformer block (``LlamaDecoderLayer``,
  ``Qwen2DecoderLayer``, ``MistralDecoderLayer``, ``GemmaDecoderLayer``, ``GPT2Block``, ...) from the
  ``_no_split_modules`` that Hugging Face models declare, or takes the class names you give.
* :class:`AutoWrapFSDPStrategy` (``configs/strategy/fsdp.yaml``) is Lightning's ``FSDPStrategy``
  with that block as the auto-wrap and activation-checkpointing unit, resolved when the model exists.
* :class:`FSDP2Strategy` (``configs/strategy/fsdp2.yaml``) is Lightning's ``ModelParallelStrategy``
  with every process in one data-parallel group; the module's ``configure_model`` calls
  :func:`shard_policy` to apply ``fully_shard`` per block and per model (policy and reference).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

import ulma_lightning._compat as _compat
from ulma_lightning.blocks import decoder_layer_classes  # noqa: F401  (also offered here, with the rest of sharding)
from ulma_lightning.logprobs import is_fsdp2
from ulma_lightning.options import TORCH_DTYPES

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]


# ---------------------------------------------------------------------------- FSDP2
def shard_policy(
    policy: nn.Module,
    mesh: Any,
    *,
    layer_classes: Sequence[str] | None = None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
) -> None:
    """Apply ``fully_shard`` to each block of the policy (and of a reference copy), then to each model.

    Every model is its own FSDP2 root: ``logprobs.response_token_logps`` runs the decoder and the
    output projection inside the root's call, so the root's parameters (embeddings, final norm,
    ``lm_head``, tied or not) are gathered once per forward and their gradients reduced after the
    backward. A frozen reference is sharded the same way and never takes gradients. Idempotent.

    Args:
        policy: a :class:`~ulma_lightning.policy.Policy` whose ``build()`` has run.
        mesh: the 1-D data-parallel device mesh.
        layer_classes: block class names (default: found by :func:`decoder_layer_classes`).
        param_dtype: compute dtype of gathered parameters (``None``: the stored dtype).
        reduce_dtype: dtype of gradient reduction.
        reshard_after_forward: free each block's gathered parameters after its forward.
        activation_checkpointing: recompute each block in the backward (Hugging Face gradient
            checkpointing of the policy).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ulma_lightning.policy import checkpointing_on, enable_gradient_checkpointing

    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    models = [m for m in (getattr(policy, "model", None), getattr(policy, "reference_model", None)) if m is not None]
    for model in models:
        if is_fsdp2(model):
            continue
        if activation_checkpointing and model is policy.model and not checkpointing_on(model):
            enable_gradient_checkpointing(model)
        classes = decoder_layer_classes(model, layer_classes)
        for block in [m for m in model.modules() if isinstance(m, classes)]:
            fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    policy.collective_forwards = True


@contextlib.contextmanager
def hidden_reference(module: nn.Module) -> Iterator[None]:
    """Detach ``module.policy.reference_model`` for the duration (checkpoints do not hold it), unless
    the module's ``checkpoints_reference`` is True (a reference that training changes, such as online
    ULMA's ``ref_refresh_every``, is saved and restored sharded like the policy)."""
    policy = getattr(module, "policy", None)
    reference = getattr(policy, "reference_model", None)
    if policy is None or reference is None or getattr(module, "checkpoints_reference", False):
        yield
        return
    policy.reference_model = None
    try:
        yield
    finally:
        policy.reference_model = reference


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) over all processes, on GPUs or CPUs (gloo).

    Lightning's ``ModelParallelStrategy`` with the data-parallel group set to every process (no
    tensor parallelism). The module's ``configure_model`` shards the policy with the settings below.
    Checkpoints are sharded folders (one file per process plus ``meta.pt``) unless
    ``save_distributed_checkpoint`` is false; they hold no frozen reference weights.

    Args:
        layer_classes: class names of the blocks to shard; default: the model's ``_no_split_modules``.
        param_dtype: compute dtype of gathered parameters; ``auto`` follows the trainer's precision
            (``bf16-mixed`` -> bfloat16, ``16-mixed`` -> float16, else the stored dtype).
        reduce_dtype: dtype of the gradient reduce-scatter.
        reshard_after_forward: free each block's gathered parameters after its forward (less memory,
            one more all-gather in the backward).
        activation_checkpointing: recompute each block in the backward.
        save_distributed_checkpoint: sharded checkpoint folders (True) or one full file on rank 0.
        process_group_backend: ``nccl``, ``gloo``; default by device.
        timeout: collective timeout.
    """

    def __init__(
        self,
        layer_classes: list[str] | None = None,
        param_dtype: DTypeName = "auto",
        reduce_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        reshard_after_forward: bool = True,
        activation_checkpointing: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.layer_classes = layer_classes
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`shard_policy`."""
        dtype: torch.dtype | None = None
        if self.param_dtype != "auto":
            dtype = TORCH_DTYPES[self.param_dtype]
        else:
            precision = str(getattr(self.precision_plugin, "precision", ""))
            if precision.startswith("bf16"):
                dtype = torch.bfloat16
            elif precision.startswith("16"):
                dtype = torch.float16
        return {
            "layer_classes": self.layer_classes,
            "param_dtype": dtype,
            "reduce_dtype": TORCH_DTYPES[self.reduce_dtype],
            "reshard_after_forward": self.reshard_after_forward,
            "activation_checkpointing": self.activation_checkpointing,
        }

    def lightning_module_state_dict(self) -> dict[str, Any]:
        with hidden_reference(self.lightning_module):
            return super().lightning_module_state_dict()

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        with hidden_reference(self.lightning_module):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


def shard_options_for(strategy: Any) -> dict[str, Any]:
    """:func:`shard_policy` options of ``strategy`` (defaults for Lightning's own ModelParallelStrategy)."""
    if isinstance(strategy, FSDP2Strategy):
        return strategy.shard_options()
    return {}


def data_parallel_mesh(mesh: Any) -> Any:
    """The data-parallel sub-mesh of a ``ModelParallelStrategy`` mesh; refuses tensor parallelism."""
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "tensor parallelism is not supported by ulma_lightning's modules; use "
            "ulma_lightning.sharding.FSDP2Strategy (configs/strategy/fsdp2.yaml) or tensor_parallel_size: 1"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


# ---------------------------------------------------------------------------- FSDP (1)
class AutoWrapFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` that wraps (and optionally checkpoints) each transformer block.

    The block class is found when the model exists (see :func:`decoder_layer_classes`), so one
    config serves Llama, Qwen2, Mistral, Gemma, GPT-2 and other Hugging Face families. The frozen
    reference (``reference: copy``) is wrapped the same way. GPUs only (torch's FSDP1 refuses CPUs;
    use :class:`FSDP2Strategy` there).

    Args:
        layer_classes: class names of the blocks; default: the models' ``_no_split_modules``.
        activation_checkpointing: recompute each block in the backward.
        sharding_strategy: ``FULL_SHARD``, ``SHARD_GRAD_OP``, ``HYBRID_SHARD``, ``NO_SHARD``.
        state_dict_type: ``sharded`` (a folder, one file per process) or ``full`` (one file).
        cpu_offload: keep parameters and gradients on the CPU.
        limit_all_gathers: rate-limit all-gathers (less memory).
        process_group_backend: default ``nccl``.
        timeout: collective timeout.
    """

    def __init__(
        self,
        layer_classes: list[str] | None = None,
        activation_checkpointing: bool = False,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "sharded",
        cpu_offload: bool = False,
        limit_all_gathers: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
            limit_all_gathers=limit_all_gathers,
            process_group_backend=process_group_backend,
            timeout=timeout,
            use_orig_params=True,
        )
        self.layer_classes = layer_classes
        self.activation_checkpointing = activation_checkpointing

    def setup_environment(self) -> None:
        if self.root_device.type != "cuda":
            raise ValueError(
                f"configs/strategy/fsdp.yaml (torch FSDP) runs on CUDA GPUs only, not on {self.root_device.type}; on "
                "CPUs use configs/strategy/fsdp2.yaml or configs/strategy/ddp.yaml"
            )
        super().setup_environment()

    def wrap_policy(self, model: nn.Module) -> Any:
        """The ``ModuleWrapPolicy`` of ``model``'s blocks (also used for activation checkpointing)."""
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return ModuleWrapPolicy(set(decoder_layer_classes(model, self.layer_classes)))

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            policy = self.wrap_policy(model)
            self.kwargs["auto_wrap_policy"] = policy
            if self.activation_checkpointing:
                _compat.set_activation_checkpointing(self, policy)
        for module in model.modules():
            if hasattr(module, "collective_forwards"):
                module.collective_forwards = True
        return super()._setup_model(model)
