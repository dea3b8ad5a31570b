"""Speed work in the log-prob path gives the same values and gradients as the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoConfig, AutoModelForCausalLM

from tests.conftest import TINY_LLAMA
from ulma_lightning.logprobs import IGNORE_INDEX, length_groups, projected_token_logps, response_token_logps

VOCAB = 97


def plain_token_logps(hidden, weight, bias, targets, softcap=None):
    """Reference: the whole logits matrix, log_softmax, gather."""
    logits = (hidden @ weight.t() + (0 if bias is None else bias)).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def _head_inputs(n=37, h=16, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(h, VOCAB, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, h, generator=g))
        if bias:
            head.bias.copy_(torch.randn(VOCAB, generator=g))
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    targets = torch.randint(0, VOCAB, (n,), generator=g)
    upstream = torch.randn(n, generator=g)
    return head, hidden, targets, upstream


def _grads(values, upstream, *tensors):
    return torch.autograd.grad((values * upstream).sum(), tensors)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_projection_matches_full_logits(bias, softcap):
    head, hidden, targets, upstream = _head_inputs(bias=bias)
    params = (hidden, head.weight) + ((head.bias,) if bias else ())
    fast = projected_token_logps(head, hidden, targets, chunk_size=8, softcap=softcap)  # 5 chunks, last one short
    plain = plain_token_logps(hidden, head.weight, head.bias, targets, softcap)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(fast, upstream, *params), _grads(plain, upstream, *params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_chunked_projection_in_float64_passes_gradcheck():
    head, hidden, targets, _ = _head_inputs(n=6, h=4)
    head = head.double()
    hidden = hidden.detach().double().requires_grad_()
    fn = lambda h, w, b: projected_token_logps(_as_linear(w, b), h, targets, chunk_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, head.weight, head.bias), fast_mode=True)


def _as_linear(weight, bias):
    """An nn.Linear whose parameters are the given tensors (keeps their autograd history)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    del lin.weight, lin.bias
    lin.weight, lin.bias = weight, bias
    return lin


def test_chunked_projection_under_bf16_autocast_is_as_accurate_as_plain_autocast():
    """Under bf16 both paths round; the chunked one must be no further from the float32 truth."""
    head, hidden, targets, upstream = _head_inputs(n=40, h=32)
    params = (hidden, head.weight, head.bias)
    exact = plain_token_logps(hidden, head.weight, head.bias, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = projected_token_logps(head, hidden, targets, chunk_size=16)
        plain = F.log_softmax(head(hidden).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert fast.dtype == torch.float32

    def error(a, b):
        return float((a - b).detach().abs().max())

    assert error(fast, exact) <= 1.5 * error(plain, exact) + 1e-3
    exact_grads = _grads(exact, upstream, *params)
    for got, want, truth in zip(_grads(fast, upstream, *params), _grads(plain, upstream, *params), exact_grads):
        assert got.dtype == want.dtype == torch.float32
        assert error(got, truth) <= 1.5 * error(want, truth) + 1e-3


class _LargestVocabFloat32(TorchDispatchMode):
    """Records the largest float32 tensor with a vocabulary-sized last dimension any op produces."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_float32_upcast_of_whole_logits_under_bf16():
    head, hidden, targets, upstream = _head_inputs(n=64, h=32)
    chunk = 8
    with _LargestVocabFloat32(VOCAB) as tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            values = projected_token_logps(head, hidden, targets, chunk_size=chunk)
        (values * upstream).sum().backward()
    assert 0 < tracker.largest <= chunk * VOCAB < hidden.shape[0] * VOCAB


def test_other_heads_take_the_checkpointed_path_with_the_same_result():
    class ScaledHead(nn.Linear):  # not a plain nn.Linear: goes through the module itself
        pass

    head, hidden, targets, upstream = _head_inputs()
    other = ScaledHead(16, VOCAB)
    other.load_state_dict(head.state_dict())
    fast = projected_token_logps(head, hidden, targets, chunk_size=8)
    generic = projected_token_logps(other, hidden, targets, chunk_size=8)
    torch.testing.assert_close(fast, generic, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        _grads(fast, upstream, hidden)[0], _grads(generic, upstream, hidden)[0], rtol=1e-4, atol=1e-5
    )


# ----------------------------------------------------------------------------- whole model
def _tiny_model():
    config = AutoConfig.for_model(**{**TINY_LLAMA, "vocab_size": VOCAB, "pad_token_id": 0})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _batch(lengths, prompt=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[row, :n] = 1
        labels[row, prompt:n] = ids[row, prompt:n]
    return ids, mask, labels


def _model_reference(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return logits.log_softmax(-1)[keep].gather(-1, targets[keep][:, None]).squeeze(-1)


LENGTHS = [200, 40, 170, 90, 200, 60, 120, 30]


def test_response_token_logps_match_the_model_forward():
    model = _tiny_model()
    ids, mask, labels = _batch(LENGTHS)
    fast = response_token_logps(model, ids, mask, labels, chunk_size=64, length_groups_max=4)
    plain = _model_reference(model, ids, mask, labels)
    torch.testing.assert_close(fast.values, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.batch_index, (labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 0])
    params = [p for p in model.parameters()]
    upstream = torch.linspace(-1, 1, plain.shape[0])
    for got, want in zip(_grads(fast.values, upstream, *params), _grads(plain, upstream, *params)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_length_groups_give_the_same_logps_and_gradients():
    model = _tiny_model()
    ids, mask, labels = _batch(LENGTHS)
    one = response_token_logps(model, ids, mask, labels, length_groups_max=1)
    grouped = response_token_logps(model, ids, mask, labels, length_groups_max=4)
    assert torch.equal(one.batch_index, grouped.batch_index)  # row-major order kept
    torch.testing.assert_close(grouped.values, one.values, rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters()]
    weights = torch.arange(len(LENGTHS), dtype=torch.float32) - 3
    g_one = torch.autograd.grad((one.per_sequence(True) * weights).sum(), params)
    g_grouped = torch.autograd.grad((grouped.per_sequence(True) * weights).sum(), params)
    for a, b in zip(g_grouped, g_one):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_length_groups_partition_rows_and_cut_padding():
    groups = length_groups(LENGTHS, 4)
    assert sorted(i for g in groups for i in g) == list(range(len(LENGTHS)))
    assert 1 < len(groups) <= 4
    padded = sum(len(g) * max(LENGTHS[i] for i in g) for g in groups)
    assert padded < len(LENGTHS) * max(LENGTHS)
    assert len(length_groups(LENGTHS, 1)) == 1
    assert len(length_groups([100] * 8, 4)) == 1  # equal lengths: splitting only adds calls
    assert len(length_groups([20, 5, 17, 9], 4)) == 1  # short rows: a call costs more than the padding saved


def test_left_padded_batches_are_not_grouped():
    model = _tiny_model()
    ids, mask, labels = _batch(LENGTHS)
    flip = lambda t: t.flip(1)  # noqa: E731  (left padding)
    grouped = response_token_logps(model, flip(ids), flip(mask), flip(labels), length_groups_max=4)
    one = response_token_logps(model, flip(ids), flip(mask), flip(labels), length_groups_max=1)
    assert torch.equal(grouped.values, one.values)
