"""Response log-probabilities without materialising (batch x seq x vocab) logits.

The backbone runs over the batch once; the vocabulary projection runs only on hidden states at
response positions (where the shifted label is not ``IGNORE_INDEX``), ``chunk_size`` tokens at a time.

* The projection of an ``nn.Linear`` head is one autograd function (:class:`ChunkedTokenLogps`):
  the forward keeps each token's log-sum-exp (4 bytes per token) and the first chunk's softmax;
  the backward uses that softmax and recomputes the other chunks' logits once, turning them in
  place into the logits' gradient (``onehot - softmax``, scaled by the incoming gradient) before
  the two gradient matmuls. A batch whose response tokens fit in one chunk needs no recompute. Peak memory is about one
  ``chunk_size x vocab`` float32 buffer whatever the batch or sequence length (chunks shrink so that
  one holds at most ``MAX_CHUNK_LOGITS`` logits, for large vocabularies). Under autocast the
  matmuls run in the autocast dtype and only the current chunk is upcast to float32.
* Other heads (e.g. a LoRA-wrapped or sharded head) take the generic path: each chunk through the
  module, with activation checkpointing.
* ``length_groups_max``: a right-padded batch whose rows differ in length is split into up to this many
  groups of rows of similar length, each trimmed to its longest row, so the backbone computes on less
  padding. The per-token log-probs are the same (each row sees the same tokens at the same
  positions); only the padding work goes. Off for sharded models (FSDP, FSDP2): each call would
  gather the weights again, and the number of calls, which follows the batch's lengths, would differ
  between processes, whose collectives must match. (A parameter check cannot tell: inside a forward
  FSDP swaps in the gathered, ordinary tensors.) :class:`~ulma_lightning.policy.Policy` passes 1
  under any sharded strategy; a ``fully_shard`` root is detected here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
GROUP_OVERHEAD_TOKENS = 64  # a backbone call costs about this many padded tokens of work
MAX_CHUNK_LOGITS = 2**24  # a chunk holds at most this many logits (64 MB in float32)


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


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(decoder, head)`` of a causal LM: the backbone that yields the final hidden states (called as
    ``decoder(input_ids=..., attention_mask=...).last_hidden_state``) and the output projection to
    the vocabulary. A peft-wrapped model gives its base model's (LoRA layers stay inside them).
    Used here for the response-only log-probs, and by :class:`~ulma_lightning.PPOModule` to build
    its critic from the policy's backbone. Raises ``TypeError`` for a model that is not a causal LM.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if head is None or decoder is None:
        raise TypeError(f"{type(base).__name__} exposes no decoder/output embeddings; is it a causal LM?")
    return decoder, head


def _softcap(model: nn.Module) -> float | None:
    config = getattr(model, "config", None)
    return getattr(config, "final_logit_softcapping", None)


# --------------------------------------------------------------------------- vocabulary projection
def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _chunk_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None
) -> tuple[Tensor, Tensor | None]:
    """float32 (float64 for float64 inputs) logits of one chunk, capped if ``softcap``, and then
    ``tanh`` for the backward."""
    logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if not softcap:
        return logits, None
    tanh = torch.tanh(logits.div_(softcap))
    return tanh * softcap, tanh


def _chunk_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    softcap: float | None,
    keep_probs: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(target log-prob, log-sum-exp, softmax if ``keep_probs``) of one chunk, float32, in one
    ``chunk x vocab`` buffer."""
    z, _ = _chunk_logits(hidden, weight, bias, softcap)
    target = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    peak = z.amax(dim=-1, keepdim=True)
    e = z.sub_(peak).exp_()
    total = e.sum(dim=-1)
    lse = total.log().add_(peak.squeeze(-1))
    return target - lse, lse, (e.div_(total[:, None]) if keep_probs else None)


