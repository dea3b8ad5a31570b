"""Helpers shared by several test modules (a test module imports these, never another test module):
data files, a user's local model folder, the ``ulma`` command in a child process, one-step fits and
the tiny comparison grid. The RL tests' own helpers are in ``rl_helpers.py``."""

from __future__ import annotations

import gzip
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import HH_FILE, REPO, TINY_LLAMA

# ----------------------------------------------------------------------------- data files


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """``records`` as JSON lines at ``path`` (gzip-compressed when it ends in ``.gz``)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    return path


def hh_records(n: int) -> list[dict]:
    """``n`` HH transcripts: the first of the real file (skipping empty final turns), else made up."""
    if HH_FILE.exists():
        with gzip.open(HH_FILE, "rt") as handle:
            records = [json.loads(line) for _, line in zip(range(3 * n), handle)]
        return [
            r for r in records if not r["chosen"].endswith("Assistant:") and not r["rejected"].endswith("Assistant:")
        ][:n]
    return [
        {
            "chosen": f"\n\nHuman: How do I plant tree {i}?\n\nAssistant: Dig a hole and water it.",
            "rejected": f"\n\nHuman: How do I plant tree {i}?\n\nAssistant: No.",
        }
        for i in range(n)
    ]


# ----------------------------------------------------------------------------- a user's own model

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


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
        max_position_embeddings=1024,  # the README's own-model max_length (Qwen2.5-0.5B has 32768)
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)


# ----------------------------------------------------------------------------- the ulma command

#: ``python -c ULMA_CODE ARGS`` runs ``ulma ARGS`` as the console script does (its usage says ``ulma``)
ULMA_CODE = "import sys; from ulma_lightning.cli import run; sys.argv[0] = 'ulma'; run()"


def run_ulma(command: str | list[str], cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    """``ulma ...`` in a child process run from ``cwd``, offline, with this repository (and
    ``extra_path``) first on its path: ``command`` is a shell line starting with ``ulma`` or the
    argument list after it."""
    if isinstance(command, str):
        argv = shlex.split(command)
        assert argv[0] == "ulma", command
        command = argv[1:]
    paths = [str(REPO)] + ([str(extra_path)] if extra_path else []) + [os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-c", ULMA_CODE, *command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def run_cli(args: list[str], cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    """:func:`run_ulma`, which must succeed (else the test fails with the command's output)."""
    result = run_ulma(args, cwd, extra_path)
    assert result.returncode == 0, f"ulma {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


#: config -> the demo data its data module reads
METHODS = {
    "ulma": "binary",
    "pointwise_dpo": "binary",
    "sft": "demonstration",
    "dpo": "pairwise",
    "unlikelihood": "binary",
    "kto": "binary",
    "reward": "pairwise",
}


def fit_one_step(config: str, root: Path) -> object:
    """``ulma fit --config configs/<config>.yaml`` for one step on a tiny model, in this process."""
    from ulma_lightning.cli import main

    return main([
        "fit", "--config", str(REPO / "configs" / f"{config}.yaml"),
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        f"--model.init_args.policy.model_config={json.dumps(TINY_LLAMA)}",
        "--data.init_args.train", f"demo://{METHODS[config]}?n=8", "--data.init_args.test", "null",
        "--data.init_args.val_fraction", "0.5", "--data.init_args.batch_size", "4",
    ])  # fmt: skip


# ----------------------------------------------------------------------------- ulma compare

#: a grid of three tiny runs (one fails on purpose) on demo data
GRID = {
    "name": "tiny",
    "seeds": [0],
    "overrides": {
        "trainer.max_steps": 1,
        "trainer.limit_val_batches": 1,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "data.init_args.batch_size": 8,
    },
    "variants": {
        "ordinary": {
            "demonstration": "demo://demonstration?n=24",
            "pairwise": {"train": "demo://pairwise?n=24"},
            "binary": "demo://binary?n=24",
        }
    },
    "evaluation": {
        "prompts": "demo://demonstration?split=test&n=8",
        "golden": "demo://demonstration?split=test&n=8",
        "request_kind": "ulma_lightning.data.demo.request_kind",
        "generation": {"max_new_tokens": 6},
        "kl_max_new_tokens": 6,
        "batch_size": 8,
    },
    "runs": [
        {"name": "sft", "stages": [{"method": "sft", "data": "demonstration"}]},
        {
            "name": "sft_dpo",
            "label": "SFT then DPO",
            "stages": [{"method": "sft", "data": "demonstration"}, {"method": "dpo", "data": "pairwise"}],
        },
        {
            "name": "broken",
            "stages": [{"method": "ulma", "data": "binary", "overrides": {"model.init_args.beta": -1.0}}],
        },
    ],
}


def write_grid(folder: Path, grid: dict, name: str = "grid.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path
