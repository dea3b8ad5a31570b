"""The README's own-model path, as a new user takes it: a local model folder, their own data.

The fit and evaluate commands are read from README.md (the fenced blocks after the
``own-model-fit`` and ``own-model-evaluate`` markers), so the README and this test cannot drift
apart. Placeholders replaced: the hub id by a local folder (a small Qwen2-style model and a byte-level
BPE tokenizer with a ChatML chat template, saved with ``save_pretrained``), the data files by small
HH-style files (a slice of the real HH file when it is present).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import HH_FILE, REPO

HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def readme_command(marker: str) -> str:
    """The shell command in the first ```bash block after ``<!-- marker: ...-->`` in README.md."""
    text = (REPO / "README.md").read_text()
    found = re.search(rf"<!-- {marker}:.*?-->\s*```bash\n(.*?)```", text, re.S)
    assert found, f"README.md has no ```bash block after the {marker} marker"
    return found.group(1).replace("\\\n", " ").strip()


def hh_records(n: int) -> list[dict]:
    """``n`` HH transcripts: the first of the real file (skipping empty final turns), else made up."""
    if HH_FILE.exists():
        with gzip.open(HH_FILE, "rt") as handle:
            records = [json.loads(line) for _, line in zip(range(3 * n), handle)]
        return [r for r in records if not r["chosen"].endswith("Assistant:") and not r["rejected"].endswith("Assistant:")][:n]
    return [
        {
            "chosen": f"\n\nHuman: How do I plant tree {i}?\n\nAssistant: Dig a hole and water it.",
            "rejected": f"\n\nHuman: How do I plant tree {i}?\n\nAssistant: No.",
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_local_model(folder: Path, texts: list[str]) -> None:
    """A tiny Qwen2-style model and its own byte-level BPE tokenizer with a ChatML chat template."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ulma_lightning.tokenizers import as_transformers_tokenizer, train_byte_level_bpe

    raw = train_byte_level_bpe(texts, vocab_size=400)
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer = as_transformers_tokenizer(raw)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A user's working folder: a local model folder and train/val files."""
    root = tmp_path_factory.mktemp("own")
    records = hh_records(48)
    make_local_model(root / "model", [r["chosen"] for r in records] + [r["rejected"] for r in records])
    return {
        "root": root,
        "model": root / "model",
        "train": write_jsonl(root / "train.jsonl", records[:40]),
        "val": write_jsonl(root / "val.jsonl", records[40:]),
    }


def run_ulma(command: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    assert argv[0] == "ulma", command
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    code = "import sys; from ulma_lightning.cli import run; sys.argv[0] = 'ulma'; run()"
    return subprocess.run([sys.executable, "-c", code, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_readme_own_model_fit_and_evaluate(own: dict[str, Path]) -> None:
    fit = readme_command("own-model-fit")
    for placeholder, value in {
        HUB_ID: own["model"],
        "configs/": f"{REPO}/configs/",
        "data/feedback.jsonl": own["train"],
        "data/feedback-val.jsonl": own["val"],
    }.items():
        assert placeholder in fit, placeholder
        fit = fit.replace(placeholder, str(value))
    done = run_ulma(fit + " --trainer.max_steps 2 --trainer.enable_progress_bar false", own["root"])
    assert done.returncode == 0, done.stderr[-3000:]
    run = own["root"] / "runs" / "ulma" / "version_0"

    # the exported model carries the model's own tokenizer and chat template, not the demo's
    from transformers import AutoTokenizer

    exported, original = AutoTokenizer.from_pretrained(run / "hf_model"), AutoTokenizer.from_pretrained(own["model"])
    assert len(exported) == len(original) and exported.get_vocab() == original.get_vocab()
    assert exported.chat_template == original.chat_template
    assert "GenerationSamples: scorer 'demo' (DemoScorer) skipped" in done.stderr

    evaluate = readme_command("own-model-evaluate")
    done = run_ulma(evaluate + " --trainer.limit_test_batches 1 --trainer.limit_predict_batches 1", own["root"])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((own["root"] / done.stdout.strip().splitlines()[-1].removeprefix("report written to ")).read_text())
    assert report["test"]["test/loss"] > 0 and report["num_predictions"] > 0
    assert report["generation"] == {}  # no scorer was chosen: the demo's is skipped on this data
    predictions = [json.loads(line) for line in (own["root"] / report["predictions"]).read_text().splitlines()]
    val_text = own["val"].read_text()
    assert predictions and all(json.dumps(p["reference_response"])[1:-1] in val_text for p in predictions)  # the user's val data
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["init_args"]["test"] is None  # nothing of the demo was configured for test


def test_failed_evaluate_leaves_no_version_folder(own: dict[str, Path], tmp_path: Path) -> None:
    config = {
        "trainer": {"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "x"}}},
        "model": {"class_path": "ulma_lightning.ULMAModule", "init_args": {"policy": {"model": str(own["model"])}}},
        "data": {"class_path": "ulma_lightning.PointwiseDataModule", "init_args": {"train": str(own["train"]), "val": str(own["val"])}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    done = run_ulma("ulma evaluate --ckpt_path bad.ckpt --skip_predict true", tmp_path)
    assert done.returncode != 0
    assert "using the run's saved config" in done.stdout
    assert not list(tmp_path.glob("runs/x/version_*"))


def test_a_tokenizer_that_does_not_fit_the_model_is_an_error(own: dict[str, Path]) -> None:
    from ulma_lightning.policy import Policy, PolicyConfig

    policy = Policy(PolicyConfig(model=str(own["model"]), tokenizer="builtin:demo"))
    rows = len(Policy(PolicyConfig(model=str(own["model"]))).tokenizer)
    with pytest.raises(ValueError, match=rf"'builtin:demo' has 640 tokens but .*model has {rows} embedding rows"):
        policy.build()
    assert Policy(PolicyConfig(model=str(own["model"]))).tokenizer.chat_template == CHATML  # default: the model's own


def test_null_on_the_command_line_is_null_and_print_config_shows_lora(own: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    from ulma_lightning.cli import main

    args = ["--model.init_args.policy.model", str(own["model"]), "--model.init_args.policy.model_config", "null"]
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "ulma.yaml"), *args, "--model.policy.tokenizer=null", "--print_config"])
    policy = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["policy"]
    assert policy["model_config"] is None and policy["tokenizer"] is None and policy["model"] == str(own["model"])
    assert {"r", "alpha", "dropout", "target_modules"} <= set(policy["lora"])  # LoRA's options are shown
