"""PPOModule and RLOOModule: rollouts, masking, reference modes, metrics, bad input, refusals (PPO under FSDP2)."""

from __future__ import annotations

import logging
import os

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY_LLAMA
from rl_helpers import GEN, LengthScorer, fit, policy, prompts

from ulma_lightning import PPOModule, PromptDataModule, RLOOModule
from ulma_lightning.evaluation.generation import GenerationConfig
from ulma_lightning.evaluation.scorers import Scorer
from ulma_lightning.logprobs import IGNORE_INDEX
from ulma_lightning.modules.base import OptimizerConfig


class BadScorer(Scorer):
    def __init__(self, mode: str) -> None:
        super().__init__("bad")
        self.mode = mode

    def score(self, prompts, responses):
        if self.mode == "nan":
            return [float("nan")] + [0.0] * (len(responses) - 1)
        return [0.0] * (len(responses) - 1)


@pytest.mark.integration
@pytest.mark.parametrize("cls,reference", [(PPOModule, "copy"), (RLOOModule, "adapter")])
def test_a_step_trains_and_logs_every_metric(cls, reference) -> None:
    pl.seed_everything(0)
    extra = {"ppo_epochs": 2, "mini_batch_size": 2} if cls is PPOModule else {"rloo_k": 2}
    module = cls(
        policy(reference, lora=reference == "adapter"),
        OptimizerConfig(lr=1e-2),
        scorer=LengthScorer(),
        generation=GEN,
        **extra,
    )
    data = prompts()
    module.configure_model()
    before = {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}
    trainer = fit(module, data)
    changed = [k for k, v in module.named_parameters() if v.requires_grad and not torch.equal(v, before[k])]
    assert changed, "no trainable weight moved"
    metrics = trainer.callback_metrics
    expected = [
        "reward",
        "reward_penalized",
        "kl",
        "entropy",
        "policy/clipfrac",
        "policy/approx_kl",
        "response_length",
        "no_eos_fraction",
    ]
    expected += ["generation/tokens_per_sec", "time/generate", "time/score", "time/reference", "time/update", "loss"]
    if cls is PPOModule:
        expected += ["value/loss", "value/explained_variance"]
        assert any(k.startswith("critic.") for k in changed)
        assert trainer.global_step == 2 * 2  # 2 epochs x 2 mini-batches of the 4 prompts
    for name in expected:
        assert f"train/{name}_step" in metrics, name
    assert "val/reward" in metrics and 0 <= float(metrics["train/no_eos_fraction_step"]) <= 1
    if reference == "adapter":
        assert module.policy.reference_model is None  # no second copy of the weights


