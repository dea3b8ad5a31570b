"""Tokenizer loading, and the built-in tokenizers trained offline on the demo and comparison tasks' text."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
DEMO_TOKENIZER = "builtin:demo"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_byte_level_bpe(corpus: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``corpus``, with the EOS and PAD tokens.

    Byte-level, so any text encodes; deterministic for a given corpus order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def as_transformers_tokenizer(tokenizer: Any) -> Any:
    """A ``tokenizers.Tokenizer`` from :func:`train_byte_level_bpe` as a right-padding
    ``PreTrainedTokenizerFast`` (EOS doubling as BOS)."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    wrapped.padding_side = "right"
    return wrapped


#: The corpora the built-in tokenizers train on: name -> a function returning the texts. The tasks
#: register their own (``ulma_lightning.data.demo``, ``ulma_lightning.data.task``), so this module
#: imports nothing of the data package (which imports it).
BUILTIN_CORPORA: dict[str, Callable[[], list[str]]] = {}
BUILTIN_VOCAB_SIZES = {"demo": 640, "task": 1024}


def register_builtin_corpus(name: str, corpus: Callable[[], list[str]], vocab_size: int) -> None:
    """Make ``builtin:<name>`` a tokenizer trained on ``corpus()`` with ``vocab_size`` tokens."""
    BUILTIN_CORPORA[name] = corpus
    BUILTIN_VOCAB_SIZES[name] = vocab_size


@functools.lru_cache(maxsize=4)
def _builtin_tokenizer_json(name: str, vocab_size: int) -> str:
    if name not in BUILTIN_CORPORA:  # the package's __init__ imports the data package, which registers them
        raise ValueError(f"no corpus registered for builtin:{name}; register_builtin_corpus({name!r}, ...) first")
    corpus = BUILTIN_CORPORA[name]() + ["\n\nHuman: ", "\n\nAssistant: "]
    return train_byte_level_bpe(sorted(corpus) * 4, vocab_size).to_str()


def build_builtin_tokenizer(name: str, vocab_size: int | None = None) -> Any:
    """The built-in tokenizer ``builtin:<name>``: byte-level BPE trained on that task's text."""
    from tokenizers import Tokenizer

    return as_transformers_tokenizer(
        Tokenizer.from_str(_builtin_tokenizer_json(name, vocab_size or BUILTIN_VOCAB_SIZES[name]))
    )


def _demo_tokenizer_json(vocab_size: int = 640) -> str:
    return _builtin_tokenizer_json("demo", vocab_size)


def build_demo_tokenizer(vocab_size: int = 640) -> Any:
    """A byte-level BPE tokenizer trained on the demo corpus, with EOS and PAD tokens.

    Byte-level, so any text encodes; merges fit the demo task, so its sequences are short.
    """
    return build_builtin_tokenizer("demo", vocab_size)


def build_task_tokenizer(vocab_size: int = 1024) -> Any:
    """A byte-level BPE tokenizer trained on the comparison task's text (``builtin:task``)."""
    return build_builtin_tokenizer("task", vocab_size)


BUILTIN_TOKENIZERS = {"demo": build_demo_tokenizer, "task": build_task_tokenizer}

#: Loaders of tokenizer sources that ``AutoTokenizer.from_pretrained(source)`` does not read as they
#: are: file suffix -> ``loader(source, trust_remote_code=...)``. ``ulma_lightning.gguf_models``
#: registers ``.gguf`` (so this module imports nothing of the package).
SOURCE_LOADERS: dict[str, Callable[..., Any]] = {}


def register_tokenizer_loader(suffix: str, loader: Callable[..., Any]) -> None:
    """Make :func:`load_tokenizer` read sources ending in ``suffix`` (lower case) with ``loader``."""
    SOURCE_LOADERS[suffix.lower()] = loader


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads ``tokenizer``'s sequences: its pad token, else its EOS token (the attention
    mask, not the pad id, decides what a model sees)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


