"""Chunked response log-probs against the naive ``log_softmax(logits).gather()``, values and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ulma_lightning.logprobs import IGNORE_INDEX, decoder_and_head, response_token_logps, sequence_logps

VOCAB = 97
PAD = 0

CONFIGS = {
    "llama": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),  # tied input/output embeddings
    "qwen2": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
}
CHUNK_SIZES = [1, 3, 100_000]


def tiny_model(model_type: str) -> torch.nn.Module:
    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **CONFIGS[model_type]
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def make_batch(prompt_lengths: list[int], total_lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows of random tokens; labels are IGNORE_INDEX on the prompt and the padding."""
    generator = torch.Generator().manual_seed(seed)
    width = max(total_lengths)
    input_ids = torch.full((len(total_lengths), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (prompt, total) in enumerate(zip(prompt_lengths, total_lengths)):
        input_ids[row, :total] = torch.randint(3, VOCAB, (total,), generator=generator)
        attention_mask[row, :total] = 1
        labels[row, prompt:total] = input_ids[row, prompt:total]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# prompts of 3, 2, 5, 5 tokens; the last row is all prompt (no response token)
BATCH_SHAPE = ([3, 2, 5, 5], [9, 6, 12, 5])


def naive_token_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Full (B, T, V) float32 log-softmax, gathered at the labels; returns (per-token values, mask)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    logps = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


def naive_sequence_logps(model, batch, average: bool) -> torch.Tensor:
    values, mask = naive_token_logps(model, batch)
    total = values.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_chunked_equals_naive(model_type: str) -> None:
    model = tiny_model(model_type)
    batch = make_batch(*BATCH_SHAPE)
    with torch.no_grad():
        for average in (False, True):
            expected = naive_sequence_logps(model, batch, average)
            assert (expected[:3] < 0).all()
            for chunk in CHUNK_SIZES:
                got = sequence_logps(model, **batch, average=average, chunk_size=chunk)
                assert got.dtype == torch.float32 and got.shape == (4,)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
                assert got[3] == 0.0  # no response tokens


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_chunked_gradients_equal_naive(model_type: str) -> None:
    model = tiny_model(model_type)
    batch = make_batch(*BATCH_SHAPE, seed=1)
    weights = torch.tensor([0.7, -1.3, 0.4, 2.0])
    params = [p for p in model.parameters() if p.requires_grad]

    def objective(values_sum: torch.Tensor, values_mean: torch.Tensor) -> torch.Tensor:
        return (weights * values_sum).sum() + (weights * values_mean).sum()

    naive = objective(naive_sequence_logps(model, batch, False), naive_sequence_logps(model, batch, True))
    expected = torch.autograd.grad(naive, params)
    for chunk in (1, 3, 100_000):
        loss = objective(
            sequence_logps(model, **batch, average=False, chunk_size=chunk),
            sequence_logps(model, **batch, average=True, chunk_size=chunk),
        )
        torch.testing.assert_close(loss, naive, rtol=1e-5, atol=0)
        grads = torch.autograd.grad(loss, params)
        for (name, _), got, want in zip(model.named_parameters(), grads, expected):
            assert torch.isfinite(got).all(), name
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"{model_type} chunk {chunk}: {name}")
    assert any(float(g.abs().sum()) > 0 for g in expected)


def test_per_token_values_and_rows() -> None:
    model = tiny_model("llama")
    batch = make_batch(*BATCH_SHAPE, seed=2)
    with torch.no_grad():
        tokens = response_token_logps(model, **batch, chunk_size=3)
        values, mask = naive_token_logps(model, batch)
    assert tokens.num_sequences == 4
    assert tokens.values.shape == (int(mask.sum()),)
    assert tokens.batch_index.tolist() == [0] * 6 + [1] * 4 + [2] * 7
    torch.testing.assert_close(tokens.values, values[mask], rtol=1e-5, atol=0)


def test_rows_without_response_give_zero_and_no_nan() -> None:
    model = tiny_model("llama")
    batch = make_batch(*BATCH_SHAPE, seed=3)
    for average in (False, True):
        model.zero_grad()
        logps = sequence_logps(model, **batch, average=average, chunk_size=3)
        assert logps[3] == 0.0 and torch.isfinite(logps).all()
        logps.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # A batch where no row has a response token: all zeros, no error.
    empty = make_batch([4, 3], [4, 3])
    with torch.no_grad():
        out = sequence_logps(model, **empty, average=True, chunk_size=3)
    assert out.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("chunk", [1, 3])
def test_lm_head_sees_at_most_chunk_rows(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """No (B x T x V) logits: the vocabulary projection only ever runs on <= chunk response rows.

    Spies on both projection paths: the lm_head module (generic heads) and the chunked autograd
    function's logits (plain linear heads).
    """
    import ulma_lightning.logprobs as logprobs

    model = tiny_model("qwen2")
    batch = make_batch(*BATCH_SHAPE, seed=4)
    shapes: list[tuple[int, ...]] = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: shapes.append(tuple(args[0].shape))
    )
    chunk_logits = logprobs._chunk_logits

    def spy(hidden, *args, **kwargs):
        shapes.append(tuple(hidden.shape))
        return chunk_logits(hidden, *args, **kwargs)

    monkeypatch.setattr(logprobs, "_chunk_logits", spy)
    try:
        n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        with torch.no_grad():
            sequence_logps(model, **batch, chunk_size=chunk)
        assert all(len(s) == 2 and s[0] <= chunk for s in shapes), shapes
        assert sum(s[0] for s in shapes) == n_tokens
        shapes.clear()
        sequence_logps(model, **batch, chunk_size=chunk).sum().backward()  # recomputed chunk by chunk
        assert shapes and all(len(s) == 2 and s[0] <= chunk for s in shapes), shapes
    finally:
        handle.remove()
    # Sanity check of the spy: a plain forward of the model does project the whole (B, T, H).
    handle = model.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: shapes.append(tuple(args[0].shape))
    )
    try:
        shapes.clear()
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    assert shapes == [tuple(batch["input_ids"].shape) + (32,)]


