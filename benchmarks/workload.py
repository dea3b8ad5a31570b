"""bench-A, defined once: data, tokenizer, model, batches.

* Data: ``../shared/data/hh-rlhf/harmless-base-test.jsonl.gz`` (beside the repository). Prompt = the
  transcript up to and including the last ``"\\n\\nAssistant:"``, response = the rest (the library's
  HH parsing). Point-wise: every chosen (score 1) and rejected (score 0); pairwise: (prompt, chosen,
  rejected) where the two prompts agree; SFT: (prompt, chosen). Each list is shuffled with seed 0.
* Tokenizer: byte-level BPE, vocabulary 8,192, trained with ``tokenizers`` on those transcripts (in
  file order, so the result is deterministic) and cached under ``benchmarks/.cache``.
* Model: a random-init Llama (:data:`MODEL_CONFIG`, seed 0); the reference is a frozen copy.
* ``max_length`` 512 (the library's truncation: the prompt end is kept); 8 sequences per step
  (4 pairs for DPO); 2 warm-up steps then 10 measured.

The tokenized batches are built once by the library's own pipeline (records -> features ->
``PaddingCollator``) and saved, so that every benchmark row, ours or TRL's, trains on the same token
ids in the same batches.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
# ULMA_BENCH_HH names the file elsewhere (e.g. running from a git worktree)
DATA_FILE = Path(
    os.environ.get("ULMA_BENCH_HH") or REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
)
CACHE = REPO / "benchmarks" / ".cache"

#: The Qwen2.5-0.5B shape built from its config: bench-B's model and scripts/gpu_check.py's.
QWEN25_05B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
}
#: SmolLM2-135M's shape (the config of the model scripts/get_smollm2.py writes): scripts/gpu_check.py's second row.
SMOLLM2_135M = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}

VOCAB_SIZE = 8192
SEED = 0
MAX_LENGTH = 512
BATCH_SIZE = 8
WARMUP_STEPS = 2
MEASURED_STEPS = 10
LR = 1e-5
THREADS = 2

MODEL_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


class MissingData(RuntimeError):
    """The HH file is not beside the repository."""


def require_data() -> Path:
    if not DATA_FILE.exists():
        raise MissingData(
            f"bench-A needs the HH-RLHF test file at {DATA_FILE} (../shared/data/hh-rlhf/ beside the repository); "
            "it is not there, so the benchmark is skipped"
        )
    return DATA_FILE


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    h.update(DATA_FILE.read_bytes())
    for part in parts:
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def transcripts() -> list[str]:
    """Every chosen and rejected transcript, in file order (the tokenizer's training corpus)."""
    return [r[k] for r in _hh_records() for k in ("chosen", "rejected")]


def tokenizer_dir() -> Path:
    """Train (once) and cache the bench-A tokenizer; return its folder."""
    from ulma_lightning.tokenizers import as_transformers_tokenizer, train_byte_level_bpe

    folder = CACHE / f"tokenizer-{VOCAB_SIZE}-{_digest(VOCAB_SIZE, SEED)}"
    if (folder / "tokenizer.json").exists():
        return folder
    tokenizer = as_transformers_tokenizer(train_byte_level_bpe(transcripts(), VOCAB_SIZE))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return folder


def model_config(**overrides: Any) -> dict[str, Any]:
    """The bench-A model config (as ``PolicyConfig.model_config``), with optional overrides."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    return {
        **MODEL_CONFIG,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.eos_token_id,
        **overrides,
    }


def build_model(**overrides: Any) -> torch.nn.Module:
    """The random-init bench-A model, seed 0 (the same weights the library's Policy builds)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    options = model_config(**overrides)
    kind = options.pop("model_type")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **options), dtype=torch.float32)


def _shuffled(items: list[Any]) -> list[Any]:
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(SEED)).tolist()
    return [items[i] for i in order]


@dataclass
class Sample:
    """One tokenized (prompt, response): ``prompt_ids`` + ``response_ids`` (EOS-terminated)."""

    prompt_ids: list[int]
    response_ids: list[int]
    score: float = 1.0

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def _encode(prompts: list[str], responses: list[str], max_length: int, tokenizer: str) -> list[Sample | None]:
    """The library's tokenization and truncation (``AlignmentDataModule.encode_examples``)."""
    from ulma_lightning.data.datamodule import PointwiseDataModule

    dm = PointwiseDataModule(tokenizer=tokenizer, max_length=max_length)
    out: list[Sample | None] = []
    for pair in dm.encode_examples(prompts, responses):
        if pair is None:
            out.append(None)
            continue
        ids, labels = pair
        cut = int((labels != -100).argmax())
        out.append(Sample(ids[:cut].tolist(), ids[cut:].tolist()))
    return out


