"""The README's own-model path, as a new user takes it: a local model folder, their own data.

The fit, evaluate and predict commands are read from README.md (the fenced blocks after the
``own-model-fit``, ``own-model-evaluate``, ``own-model-predict`` and ``hh-fit`` markers), so the
README and this test cannot drift apart. Placeholders replaced: the hub id by a local folder (a small
Qwen2-style model and a byte-level BPE tokenizer with a ChatML chat template, saved with
``save_pretrained``), the data files by small HH-style files (a slice of the real HH file when it is
present; the first HH lines as they are, empty responses included, for the tests that need them).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import HH_FILE, REPO
from helpers import CHATML, hh_records, make_local_model, run_ulma, write_jsonl

HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"


def readme_command(marker: str) -> str:
    """The shell command in the first ```bash block after ``<!-- marker: ...-->`` in README.md."""
    text = (REPO / "README.md").read_text()
    found = re.search(rf"<!-- {marker}:.*?-->\s*```bash\n(.*?)```", text, re.S)
    assert found, f"README.md has no ```bash block after the {marker} marker"
    return found.group(1).replace("\\\n", " ").strip()


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


@pytest.mark.integration
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
    report = json.loads(
        (own["root"] / done.stdout.strip().splitlines()[-1].removeprefix("report written to ")).read_text()
    )
    assert report["test"]["test/loss"] > 0 and report["num_predictions"] > 0
    assert report["generation"] == {}  # no scorer was chosen: the demo's is skipped on this data
    predictions = [json.loads(line) for line in (own["root"] / report["predictions"]).read_text().splitlines()]
    val_text = own["val"].read_text()
    assert predictions and all(
        json.dumps(p["reference_response"])[1:-1] in val_text for p in predictions
    )  # the user's val data
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["init_args"]["test"] is None  # nothing of the demo was configured for test


@pytest.mark.integration
def test_failed_evaluate_leaves_no_version_folder(own: dict[str, Path], tmp_path: Path) -> None:
    config = {
        "trainer": {
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "x"},
            }
        },
        "model": {"class_path": "ulma_lightning.ULMAModule", "init_args": {"policy": {"model": str(own["model"])}}},
        "data": {
            "class_path": "ulma_lightning.PointwiseDataModule",
            "init_args": {"train": str(own["train"]), "val": str(own["val"])},
        },
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


def test_null_on_the_command_line_is_null_and_print_config_shows_lora(
    own: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    from ulma_lightning.cli import main

    args = ["--model.init_args.policy.model", str(own["model"]), "--model.init_args.policy.model_config", "null"]
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "ulma.yaml"),
                *args,
                "--model.policy.tokenizer=null",
                "--print_config",
            ]
        )
    policy = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["policy"]
    assert policy["model_config"] is None and policy["tokenizer"] is None and policy["model"] == str(own["model"])
    assert {"r", "alpha", "dropout", "target_modules"} <= set(policy["lora"])  # LoRA's options are shown


# ----------------------------------------------------------------------------- issue 27: the first hour
def readme_block(marker_text: str) -> list[str]:
    """The lines of the first plain ``` block after ``marker_text`` in README.md."""
    text = (REPO / "README.md").read_text()
    found = re.search(re.escape(marker_text) + r".*?```\n(.*?)```", text, re.S)
    assert found, f"README.md has no ``` block after {marker_text!r}"
    return found.group(1).strip().splitlines()


def hh_lines(start: int, stop: int) -> str:
    """Lines ``start`` to ``stop`` (1-based, inclusive) of the real HH file, as they are."""
    if not HH_FILE.exists():
        pytest.skip(f"real HH data not found at {HH_FILE} (it lives in ../shared beside the repository)")
    with gzip.open(HH_FILE, "rt") as handle:
        return "".join(line for number, line in enumerate(handle, 1) if start <= number <= stop)


def readme_fit(model: Path) -> str:
    """The README's own-model fit, on ``model``, data files as written (relative to the working folder)."""
    return (
        readme_command("own-model-fit").replace(HUB_ID, str(model)).replace("configs/", f"{REPO}/configs/")
        + " --trainer.enable_progress_bar false"
    )


