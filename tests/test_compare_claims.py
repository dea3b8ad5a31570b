"""experiments/claims.py: the paper's claims judged by the rule written before the run, on a
hand-made results.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("claims", REPO / "experiments" / "claims.py")
claims = importlib.util.module_from_spec(spec)
spec.loader.exec_module(claims)


def results(scores: dict[tuple[str, str], list[float]], ppl: dict[tuple[str, str], list[float]] | None = None) -> dict:
    runs = []
    for (run, variant), values in scores.items():
        for seed, value in enumerate(values):
            metrics = {"score": value}
            if ppl and (run, variant) in ppl:
                metrics["golden_ppl"] = ppl[(run, variant)][seed]
            runs.append({"run": run, "variant": variant, "seed": seed, "status": "ok", "metrics": metrics})
    runs.append({"run": "kto", "variant": "ordinary", "seed": 0, "status": "failed", "metrics": {}})
    return {"runs": runs}


def test_verdicts_follow_the_seed_paired_rule(tmp_path: Path, capsys) -> None:
    data = results(
        {
            ("ulma", "ordinary"): [0.5, 0.6, 0.7],
            ("dpo", "ordinary"): [0.4, 0.65, 0.6],  # ULMA wins 2 of 3: mixed
            ("sft", "ordinary"): [0.1, 0.2, 0.3],  # 3 of 3: supported
            ("pointwise_dpo", "ordinary"): [0.5, 0.5, 0.5],
            ("ulma", "golden"): [0.9, 0.9, 0.9],
            ("dpo", "golden"): [0.95, 0.95, 0.95],
            ("pointwise_dpo", "golden"): [0.6, 0.6, 0.6],  # far below DPO: not at least as good
        },
        ppl={("ulma", "ordinary"): [5.0, 6.0, 7.0], ("pointwise_dpo", "ordinary"): [9.0, 9.0, 6.5]},
    )
    rows = {(claim, variant): (numbers, verdict) for claim, variant, numbers, verdict in claims.claims(data)}
    assert rows[("ULMA beats sft", "ordinary")][1] == "supported"
    assert rows[("ULMA beats dpo", "ordinary")] == ("0.600 ± 0.100 vs 0.550 ± 0.132 (2/3 seeds)", "mixed")
    assert rows[("ULMA beats dpo", "golden")][1] == "not supported"
    assert rows[("ULMA beats kto", "ordinary")][1] == "not run"  # its only run failed
    assert rows[("point-wise DPO is at least as good as DPO", "ordinary")][1] == "supported"  # 0.5 >= 0.55 - 0.13
    assert rows[("point-wise DPO is at least as good as DPO", "golden")][1] == "not supported"
    assert rows[("ULMA's golden perplexity is below point-wise DPO's", "ordinary")][1] == "mixed"  # 7.0 > 6.5 on seed 2
    gain = rows[("ULMA gains most from golden data", "golden - ordinary")]
    assert gain == ("dpo +0.400, ulma +0.300, pointwise_dpo +0.100", "not supported")  # DPO gains more than ULMA
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    claims.main([str(path)])
    assert "| ULMA beats sft | ordinary |" in capsys.readouterr().out