def _hh_records() -> list[dict[str, Any]]:
    with gzip.open(require_data(), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_samples(max_length: int = MAX_LENGTH, n_steps: int = WARMUP_STEPS + MEASURED_STEPS) -> dict[str, Any]:
    """Tokenized bench-A samples for ``n_steps`` steps of each kind (cached).

    Returns ``{"pointwise": [Sample]*8n, "pairwise": [(chosen Sample, rejected Sample)]*4n,
    "sft": [Sample]*8n, "tokenizer": folder}``.
    """
    from ulma_lightning.data.errors import DataError
    from ulma_lightning.data.records import parse_pair, parse_pointwise
    from ulma_lightning.data.sources import Location

    tok = str(tokenizer_dir())
    path = CACHE / f"samples-{max_length}-{n_steps}-{_digest(max_length, n_steps, VOCAB_SIZE)}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=False)
        cached["tokenizer"] = tok
        return cached
    records = _hh_records()
    loc = lambda i: Location(str(DATA_FILE), i + 1)  # noqa: E731

    def parsed(parse: Any) -> list[Any]:
        """Parse every record; records the library rejects (empty response, ...) are skipped."""
        out = []
        for i, r in enumerate(records):
            try:
                out.append(parse(r, loc(i)))
            except DataError:
                continue
        return out

    pointwise = _shuffled([e for pair in parsed(lambda r, where: parse_pointwise(r, where, (0.0, 1.0))) for e in pair])
    demos = _shuffled(
        [e for pair in parsed(lambda r, where: parse_pointwise(r, where, (0.0, 1.0))) for e in pair if e.score == 1.0]
    )
    pairs = parsed(parse_pair)  # only pairs whose two prompts agree
    pairs = _shuffled(pairs)

    def take(examples: list[Any], need: int) -> list[Sample]:
        got: list[Sample] = []
        for start in range(0, len(examples), 64):
            chunk = examples[start : start + 64]
            for example, sample in zip(
                chunk, _encode([e.prompt for e in chunk], [e.response for e in chunk], max_length, tok)
            ):
                if sample is not None:
                    sample.score = example.score
                    got.append(sample)
            if len(got) >= need:
                return got[:need]
        raise ValueError(f"bench-A needs {need} samples, the data gave {len(got)}")

    def take_pairs(need: int) -> list[tuple[Sample, Sample]]:
        got: list[tuple[Sample, Sample]] = []
        for start in range(0, len(pairs), 64):
            chunk = pairs[start : start + 64]
            prompts = [p.prompt for p in chunk]
            chosen = _encode(prompts, [p.chosen for p in chunk], max_length, tok)
            rejected = _encode(prompts, [p.rejected for p in chunk], max_length, tok)
            for c, r in zip(chosen, rejected):
                # both sides kept, with the same (truncated) prompt
                if c is not None and r is not None and c.prompt_ids == r.prompt_ids:
                    c.score, r.score = 1.0, 0.0
                    got.append((c, r))
            if len(got) >= need:
                return got[:need]
        raise ValueError(f"bench-A needs {need} pairs, the data gave {len(got)}")

    out: dict[str, Any] = {
        "pointwise": take(pointwise, BATCH_SIZE * n_steps),
        "sft": take(demos, BATCH_SIZE * n_steps),
        "pairwise": take_pairs(BATCH_SIZE // 2 * n_steps),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    out["tokenizer"] = tok
    return out


class ULMAStep:
    """The library's ULMA training step outside a Trainer, as bench-B and bench-C time it: the module
    built from ``policy`` (its own AdamW), samples collated in batches of ``batch``, one step = forward,
    loss, backward, optimizer step."""

    def __init__(self, policy: Any, batch: int) -> None:
        from ulma_lightning import ULMAModule

        self.module = ULMAModule(policy=policy)
        self.module.configure_model()
        self.module.train()
        self.optimizer = self.module.build_optimizer()
        self.batch = batch

    def collate(self, items: list[Sample]) -> list[dict[str, Any]]:
        from ulma_lightning.data.collate import PaddingCollator
        from ulma_lightning.data.features import build_sequence
        from ulma_lightning.tokenizers import pad_token_id

        collator = PaddingCollator(pad_token_id(self.module.tokenizer))
        feats = []
        for i, s in enumerate(items):
            ids, labels = build_sequence(s.prompt_ids, s.response_ids)
            feats.append({"input_ids": ids, "labels": labels, "score": s.score, "index": i})
        return [collator(feats[i : i + self.batch]) for i in range(0, len(feats), self.batch)]

    def step(self, batch: dict[str, Any], index: int) -> float:
        loss = self.module.training_step(batch, index)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
