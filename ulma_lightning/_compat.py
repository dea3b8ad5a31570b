"""Every use of another library's private (or version-dependent) API, in one place."""

from __future__ import annotations

from typing import Any


def gguf_architectures() -> set[str]:
    """The GGUF ``general.architecture`` values transformers can load (both its GGUF loaders)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # metadata sections, not architectures
    try:  # transformers >= 5.2x: the loader that keeps weights in blocks has its own list
        from transformers.integrations.gguf.utils import GGUF_ARCHS
    except ImportError:
        return names
    return names | set(GGUF_ARCHS)


def gguf_dequantize_options() -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that dequantise a GGUF's weights to a plain float model.

    transformers 5.x keeps a GGUF's weights in their quantised blocks (``GgufConfig``) unless told to
    dequantise; earlier versions always dequantise and take no such option.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}
