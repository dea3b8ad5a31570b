"""Batched generation from left-padded prompts with a Hugging Face causal LM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ulma_lightning.compiling import eager
from ulma_lightning.tokenizers import pad_token_id


@dataclass
class GenerationConfig:
    """How responses are generated.

    Args:
        max_new_tokens: the most tokens generated per response (EOS ends a response earlier).
        do_sample: sample (True) or decode greedily (False, deterministic).
        temperature: softmax temperature when sampling.
        top_p: nucleus-sampling mass when sampling (1.0 keeps every token).
        top_k: keep the k most likely tokens when sampling (0 keeps all).
        repetition_penalty: Hugging Face's repetition penalty (1.0 is none).
        seed: seed of the sampler (sampling only), so sampled generations can be repeated.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.generate`` (sampling ones only when sampling)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


def can_generate(model: nn.Module | None) -> bool:
    """Whether ``model`` is a Hugging Face generative LM (a reward model is not)."""
    if model is None:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    check = getattr(base, "can_generate", None)
    return bool(callable(check) and check())


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    tokenizer: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    config: GenerationConfig,
    *,
    seed_offset: int = 0,
    synced: bool = False,
) -> Tensor:
    """The new token ids ``(B, N)`` generated after a batch of **left-padded** prompts (rows that end
    early are padded after their EOS).

    The model is put in eval mode for the call and restored afterwards; the KV cache is used. When
    sampling, the global RNG is seeded with ``config.seed + seed_offset`` (e.g. the batch index) for
    the call and restored afterwards. ``synced``: every process calls this together (a sharded
    model) and each keeps stepping until all have finished (transformers' ``synced_gpus``).
    """
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    pad = pad_token_id(tokenizer)
    generator_state = None
    if config.do_sample:
        generator_state = (
            torch.random.get_rng_state(),
            (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None),
        )
        torch.manual_seed(config.seed + seed_offset)
    try:
        with eager():  # compiled blocks (policy.compile) run eager: each decoding step has new shapes
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pad_token_id=pad,
                eos_token_id=eos,
                use_cache=True,
                synced_gpus=synced,
                **config.generate_kwargs(),
            )
    finally:
        if generator_state is not None:
            torch.random.set_rng_state(generator_state[0])
            if generator_state[1] is not None:
                torch.cuda.set_rng_state_all(generator_state[1])
        model.train(was_training)
    return output[:, input_ids.shape[1] :]


def decode_response(tokenizer: Any, ids: list[int]) -> str:
    """A generated response as text: cut at the first EOS, special tokens dropped, stripped."""
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_responses(
    model: nn.Module,
    tokenizer: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    config: GenerationConfig,
    *,
    seed_offset: int = 0,
    synced: bool = False,
) -> list[str]:
    """Decoded responses to a batch of **left-padded** prompts, cut at the first EOS (see :func:`generate_ids`)."""
    if input_ids.shape[0] == 0:
        return []
    new_tokens = generate_ids(
        model, tokenizer, input_ids, attention_mask, config, seed_offset=seed_offset, synced=synced
    )
    return [decode_response(tokenizer, ids) for ids in new_tokens.tolist()]


def empty_responses(responses: list[str]) -> int:
    """How many of ``responses`` are empty (nothing, or only whitespace, before EOS)."""
    return sum(1 for response in responses if not response.strip())


def empty_warning(where: str, empty: int, total: int) -> str:
    """The warning for ``empty`` of ``total`` responses being empty: ``312 of 312 responses are empty``."""
    return (
        f"{where}: {empty} of {total} responses are empty (the model generated EOS, or only whitespace, first): an "
        "untrained or collapsed model, or prompts in a format it was not trained on (check its chat template and the "
        "data's prompts)"
    )
