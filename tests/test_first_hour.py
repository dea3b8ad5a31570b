"""A new user's first hour with their own model (issue 27, items 8-9): the tokenizer they saved is the
one that trains and is exported; LoRA's reference is the policy with adapters off; an exported adapter
names its base by an absolute path.

Commands run through the CLI as the README writes them, on a tiny local Qwen2-style model with its own
ChatML tokenizer (made by ``tokenizers`` and saved with ``PreTrainedTokenizerFast.save_pretrained``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from helpers import hh_records, make_local_model, run_ulma, write_jsonl

from ulma_lightning.tokenizers import SAMPLE_TEXT, load_tokenizer

#: text whose BPE merges (blank lines, runs of digits) a Qwen2 pre-tokenizer splits differently
NUMBERS = [f"\n\nHuman: In {1990 + i}, what was 12 + {i}?\n\nAssistant: {2024 + i} and {i * 7}." for i in range(120)]


def raw_ids(folder: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder: ``model/`` (Qwen2-style, its own ChatML tokenizer) and train/val files."""
    root = tmp_path_factory.mktemp("first_hour")
    records = hh_records(40)
    make_local_model(root / "model", [r["chosen"] for r in records] + NUMBERS)
    write_jsonl(root / "train.jsonl", records[:32])
    write_jsonl(root / "val.jsonl", records[32:])
    return root


def test_the_saved_tokenizer_is_the_one_loaded(user: Path) -> None:
    from transformers import AutoTokenizer

    folder = user / "model"
    auto = AutoTokenizer.from_pretrained(folder)
    # the trap: transformers picks Qwen2Tokenizer from the model's type, with other ids than the saved file
    assert auto(SAMPLE_TEXT, add_special_tokens=False)["input_ids"] != raw_ids(folder, SAMPLE_TEXT)
    tokenizer = load_tokenizer(str(folder))
    for text in (SAMPLE_TEXT, NUMBERS[3], "\n\nHuman: 007 x 3 = 21\n\n\nAssistant:  ok"):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == raw_ids(folder, text)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.padding_side) == ("<|endoftext|>", "<|pad|>", "right")
    assert tokenizer.chat_template == auto.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == auto.convert_tokens_to_ids("<|im_end|>")


def test_a_tokenizer_that_loads_as_saved_is_kept(tmp_path: Path) -> None:
    from ulma_lightning.tokenizers import as_transformers_tokenizer, train_byte_level_bpe

    as_transformers_tokenizer(train_byte_level_bpe(NUMBERS, vocab_size=300)).save_pretrained(
        tmp_path
    )  # no model config: no other class
    tokenizer = load_tokenizer(str(tmp_path))
    assert type(tokenizer).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
    assert tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"] == raw_ids(tmp_path, SAMPLE_TEXT)


