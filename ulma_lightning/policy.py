"""The policy: a Hugging Face causal LM, its tokenizer, its reference, and response log-probs; and the
model loading it shares with the reward model (:class:`PretrainedModel`)."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ulma_lightning.compiling import compile_blocks, compile_options
from ulma_lightning.gguf_models import is_gguf, load_gguf_config, load_gguf_model, model_source
from ulma_lightning.logprobs import TokenLogps, response_token_logps
from ulma_lightning.noise import peft_wrapping
from ulma_lightning.options import TORCH_DTYPES, check_numbers
from ulma_lightning.tokenizers import DEMO_TOKENIZER, load_tokenizer

log = logging.getLogger(__name__)

ReferenceMode = Literal["auto", "copy", "adapter", "precomputed", "none"]
DType = Literal["float32", "bfloat16", "float16"]


@dataclass
class LoraSettings:
    """LoRA adapters through peft (``pip install ulma-lightning[peft]``); off while ``r`` is 0.

    Args:
        r: adapter rank; 0 (the default) is full fine-tuning, e.g. 8 turns LoRA on.
        alpha: scaling numerator (``lora_alpha``).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or ``"all-linear"``.
    """

    r: int = 0
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"

    def __post_init__(self) -> None:
        check_numbers(r=(self.r, ">= 0"), alpha=(self.alpha, "> 0"), dropout=(self.dropout, "in [0, 1)"))


@dataclass
class PolicyConfig:
    """Which model to train and how to get reference log-probs.

    Args:
        model: a hub id, a local folder saved with ``save_pretrained``, or a ``.gguf`` file (llama.cpp's
            format, e.g. a Q4_1 checkpoint; dequantised to ``dtype`` on load and then trained and
            exported as an ordinary model; needs ``pip install 'ulma-lightning[gguf]'``). Leave empty to
            build a randomly initialised model from ``model_config``.
        gguf_file: the name of a ``.gguf`` file inside the ``model`` folder (or hub repo), as
            ``from_pretrained(model, gguf_file=...)`` takes it; the same as ``model: folder/name.gguf``.
        model_config: keyword arguments of ``transformers.AutoConfig.for_model`` (must include
            ``model_type``) for a random init, e.g. the tiny built-in default; ignored when ``model``
            is set. ``vocab_size`` and the special-token ids default to the tokenizer's.
        tokenizer: a hub id, a local folder, ``builtin:demo`` or ``builtin:task`` (the demo or the
            comparison task's tokenizer, built offline). Default (null): the model's own, or
            ``builtin:demo`` for a model built from ``model_config``. A tokenizer that does not fit the model's
            embeddings is an error.
        dtype: the weights' dtype. For mixed precision keep ``float32`` and set the trainer's
            ``precision: bf16-mixed``.
        reference: ``auto`` (the default: ``adapter`` with LoRA on and no ``reference_model``, else
            ``copy``), ``copy`` (a frozen model: ``reference_model`` or a copy of the initial policy),
            ``adapter`` (the LoRA policy with adapters disabled; no second copy of the weights),
            ``precomputed`` (reference log-probs computed once before training and stored with each
            sample), ``none`` (for objectives without a reference).
        reference_model: hub id, folder or ``.gguf`` file of the reference (e.g. an SFT checkpoint); defaults to
            the initial policy. Used by ``copy`` and ``precomputed``.
        lora: LoRA settings; ``r: 0`` (or null) is full fine-tuning, ``--model.init_args.policy.lora.r 8``
            trains rank-8 adapters.
        gradient_checkpointing: recompute decoder activations in the backward pass.
        disable_dropout: set every dropout probability to 0 (policy, its LoRA adapters' ``lora.dropout``
            included, and reference), as DPO does.
        logits_chunk_size: response tokens per vocabulary-projection chunk (fewer for vocabularies so
            large that a chunk would hold more than 16M logits).
        length_groups: run the backbone on up to this many groups of rows of similar length, each
            trimmed to its longest row, so less compute goes to padding (1 = the whole batch at once;
            FSDP-sharded models always use 1). Same log-probs either way.
        compile: run each transformer block of the policy, its reference copy (and a reward model)
            through ``torch.compile``: ``false`` (default), ``true``, or a mapping of ``torch.compile``
            arguments ``mode``, ``dynamic``, ``backend``, ``fullgraph`` (e.g. ``{backend: aot_eager}``).
            The first steps are slower (compiling, once more when the padded length first changes);
            checkpoints keep the eager keys; generation runs eager. Works with LoRA, DDP and FSDP2;
            refused under FSDP1 (``configs/strategy/fsdp.yaml``).
        attn_implementation: passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``).
        trust_remote_code: allow model code from the hub.
        init_seed: seed of the random init when building from ``model_config``.
    """

    model: str | None = None
    gguf_file: str | None = None
    model_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    dtype: DType = "float32"
    reference: ReferenceMode = "auto"
    reference_model: str | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)  # type: ignore[assignment]
    gradient_checkpointing: bool = False
    disable_dropout: bool = True
    logits_chunk_size: int = 1024
    length_groups: int = 4
    compile: bool | dict[str, Any] = False
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.lora is not None and self.lora.r == 0:
            if self.lora != LoraSettings():
                raise ValueError(
                    f"policy.lora: {self.lora} sets adapter options but r is 0 (LoRA off); set lora.r, e.g. 8"
                )
            # r: 0 is the shown default: full fine-tuning (the field is typed LoraSettings for the CLI)
            self.lora = None  # type: ignore[assignment]
        if (
            self.reference == "auto"
        ):  # LoRA needs no second copy of the weights: its reference is the policy, adapters off
            self.reference = "adapter" if self.lora is not None and self.reference_model is None else "copy"
        if self.model is None and self.model_config is None:
            raise ValueError("PolicyConfig needs `model` (hub id or folder) or `model_config` (random init)")
        if self.gguf_file is not None and (self.model is None or is_gguf(self.model) or not is_gguf(self.gguf_file)):
            raise ValueError(
                f"policy.gguf_file {self.gguf_file!r} with policy.model {self.model!r}: gguf_file names a .gguf file "
                "inside the `model` folder (e.g. model: models/smollm2, gguf_file: model.Q4_1.gguf); or drop "
                "gguf_file and set model to the .gguf path"
            )
        if self.reference == "adapter" and self.lora is None:
            raise ValueError("reference: adapter needs `lora` settings (the reference is the policy without adapters)")
        if self.logits_chunk_size < 1:
            raise ValueError(f"logits_chunk_size must be >= 1, got {self.logits_chunk_size}")
        if self.length_groups < 1:
            raise ValueError(f"length_groups must be >= 1 (1 turns grouping off), got {self.length_groups}")
        compile_options(self.compile)  # a bad key or value stops here, named

    @property
    def model_source(self) -> str | None:
        """What to load the model from: ``model``, or ``model/gguf_file``."""
        return model_source(self.model, self.gguf_file)

    @property
    def tokenizer_source(self) -> str:
        return default_tokenizer(self.tokenizer, self.model_source)


def default_tokenizer(tokenizer: str | None, model: str | None) -> str:
    """The tokenizer a policy uses: the one named, else the model's own, else (a model built from
    ``model_config``) the offline demo tokenizer."""
    return tokenizer or model or DEMO_TOKENIZER


def absolute_if_local(source: str | None) -> str | None:
    """``source`` as an absolute path when it names an existing local folder or file, else unchanged
    (a hub id, or None)."""
    if source is not None and os.path.exists(source):
        return os.path.abspath(source)
    return source


def check_vocab_fits(model: nn.Module, tokenizer: Any, config: PolicyConfig) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding rows.

    Any tokenizer with more tokens than rows is refused (its ids would index past the table). A
    tokenizer named apart from a pretrained model must also cover 90% of the rows (models pad their
    tables a little, not by half): e.g. a 640-token tokenizer on a 4,000-row model is a mistake. A
    model built from ``model_config`` may pad its table freely (``vocab_size``).
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        return
    size = len(tokenizer)
    named_apart = config.model is not None and config.tokenizer not in (None, config.model, config.model_source)
    if size > rows or (named_apart and size < 0.9 * rows):
        model_name = config.model_source or "the model built from policy.model_config"
        raise ValueError(
            f"policy.tokenizer {config.tokenizer_source!r} has {size} tokens but {model_name} has {rows} embedding "
            "rows: the tokenizer does not belong to this model. Drop policy.tokenizer (null: the model's own "
            "tokenizer) or name the tokenizer the model was trained with"
        )


def check_logit_transform(model: nn.Module) -> None:
    """Refuse models that rescale their logits after the output projection (e.g. Granite's
    ``logits_scaling``, Cohere's ``logit_scale``): the chunked log-probs apply only Gemma-style
    ``final_logit_softcapping``, and would silently differ from the model's own forward."""
    config = getattr(model, "config", None)
    for name in ("logits_scaling", "logit_scale"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} rescales its logits ({name}={value}); ulma-lightning's response log-probs do "
                "not support that yet. Please open an issue naming the model."
            )


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout probability in ``model`` (modules and attention-dropout attributes)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in the backward (non-reentrant), and stop caching keys."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def checkpointing_on(model: nn.Module) -> bool:
    """Whether ``model`` recomputes its blocks in the backward (transformers 5 renamed the flag)."""
    name = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    return bool(getattr(model, name, False))


