"""One process of a process group that runs several ``ulma fit`` command lines in a row.

Launched by tests/test_dist_configs.py once per rank with the environment torchrun would give
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so Lightning joins the
group instead of spawning processes, and the group's start-up is paid once for all the runs:

    python tests/dist_runner.py RUNS.json

``RUNS.json``: ``[{"name": ..., "argv": [...]}, ...]``. Each run is ``ulma_lightning.cli.main(argv)``
in its own folder ``<RUNS.json's folder>/<name>/`` (the configs' relative ``runs/`` land there).
After each, every rank writes ``<name>/result.rank<r>.json``: the global step, the logged metrics,
the reference forward count, the number of compiled graphs and a checksum of the policy's full weights (gathered
under FSDP2).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


def full_weights_checksum(model: Any) -> float:
    """Sum over tensors of ``sum(|w| * (1 + index))``: equal on ranks that hold equal weights."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ulma_lightning.sharding import is_fsdp2

    state = (
        get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        if is_fsdp2(model)
        else model.state_dict()
    )
    total = 0.0
    for key in sorted(state):
        value = state[key].detach().double().flatten()
        total += float((value.abs() * torch.arange(1, value.numel() + 1, dtype=torch.float64)).sum())
    return total


def compiled_graphs() -> int:
    """Graphs ``torch.compile`` has built in this process so far (``policy.compile``)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main(spec: Path) -> None:
    from ulma_lightning.cli import main as ulma

    rank = int(os.environ["RANK"])
    for run in json.loads(spec.read_text()):
        folder = spec.parent / run["name"]
        folder.mkdir(parents=True, exist_ok=True)
        os.chdir(folder)
        start = time.perf_counter()
        cli = ulma(run["argv"])
        trainer, module = cli.trainer, cli.model
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        result = {
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "metrics": {k: (None if math.isnan(v) else v) for k, v in metrics.items()},
            "reference_forward_samples": getattr(module.policy, "reference_forward_samples", None),
            "checksum": full_weights_checksum(module.policy.model),
            "compiled_graphs": compiled_graphs(),
            "seconds": round(time.perf_counter() - start, 1),
        }
        (folder / f"result.rank{rank}.json").write_text(json.dumps(result))
        print(f"[rank {rank}] {run['name']}: done in {result['seconds']} s", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
