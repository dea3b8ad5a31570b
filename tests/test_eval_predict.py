"""``ulma predict`` on a tiny model (a subprocess, as users run it) writes one scored line per prompt,
with the checkpoint's greedy generations; ``ulma evaluate`` writes the whole report as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_LLAMA

from ulma_lightning import PointwiseDataModule, ULMAModule
from ulma_lightning.cli import main
from ulma_lightning.evaluation import GenerationConfig, generate_responses

pytestmark = pytest.mark.integration  # every test here builds a Trainer

REPO = Path(__file__).resolve().parents[1]
PAIRS = [
    ("How do I bake bread?", "Sure! To bake bread, mix flour, water, yeast and salt.", "No."),
    ("How do I build a bomb?", "I'm sorry, but I can't help with that.", "Sure! Get the powder and a pipe."),
    ("Can you tell me how to make tea?", "Sure! To make tea, boil fresh water.", "I won't help with that."),
    ("How do I steal a car?", "That is not something I can help with.", "Break the side window."),
    ("Please explain how to save money.", "Sure! Track your spending and set a budget.", "Hello!"),
]
MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Prompts (pairs: each record is two point-wise samples but one prompt), a config, a checkpoint."""
    root = tmp_path_factory.mktemp("predict")
    prompts = root / "prompts.jsonl"
    records = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    records.append(
        {
            "prompt": [{"role": "user", "content": "I want to plant tomatoes. Any tips?"}],
            "response": "Dig a hole.",
            "score": 1,
        }
    )
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                    "enable_model_summary": False, "default_root_dir": str(root)},
        "model": {"class_path": "ulma_lightning.ULMAModule",
                  "init_args": {"policy": {"model_config": TINY_LLAMA, "tokenizer": "builtin:demo"}}},
        "data": {"class_path": "ulma_lightning.PointwiseDataModule",
                 "init_args": {"train": "demo://binary?n=20", "test": str(prompts), "eval_batch_size": 4}},
        "evaluation": {"output": str(root / "out" / "predictions.jsonl"),
                       "generation": {"max_new_tokens": MAX_NEW_TOKENS},
                       "scorers": [{"class_path": "ulma_lightning.evaluation.DemoScorer"}]},
    }  # fmt: skip
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    # a checkpoint whose weights differ from the initial ones: two training steps through the CLI
    # (a CLI-made checkpoint stores plain hyperparameters, which `ulma predict --ckpt_path` reads back)
    argv, sys.argv = sys.argv, ["ulma"]
    try:
        fit_args = [
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.enable_progress_bar",
            "false",
        ]
        cli = main(["fit", "--config", str(root / "tiny.yaml"), *fit_args, "--data.init_args.batch_size", "10"])
    finally:
        sys.argv = argv
    cli.trainer.save_checkpoint(root / "model.ckpt")
    module = cli.model
    return {"root": root, "prompts": prompts, "records": records, "module": module}


def expected_responses(module: ULMAModule, prompts: Path) -> list[str]:
    """Greedy generations of the trained module, one prompt at a time (no padding at all)."""
    datamodule = PointwiseDataModule(predict=str(prompts))
    datamodule.setup("predict")
    dataset = datamodule.datasets["predict"]
    collate = datamodule.prompt_collator
    out = []
    for i in range(len(dataset)):
        batch = collate([dataset[i]])
        out += generate_responses(
            module.policy.model,
            module.tokenizer,
            batch["input_ids"],
            batch["attention_mask"],
            GenerationConfig(max_new_tokens=MAX_NEW_TOKENS),
        )
    return out


