"""Shared fixtures: tiny models built from configs, offline."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
#: the README's first config, and ``ulma fit`` options for a quiet short run of it on 24 demo samples
ULMA_CONFIG = str(REPO / "configs" / "ulma.yaml")
QUIET_FIT = [
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.num_sanity_val_steps", "0", "--data.init_args.train", "demo://binary?n=24",
]  # fmt: skip
HH_FILE = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def hh_file() -> Path:
    if not HH_FILE.exists():
        pytest.skip(f"real HH data not found at {HH_FILE} (it lives in ../shared beside the repository)")
    return HH_FILE


@pytest.fixture
def plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sys.argv`` as the ``ulma`` command sees it (no pytest options) for tests that call ``cli.main``."""
    monkeypatch.setattr(sys, "argv", ["ulma"])


@pytest.fixture(scope="session")
def dpo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.ckpt`` of ``ulma fit --config configs/dpo.yaml`` run for one step on a tiny model."""
    from helpers import fit_one_step

    root = tmp_path_factory.mktemp("dpo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["ulma"])
        fit_one_step("dpo", root)
    (ckpt,) = root.rglob("last.ckpt")
    return ckpt


# ----------------------------------------------------------------------------- policy and batches

DEMO_PAIRS = [
    ("How do I bake bread?", "mix flour, water, yeast and salt, knead the dough, let it rise, then bake it."),
    ("How do I steal a car?", "break the side window, pull the wires under the wheel, and drive away fast."),
    ("Can you tell me how to make tea?", "boil fresh water, pour it over the leaves."),
    ("How do I build a bomb?", "I'm sorry, but I can't help with that."),
    ("Please explain how to save money.", "I won't help with that, because it could hurt someone."),
    (
        "What is the best way to plant tomatoes?",
        "pick a sunny spot, dig a deep hole, set the plant in, and water it every day.",
    ),
]


@pytest.fixture(scope="session")
def demo_tokenizer():
    """The offline ``builtin:demo`` tokenizer (built once per session)."""
    from ulma_lightning.tokenizers import load_tokenizer

    return load_tokenizer("builtin:demo")


def make_pointwise_batch(tokenizer, scores: list[float], pairs: list[tuple[str, str]] | None = None) -> dict:
    """A right-padded point-wise batch (prompt masked, EOS appended) of ``len(scores)`` demo samples."""
    from ulma_lightning.data.collate import PaddingCollator
    from ulma_lightning.data.features import build_sequence

    pairs = pairs or DEMO_PAIRS
    items = []
    for index, score in enumerate(scores):
        prompt, response = pairs[index % len(pairs)]
        prompt_ids = tokenizer(f"\n\nHuman: {prompt}\n\nAssistant: ")["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids, labels = build_sequence(list(prompt_ids), response_ids)
        items.append({"input_ids": input_ids, "labels": labels, "score": float(score), "index": index})
    return PaddingCollator(tokenizer.pad_token_id)(items)


#: The quick subset (`python -m pytest -q -m quick tests`, about 30 s on 2 quiet cores, 95 s under heavy
#: load): the files that test pure functions and data handling (a few of their tests fit a tiny model
#: and are marked ``integration`` too). The other files train, run the CLI or start processes. A new
#: fast file belongs here.
QUICK_FILES = {
    "test_losses.py", "test_gradients.py", "test_logprobs.py", "test_rl_losses.py", "test_trl_oracle.py",
    "test_task.py", "test_demo.py", "test_data_records.py", "test_data_sources.py", "test_data_checks.py",
    "test_data_contract.py", "test_data_pairwise.py", "test_data_samplers.py", "test_data_formats.py",
    "test_data_features.py", "test_compare_claims.py", "test_compare_overview.py", "test_eval_metrics.py",
    "test_eval_winrate.py", "test_imports.py", "test_benchmark_report.py", "test_checks.py",
}  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests of :data:`QUICK_FILES` ``quick``."""
    for item in items:
        if item.path.name in QUICK_FILES:
            item.add_marker(pytest.mark.quick)


# ----------------------------------------------------------------------------- the integration marker

#: Lightning Trainers built in this process so far (see :func:`pytest_configure`)
TRAINERS_BUILT = [0]
TRAINERS_BEFORE = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    """Count the Trainers the tests build: a test that builds one (in its fixtures or its body) and is
    not marked ``integration`` fails, so ``-m "not integration"`` never trains. Tests that train in a
    child process (the ``ulma`` command, DDP) carry the marker too; this count cannot see them."""
    import lightning.pytorch as pl

    build = pl.Trainer.__init__

    @functools.wraps(build)
    def counted(self: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        TRAINERS_BUILT[0] += 1
        build(self, *args, **kwargs)

    pl.Trainer.__init__ = counted  # type: ignore[method-assign]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    item.stash[TRAINERS_BEFORE] = TRAINERS_BUILT[0]
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    result = yield
    if (
        TRAINERS_BUILT[0] > item.stash.get(TRAINERS_BEFORE, TRAINERS_BUILT[0])
        and item.get_closest_marker("integration") is None
    ):
        pytest.fail(
            f"{item.nodeid} builds a Lightning Trainer: mark it @pytest.mark.integration (or the file, pytestmark)",
            pytrace=False,
        )
    return result
