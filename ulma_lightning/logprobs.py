"""Response log-probabilities without materialising (batch x seq x vocab) logits.

The backbone runs once over the whole sequence; the vocabulary projection runs only on hidden states
at response positions (where the shifted label is not ``IGNORE_INDEX``), in chunks of
``chunk_size`` tokens. Each chunk's log-sum-exp is taken in float32 and, when gradients are needed,
the chunk is recomputed in the backward pass (activation checkpointing), so peak memory is
``chunk_size x vocab`` floats whatever the batch or sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


@dataclass
class TokenLogps:
    """Log-probs of the response tokens of a batch, flattened.

    Attributes:
        values: ``(N,)`` log pi(y_t | x, y_<t) for every response token, in row-major order.
        batch_index: ``(N,)`` the row each token belongs to.
        num_sequences: ``B``.
    """

    values: Tensor
    batch_index: Tensor
    num_sequences: int

    def per_sequence(self, average: bool) -> Tensor:
        """Sum (or per-token mean) of the token log-probs of each row, shape ``(B,)``."""
        total = torch.zeros(self.num_sequences, dtype=self.values.dtype, device=self.values.device)
        total = total.index_add(0, self.batch_index, self.values)
        if not average:
            return total
        counts = torch.bincount(self.batch_index, minlength=self.num_sequences).clamp(min=1)
        return total / counts.to(total.dtype)


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The backbone that yields final hidden states and the output projection of a causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    head = base.get_output_embeddings()
    decoder = base.get_decoder()
    if head is None or decoder is None:
        raise TypeError(f"{type(base).__name__} exposes no decoder/output embeddings; is it a causal LM?")
    return decoder, head


def _softcap(model: nn.Module) -> float | None:
    config = getattr(model, "config", None)
    return getattr(config, "final_logit_softcapping", None)


def _chunk_token_logps(head: nn.Module, hidden: Tensor, targets: Tensor, softcap: float | None) -> Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return target_logits - torch.logsumexp(logits, dim=-1)


def _through_root(model: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` as ``model``'s forward, inside ``model.__call__``.

    For a model sharded with FSDP2 (``fully_shard``), the root's hooks then gather its parameters
    (embeddings, norm, ``lm_head``) before ``fn`` and reduce their gradients after the backward,
    although ``fn`` calls the decoder and the head directly. A frozen root is resharded after a
    no-grad call.
    """
    previous = model.__dict__.get("forward")
    model.forward = fn
    try:
        out = model(*args)
    finally:
        if previous is None:
            del model.forward
        else:
            model.forward = previous
    if not torch.is_grad_enabled() and hasattr(model, "reshard") and not any(p.requires_grad for p in model.parameters()):
        model.reshard()
    return out


def _is_fsdp2(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def response_token_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
) -> TokenLogps:
    """Per-token log-probs of the labelled (response) tokens under a causal LM.

    Args:
        model: a Hugging Face causal LM (optionally peft-wrapped).
        input_ids, attention_mask: ``(B, T)``.
        labels: ``(B, T)``, ``IGNORE_INDEX`` where no loss is taken (prompt, padding). Label ``t``
            is predicted from position ``t - 1``, as in Hugging Face models.
        chunk_size: tokens per vocabulary-projection chunk.
    """
    if _is_fsdp2(model):
        values, batch_index = _through_root(model, partial(_response_logps, model), input_ids, attention_mask, labels, chunk_size)
    else:
        values, batch_index = _response_logps(model, input_ids, attention_mask, labels, chunk_size)
    return TokenLogps(values=values, batch_index=batch_index, num_sequences=input_ids.shape[0])


def _response_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    decoder, head = _decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    selected = hidden[:, :-1][mask]
    selected_targets = targets[mask]
    batch_index = mask.nonzero(as_tuple=True)[0]
    softcap = _softcap(model)
    pieces = []
    for start in range(0, selected.shape[0], chunk_size):
        h = selected[start : start + chunk_size]
        t = selected_targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_token_logps, head, h, t, softcap, use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(head, h, t, softcap))
    values = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    return values, batch_index


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    average: bool = False,
    chunk_size: int = 1024,
) -> Tensor:
    """``log pi(y|x)`` of each row's response, summed or averaged per token, float32, shape ``(B,)``."""
    tokens = response_token_logps(model, input_ids, attention_mask, labels, chunk_size=chunk_size)
    return tokens.per_sequence(average)