class PretrainedModel(nn.Module):
    """A Hugging Face model built from a :class:`PolicyConfig`, and its tokenizer: what
    :class:`Policy` (a causal LM: log-probs and a reference) and
    :class:`~ulma_lightning.modules.reward.RewardModel` (a scalar head: scores) share.

    The tokenizer is loaded at construction; the weights by :meth:`build` (called from the module's
    ``configure_model``, so that sharded strategies can wrap them). ``collective_forwards`` is set by
    sharded strategies (FSDP, FSDP2), under which every process must run every forward
    (:attr:`lockstep`).
    """

    #: the transformers Auto class that loads or builds the model, the extra keyword arguments it
    #: gets, and the peft task type of its adapters (each kind of model sets its own).
    auto_class: str = "AutoModelForCausalLM"
    model_kwargs: dict[str, Any] = {}
    lora_task_type: str = "CAUSAL_LM"

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer_source, trust_remote_code=config.trust_remote_code)
        self.model: nn.Module | None = None
        self.collective_forwards = False

    # ---------------------------------------------------------------- building
    def hf_config(self, source: str | None) -> Any:
        """The transformers config of ``source`` (a hub id, folder or .gguf file), or of ``model_config`` if None."""
        from transformers import AutoConfig

        cfg = self.config
        if is_gguf(source):
            return load_gguf_config(source, trust_remote_code=cfg.trust_remote_code, **self.model_kwargs)  # type: ignore[arg-type]
        if source is not None:
            return AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **self.model_kwargs)
        options = dict(cfg.model_config or {})
        model_type = options.pop("model_type", None)
        if model_type is None:
            raise ValueError("model_config needs a `model_type` (e.g. llama, qwen2, gpt2)")
        tok = self.tokenizer
        options.setdefault("vocab_size", len(tok))
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            if getattr(tok, name, None) is not None:
                options.setdefault(name, getattr(tok, name))
        return AutoConfig.for_model(model_type, **options, **self.model_kwargs)

    def _load(self, source: str | None, *, empty: bool = False) -> nn.Module:
        import transformers

        source = absolute_if_local(
            source
        )  # the model's name_or_path, and so an exported adapter's base, holds from any folder

        auto_class = getattr(transformers, self.auto_class)
        cfg = self.config
        kwargs: dict[str, Any] = {"dtype": TORCH_DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        if empty:
            with torch.device("meta"):
                return auto_class.from_config(self.hf_config(source), **kwargs)
        if is_gguf(source):  # dequantised to a plain float model
            return load_gguf_model(auto_class, source, **kwargs, **self.model_kwargs)  # type: ignore[arg-type]
        if source is not None:
            return auto_class.from_pretrained(source, **kwargs, **self.model_kwargs)
        model_config = self.hf_config(None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            return auto_class.from_config(model_config, **kwargs)

    def build(self, *, empty: bool = False) -> None:
        """Load or initialise the weights; idempotent.

        With ``empty``, build the architecture (and adapters) on the meta device without loading or
        initialising weights: a skeleton to load a checkpoint into.
        """
        if self.model is not None:
            return
        cfg = self.config
        if empty:
            model = self._load(cfg.model_source, empty=True)
            if cfg.lora is not None:
                with torch.device("meta"):
                    model = self._wrap_lora(model, cfg.lora, self.lora_task_type)
            self.model = model
            return
        model = self._load(cfg.model_source)
        # from_pretrained returns eval mode: no dropout, and transformers skips gradient checkpointing outside
        # training mode
        model.train()
        check_logit_transform(model)
        check_vocab_fits(model, self.tokenizer, cfg)
        if cfg.dtype != "float32" and cfg.lora is None:
            log.warning(
                "policy.dtype %s without LoRA trains %s master weights: small AdamW updates round to zero. For mixed "
                "precision keep dtype float32 and set trainer.precision: bf16-mixed",
                cfg.dtype,
                cfg.dtype,
            )
        self.before_wrapping(model)
        if cfg.lora is not None:
            model = self._wrap_lora(model, cfg.lora, self.lora_task_type)
        if cfg.disable_dropout:  # after wrapping, so that the adapters' own dropout goes too
            disable_dropout(model)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.model = model
        options = compile_options(cfg.compile)
        if options is not None:  # in place: the state-dict keys stay the eager ones
            for built in self.compiled_models():
                compile_blocks(built, options)

    def compiled_models(self) -> list[nn.Module]:
        """The models that ``policy.compile`` compiles (the policy adds its reference copy)."""
        return [self.model] if self.model is not None else []

    def before_wrapping(self, model: nn.Module) -> None:
        """Called by :meth:`build` with the loaded model before adapters, dropout and checkpointing
        change it (the policy copies its reference here)."""

    @staticmethod
    def _wrap_lora(model: nn.Module, lora: LoraSettings, task_type: str = "CAUSAL_LM") -> nn.Module:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("LoRA needs peft: pip install 'ulma-lightning[peft]'") from exc
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type=task_type,
        )
        with peft_wrapping():  # peft reads transformers' deprecated is_gradient_checkpointing
            return get_peft_model(model, config)

    @property
    def lockstep(self) -> bool:
        """Whether every process must run the same forwards: a sharded model (FSDP, FSDP2) on more
        than one process, whose every forward all-gathers weights."""
        dist = torch.distributed
        return self.collective_forwards and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Plain forward of the model (logits), e.g. for generation-free inspection."""
        assert self.model is not None
        return self.model(*args, **kwargs)


class Policy(PretrainedModel):
    """A causal LM to train, its tokenizer and its reference; per-sequence and per-token log-probs.

    ``reference_forward_samples`` counts the samples the reference model has run on, which tests use
    to prove that ULMA skips it on positives. Under :attr:`lockstep` a process with no row for a
    forward runs it on one row and discards the result (:meth:`idle_forward`).
    """

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__(config)
        self.reference_model: nn.Module | None = None
        self.reference_forward_samples = 0
        self._records: list[tuple[dict[str, Tensor], TokenLogps]] | None = None

    def before_wrapping(self, model: nn.Module) -> None:
        """The reference: a frozen copy of the loaded model (or ``reference_model``'s weights) in the
        ``copy`` and ``precomputed`` modes."""
        cfg = self.config
        if cfg.reference in ("copy", "precomputed"):
            reference = copy.deepcopy(model) if cfg.reference_model is None else self._load(cfg.reference_model)
            if cfg.disable_dropout:
                disable_dropout(reference)
            reference.requires_grad_(False).eval()
            self.reference_model = reference

    def compiled_models(self) -> list[nn.Module]:
        return [m for m in (self.model, self.reference_model) if m is not None]

    # ---------------------------------------------------------------- log-probs
    def token_logps(self, batch: dict[str, Tensor], *, reference: bool = False) -> TokenLogps:
        """Per-token response log-probs of the policy (or, without gradients, of the reference)."""
        if self.model is None:
            raise RuntimeError("Policy.build() has not run: call it (or the module's configure_model) first")
        args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        groups = 1 if self.collective_forwards else self.config.length_groups  # the same calls on every process
        options = {"chunk_size": self.config.logits_chunk_size, "length_groups_max": groups}
        if not reference:
            tokens = response_token_logps(self.model, *args, **options)
            if self._records is not None:
                self._records.append((batch, tokens))
            return tokens
        mode = self.config.reference
        self.reference_forward_samples += batch["input_ids"].shape[0]
        with torch.no_grad():
            if mode == "adapter":
                with self.model.disable_adapter():
                    return response_token_logps(self.model, *args, **options)
            if self.reference_model is None:
                raise RuntimeError(f"reference mode {mode!r} has no reference model to run")
            return response_token_logps(self.reference_model, *args, **options)

    @contextmanager
    def recording(self) -> Iterator[list[tuple[dict[str, Tensor], TokenLogps]]]:
        """Collect ``(batch, token log-probs)`` of every policy forward inside the block, so that
        metrics such as perplexity reuse them instead of running the model again."""
        previous, self._records = self._records, []
        try:
            yield self._records
        finally:
            self._records = previous

    def logps(self, batch: dict[str, Tensor], *, average: bool) -> Tensor:
        """Policy ``log pi(y|x)`` per row, shape ``(B,)``."""
        return self.token_logps(batch).per_sequence(average)

    def reference_model_logps(self, batch: dict[str, Tensor], *, average: bool) -> Tensor:
        """Reference ``log pi_ref(y|x)`` per row from the reference model itself (never from a batch's
        precomputed columns), shape ``(B,)``, no gradient: what every module's
        ``reference_columns`` stores in ``precomputed`` mode, and what a live reference returns."""
        return self.token_logps(batch, reference=True).per_sequence(average)

    def reference_logps(self, batch: dict[str, Tensor], *, average: bool, rows: Tensor | None = None) -> Tensor:
        """Reference ``log pi_ref(y|x)`` per row, shape ``(B,)``, float32, no gradient.

        With ``rows`` (a boolean mask), the reference runs on those rows only and the others are NaN.
        In ``precomputed`` mode the values come from ``batch["reference_logps"]``; a batch without them
        (a split that was not precomputed, e.g. ``ulma test``) runs the reference model while it is loaded.
        """
        size = batch["input_ids"].shape[0]
        if self.config.reference == "none":
            raise RuntimeError("this objective needs reference log-probs, but policy.reference is 'none'")
        if self.config.reference == "precomputed" and "reference_logps" not in batch and self.reference_model is None:
            raise RuntimeError(
                "reference: precomputed, but the batch carries no reference_logps and the reference model was "
                "freed after precomputing (only the train and val splits are precomputed, at fit start); "
                "evaluate other splits in a fresh run (`ulma test --ckpt_path ...`), which rebuilds the reference"
            )
        if self.config.reference == "precomputed" and "reference_logps" in batch:
            values = batch["reference_logps"].to(torch.float32)
            return values if rows is None else torch.where(rows, values, torch.full_like(values, float("nan")))
        if rows is None:
            return self.reference_model_logps(batch, average=average)
        out = torch.full((size,), float("nan"), device=batch["input_ids"].device)
        if bool(rows.any()):
            out[rows] = self.reference_model_logps(select_rows(batch, rows), average=average)
        else:
            self.idle_forward(batch, reference=True)
        return out

    def idle_forward(self, batch: dict[str, Tensor], *, reference: bool = False) -> None:
        """Under :attr:`lockstep`, the forward that this process skips for lack of rows (and the
        others may run): on the first row of ``batch``, without gradient, result discarded. Nothing
        otherwise."""
        if not self.lockstep:
            return
        first = torch.zeros(batch["input_ids"].shape[0], dtype=torch.bool, device=batch["input_ids"].device)
        first[0] = True
        records, self._records = self._records, None
        try:
            with torch.no_grad():
                self.token_logps(select_rows(batch, first), reference=reference)
        finally:
            self._records = records
        if reference:
            self.reference_forward_samples -= 1


def select_rows(batch: dict[str, Any], rows: Tensor) -> dict[str, Tensor]:
    """The sub-batch of a right-padded batch at ``rows`` (a boolean mask or row indices): every tensor
    with one entry per row, its sequences trimmed to the longest one kept. The one row selector of
    the package (the modules' sub-batches, rollouts' chunks, KTO's mismatched pairs)."""
    size = batch["input_ids"].shape[0]
    sub = {k: v[rows] for k, v in batch.items() if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size}
    length = int(sub["attention_mask"].sum(dim=1).max())
    for key in ("input_ids", "attention_mask", "labels"):
        if key in sub:
            sub[key] = sub[key][:, :length]
    return sub