class ChunkedTokenLogps(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[targets]`` per row, ``chunk_size`` rows at a time.

    Saves the per-row log-sum-exp, and the softmax of the first chunk only (at most
    ``MAX_CHUNK_LOGITS`` floats, whatever the sequence length); the backward uses that softmax
    as is and recomputes the other chunks' logits once, writing ``g * (onehot - softmax)`` over them
    in place. Matmuls run in the compute dtype (the autocast dtype under autocast), the softmax in
    float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap):  # type: ignore[override]
        dtype = _compute_dtype(hidden.device, hidden.dtype)
        # keep the first chunk's softmax for the backward (not with a softcap: that needs tanh too)
        keep = softcap is None and any(getattr(ctx, "needs_input_grad", (False,))[:3])
        first_probs = None
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            values = hidden.new_empty(hidden.shape[0], dtype=torch.promote_types(dtype, torch.float32))
            lse = torch.empty_like(values)
            for start in range(0, h.shape[0], chunk_size):
                end = start + chunk_size
                values[start:end], lse[start:end], probs = _chunk_forward(
                    h[start:end], w, b, targets[start:end], softcap, keep and start == 0
                )
                first_probs = probs if start == 0 else first_probs
        ctx.save_for_backward(hidden, weight, bias, targets, lse, first_probs)
        ctx.chunk_size, ctx.softcap, ctx.dtype = chunk_size, softcap, dtype
        return values

    @staticmethod
    def backward(ctx, grad_values):  # type: ignore[override]
        hidden, weight, bias, targets, lse, first_probs = ctx.saved_tensors
        dtype, softcap = ctx.dtype, ctx.softcap
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            grad_h = torch.empty_like(hidden) if need_h else None
            acc = lse.dtype  # float32 sums of the per-chunk weight gradients (float64 for float64)
            grad_w = grad_b = None
            rows = torch.arange(min(ctx.chunk_size, h.shape[0]), device=h.device)
            for start in range(0, h.shape[0], ctx.chunk_size):
                end = min(start + ctx.chunk_size, h.shape[0])
                g = grad_values[start:end].to(lse.dtype)
                # d log p_t / d z = onehot(t) - softmax(z), times the incoming gradient
                if start == 0 and first_probs is not None:
                    tanh, grad_z = None, first_probs * -g[:, None]
                else:
                    z, tanh = _chunk_logits(h[start:end], w, b, softcap)
                    grad_z = z.sub_(lse[start:end, None]).exp_().mul_(-g[:, None])
                grad_z[rows[: end - start], targets[start:end]] += g
                if tanh is not None:
                    grad_z.mul_(1 - tanh * tanh)
                grad_z = grad_z.to(dtype)
                if grad_h is not None and grad_h.dtype == dtype:
                    torch.mm(grad_z, w, out=grad_h[start:end])
                elif grad_h is not None:
                    grad_h[start:end] = grad_z @ w
                if need_w:
                    if grad_w is None:
                        grad_w = (grad_z.t() @ h[start:end]).to(acc)
                    elif dtype == acc:
                        grad_w.addmm_(grad_z.t(), h[start:end])
                    else:
                        grad_w += grad_z.t() @ h[start:end]
                if need_b and bias is not None:
                    part = grad_z.sum(dim=0, dtype=acc)
                    grad_b = part if grad_b is None else grad_b.add_(part)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def _plain_linear(head: nn.Module, hidden: Tensor) -> bool:
    """An ``nn.Linear`` whose weight is an ordinary tensor (not sharded, not adapted)."""
    weight = getattr(head, "weight", None)
    return (
        type(head) is nn.Linear
        and isinstance(weight, Tensor)
        and type(weight) in (Tensor, nn.Parameter)
        and weight.dim() == 2
        and weight.shape[1] == hidden.shape[-1]
    )


def _module_chunk_logps(head: nn.Module, hidden: Tensor, targets: Tensor, softcap: float | None) -> Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return target_logits - torch.logsumexp(logits, dim=-1)


def projected_token_logps(
    head: nn.Module, hidden: Tensor, targets: Tensor, *, chunk_size: int = 1024, softcap: float | None = None
) -> Tensor:
    """``log p(targets)`` under ``head`` for ``(N, H)`` hidden states, float32 ``(N,)``, in chunks
    of ``chunk_size`` tokens (fewer where a chunk would exceed ``MAX_CHUNK_LOGITS`` logits)."""
    vocab = getattr(head, "out_features", None)
    if vocab:
        chunk_size = max(1, min(chunk_size, MAX_CHUNK_LOGITS // vocab))
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()
    if _plain_linear(head, hidden):
        if torch.is_grad_enabled():
            return ChunkedTokenLogps.apply(hidden, head.weight, head.bias, targets, chunk_size, softcap)
        with torch.no_grad():
            return ChunkedTokenLogps.forward(_NoCtx(), hidden, head.weight, head.bias, targets, chunk_size, softcap)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_module_chunk_logps, head, h, t, softcap, use_reentrant=False))
        else:
            pieces.append(_module_chunk_logps(head, h, t, softcap))
    return torch.cat(pieces)


class _NoCtx:
    """Stands in for autograd's ctx when the function's forward runs without gradients."""

    def save_for_backward(self, *tensors: object) -> None:
        pass


