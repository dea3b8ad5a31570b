"""KTO under DDP: 2 CPU processes (gloo) agree on the KL estimate at every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_LLAMA

pytestmark = pytest.mark.integration  # every test here builds a Trainer

SCRIPT = """
import json, sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from ulma_lightning import KTOModule, PointwiseDataModule, PolicyConfig

OUT = Path(sys.argv[1])


class DriftedKTO(KTOModule):
    def configure_model(self):
        super().configure_model()
        g = torch.Generator().manual_seed(1)  # move the policy away from its reference copy
        with torch.no_grad():
            for p in self.policy.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))


class Record(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        size = int(batch["input_ids"].shape[0])
        self.rows.append({"global": float(module.kl), "local": float(module.kl_local), "rows": size,
                          "index": batch["index"].tolist()})

    def on_train_end(self, trainer, module):
        (OUT / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


if __name__ == "__main__":
    torch.set_num_threads(1)
    module = DriftedKTO(PolicyConfig(model_config=%(tiny)s, tokenizer="builtin:demo", reference="copy"))
    data = PointwiseDataModule(train="demo://binary?n=32", batch_size=4, max_length=96)
    trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[Record()])
    trainer.fit(module, datamodule=data)
"""


def test_kto_kl_estimate_is_the_same_on_both_ddp_ranks(tmp_path: Path) -> None:
    script = tmp_path / "kto_ddp.py"
    script.write_text(SCRIPT % {"tiny": repr(TINY_LLAMA)})
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    differs = False
    for step0, step1 in zip(*ranks):
        assert set(step0["index"]).isdisjoint(step1["index"])  # each rank saw its own samples
        assert step0["global"] == step1["global"], (step0, step1)
        # the shared estimate is the mean over all mismatched pairs of both ranks (equal batch sizes)
        assert abs(step0["global"] - (step0["local"] + step1["local"]) / 2) < 1e-5
        differs |= abs(step0["local"] - step1["local"]) > 1e-4
    assert differs, "the ranks' own estimates never differed: the test would not catch a missing all-reduce"
