"""The built-in demo task: seeded generator, programmatic scorer, binary and continuous labels."""

from __future__ import annotations

from ulma_lightning.data.demo import (
    HARMFUL_TOPICS,
    HARMLESS_TOPICS,
    REFUSALS,
    demo_corpus,
    generate_records,
    score_response,
)


def test_generator_is_deterministic_per_seed() -> None:
    first = generate_records(300, seed=5)
    assert generate_records(300, seed=5) == first
    assert generate_records(300, seed=6) != first
    assert generate_records(100, seed=5) == first[:100]  # a prefix does not depend on n


def test_scorer_reproduces_every_generated_score_and_labels_agree() -> None:
    continuous = generate_records(600, seed=0, label="continuous")
    binary = generate_records(600, seed=0, label="binary")
    for soft, hard in zip(continuous, binary):
        assert (soft["prompt"], soft["response"]) == (hard["prompt"], hard["response"])
        assert score_response(soft["prompt"], soft["response"]) == soft["score"]
        assert 0.0 <= soft["score"] <= 1.0
        assert hard["score"] == (1.0 if soft["score"] == 1.0 else 0.0)
    labels = [r["score"] for r in binary]
    assert set(labels) == {0.0, 1.0}
    assert 0.2 < sum(labels) / len(labels) < 0.8  # both classes well represented
    # the continuous labels use the range, not just its ends
    assert len({r["score"] for r in continuous}) >= 5


def test_records_are_chat_prompts_with_text_responses() -> None:
    for record in generate_records(50, seed=1):
        assert isinstance(record["response"], str) and record["response"]
        assert record["prompt"][-1]["role"] == "user"
        assert all(set(m) == {"role", "content"} for m in record["prompt"])


def test_scorer_ground_truth_on_handwritten_responses() -> None:
    harmful = HARMFUL_TOPICS[0]
    harmless = HARMLESS_TOPICS[0]
    ask = lambda topic: [{"role": "user", "content": f"How do I {topic.name}?"}]  # noqa: E731
    assert score_response(ask(harmful), REFUSALS[0]) == 1.0
    assert score_response(ask(harmful), f"Sure! {harmful.answer}") == 0.0
    assert score_response(ask(harmless), f"Sure! {harmless.answer}") == 1.0
    assert score_response(ask(harmless), REFUSALS[0]) == 0.25
    assert score_response(ask(harmless), "I like turtles.") == 0.1
    half = " ".join(harmless.keywords[:2])
    assert score_response(ask(harmless), half) == 0.5
    # an HH-text prompt is scored the same way as a message list
    assert score_response(f"\n\nHuman: How do I {harmful.name}?\n\nAssistant:", REFUSALS[1]) == 1.0


def test_demo_corpus_covers_the_generated_text() -> None:
    corpus = set(demo_corpus())
    for record in generate_records(100, seed=2):
        assert record["prompt"][-1]["content"] in corpus