@pytest.fixture(scope="module")
def hh_run(own: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The README's own-model fit run as written on the first 160 lines of the real HH file (line 87's
    final response is empty), in a fresh working folder with ``data/feedback.jsonl`` and ``data/feedback-val.jsonl``."""
    root = tmp_path_factory.mktemp("hh_own")
    (root / "data").mkdir()
    (root / "data" / "feedback.jsonl").write_text(hh_lines(1, 120))
    (root / "data" / "feedback-val.jsonl").write_text(hh_lines(121, 160))
    done = run_ulma(readme_fit(own["model"]) + " --trainer.max_steps 2", root)
    return {"root": root, "fit": done, "run": root / "runs" / "ulma" / "version_0"}


@pytest.mark.integration
def test_readme_own_model_block_trains_on_hh_data_and_prints_the_data_report(hh_run: dict) -> None:
    done = hh_run["fit"]
    assert done.returncode == 0, done.stderr[-3000:]
    # the report the README shows is printed at the default verbosity, each line once
    report = readme_block("and, for a mix, each source's samples and draws:")
    assert any("skipped 1 record(s)" in line and "feedback.jsonl:87" in line for line in report)
    printed = done.stderr.splitlines()
    for line in report:
        assert printed.count(line) == 1, (
            f"{line!r} not printed once; the data lines printed: {[x for x in printed if ' split: ' in x]}"
        )
    assert sum(bool(re.fullmatch(r"val split: \d+ samples", line)) for line in printed) == 1
    assert (hh_run["run"] / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.integration
def test_an_own_model_run_records_the_model_it_trained_not_the_demo_config(hh_run: dict, own: dict[str, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = hh_run["run"]
    for name, policy in (
        ("config.yaml", yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["policy"]),
        ("hparams.yaml", yaml.safe_load((run / "hparams.yaml").read_text())["policy"]),
    ):
        assert policy["model"] == str(own["model"]) and policy["model_config"] is None, (name, policy)
    events = EventAccumulator(str(run)).Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["policy/model"].string_value == str(own["model"])
    assert not [key for key in hparams if key.startswith("policy/model_config/")]  # no llama, hidden 96
    trained = json.loads((run / "hf_model" / "config.json").read_text())
    assert trained["model_type"] == "qwen2" and trained["hidden_size"] == 32


@pytest.mark.integration
def test_empty_sample_generations_are_counted_and_warned_about(hh_run: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(hh_run["run"])).Reload()
    table = events.Tensors("samples/generations/text_summary")[-1]
    rows = table.tensor_proto.string_val[0].decode().splitlines()[2:]
    responses = [re.split(r"(?<!\\)\|", row)[2].strip() for row in rows]
    empty = responses.count("")
    warning = f"GenerationSamples at step {table.step}: {empty} of {len(rows)} responses are empty"
    assert len(rows) == 8 and (warning in hh_run["fit"].stderr) == (empty > 0), hh_run["fit"].stderr[-2000:]


@pytest.mark.integration
def test_readme_evaluate_and_predict_write_into_the_run_folder(hh_run: dict) -> None:
    root, run = hh_run["root"], hh_run["run"]
    assert hh_run["fit"].returncode == 0
    config = (run / "config.yaml").read_text()
    limits = " --trainer.limit_test_batches 1 --trainer.limit_predict_batches 1"
    done = run_ulma(readme_command("own-model-evaluate") + limits, root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dirpath has changed" not in done.stderr and "callbacks used to create the checkpoint" not in done.stderr
    assert done.stdout.strip().splitlines()[-1] == "report written to runs/ulma/version_0/evaluation.json"
    report = json.loads((run / "evaluation.json").read_text())
    assert report["predictions"] == "runs/ulma/version_0/predictions.jsonl"
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    empty = sum(not row["response"].strip() for row in rows)
    assert report["num_predictions"] == len(rows) > 0 and report["empty_responses"] == empty
    assert f"generation/empty_responses  {empty} of {len(rows)}" in done.stdout
    assert (f"{empty} of {len(rows)} responses are empty" in done.stderr) == (empty > 0)

    (run / "predictions.jsonl").unlink()
    done = run_ulma(readme_command("own-model-predict") + limits, root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dirpath has changed" not in done.stderr and "callbacks used to create the checkpoint" not in done.stderr
    assert f"ulma predict: using the run's saved config {run / 'config.yaml'}" in done.stdout
    assert (
        done.stdout.strip().splitlines()[-1]
        == f"wrote {len(rows)} predictions to runs/ulma/version_0/predictions.jsonl"
    )
    assert len((run / "predictions.jsonl").read_text().splitlines()) == len(rows)
    summary = json.loads((run / "predictions.summary.json").read_text())
    assert summary["empty_responses"] == sum(
        not json.loads(line)["response"].strip() for line in (run / "predictions.jsonl").read_text().splitlines()
    )
    assert sorted(p.name for p in (root / "runs" / "ulma").iterdir()) == ["version_0"]  # no new version_N
    assert (run / "config.yaml").read_text() == config  # the run's config stays the one it trained with


@pytest.mark.integration
def test_a_failed_start_leaves_no_version_folder_and_evaluate_names_the_missing_checkpoint(
    own: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    good = json.loads(own["train"].read_text().splitlines()[0])
    bad = {
        "chosen": good["chosen"].rsplit("Assistant:", 1)[0] + "Assistant:",
        "rejected": good["rejected"],
    }  # an empty final response
    write_jsonl(tmp_path / "data" / "feedback.jsonl", [good, bad])
    (tmp_path / "data" / "feedback-val.jsonl").write_text(own["val"].read_text())
    earlier = tmp_path / "runs" / "ulma" / "version_0"  # a real run beside it stays untouched
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "last.ckpt").write_text("weights")
    done = run_ulma(readme_fit(own["model"]) + " --data.init_args.on_bad_record error", tmp_path)
    assert (
        done.returncode != 0
        and "data/feedback.jsonl:2: field 'chosen': the final assistant response is empty" in done.stderr
    )
    assert sorted(p.name for p in (tmp_path / "runs" / "ulma").iterdir()) == ["version_0"]
    assert (earlier / "checkpoints" / "last.ckpt").read_text() == "weights"

    from ulma_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    for command in ("evaluate", "predict"):  # the README's commands on a run that never started
        with pytest.raises(
            FileNotFoundError,
            match=rf"^ulma {command}: no such checkpoint: runs/ulma/version_1/checkpoints/last.ckpt \(pass",
        ):
            main([command, "--ckpt_path", "runs/ulma/version_1/checkpoints/last.ckpt"])


def test_unused_log_dir_is_only_a_folder_of_start_files(tmp_path: Path) -> None:
    from ulma_lightning.lightning_cli import unused_log_dir

    (tmp_path / "events.out.tfevents.1.host.2.0").write_bytes(b"x")
    (tmp_path / "hparams.yaml").write_text("{}")
    (tmp_path / "config.yaml").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    assert unused_log_dir(tmp_path)
    (tmp_path / "checkpoints" / "last.ckpt").write_text("weights")
    assert not unused_log_dir(tmp_path)


@pytest.mark.integration
def test_max_length_above_the_models_positions_is_refused_naming_both(own: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    long = {
        "prompt": "How do I plant a tree?",
        "completion": " ".join(["Dig a hole and water it."] * 300),
        "score": 1,
    }  # over 1024 tokens
    write_jsonl(
        tmp_path / "data" / "feedback.jsonl", [long, *[{"prompt": "Hi?", "completion": "Hello.", "score": 1}] * 4]
    )
    write_jsonl(tmp_path / "data" / "feedback-val.jsonl", [{"prompt": "Hi?", "completion": "Hello.", "score": 1}])
    fit = readme_fit(own["model"]).replace("--data.init_args.max_length 1024", "--data.init_args.max_length 2048")
    done = run_ulma(fit + " --trainer.max_steps 1", tmp_path)
    assert done.returncode != 0
    assert "data.max_length 2048 is above the model's max_position_embeddings 1024" in done.stderr
    assert "set data.max_length to 1024 or less" in done.stderr
    assert not (tmp_path / "runs" / "ulma").exists()  # nothing left of the failed start


@pytest.mark.integration
def test_readme_hh_example_fits_the_demo_models_positions(hh_file: Path, tmp_path: Path) -> None:
    fit = (
        readme_command("hh-fit")
        .replace("configs/", f"{REPO}/configs/")
        .replace("../shared/data/hh-rlhf/harmless-base-test.jsonl.gz", str(hh_file))
    )
    assert "--data.init_args.max_length 256" in fit  # the demo model's max_position_embeddings
    quick = (
        " --trainer.max_steps 1 --trainer.limit_val_batches 1 --trainer.num_sanity_val_steps 0"
        " --trainer.enable_progress_bar false"
    )
    done = run_ulma(fit + quick, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train split: skipped 4 record(s): field 'chosen': the final assistant response is empty" in done.stderr


def test_empty_generations_are_counted_and_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from ulma_lightning.evaluation import PredictionWriter
    from ulma_lightning.evaluation.generation import empty_responses

    assert empty_responses(["", "  \n", "Dig a hole."]) == 2
    writer = PredictionWriter(output=str(tmp_path / "predictions.jsonl"))
    writer.rows = [
        {"index": i, "prompt": "p", "response": r, "reference_response": None, "scores": {}, "reference_scores": {}}
        for i, r in enumerate(["", " ", "yes"])
    ]
    trainer = SimpleNamespace(is_global_zero=True, loggers=[], log_dir=None, default_root_dir=str(tmp_path))
    writer.on_predict_epoch_end(trainer, None)  # type: ignore[arg-type]
    assert writer.empty == 2 and "predict: 2 of 3 responses are empty" in caplog.text
    assert json.loads((tmp_path / "predictions.summary.json").read_text())["empty_responses"] == 2


def test_the_data_report_is_printed_by_rank_zero_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import logging

    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from ulma_lightning.lightning_cli import show_data_report

    show_data_report()
    show_data_report()  # once: one handler however often the CLI starts in a process
    logging.getLogger("ulma_lightning.data").info("train split: 12 samples")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logging.getLogger("ulma_lightning.data").info("train split: 34 samples")
    assert capsys.readouterr().err.splitlines() == ["train split: 12 samples"]