#: Text on which a loaded tokenizer must give the ids of the ``tokenizer.json`` it was loaded from:
#: blank lines, digits, decomposed and composed accents, runs of spaces, tabs, punctuation, CJK.
SAMPLE_TEXT = (
    "\n\nHuman: In 2024, 1234 + 56 = 1290?  Cafe\u0301 cafe\u0301s na\u00efve\t\u00c5ngstr\u00f6m \u4f60\u597d!"
    "\n\nAssistant: Yes -- 3.14.\n"
)


def saved_tokenizer_json(source: str) -> str | None:
    """The ``tokenizer.json`` of a local folder or of a hub id already in the local cache, else None."""
    path = os.path.join(source, "tokenizer.json")
    if os.path.isdir(source):
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    found = try_to_load_from_cache(source, "tokenizer.json")
    return found if isinstance(found, str) else None


def _sample_ids(tokenizer: Any) -> list[int]:
    return list(tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"])


def as_saved(tokenizer: Any, source: str) -> Any:
    """``tokenizer`` if it encodes like the ``tokenizer.json`` saved at ``source``, else that file as saved.

    transformers picks a tokenizer class from the model's type: a tokenizer trained with ``tokenizers``
    and saved with ``PreTrainedTokenizerFast.save_pretrained`` beside a Qwen2 config reloads as
    ``Qwen2Tokenizer``, whose own normalizer and pre-tokenizer give other ids (for blank lines and
    digits). The user's ``tokenizer.json`` is what the model was trained with: on a sample text, the
    loaded tokenizer must give its ids; if not, it is loaded as ``PreTrainedTokenizerFast`` (special
    tokens and chat template from the folder), with a warning; if that still differs, an error.
    """
    path = saved_tokenizer_json(source)
    if path is None or not getattr(tokenizer, "is_fast", False):
        return tokenizer
    from tokenizers import Tokenizer

    expected = Tokenizer.from_file(path).encode(SAMPLE_TEXT, add_special_tokens=False).ids
    if _sample_ids(tokenizer) == expected:
        return tokenizer
    from transformers import PreTrainedTokenizerFast

    loaded_as = type(tokenizer).__name__
    tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
    if _sample_ids(tokenizer) != expected:
        raise ValueError(
            f"tokenizer {source!r}: transformers loads it as {loaded_as}, and neither that class nor "
            f"PreTrainedTokenizerFast gives the ids of its tokenizer.json ({path}) on a sample text; save the "
            "tokenizer again with save_pretrained, or name another with policy.tokenizer"
        )
    if source not in _WARNED:
        _WARNED.add(source)
        log.warning(
            "tokenizer %r: AutoTokenizer loads it as %s, which encodes differently from its tokenizer.json (other "
            "normalizer or pre-tokenizer); using tokenizer.json as saved (PreTrainedTokenizerFast). Load the exported "
            "model's tokenizer the same way: PreTrainedTokenizerFast.from_pretrained(folder)",
            source,
            loaded_as,
        )
    return tokenizer


_WARNED: set[str] = set()


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> Any:
    """A tokenizer from a hub id, a local folder, a ``.gguf`` file (its metadata's tokenizer and chat
    template), ``builtin:demo`` or ``builtin:task``.

    A tokenizer without a pad token gets its EOS token as pad (the attention mask, not the pad id,
    decides what the model sees). A folder's (or cached hub model's) ``tokenizer.json`` is the
    tokenizer as saved: :func:`as_saved` (not with ``trust_remote_code``).
    """
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_TOKENIZERS:
            available = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_TOKENIZERS)
            raise ValueError(f"unknown built-in tokenizer {source!r}; available: {available}")
        return BUILTIN_TOKENIZERS[name]()
    from transformers import AutoTokenizer

    loader = next((load for suffix, load in SOURCE_LOADERS.items() if source.lower().endswith(suffix)), None)
    if loader is not None:
        tokenizer = loader(source, trust_remote_code=trust_remote_code)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        if not trust_remote_code:  # a tokenizer with its own code may encode otherwise by design
            tokenizer = as_saved(tokenizer, source)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {source!r} has neither a pad nor an EOS token; add one and save it again")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