@pytest.mark.integration
def test_lora_fit_trains_and_exports_the_users_tokenizer_without_a_reference_copy(user: Path, tmp_path: Path) -> None:
    """README: ``ulma fit --config configs/ulma.yaml --model.init_args.policy.model ...
    --model.init_args.policy.lora.r 8``, with the model folder named relative to the working folder, then
    ``ulma export --keep-adapter``."""
    (tmp_path / "model").symlink_to(user / "model")
    fit = (
        f"ulma fit --config {REPO}/configs/ulma.yaml --model.init_args.policy.model model"
        " --model.init_args.policy.lora.r 8"
        f" --data.init_args.train {user}/train.jsonl --data.init_args.val {user}/val.jsonl"
        " --trainer.max_steps 2 --trainer.enable_progress_bar false --trainer.limit_val_batches 1"
    )
    done = run_ulma(fit, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "AutoTokenizer loads it as Qwen2Tokenizer" in done.stderr
    run = tmp_path / "runs" / "ulma" / "version_0"

    # the exported tokenizer encodes as the user's tokenizer.json
    exported = load_tokenizer(str(run / "hf_model"))
    assert exported(SAMPLE_TEXT, add_special_tokens=False)["input_ids"] == raw_ids(user / "model", SAMPLE_TEXT)
    assert raw_ids(run / "hf_model", SAMPLE_TEXT) == raw_ids(user / "model", SAMPLE_TEXT)

    # LoRA's default reference: the policy with adapters off, no frozen copy in the checkpoint
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert any("lora_A" in key for key in state["state_dict"])
    assert not any("reference_model" in key for key in state["state_dict"])

    # the adapter names its base by an absolute path that exists from any folder
    out = tmp_path / "adapter"
    done = run_ulma(f"ulma export --ckpt {run}/checkpoints/last.ckpt --out {out} --keep-adapter", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_absolute() and Path(base) == (tmp_path / "model").absolute(), base
    assert (Path(base) / "config.json").exists()


def test_reference_auto_resolves_per_lora_and_an_explicit_mode_is_kept() -> None:
    from conftest import TINY_LLAMA

    from ulma_lightning.policy import LoraSettings, PolicyConfig

    assert PolicyConfig(model_config=TINY_LLAMA).reference == "copy"
    assert PolicyConfig(model_config=TINY_LLAMA, lora=LoraSettings(r=4)).reference == "adapter"
    assert PolicyConfig(model_config=TINY_LLAMA, lora=LoraSettings(r=4), reference="copy").reference == "copy"
    assert (
        PolicyConfig(model_config=TINY_LLAMA, lora=LoraSettings(r=4), reference="precomputed").reference
        == "precomputed"
    )
    assert PolicyConfig(model_config=TINY_LLAMA, lora=LoraSettings(r=4), reference_model="some/sft").reference == "copy"


#: what ``ulma fit`` printed before issue 27 item 10, none of which a user can act on
NOISE = (
    "No negative samples in targets",  # torchmetrics: an AUC over one class
    "No positive samples in targets",
    "LeafSpec",  # torch's deprecation, raised inside Lightning's _pytree.py
    "litlogger",  # Lightning's tip
    "is_gradient_checkpointing",  # transformers' FutureWarning, raised inside peft
    "v_num",  # the run's version in the progress bar
)


@pytest.mark.integration
def test_the_first_command_prints_nothing_a_user_cannot_act_on(tmp_path: Path) -> None:
    """README: ``ulma fit --config configs/ulma.yaml`` (a few steps, with its progress bar)."""
    done = run_ulma(f"ulma fit --config {REPO}/configs/ulma.yaml --trainer.max_steps 4", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout + done.stderr
    assert "Epoch 0" in printed and "train/loss" in printed  # the progress bar was drawn
    assert [noise for noise in NOISE if noise in printed] == []

    # item 11: TensorBoard's HPARAMS view without LightningCLI's _instantiator, hp_metric without a -1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "runs" / "ulma" / "version_0"
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info
    assert "beta" in start.hparams and not [name for name in start.hparams if "_instantiator" in name]
    assert "_instantiator" not in (run / "hparams.yaml").read_text()
    val_loss, hp_metric = events.Scalars("val/loss"), events.Scalars("hp_metric")
    assert [(e.step, e.value) for e in hp_metric] == [(e.step, e.value) for e in val_loss] and len(val_loss) >= 1


def test_lora_wrapping_raises_no_warning() -> None:
    import warnings

    from conftest import TINY_LLAMA

    from ulma_lightning.policy import LoraSettings, Policy, PolicyConfig

    policy = Policy(PolicyConfig(model_config=TINY_LLAMA, lora=LoraSettings(r=4)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy.build()
    assert [str(w.message) for w in caught if "checkpointing" in str(w.message)] == []
    assert policy.reference_model is None  # reference: auto is adapter with LoRA


def test_auc_is_not_logged_for_one_class() -> None:

    from conftest import TINY_LLAMA

    from ulma_lightning import ULMAModule
    from ulma_lightning.policy import PolicyConfig

    module = ULMAModule(PolicyConfig(model_config=TINY_LLAMA))
    logged: dict[str, float] = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))  # type: ignore[method-assign]
    module.reward_metrics.outputs["val"] = [
        (torch.tensor([0.6, 0.7]), torch.tensor([1, 1]), torch.zeros(2), torch.ones(2))
    ]
    module.reward_metrics.log_epoch(module, "val", module.label_type)
    assert "val/rewards/accuracy" in logged and "val/rewards/auc" not in logged
    module.reward_metrics.outputs["val"] = [
        (torch.tensor([0.6, 0.4]), torch.tensor([1, 0]), torch.zeros(2), torch.tensor([1.0, 0.0]))
    ]
    module.reward_metrics.log_epoch(module, "val", module.label_type)
    assert logged["val/rewards/auc"] == 1.0


@pytest.mark.integration
def test_kto_logs_reward_accuracy_and_auc_like_the_other_methods(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from conftest import TINY_LLAMA

    from ulma_lightning import KTOModule, PointwiseDataModule
    from ulma_lightning.policy import PolicyConfig

    module = KTOModule(PolicyConfig(model_config=TINY_LLAMA), beta=0.1)
    datamodule = PointwiseDataModule(
        train="demo://binary?n=40", val="demo://binary?split=validation&n=16", batch_size=8
    )
    trainer = pl.Trainer(
        max_steps=3, val_check_interval=3, num_sanity_val_steps=0, logger=False, accelerator="cpu",
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    assert 0.0 <= metrics["val/rewards/accuracy"] <= 1.0 and 0.0 <= metrics["val/rewards/auc"] <= 1.0
    assert 0.0 <= metrics["train/rewards/accuracy_step"] <= 1.0
    assert (
        metrics["val/kl"] >= max(0.0, metrics["val/kl_estimate"]) - 1e-6
    )  # kl: the mean of the batches' clamped estimates

    # the accuracy is KTO's decision, h > z0, over the validation samples
    module.eval()
    batches = list(datamodule.val_dataloader())
    outcomes = []
    with torch.no_grad():
        for batch in batches:
            out = module.compute_loss(batch, "test")
            ratio = module.policy.logps(batch, average=module.average_logps) - module.policy.reference_logps(
                batch, average=module.average_logps
            )
            outcomes += ((ratio > out.metrics["kl"]) == (batch["score"] >= 1.0)).tolist()
    module.reward_metrics.outputs["test"] = []
    assert metrics["val/rewards/accuracy"] == pytest.approx(sum(outcomes) / len(outcomes), abs=1e-6)


def test_a_small_model_runs_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from conftest import TINY_LLAMA

    from ulma_lightning import ULMAModule, threads
    from ulma_lightning.policy import PolicyConfig

    for name in threads.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    module = ULMAModule(PolicyConfig(model_config=TINY_LLAMA))
    module.configure_model()
    cpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    torch.set_num_threads(2)
    threads.SmallModelThreads().on_fit_start(cpu, module)  # type: ignore[arg-type]
    assert torch.get_num_threads() == 1

    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "SMALL_MODEL_PARAMETERS", 1000)  # a model above the bound keeps its threads
    threads.SmallModelThreads().on_fit_start(cpu, module)  # type: ignore[arg-type]
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(threads, "SMALL_MODEL_PARAMETERS", 10**9)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stands
    threads.SmallModelThreads().on_fit_start(cpu, module)  # type: ignore[arg-type]
    assert torch.get_num_threads() == 2


def test_the_evaluation_table_shows_a_small_value_as_non_zero() -> None:
    from ulma_lightning.evaluation.evaluate import format_report

    table = format_report({"test": {"test/kl": 3.2e-05, "test/loss": 0.5, "test/kl_estimate": 0.0}})
    assert "test/kl           3.200e-05" in table and "0.5000" in table and "test/kl_estimate  0.0000" in table
