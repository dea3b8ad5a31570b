"""The FLOPs a method needs on a batch, and the machine's measured matmul peak.

Counted (matmuls only, 2 FLOPs per multiply-add; a backward pass costs twice its forward):

* backbone, per token: the attention projections and the MLP of every layer; plus causal
  attention, ``2 * 2 * heads * head_dim * n(n+1)/2`` per layer for a row of ``n`` tokens. Only
  non-pad tokens count.
* vocabulary projection: ``2 * hidden * vocab`` per *response* token: every method here needs
  log-probs of response tokens only, so projecting prompt or padding positions is not needed work.
* the policy: forward + backward (3x) on the training rows; the reference: one forward, on the
  rows whose loss uses it (ULMA: negatives only; point-wise DPO, DPO, KTO: all; SFT: none; none at
  all with precomputed reference log-probs); KTO also needs its KL estimate: a policy forward
  without gradient, and a reference forward unless precomputed, on the mismatched pairs.

The same count is used for the library's rows and TRL's, so a method's MFU ratio equals its
tokens/s ratio.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Seq:
    """A training row: ``length`` non-pad tokens, ``response`` of them labelled, positive or not."""

    length: int
    response: int
    positive: bool = True


def _dims(config: dict[str, Any]) -> dict[str, int]:
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads") or heads
    return {
        "h": h,
        "heads": heads,
        "head_dim": head_dim,
        "kv": kv,
        "layers": config["num_hidden_layers"],
        "inter": config["intermediate_size"],
        "vocab": config["vocab_size"],
    }


def forward_flops(config: dict[str, Any], seqs: list[Seq]) -> float:
    """One forward pass over ``seqs``: backbone on every token, vocabulary projection on responses."""
    d = _dims(config)
    proj = d["h"] * d["heads"] * d["head_dim"] * 2 + 2 * d["h"] * d["kv"] * d["head_dim"]  # q, o and k, v
    mlp = 3 * d["h"] * d["inter"]
    per_token = 2 * d["layers"] * (proj + mlp)
    total = 0.0
    for s in seqs:
        attention = d["layers"] * 2 * 2 * d["heads"] * d["head_dim"] * s.length * (s.length + 1) / 2
        total += per_token * s.length + attention + 2 * d["h"] * d["vocab"] * s.response
    return total


def needed_flops(
    config: dict[str, Any], method: str, reference: str, seqs: list[Seq], kl_seqs: list[Seq] | None = None
) -> float:
    """FLOPs ``method`` needs for one training step on ``seqs`` (see the module docstring)."""
    total = 3 * forward_flops(config, seqs)
    with_reference = reference == "copy"
    if with_reference and method == "ulma":
        total += forward_flops(config, [s for s in seqs if not s.positive])
    elif with_reference and method in ("pointwise_dpo", "dpo", "kto"):
        total += forward_flops(config, seqs)
    if method == "kto":
        if not kl_seqs:
            raise ValueError("KTO's FLOPs need its KL (mismatched) sequences")
        total += forward_flops(config, kl_seqs) * (2 if with_reference else 1)
    return total


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 8) -> float:
    """Best FLOP/s of a ``size``-square matmul in ``dtype`` on this machine (current thread count)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
