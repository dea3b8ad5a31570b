"""Evaluation: held-out perplexity, generation, scorers, win rates, TensorBoard samples, ``ulma evaluate``."""

from ulma_lightning.evaluation.callback import GenerationSamples
from ulma_lightning.evaluation.generation import GenerationConfig, generate_responses
from ulma_lightning.evaluation.metrics import TokenPerplexity
from ulma_lightning.evaluation.scorers import DemoScorer, HFClassifierScorer, RewardModelScorer, Scorer, TaskScorer
from ulma_lightning.evaluation.winrate import read_predictions, summarize, win_rate
from ulma_lightning.evaluation.writer import PredictionWriter

__all__ = [
    "DemoScorer",
    "GenerationConfig",
    "GenerationSamples",
    "HFClassifierScorer",
    "PredictionWriter",
    "RewardModelScorer",
    "Scorer",
    "TaskScorer",
    "TokenPerplexity",
    "generate_responses",
    "read_predictions",
    "summarize",
    "win_rate",
]