def test_policy_uses_its_chunk_size(demo_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import TINY_LLAMA, make_pointwise_batch

    import ulma_lightning.logprobs as logprobs
    from ulma_lightning.policy import Policy, PolicyConfig

    chunk_logits = logprobs._chunk_logits
    rows: list[int] = []

    def spy(hidden, *args, **kwargs):
        rows.append(hidden.shape[0])
        return chunk_logits(hidden, *args, **kwargs)

    monkeypatch.setattr(logprobs, "_chunk_logits", spy)

    batch = make_pointwise_batch(demo_tokenizer, [1, 0, 1])
    results = []
    for chunk in (2, 4096):
        policy = Policy(
            PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo", reference="none", logits_chunk_size=chunk)
        )
        policy.build()
        rows.clear()
        policy.model.get_output_embeddings().register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
        with torch.no_grad():
            results.append(policy.logps(batch, average=True))
        assert rows and max(rows) <= chunk
        with torch.no_grad():
            naive = naive_sequence_logps(policy.model, batch, average=True)
        torch.testing.assert_close(results[-1], naive, rtol=1e-5, atol=0)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("lora", [False, True])
def test_decoder_and_head_give_the_logits(lora: bool) -> None:
    """``decoder_and_head`` (public: PPO builds its critic from the decoder): decoder then head is the
    model's own logits, for a plain and a LoRA-wrapped model; not a causal LM is a TypeError."""
    model = tiny_model("llama")
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    decoder, head = decoder_and_head(model)
    batch = make_batch([3], [8])
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(
        head(hidden), model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    )
    with pytest.raises(TypeError, match="causal LM"):
        decoder_and_head(torch.nn.Linear(2, 2))