# --------------------------------------------------------------------------- backbone
def length_groups(lengths: list[int], max_groups: int, overhead: int = GROUP_OVERHEAD_TOKENS) -> list[list[int]]:
    """Split rows into at most ``max_groups`` groups of similar length, minimising padded tokens.

    Rows are sorted by length; a dynamic programme picks the cut points that minimise
    ``sum(rows_in_group * longest_in_group) + overhead * groups``. Returns row indices per group,
    longest group first.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    if max_groups <= 1 or n <= 1:
        return [order]
    if n > 128:  # large (evaluation) batches: equal-size groups, no search
        size = -(-n // max_groups)
        return [order[i : i + size] for i in range(0, n, size)]
    sizes = [lengths[i] for i in order]  # descending: a group [a, b) is padded to sizes[a]
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for k in range(1, max_groups + 1):
        for end in range(1, n + 1):
            for start in range(end):
                cost = best[k - 1][start] + (end - start) * sizes[start] + overhead
                if cost < best[k][end]:
                    best[k][end], cut[k][end] = cost, start
    k = min(range(1, max_groups + 1), key=lambda g: best[g][n])
    groups, end = [], n
    while k > 0:
        start = cut[k][end]
        groups.append(order[start:end])
        end, k = start, k - 1
    return groups[::-1]


def _right_padded(attention_mask: Tensor) -> bool:
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


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
    if (
        not torch.is_grad_enabled()
        and hasattr(model, "reshard")
        and not any(p.requires_grad for p in model.parameters())
    ):
        model.reshard()
    return out


def is_fsdp2(module: nn.Module | None) -> bool:
    """Whether FSDP2's ``fully_shard`` was applied to ``module`` itself."""
    if module is None:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def response_token_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
    length_groups_max: int = 1,
) -> TokenLogps:
    """Per-token log-probs of the labelled (response) tokens under a causal LM.

    Args:
        model: a Hugging Face causal LM (optionally peft-wrapped).
        input_ids, attention_mask: ``(B, T)``.
        labels: ``(B, T)``, ``IGNORE_INDEX`` where no loss is taken (prompt, padding). Label ``t``
            is predicted from position ``t - 1``, as in Hugging Face models.
        chunk_size: tokens per vocabulary-projection chunk.
        length_groups_max: run the backbone on up to this many groups of rows of similar length
            (right-padded batches only; 1 runs the whole batch at once). Pass 1 for a model with
            FSDP-wrapped blocks; a ``fully_shard`` root always runs as 1.
    """
    if is_fsdp2(model):
        length_groups_max = 1  # see the module docstring
        values, batch_index = _through_root(
            model, partial(_response_logps, model), input_ids, attention_mask, labels, chunk_size, length_groups_max
        )
    else:
        values, batch_index = _response_logps(model, input_ids, attention_mask, labels, chunk_size, length_groups_max)
    return TokenLogps(values=values, batch_index=batch_index, num_sequences=input_ids.shape[0])


def _response_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, chunk_size: int, length_groups_max: int
) -> tuple[Tensor, Tensor]:
    decoder, head = decoder_and_head(model)
    lengths = attention_mask.sum(dim=1)
    groups = [list(range(input_ids.shape[0]))]
    if length_groups_max > 1 and input_ids.shape[0] > 1 and _right_padded(attention_mask):
        groups = length_groups(lengths.tolist(), length_groups_max)
        if len(groups) == 1:
            groups = [sorted(groups[0])]
    hiddens, targets, rows = [], [], []
    # grouped: embed once, so the embedding's (vocab x hidden) gradient is built once, not per group
    embeds = decoder.get_input_embeddings()(input_ids) if len(groups) > 1 else None
    for group in groups:
        index = torch.as_tensor(group, device=input_ids.device)
        if embeds is not None:
            width = int(lengths[index].max())
            inputs = {"inputs_embeds": embeds[index, :width]}
            mask, lab = attention_mask[index, :width], labels[index, :width]
            if bool(mask.all()):
                mask = None  # no padding left: plain causal attention
        else:
            inputs, mask, lab = {"input_ids": input_ids}, attention_mask, labels
        hidden = decoder(**inputs, attention_mask=mask, use_cache=False).last_hidden_state
        shifted = lab[:, 1:]
        keep = shifted != IGNORE_INDEX
        hiddens.append(hidden[:, :-1][keep])
        targets.append(shifted[keep])
        rows.append(index[keep.nonzero(as_tuple=True)[0]])
    if len(groups) == 1:
        selected, selected_targets, batch_index = hiddens[0], targets[0], rows[0]
    else:
        batch_index = torch.cat(rows)
        order = torch.argsort(batch_index, stable=True)  # back to row-major order
        selected, selected_targets, batch_index = (
            torch.cat(hiddens)[order],
            torch.cat(targets)[order],
            batch_index[order],
        )
    values = projected_token_logps(head, selected, selected_targets, chunk_size=chunk_size, softcap=_softcap(model))
    return values, batch_index


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    average: bool = False,
    chunk_size: int = 1024,
    length_groups_max: int = 1,
) -> Tensor:
    """``log pi(y|x)`` of each row's response, summed or averaged per token, float32, shape ``(B,)``."""
    tokens = response_token_logps(
        model, input_ids, attention_mask, labels, chunk_size=chunk_size, length_groups_max=length_groups_max
    )
    return tokens.per_sequence(average)
