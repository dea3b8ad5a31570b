"""The TensorBoard callback: generation tables, implicit-reward histograms and the hparams view's final
metric, read back with TensorBoard's own event reader."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
from conftest import TINY_LLAMA
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from ulma_lightning import PointwiseDataModule, PolicyConfig, ULMAModule
from ulma_lightning.evaluation import DemoScorer, GenerationConfig, GenerationSamples
from ulma_lightning.loggers import TensorBoardLogger

pytestmark = pytest.mark.integration  # every test here builds a Trainer


def test_callback_writes_text_histograms_and_hparams(tmp_path: Path) -> None:
    module = ULMAModule(PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo"))
    datamodule = PointwiseDataModule(
        train="demo://binary?n=40", val="demo://binary?split=validation&n=10", batch_size=5
    )
    callback = GenerationSamples(
        every_n_steps=2, num_prompts=3, generation=GenerationConfig(max_new_tokens=6), scorer=DemoScorer()
    )
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl.Trainer(
        max_steps=4, val_check_interval=2, num_sanity_val_steps=0, logger=logger, callbacks=[callback],
        accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)

    events = EventAccumulator(
        str(tmp_path / "run" / "version_0"), size_guidance={"tensors": 0, "histograms": 0, "scalars": 0}
    )
    events.Reload()
    texts = events.Tensors("samples/generations/text_summary")
    assert [t.step for t in texts] == [2, 4]
    table = texts[-1].tensor_proto.string_val[0].decode().splitlines()
    assert table[0] == "| prompt | (score) response |" and len(table) == 2 + 3  # no narrow score column to wrap
    scores = [float(line.split("| **", 1)[1].split("**", 1)[0]) for line in table[2:]]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert [e.value for e in events.Scalars("samples/mean_score")][-1] == pytest.approx(sum(scores) / 3, abs=1e-3)

    val_scores = [item["score"] for item in datamodule.datasets["val"].items]
    positives, negatives = sum(s >= 1.0 for s in val_scores), sum(s < 1.0 for s in val_scores)
    assert positives and negatives
    for name, count in (("positive", positives), ("negative", negatives)):
        histograms = events.Histograms(f"val/rewards/{name}_hist")
        assert (
            [h.step for h in histograms] == [e.step for e in events.Scalars("val/loss")] == [1, 3]
        )  # val/loss's steps
        assert all(h.histogram_value.num == count for h in histograms)  # one value per sample

    val_loss = [e.value for e in events.Scalars("val/loss")]
    hp_metric = events.Scalars("hp_metric")  # val/loss's values at val/loss's steps, no -1 placeholder first
    assert [e.step for e in hp_metric] == [e.step for e in events.Scalars("val/loss")]
    assert [e.value for e in hp_metric] == pytest.approx(val_loss)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/experiment"]
    ).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["hp_metric"]  # still named in the HPARAMS view
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["beta"].number_value == pytest.approx(0.1)
    assert start.hparams["policy/tokenizer"].string_value == "builtin:demo"
