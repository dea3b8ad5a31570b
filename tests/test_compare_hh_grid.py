"""``experiments/paper-hh.yaml``, the comparison on the paper's real data for a GPU, run here with every
hub name replaced by a local stand-in of the same shape: a tiny Qwen2-style model folder with its own
tokenizer and chat template, HH transcripts {chosen, rejected} for harmless-base and golden HH,
red-team records {transcript, rating} for the continuous labels, and a tiny sequence-classification
reward model as the evaluation's scorer. Everything else in the file is used as shipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from helpers import hh_records, make_local_model, write_jsonl

from ulma_lightning.compare.runner import compare_main
from ulma_lightning.data import sources

REPO = Path(__file__).resolve().parents[1]
GRID_FILE = REPO / "experiments" / "paper-hh.yaml"


def golden(records: list[dict]) -> list[dict]:
    """The golden set's shape: the same prompts and rejected answers, the chosen answers rewritten."""
    out = []
    for record in records:
        prompt = record["chosen"].rsplit("\n\nAssistant:", 1)[0]
        out.append(
            {
                "chosen": prompt + "\n\nAssistant: I'm glad to help: here is a careful, safe answer.",
                "rejected": record["rejected"],
            }
        )
    return out


def red_team(records: list[dict]) -> list[dict]:
    """Red-team attempts' shape: one whole transcript and the red-teamer's 0-4 success rating."""
    return [
        {
            "transcript": r["rejected"] if i % 2 else r["chosen"],
            "rating": float(i % 5),
            "task_description": "t",
            "min_harmlessness_score_transcript": 0.0,
        }
        for i, r in enumerate(records)
    ]


def local_reward_model(folder: Path, tokenizer_folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1)
    Qwen2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Hub name (as the grid file writes it) -> a local folder or file of the same shape."""
    root = tmp_path_factory.mktemp("hh")
    records = hh_records(40)
    make_local_model(root / "model", [r["chosen"] for r in records] + [r["rejected"] for r in records])
    local_reward_model(root / "rm", root / "model")
    hh = {"train[:95%]": records[:24], "train[95%:]": records[24:32], "test": records[32:]}
    files: dict[str, str] = {
        "Qwen/Qwen2.5-0.5B": str(root / "model"),
        "OpenAssistant/reward-model-deberta-v3-large-v2": str(root / "rm"),
    }
    for split, part in hh.items():
        name = split.replace("[", "_").replace("]", "").replace(":", "").replace("%", "")
        files[f"hf://Anthropic/hh-rlhf?data_dir=harmless-base&split={split}"] = str(
            write_jsonl(root / f"hh_{name}.jsonl", part)
        )
        files[f"hf://Unified-Language-Model-Alignment/Anthropic_HH_Golden?split={split}"] = str(
            write_jsonl(root / f"golden_{name}.jsonl", golden(part))
        )
        files[f"hf://Anthropic/hh-rlhf?data_dir=red-team-attempts&split={split}"] = str(
            write_jsonl(root / f"red_{name}.jsonl", red_team(part))
        )
    return files


def local_grid(path: Path, files: dict[str, str], runs: list[str]) -> Path:
    """The shipped file with its hub names replaced, 2 steps a stage on the CPU, and the rows ``runs``."""
    text = GRID_FILE.read_text()
    for name, local in files.items():
        text = text.replace(name, local)
    assert "hf://" not in text.split("\ntune:")[0], "a hub source of the grid has no local stand-in"
    grid = yaml.safe_load(text)
    grid["seeds"] = [0]
    grid["overrides"].update(
        {
            "trainer.max_steps": 2,
            "trainer.accumulate_grad_batches": 1,
            "trainer.limit_val_batches": 1,
            "trainer.num_sanity_val_steps": 0,
            "trainer.accelerator": "cpu",
        }
    )
    grid["evaluation"].update({"max_prompts": 4, "generation": {"max_new_tokens": 8}, "kl_max_new_tokens": 8})
    grid["runs"] = [run for run in grid["runs"] if run["name"] in runs]
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


@pytest.mark.integration
def test_the_hub_grid_runs_on_local_stand_ins(stand_ins: dict[str, str], tmp_path: Path) -> None:
    runs = [
        "sft",
        "sft_dpo",
        "ulma",
        "ulma_continuous",
        "rlhf",
    ]  # sft: the baseline of the win rates (its stage is sft_dpo's first)
    path = local_grid(tmp_path / "paper-hh.yaml", stand_ins, runs)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        results = compare_main(["--config", str(path), "--output", str(tmp_path / "out")])
    finally:
        os.chdir(cwd)
    failed = {r["id"]: r.get("error") for r in results["runs"] if r["status"] != "ok"}
    assert not failed, failed
    ids = {r["id"] for r in results["runs"]}
    assert {"ulma/golden/seed0", "ulma_continuous/ordinary/seed0", "rlhf/ordinary/seed0"} <= ids
    assert "ulma_continuous/golden/seed0" not in ids  # continuous labels exist for the ordinary data only
    for run in results["runs"]:
        assert (
            0.0 <= run["metrics"]["win_vs_untrained"] <= 1.0 and run["metrics"]["score"] == run["metrics"]["score"]
        )  # scored, not NaN
    # the red-team rows read {transcript, rating} with the rating mapped lower-is-better through score_range
    stage = json.loads((tmp_path / "out/runs/ulma_continuous/ordinary/seed0/result.json").read_text())["stages"][0]
    data = yaml.safe_load(next(Path(stage["tensorboard"]).rglob("config.yaml")).read_text())["data"]["init_args"]
    assert (
        data["columns"] == {"score": "rating"}
        and data["score_range"] == [0, 4]
        and data["score_direction"] == "lower_is_better"
    )
    assert Path(data["train"]) == Path(stand_ins["hf://Anthropic/hh-rlhf?data_dir=red-team-attempts&split=train[:95%]"])


def test_hub_sources_pass_split_slices_to_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The grid's validation data is a slice of HH's train split (``split=train[95%:]``): passed on as written."""
    import datasets

    seen: dict = {}

    def load_dataset(repo, name=None, split=None, **kwargs):
        seen.update(repo=repo, name=name, split=split, **kwargs)
        return datasets.Dataset.from_list(
            [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: no"}]
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rows = list(sources._read_hub("hf://Anthropic/hh-rlhf?data_dir=harmless-base&split=train[95%:]", "train"))
    assert seen == {"repo": "Anthropic/hh-rlhf", "name": None, "split": "train[95%:]", "data_dir": "harmless-base"}
    assert len(rows) == 1
