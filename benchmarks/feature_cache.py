"""Data setup time with and without ``cache_dir`` (issue 16): each case runs in a fresh process three
times (no cache; cache empty: build and save; cache full: load), after the imports and the tokenizer.

    python benchmarks/feature_cache.py                 # the built-in task as experiments/paper.yaml uses it
    python benchmarks/feature_cache.py HH_FILE.jsonl.gz  # and an HH file, configs/ulma.yaml-like
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

CASES = {
    "task binary (PointwiseDataModule)": {
        "cls": "PointwiseDataModule",
        "train": "task://binary?variant=ordinary&split=train",
        "val": "task://binary?variant=ordinary&split=val",
        "tokenizer": "builtin:task",
        "max_length": 128,
    },
    "task pairwise (PairwiseDataModule)": {
        "cls": "PairwiseDataModule",
        "train": "task://pairwise?variant=ordinary&split=train",
        "val": "task://pairwise?variant=ordinary&split=val",
        "tokenizer": "builtin:task",
        "max_length": 128,
    },
    "task demonstration (DemonstrationDataModule)": {
        "cls": "DemonstrationDataModule",
        "train": "task://demonstration?variant=ordinary&split=train",
        "val": "task://demonstration?variant=ordinary&split=val",
        "tokenizer": "builtin:task",
        "max_length": 128,
    },
}


def one(case: dict, cache: str | None) -> float:
    """Seconds of ``setup('fit')`` in this process (imports and tokenizer loaded first)."""
    import ulma_lightning

    options = dict(case)
    cls = getattr(ulma_lightning, options.pop("cls"))
    _ = cls(train=options["train"], tokenizer=options["tokenizer"]).tokenizer  # imports, the built-in tokenizer
    started = time.perf_counter()
    cls(**options, cache_dir=cache).setup("fit")
    return time.perf_counter() - started


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        case, cache = json.loads(sys.argv[2]), sys.argv[3]
        print(one(case, None if cache == "-" else cache))
        return
    cases = dict(CASES)
    for path in sys.argv[1:]:
        cases[f"HH {path} (PointwiseDataModule, val_fraction 0.1, skip)"] = {
            "cls": "PointwiseDataModule", "train": path, "tokenizer": "builtin:demo", "max_length": 128,
            "val_fraction": 0.1, "on_bad_record": "skip",
        }  # fmt: skip
    print("| data | no cache (s) | cache empty: build + save (s) | cache full: load (s) |\n| --- | --- | --- | --- |")
    for name, case in cases.items():
        with tempfile.TemporaryDirectory() as folder:
            times = [
                float(subprocess.run([sys.executable, __file__, "--one", json.dumps(case), cache], check=True,
                                     capture_output=True, text=True).stdout.split()[-1])
                for cache in ("-", folder, folder)
            ]  # fmt: skip
        print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in times) + " |")


if __name__ == "__main__":
    main()
