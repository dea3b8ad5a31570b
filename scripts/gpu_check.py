"""One sharded ULMA fit on one device, measured: tokens/s, peak memory, model FLOPs utilisation.

Used by ``scripts/gpu_check.sh`` (fsdp and fsdp2 on one GPU in bf16, a Qwen2.5-0.5B-shaped model
built from its config, then fsdp2 with SmolLM2-135M's shape; random weights, synthetic point-wise data).
``--model tiny --accelerator cpu --precision 32-true --strategy fsdp2`` runs the same code on a CPU in
seconds (the tests do).

Model FLOPs per step (PaLM appendix B convention, causal attention counted in full; T = the batch's
padded length, N = non-embedding parameters, d = hidden size, V = vocabulary, L = layers):
  policy, every token:            6 N + 12 L d T   (forward and backward)
  policy output projection:       6 d V per response token (the chunked head runs on those only)
  reference (ULMA: negatives):    2 N + 4 L d T per token, 2 d V per response token
MFU = model FLOPs per second / the device's dense bf16 peak (``--peak-tflops`` or a known GPU).
Tokens are non-padding tokens of the policy's batches; the first ``--warmup`` steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.workload import QWEN25_05B, SMOLLM2_135M  # PYTHONPATH: the repository root, as gpu_check.sh sets

TINY = {
    "model_type": "qwen2",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "tie_word_embeddings": True,
}
# dense bf16 peak TFLOP/s by device name, most specific first
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
]
#: --model: the shapes a check builds from their configs (random weights)
MODELS = {
    "qwen2.5-0.5b": ("Qwen2.5-0.5B shapes (random init)", QWEN25_05B),
    "smollm2-135m": ("SmolLM2-135M shapes (random init)", SMOLLM2_135M),
    "tiny": ("tiny qwen2", TINY),
}
WORDS = (
    "the a request answer help explain safe careful about how why what people code water plan garden letter travel "
    "recipe budget history science music health weather friend story"
).split()


def body_parameters(model_config: dict[str, Any]) -> int:
    """Parameters outside the embeddings and the output projection (counted on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    options = dict(model_config)
    config = AutoConfig.for_model(options.pop("model_type"), **options)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def step_flops(
    batch: dict[str, torch.Tensor], *, body: int, config: dict[str, Any], positive_threshold: float = 1.0
) -> float:
    """Model FLOPs of one ULMA training step on ``batch`` (see the module docstring)."""
    d, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    length = batch["input_ids"].shape[1]
    tokens = batch["attention_mask"].sum(dim=1).double()
    responses = (batch["labels"][:, 1:] != -100).sum(dim=1).double()
    negative = (batch["score"] < positive_threshold).double()
    per_token = 6 * body + 12 * layers * d * length
    policy = float((tokens * per_token).sum() + (responses * 6 * d * vocab).sum())
    reference = float((negative * (tokens * (2 * body + 4 * layers * d * length) + responses * 2 * d * vocab)).sum())
    return policy + reference


def write_data(folder: Path, samples: int, words: int, seed: int = 0) -> Path:
    """Synthetic point-wise records, half positive, with responses of about ``words`` words."""
    rng = random.Random(seed)
    path = folder / "train.jsonl"
    with open(path, "w") as handle:
        for i in range(samples):
            prompt = " ".join(rng.choice(WORDS) for _ in range(max(4, words // 8)))
            response = " ".join(rng.choice(WORDS) for _ in range(words))
            handle.write(json.dumps({"prompt": prompt, "response": response, "score": float(i % 2)}) + "\n")
    return path


def peak_tflops(explicit: float | None) -> float | None:
    if explicit:
        return explicit
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_BF16_TFLOPS if key in name), None)


def check_export(trainer: Any, module: Any, folder: Path) -> bool:
    """Save a checkpoint under the run's strategy, export it, and compare with the gathered weights."""
    from safetensors.torch import load_file

    from ulma_lightning.export import gather_policy_state
    from ulma_lightning.export_cli import export_checkpoint

    ckpt = folder / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    sharded, state = gather_policy_state(trainer, module)
    if not sharded:
        state = {k: v.detach().cpu() for k, v in module.policy.model.state_dict().items()}
    out = export_checkpoint(ckpt, folder / "hf")
    exported = load_file(out / "model.safetensors")
    return bool(exported) and all(torch.equal(exported[k], state[k].to(exported[k].dtype)) for k in exported)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["fsdp", "fsdp2"], required=True)
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-0.5b", help="the model shape")
    parser.add_argument("--tiny", action="store_true", help="the same as --model tiny (CPU smoke run)")
    parser.add_argument("--steps", type=int, default=30, help="training steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--words", type=int, default=400, help="words per synthetic response")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--out", default=None, help="also write the numbers as JSON here")
    parser.add_argument(
        "--check-export",
        action="store_true",
        help="after the fit, save a (sharded) checkpoint, `ulma export` it and compare the weights",
    )
    args = parser.parse_args(argv)

    from lightning.pytorch import Callback, Trainer, seed_everything

    from ulma_lightning import PointwiseDataModule, PolicyConfig, ULMAModule
    from ulma_lightning.modules.base import OptimizerConfig
    from ulma_lightning.sharding import AutoWrapFSDPStrategy, FSDP2Strategy

    seed_everything(0)
    model_name, model_config = MODELS["tiny" if args.tiny else args.model]
    body = body_parameters(model_config)
    cuda = args.accelerator in ("gpu", "cuda")

    class Meter(Callback):
        def __init__(self) -> None:
            self.seconds = self.tokens = self.flops = 0.0
            self.timed = 0
            self.losses: list[float] = []
            self._start = 0.0

        def _sync(self) -> None:
            if cuda:
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self._sync()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self._sync()
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))
            if trainer.global_step <= args.warmup:
                return
            self.seconds += time.perf_counter() - self._start
            self.tokens += float(batch["attention_mask"].sum())
            self.flops += step_flops(batch, body=body, config=model_config)
            self.timed += 1

    if args.strategy == "fsdp":
        strategy = AutoWrapFSDPStrategy(activation_checkpointing=args.activation_checkpointing)
    else:
        strategy = FSDP2Strategy(activation_checkpointing=args.activation_checkpointing)
    meter = Meter()
    with tempfile.TemporaryDirectory() as tmp:
        data = PointwiseDataModule(
            train=str(write_data(Path(tmp), args.batch_size * (args.steps + 2), args.words)),
            tokenizer="builtin:demo",
            max_length=args.max_length,
            batch_size=args.batch_size,
        )
        module = ULMAModule(
            PolicyConfig(
                model_config=model_config, tokenizer="builtin:demo", reference="copy", attn_implementation="sdpa"
            ),
            OptimizerConfig(lr=1e-5, warmup_steps=0, schedule="constant"),
        )
        trainer = Trainer(
            accelerator=args.accelerator,
            devices=1,
            strategy=strategy,
            precision=args.precision,
            max_steps=args.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[meter],
            default_root_dir=tmp,
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer.fit(module, data)
        wall = time.perf_counter() - started
        export_ok = check_export(trainer, module, Path(tmp)) if args.check_export else None

    peak = peak_tflops(args.peak_tflops)
    seconds = max(meter.seconds, 1e-9)
    result = {
        "strategy": args.strategy,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": args.precision,
        "model": model_name,
        "body_parameters": body,
        "timed_steps": meter.timed,
        "step_seconds": seconds / max(meter.timed, 1),
        "tokens_per_second": meter.tokens / seconds,
        "model_tflops_per_second": meter.flops / seconds / 1e12,
        "mfu": (meter.flops / seconds / 1e12 / peak) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "fit_seconds": wall,
        "final_loss": meter.losses[-1] if meter.losses else None,
        "losses_finite": all(math.isfinite(v) for v in meter.losses),
        "export_matches": export_ok,
    }
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (pass --peak-tflops)"
    memory = f"{result['peak_memory_gib']:.2f} GiB" if result["peak_memory_gib"] is not None else "n/a (cpu)"
    print(
        f"[gpu_check] {args.strategy:5s} {model_name}, {result['device']} {args.precision}: "
        f"{result['tokens_per_second']:,.0f} tokens/s, peak memory {memory}, MFU {mfu}, "
        f"{result['step_seconds']:.3f} s/step over {meter.timed} steps, final loss {result['final_loss']:.4f}",
        flush=True,
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if export_ok is not None:
        print(
            f"[gpu_check] {args.strategy}: checkpoint -> ulma export -> weights {'match' if export_ok else 'DIFFER'}",
            flush=True,
        )
    if not result["losses_finite"] or meter.timed == 0 or export_ok is False:
        sys.exit(f"[gpu_check] {args.strategy}: non-finite loss, no timed step or a wrong export")
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