def test_rollout_masks_hold_response_tokens_only(demo_tokenizer) -> None:
    """Prompt and padding tokens are outside the rollout's mask; log-probs match a plain forward."""
    pl.seed_everything(0)
    module = RLOOModule(
        policy(), scorer=LengthScorer(), generation=GenerationConfig(max_new_tokens=5, do_sample=True), rloo_k=2
    )
    module.configure_model()
    data = prompts(4, 4)
    data.setup("fit")
    batch = data.collator([data.datasets["train"][i] for i in range(3)])
    rollout = module.rollout(batch)
    seq = rollout.sequences
    assert rollout.mask.shape[0] == 6 and torch.equal(rollout.mask.sum(1), rollout.lengths)
    for row in range(6):
        labels = seq["labels"][row]
        prompt_len = int(batch["attention_mask"][row // 2].sum())
        assert bool((labels[:prompt_len] == IGNORE_INDEX).all())
        response = labels[labels != IGNORE_INDEX]
        assert len(response) == int(rollout.lengths[row]) <= 5
        with torch.no_grad():
            ids = seq["input_ids"][row : row + 1, : prompt_len + len(response)]
            logits = module.policy.model(input_ids=ids).logits[0, prompt_len - 1 : -1].float()
        expected = torch.log_softmax(logits, -1).gather(1, response[:, None]).squeeze(1)
        torch.testing.assert_close(rollout.logps[row, : len(response)], expected, atol=1e-5, rtol=1e-5)
        assert bool((rollout.logps[row, len(response) :] == 0).all())
    # the reference is the initial policy: zero KL before any update
    torch.testing.assert_close(rollout.reference_logps, rollout.logps)


@pytest.mark.integration
@pytest.mark.parametrize(
    "mode,message",
    [
        ("nan", r"scorer BadScorer \(name 'bad'\) returned nan for response 0"),
        ("count", r"scorer BadScorer \(name 'bad'\) returned 3 scores for 4"),
    ],
)
@pytest.mark.parametrize("cls", [RLOOModule, PPOModule])
def test_a_bad_scorer_stops_with_its_name(cls, mode, message) -> None:
    module = (
        RLOOModule(policy(), scorer=BadScorer(mode), generation=GEN, rloo_k=2)
        if cls is RLOOModule
        else PPOModule(policy(), scorer=BadScorer(mode), generation=GEN, samples_per_prompt=2)
    )
    with pytest.raises(ValueError, match=message):
        fit(module, prompts(4, 2))


def test_missing_eos_penalty_and_reward_clip() -> None:
    module = RLOOModule(policy(), generation=GEN, missing_eos_penalty=1.0, reward_clip=0.5)
    rollout = type("R", (), {"scores": torch.tensor([0.2, 3.0, -0.1]), "has_eos": torch.tensor([True, True, False])})()
    torch.testing.assert_close(module.final_scores(rollout), torch.tensor([0.2, 0.5, -0.5]))


def test_reference_modes_and_options_are_checked() -> None:
    with pytest.raises(ValueError, match="cannot be precomputed"):
        PPOModule(policy("precomputed"))
    with pytest.raises(ValueError, match="rloo_k must be >= 2"):
        RLOOModule(policy(), rloo_k=1)
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOModule(policy(), kl_estimator="k2")  # type: ignore[arg-type]


@pytest.mark.integration
def test_ppo_under_fsdp2_is_refused_with_what_to_use() -> None:
    """PPO's critic is not sharded: under FSDP2 its gradients would not be synchronised."""
    from ulma_lightning.sharding import FSDP2Strategy

    environ = dict(
        os.environ
    )  # the strategy sets MASTER_PORT, WORLD_SIZE...: later DDP subprocesses must not inherit them
    module = PPOModule(policy(), generation=GEN)
    try:
        message = (
            r"PPOModule does not run under FSDP2Strategy .*critic.*Use DDP \(--config configs/strategy/ddp.yaml\)"
            r".*RLOOModule, GRPOModule and OnlineULMAModule run under FSDP2"
        )
        with pytest.raises(NotImplementedError, match=message):
            fit(module, prompts(4, 2), strategy=FSDP2Strategy(), accelerator="cpu", devices=1, precision="32-true")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


def test_prompt_data_ignores_responses_and_says_so_once(caplog) -> None:
    data = PromptDataModule(train="demo://pairwise?n=6", max_length=64, batch_size=3)
    with caplog.at_level(logging.INFO, logger="ulma_lightning.data.prompt_data"):
        data.setup("fit")
    said = [r for r in caplog.records if "ignored for training" in r.getMessage()]
    assert len(said) == 1
    batch = data.collator([data.datasets["train"][i] for i in range(3)])
    assert set(batch) >= {"input_ids", "attention_mask", "prompt", "reference_response"}
    assert bool((batch["attention_mask"][:, -1] == 1).all())  # left-padded: every prompt ends at the right edge
    assert len(data.datasets["train"]) == 6 and all(isinstance(r, str) for r in batch["reference_response"])


def test_a_reward_model_with_another_tokenizer_reads_the_text(tmp_path) -> None:
    """The reward model gets the responses re-tokenized by its own tokenizer, never the policy's ids."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ulma_lightning.evaluation.scorers import HFClassifierScorer
    from ulma_lightning.tokenizers import build_demo_tokenizer

    reward_tokenizer = build_demo_tokenizer(vocab_size=320)  # another vocabulary than the policy's 640
    options = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    config = AutoConfig.for_model(
        "llama", **options, vocab_size=len(reward_tokenizer), num_labels=1, pad_token_id=reward_tokenizer.pad_token_id
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    reward_tokenizer.save_pretrained(tmp_path)
    scorer = HFClassifierScorer(str(tmp_path))
    seen: list[torch.Tensor] = []
    scorer._load()
    scorer._model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)

    pl.seed_everything(0)
    module = RLOOModule(policy(), scorer=scorer, generation=GEN, rloo_k=2)
    module.configure_model()
    data = prompts(4, 4)
    data.setup("fit")
    gen = module.generate_and_score(data.collator([data.datasets["train"][i] for i in range(2)]), GEN, 2)
    assert torch.isfinite(gen.scores).all() and len(gen.scores) == 4
    fed = [row for batch in seen for row in batch]
    assert len(fed) == 4 and max(int(row.max()) for row in fed) < len(reward_tokenizer)
    for ids, response in zip(fed, gen.responses):
        assert reward_tokenizer.decode(ids, skip_special_tokens=True).endswith(response)


def test_prompt_files_with_responses_are_accepted_and_said_once(tmp_path, caplog) -> None:
    """Point-wise records (train) and HH transcripts (val) are read as prompts: the responses are not in
    the batch (prompt ids only, each ending where the response begins), and the log says so once."""
    import json

    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text(
        "".join(
            json.dumps({"prompt": f"How do I fold shirt {i}?", "response": f"ZEBRA answer {i}", "score": i % 2}) + "\n"
            for i in range(4)
        )
    )
    val.write_text(
        "".join(
            json.dumps(
                {
                    "chosen": f"\n\nHuman: Tell me a fact {i}.\n\nAssistant: QUOKKA fact {i}",
                    "rejected": f"\n\nHuman: Tell me a fact {i}.\n\nAssistant: no",
                }
            )
            + "\n"
            for i in range(2)
        )
    )
    data = PromptDataModule(train=str(train), val=str(val), max_length=64, batch_size=4)
    with caplog.at_level(logging.INFO, logger="ulma_lightning.data.prompt_data"):
        data.setup("fit")
    said = [r.getMessage() for r in caplog.records if "ignored for training" in r.getMessage()]
    assert len(said) == 1 and "train.jsonl" in said[0] and "response" in said[0]
    assert len(data.datasets["train"]) == 4 and len(data.datasets["val"]) == 2
    for split, word in (("train", "zebra"), ("val", "quokka")):
        batch = data.collator([data.datasets[split][i] for i in range(len(data.datasets[split]))])
        assert "labels" not in batch  # nothing to train on but the policy's own generations
        texts = data.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        assert all(("fold shirt" if split == "train" else "fact") in t for t in texts)  # the prompt is there
        assert all(word not in t.lower() for t in texts)  # the records' responses never reach the policy's input
        assert all(word in r.lower() for r in batch["reference_response"])  # kept as the reference answer


def test_rollouts_follow_the_run_seed(monkeypatch) -> None:
    """``seed_everything`` (``PL_GLOBAL_SEED``) enters the rollout sampler: the same seed repeats the samples,
    another seed draws others (3 seeds of a run are 3 runs)."""
    data = prompts(4, 4)
    data.setup("fit")
    batch = data.collator([data.datasets["train"][i] for i in range(4)])
    module = RLOOModule(policy(), generation=GenerationConfig(max_new_tokens=8, do_sample=True), rloo_k=2)
    module.configure_model()

    def responses(seed: str) -> list[str]:
        monkeypatch.setenv("PL_GLOBAL_SEED", seed)
        return module.rollout(batch).responses

    first = responses("0")
    assert responses("0") == first
    assert responses("1") != first
