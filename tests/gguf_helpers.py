"""A tiny llama GGUF written with the ``gguf`` package's GGUFWriter: quantised weights, a real BPE
tokenizer (the built-in demo one) and a chat template in its metadata; no download."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LICENSE = "apache-2.0"


def _tokenizer_metadata() -> tuple[list[str], list[str], list[int]]:
    """The demo tokenizer as GGUF metadata: tokens by id, merges ``"a b"``, token types (3: control)."""
    from ulma_lightning.tokenizers import build_demo_tokenizer

    spec = json.loads(build_demo_tokenizer().backend_tokenizer.to_str())
    tokens = {i: t for t, i in spec["model"]["vocab"].items()} | {a["id"]: a["content"] for a in spec["added_tokens"]}
    ordered = [tokens[i] for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = {a["content"] for a in spec["added_tokens"]}
    return ordered, merges, [3 if t in special else 1 for t in ordered]


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of a q/k projection (transformers undoes it on load)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_tiny_gguf(
    path: str | Path,
    *,
    quant: str = "Q8_0",
    architecture: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Write a tiny llama (tied embeddings) as a GGUF, its 2-D weights in ``quant`` (a ggml type name:
    Q8_0, Q4_1, F32, ... or Q8_1, which no dequantiser reads), and return the state dict that loading it
    should give (the dequantised weights, in transformers' names and row order)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, merges, token_types = _tokenizer_metadata()
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    state = {k: v.numpy() for k, v in LlamaForCausalLM(config).state_dict().items()}
    qtype = gguf.GGMLQuantizationType[quant]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_license(LICENSE)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(2 * hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(1)
    writer.add_chat_template(CHAT_TEMPLATE)
    expected: dict[str, torch.Tensor] = {}

    def add(gguf_name: str, hf_name: str, heads_to_permute: int | None = None) -> None:
        weight = state[hf_name].astype(np.float32)
        if weight.ndim == 2 and qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_1):
            packed = gguf.quants.quantize(weight, qtype)
            weight = gguf.quants.dequantize(packed, qtype)
        elif weight.ndim == 2 and qtype == gguf.GGMLQuantizationType.Q8_1:  # raw blocks of a type nothing dequantises
            block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            packed = np.zeros((weight.shape[0], weight.shape[1] // block_elems * block_bytes), dtype=np.uint8)
        else:
            packed = weight
        expected[hf_name] = torch.from_numpy(weight.copy())
        if heads_to_permute is not None:
            packed = (
                _permute(packed, heads_to_permute)
                if packed.dtype == np.float32
                else _permute_rows(packed, heads_to_permute)
            )
        writer.add_tensor(gguf_name, packed, raw_dtype=None if packed.dtype == np.float32 else qtype)

    add("token_embd.weight", "model.embed_tokens.weight")
    add("output_norm.weight", "model.norm.weight")
    for i in range(layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight")
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", heads)
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", kv_heads)
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight")
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight")
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight")
        add(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight")
        add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight")
        add(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _permute_rows(blocks: np.ndarray, heads: int) -> np.ndarray:
    """:func:`_permute` on the rows of a quantised tensor (each row's blocks move whole)."""
    rows = blocks.shape[0]
    order = _permute(np.arange(rows).reshape(rows, 1), heads).reshape(-1)
    return blocks[order]
