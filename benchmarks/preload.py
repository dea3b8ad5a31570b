"""Imported once by the fork server, so that every benchmark row starts from the same baseline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import datasets  # noqa: E402,F401
import lightning  # noqa: E402,F401
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401
import trl  # noqa: E402,F401
from trl import DPOTrainer, KTOTrainer, SFTTrainer  # noqa: E402,F401

import ulma_lightning  # noqa: E402,F401
from benchmarks import ours, rows, trl_rows, workload  # noqa: E402,F401
