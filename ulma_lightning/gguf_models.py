"""Models from GGUF files (llama.cpp's format): checked, dequantised to float by transformers, then
trained, checkpointed and exported as ordinary Hugging Face models.

``policy.model: path/model.gguf`` (or ``policy.model: folder`` with ``policy.gguf_file: model.gguf``)
loads the file's weights, config, tokenizer and chat template through transformers' GGUF support
(``from_pretrained(folder, gguf_file=name)``), which needs the ``gguf`` package
(``pip install 'ulma-lightning[gguf]'``). Quantised weights (Q4_1, Q8_0, ...) become float tensors of
``policy.dtype``: the model trains, saves and exports like any other, and an exported folder loads
without ``gguf``. Quantisation is lossy: the float model is the quantised one, not the original.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ulma_lightning._compat as _compat
from ulma_lightning.tokenizers import register_tokenizer_loader

GGUF_SUFFIX = ".gguf"
GGUF_EXTRA = "pip install 'ulma-lightning[gguf]'"


def is_gguf(source: str | None) -> bool:
    """Whether ``source`` names a GGUF file (by its ``.gguf`` suffix)."""
    return source is not None and source.lower().endswith(GGUF_SUFFIX)


def model_source(model: str | None, gguf_file: str | None) -> str | None:
    """The one string naming a model: ``model`` itself, or ``model/gguf_file`` for a folder (or hub
    id) plus the name of a GGUF file in it."""
    if gguf_file is None or model is None:
        return model
    return f"{model.rstrip('/')}/{gguf_file}"


def split_gguf(source: str) -> tuple[str, str]:
    """``(folder or hub id, file name)`` of a ``.gguf`` source, as ``from_pretrained(folder,
    gguf_file=name)`` takes them. A source whose folder exists locally must name an existing file."""
    path = Path(source).expanduser()
    if not path.is_file() and path.parent.is_dir():
        raise FileNotFoundError(
            f"GGUF file {source} does not exist (its folder {path.parent} does); check policy.model / policy.gguf_file"
        )
    return str(path.parent), path.name


def require_gguf(source: str) -> None:
    """Refuse, naming the extra to install, when ``gguf`` (or ``accelerate``) is missing."""
    for package in ("gguf", "accelerate"):  # transformers loads GGUF files only with accelerate installed
        try:
            __import__(package)
        except ImportError as exc:
            raise ImportError(f"{source} is a GGUF file; reading it needs the {package} package: {GGUF_EXTRA}") from exc


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file holds, as far as loading it goes."""

    path: str
    architecture: str
    tensor_types: tuple[str, ...]  # the ggml types of its tensors (F32, Q4_1, ...), sorted
    size_bytes: int

    @property
    def quantisation(self) -> str:
        return "+".join(self.tensor_types) or "no tensors"


def _local_file(source: str) -> Path:
    folder, name = split_gguf(source)
    path = Path(folder) / name
    if path.is_file():
        return path
    from huggingface_hub import hf_hub_download  # a hub id: the file in the local cache (downloaded when online)

    return Path(hf_hub_download(folder, name))


def inspect_gguf(source: str) -> GgufInfo:
    """Read a GGUF file's header and refuse what transformers cannot dequantise.

    Errors: ``gguf`` missing (names the extra); a file that is not a whole GGUF (truncated or
    corrupt: names the file); an architecture or a tensor type that transformers cannot turn into a
    float model (names both the architecture and the quantisation).
    """
    require_gguf(source)
    import gguf

    path = _local_file(source)
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
        architecture = str(reader.fields["general.architecture"].contents())
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # the reader's errors on a short file are numpy's (reshape, index)
        raise ValueError(
            f"{path} is not a readable GGUF file (truncated or corrupt: {type(exc).__name__}: {exc}); download or "
            "convert it again"
        ) from exc
    if end > size:
        raise ValueError(
            f"{path} is truncated: its tensors need {end} bytes, the file has {size}; download or convert it again"
        )
    types = tuple(sorted({t.tensor_type.name for t in reader.tensors}))
    info = GgufInfo(str(path), architecture, types, size)
    supported = _compat.gguf_architectures()
    bad_types = [name for name in types if not _dequantisable(gguf, name)]
    if architecture not in supported or bad_types:
        problems = []
        if architecture not in supported:
            problems.append(f"architecture {architecture!r} (supported: {', '.join(sorted(supported))})")
        if bad_types:
            problems.append(f"tensor type(s) {', '.join(bad_types)} (no dequantiser)")
        raise ValueError(
            f"{path}: GGUF architecture {architecture!r} with quantisation {info.quantisation} cannot be loaded by "
            f"this transformers/gguf: unsupported {' and '.join(problems)}. Use a GGUF of a supported architecture and "
            "quantisation (e.g. Q4_K_M, Q8_0, F16), or convert the original checkpoint with save_pretrained"
        )
    return info


def _dequantisable(gguf: Any, type_name: str) -> bool:
    """Whether the ``gguf`` package dequantises tensors of ``type_name`` (tried on one zero block)."""
    import numpy as np

    qtype = gguf.GGMLQuantizationType[type_name]
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    try:
        gguf.quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
    except (NotImplementedError, KeyError, ValueError):
        return False
    return True


def load_gguf_config(source: str, **kwargs: Any) -> Any:
    """The transformers config a GGUF file describes (``AutoConfig.from_pretrained(folder, gguf_file=...)``)."""
    from transformers import AutoConfig

    inspect_gguf(source)
    folder, name = split_gguf(source)
    return AutoConfig.from_pretrained(folder, gguf_file=name, **kwargs)


def load_gguf_tokenizer(source: str, **kwargs: Any) -> Any:
    """The tokenizer (and chat template) stored in a GGUF file's metadata."""
    from transformers import AutoTokenizer

    inspect_gguf(source)
    folder, name = split_gguf(source)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name, **kwargs)


def load_gguf_model(auto_class: Any, source: str, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(folder, gguf_file=name, **kwargs)``, dequantised to a plain float
    model that ``save_pretrained`` writes as safetensors."""
    inspect_gguf(source)
    folder, name = split_gguf(source)
    model = auto_class.from_pretrained(folder, gguf_file=name, **_compat.gguf_dequantize_options(), **kwargs)
    return plain_model(model)


def plain_model(model: Any) -> Any:
    """``model`` without a GGUF quantiser attached (which makes ``save_pretrained`` refuse): the same
    weights in a fresh model of the same class and config, or ``model`` itself if it has none."""
    if getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None:
        return model
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next(model.parameters()).dtype
    fresh = type(model)(config).to(dtype)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


register_tokenizer_loader(GGUF_SUFFIX, load_gguf_tokenizer)  # load_tokenizer("x.gguf"): the file's tokenizer
