"""Generation speed: the library's generation path against plain ``model.generate`` (and its static KV cache).

    PYTHONPATH=. python -m benchmarks.bench_generate [--batch 8] [--new-tokens 64] [--prompts 32] [--rounds 3]

The library's path is what ``ulma predict`` runs (``AlignmentModule.predict_step``: ``generate_ids``
then decoding) and what the RLHF modules' rollouts call (``generate_ids``). It is timed on two models,
random init from their configs: the built-in task's (``configs/task/ulma.yaml``: Llama, hidden 96, 2
layers, the ``builtin:task`` tokenizer) and bench-A's shape (Llama, hidden 256, 4 layers, vocabulary
32,000, with the same tokenizer: the prompts do not change the work). Prompts: the task's test split,
left-padded by the library's ``LeftPaddingCollator``, ``--batch`` per call. Every path decodes greedily
to ``--new-tokens`` with the same EOS and pad ids; the paths are timed round by round in turn (the order
rotating), and must produce the same tokens. tokens/s: generated tokens up to and including each row's
first EOS, per second of wall time. Prints a markdown table (``--out FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

TASK_MODEL = {"model_type": "llama", "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
              "tie_word_embeddings": True}  # fmt: skip
BENCH_A_MODEL = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688,
                 "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                 "max_position_embeddings": 1024, "tie_word_embeddings": False}  # fmt: skip
MODELS = {"task": TASK_MODEL, "bench-A shape": BENCH_A_MODEL}
TOKENIZER = "builtin:task"


def build(model_config: dict[str, Any], new_tokens: int) -> Any:
    from ulma_lightning import PolicyConfig, ULMAModule
    from ulma_lightning.evaluation.generation import GenerationConfig

    module = ULMAModule(policy=PolicyConfig(model_config=model_config, tokenizer=TOKENIZER, reference="copy"))
    module.configure_model()
    module.generation = GenerationConfig(max_new_tokens=new_tokens)  # what `ulma predict` sets from its options
    return module


def prompt_batches(tokenizer: Any, count: int, batch: int) -> list[dict[str, Any]]:
    from ulma_lightning.data.prompts import LeftPaddingCollator, PromptDataset, encode_prompts
    from ulma_lightning.data.task import generate_pairs
    from ulma_lightning.tokenizers import pad_token_id

    examples = [
        SimpleNamespace(prompt=r["prompt"], response=r["chosen"], location=i)
        for i, r in enumerate(generate_pairs(count, split="test"))
    ]
    dataset = PromptDataset(encode_prompts(tokenizer, examples, max_prompt_length=0))
    collate = LeftPaddingCollator(pad_token_id(tokenizer))
    return [
        collate([dataset[j] for j in range(i, min(i + batch, len(dataset)))]) for i in range(0, len(dataset), batch)
    ]


def generated_tokens(new_ids: torch.Tensor, eos: int) -> int:
    """Tokens generated up to and including each row's first EOS."""
    total = 0
    for row in new_ids.tolist():
        total += row.index(eos) + 1 if eos in row else len(row)
    return total


def paths(module: Any, new_tokens: int) -> dict[str, Callable[[dict[str, Any], int], Any]]:
    """Each path returns the new token ids ``(B, N)`` of a batch (the library's: also its decoded text)."""
    from ulma_lightning.evaluation.generation import generate_ids
    from ulma_lightning.tokenizers import pad_token_id

    model, tok = module.policy.model, module.tokenizer
    plain_kwargs = {
        "max_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": pad_token_id(tok),
        "eos_token_id": tok.eos_token_id,
    }

    def library(batch: dict[str, Any], i: int) -> Any:
        module.predict_step(batch, i)  # `ulma predict`: generate_ids + decoding; timed as a whole
        return generate_ids(
            model, tok, batch["input_ids"], batch["attention_mask"], module.generation
        )  # for the token check (untimed below)

    @torch.no_grad()
    def plain(batch: dict[str, Any], i: int, **extra: Any) -> Any:
        model.eval()
        out = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **plain_kwargs, **extra
        )
        return out[:, batch["input_ids"].shape[1] :]

    return {
        "ulma predict (predict_step)": library,
        "model.generate": plain,
        "model.generate, static cache": lambda b, i: plain(b, i, cache_implementation="static"),
    }


