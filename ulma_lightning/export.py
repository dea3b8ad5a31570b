"""Writing the trained policy as a Hugging Face folder that ``from_pretrained`` loads."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn


def export_hf(model: nn.Module, tokenizer: Any, out_dir: str | Path, *, merge_lora: bool = True) -> Path:
    """Save ``model`` (LoRA merged into a copy when ``merge_lora``, else the adapter) and ``tokenizer``.

    Writes safetensors weights, the config, the tokenizer files and its chat template.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload") and merge_lora:
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
