"""OnlineULMAModule under DDP: 2 CPU processes (gloo) sample and label their own rollouts and end with
identical weights (the pattern of tests/test_rl_ddp.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, TINY_LLAMA

SCRIPT = """
import json, sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from ulma_lightning import OnlineULMAModule, PromptDataModule, PolicyConfig
from ulma_lightning.evaluation.generation import GenerationConfig
from ulma_lightning.evaluation.scorers import Scorer

OUT = Path(sys.argv[1])


class Length(Scorer):
    def score(self, prompts, responses):
        return [len(r) / 10 for r in responses]


class Record(pl.Callback):
    def __init__(self):
        self.rows, self.kept = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append(batch["index"].tolist())
        self.kept.append(float(trainer.callback_metrics["train/kept_fraction_step"]))

    def on_train_end(self, trainer, module):
        weights = {k: float(v.double().sum()) for k, v in module.named_parameters() if v.requires_grad}
        reference = {k: float(v.double().sum()) for k, v in module.policy.reference_model.named_parameters()}
        (OUT / f"rank{trainer.global_rank}.json").write_text(json.dumps({"index": self.rows, "kept": self.kept, "weights": weights, "reference": reference}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    module = OnlineULMAModule(PolicyConfig(model_config=%(tiny)s, tokenizer="builtin:demo", reference="copy"), scorer=Length(),
                              generation=GenerationConfig(max_new_tokens=5, do_sample=True), samples_per_prompt=2,
                              mini_batch_size=4, ref_refresh_every=2)
    data = PromptDataModule(train="demo://demonstration?n=16", batch_size=4, max_length=64)
    trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[Record()])
    trainer.fit(module, datamodule=data)
"""


def test_online_ulma_under_ddp_keeps_the_ranks_in_sync(tmp_path: Path) -> None:
    script = tmp_path / "online_ddp.py"
    script.write_text(SCRIPT % {"tiny": repr(TINY_LLAMA)})
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["index"]) == 2
    for batch0, batch1 in zip(ranks[0]["index"], ranks[1]["index"]):
        assert set(batch0).isdisjoint(batch1)  # each rank sampled for its own prompts
    for key in ("weights", "reference"):  # 2 rollout batches x 2 mini-batches of 4 responses; refreshed at step 2 and 4
        values0, values1 = ranks[0][key], ranks[1][key]
        assert values0.keys() == values1.keys() and values0
        for name in values0:
            assert abs(values0[name] - values1[name]) <= 1e-6 * max(1.0, abs(values0[name])), (key, name)
    policy = {k.removeprefix("policy.model."): v for k, v in ranks[0]["weights"].items()}
    for name, value in ranks[0]["reference"].items():  # refreshed after the last step: the reference is the policy
        assert abs(policy[name] - value) <= 1e-6 * max(1.0, abs(value)), name