def time_paths(module: Any, batches: list[dict[str, Any]], new_tokens: int, rounds: int) -> list[dict[str, Any]]:
    """Each path over every batch, ``rounds`` times, paths in turn (order rotating each round)."""
    from ulma_lightning.evaluation.generation import generate_ids

    ways = paths(module, new_tokens)
    names = list(ways)
    walls = {n: 0.0 for n in names}
    tokens = {n: 0 for n in names}
    errors: dict[str, str] = {}
    reference = [
        generate_ids(module.policy.model, module.tokenizer, b["input_ids"], b["attention_mask"], module.generation)
        for b in batches
    ]
    eos = module.tokenizer.eos_token_id
    for name in names:  # warm-up round, untimed, and the identical-tokens check
        try:
            for i, b in enumerate(batches[:1]):
                ways[name](b, i)
            for i, b in enumerate(batches):
                out = ways[name](b, i) if name != names[0] else reference[i]
                if not torch.equal(out, reference[i]):
                    errors[name] = "generated other tokens than the library's path"
                    break
        except Exception as exc:  # noqa: BLE001 - a path this transformers cannot run is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    live = [n for n in names if n not in errors]
    for r in range(rounds):
        order = live[r % len(live) :] + live[: r % len(live)]
        for name in order:
            for i, b in enumerate(batches):
                if name == names[0]:
                    start = time.perf_counter()
                    module.predict_step(b, i)
                    walls[name] += time.perf_counter() - start
                else:
                    start = time.perf_counter()
                    ways[name](b, i)
                    walls[name] += time.perf_counter() - start
                tokens[name] += generated_tokens(reference[i], eos)
    out = []
    for name in names:
        if name in errors:
            out.append({"path": name, "error": errors[name]})
        else:
            out.append(
                {
                    "path": name,
                    "tokens": tokens[name],
                    "wall_s": walls[name],
                    "tokens_per_s": tokens[name] / walls[name],
                }
            )
    base = next(r for r in out if r["path"] == "model.generate")
    for r in out:
        if "error" not in r and "error" not in base:
            r["vs_generate"] = r["tokens_per_s"] / base["tokens_per_s"]
    return out


def markdown(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, wall_s: float) -> str:
    lines = [
        f"Generation, greedy, {args.new_tokens} new tokens, batch {args.batch}, {args.prompts} task prompts, "
        f"{args.rounds} timed rounds, torch threads {torch.get_num_threads()}, {wall_s:.0f} s in all "
        f"(`{' '.join(['python -m benchmarks.bench_generate'] + (sys.argv[1:]))}`):",
        "",
        "| model | path | tokens/s | vs model.generate |",
        "|---|---|---:|---:|",
    ]
    for model, rows in results.items():
        for r in rows:
            if "error" in r:
                lines.append(f"| {model} | {r['path']} | not run: {r['error']} | - |")
            else:
                lines.append(
                    f"| {model} | {r['path']} | {r['tokens_per_s']:.0f} | {r.get('vs_generate', float('nan')):.2f}x |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="prompts per generate call (default %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens (default %(default)s)")
    parser.add_argument("--prompts", type=int, default=32, help="task test prompts (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds over all prompts (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    for name in ("batch", "new_tokens", "prompts", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {}
    for name in args.models.split(","):
        module = build(MODELS[name], args.new_tokens)
        batches = prompt_batches(module.tokenizer, args.prompts, args.batch)
        results[name] = time_paths(module, batches, args.new_tokens, args.rounds)
        for r in results[name]:
            print(name, r, flush=True)
    text = markdown(results, args, time.perf_counter() - started)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