def test_ulma_predict_writes_one_scored_line_per_prompt(setup: dict) -> None:
    root = setup["root"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    args = ["predict", "--config", str(root / "tiny.yaml"), "--ckpt_path", str(root / "model.ckpt")]
    result = subprocess.run(
        [sys.executable, "-m", "ulma_lightning.cli", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    lines = (root / "out" / "predictions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    records = setup["records"]
    assert len(rows) == len(records)  # one line per prompt, though each pair is two samples
    assert [r["index"] for r in rows] == list(range(len(records)))
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in records]
    assert [r["reference_response"] for r in rows] == [r.get("chosen", r.get("response")) for r in records]
    assert [r["response"] for r in rows] == expected_responses(setup["module"], setup["prompts"])
    assert all(0.0 <= r["scores"]["demo"] <= 1.0 and 0.0 <= r["reference_scores"]["demo"] <= 1.0 for r in rows)
    summary = json.loads((root / "out" / "predictions.summary.json").read_text())["scores"]["demo"]
    assert summary["n"] == len(records)
    assert summary["mean"] == pytest.approx(sum(r["scores"]["demo"] for r in rows) / len(rows))


def test_ulma_evaluate_writes_a_json_report(
    setup: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = setup["root"]
    monkeypatch.setattr(sys, "argv", ["ulma"])
    output = root / "report.json"
    compare = root / "out" / "predictions.jsonl"  # from the test above, when it ran; else made here
    args = ["evaluate", "--config", str(root / "tiny.yaml"), "--ckpt_path", str(root / "model.ckpt"),
            "--output", str(output), "--evaluation.output", str(root / "eval" / "predictions.jsonl")]  # fmt: skip
    if compare.exists():
        args += ["--evaluation.compare_to", str(compare)]
    report = main(args)
    saved = json.loads(output.read_text())
    assert saved == json.loads(json.dumps(report))
    test = saved["test"]
    assert test["test/perplexity"] > 1.0 and 0.0 <= test["test/rewards/auc"] <= 1.0
    demo = saved["generation"]["demo"]
    assert demo["n"] == len(setup["records"]) and 0.0 <= demo["win_rate_vs_reference"] <= 1.0
    if compare.exists():  # the same checkpoint and greedy decoding: every comparison is a tie
        assert demo["win_rate_vs_other"] == 0.5 and demo["other_mean"] == pytest.approx(demo["mean"])
    printed = capsys.readouterr().out
    assert "test/perplexity" in printed and "generation/demo/win_rate_vs_reference" in printed


def test_predict_split_is_prompt_only_unless_the_module_asks_for_sequences(setup: dict) -> None:
    prompts = PointwiseDataModule(predict=str(setup["prompts"]), eval_batch_size=8)
    prompts.setup("predict")
    batch = next(iter(prompts.predict_dataloader()))
    assert "labels" not in batch and len(batch["prompt"]) == len(setup["records"])
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"][:, 0] == 0).any()  # left-padded

    sequences = PointwiseDataModule(
        predict=str(setup["prompts"]), eval_batch_size=16, predict_inputs="sequences"
    )  # a reward model's
    sequences.setup("predict")
    batch = next(iter(sequences.predict_dataloader()))
    assert "labels" in batch and batch["input_ids"].shape[0] == 2 * len(PAIRS) + 1  # every sample, both sides of pairs


def test_predict_with_the_pairwise_baselines(tmp_path: Path) -> None:
    """DPO generates in ``predict`` like every policy; the reward model scores the split's pairs."""
    from ulma_lightning import DPOModule, PairwiseDataModule, PolicyConfig, RewardModelModule
    from ulma_lightning.evaluation import DemoScorer, PredictionWriter

    def trainer(*callbacks):
        import lightning.pytorch as pl

        return pl.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=list(callbacks),
        )

    source = "demo://pairwise?split=test&n=5"
    writer = PredictionWriter(
        output=str(tmp_path / "dpo.jsonl"), generation=GenerationConfig(max_new_tokens=4), scorers=[DemoScorer()]
    )
    dpo = DPOModule(PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo"))
    trainer(writer).predict(
        dpo, datamodule=PairwiseDataModule(predict=source, eval_batch_size=3), return_predictions=False
    )
    rows = [json.loads(line) for line in (tmp_path / "dpo.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(isinstance(r["response"], str) and "demo" in r["scores"] for r in rows)

    reward = RewardModelModule(PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo", reference="none"))
    with pytest.raises(ValueError, match=r"RewardModelModule predicts on sequences.*predict_inputs='sequences'"):
        trainer().predict(
            reward, datamodule=PairwiseDataModule(predict=source, eval_batch_size=3)
        )  # what `ulma predict` links
    outputs = trainer().predict(
        reward, datamodule=PairwiseDataModule(predict=source, eval_batch_size=3, predict_inputs="sequences")
    )
    assert sum(len(o["chosen_rewards"]) for o in outputs) == 5
