"""The multimodal process reward model: Monte-Carlo step labels (`labels`), the model read at
step tags (`model`), its training (`train`), scoring responses (`score`) and its metrics
(`metrics`)."""

from evostar.reward.prm.labels import CompleteFn, StepLabels, hf_completer, label_responses, read_labels
from evostar.reward.prm.metrics import (
    auroc,
    first_error_f1,
    label_quality,
    reward_pass_at_k,
    selection_accuracy,
    step_auroc,
)
from evostar.reward.prm.model import PRM, PRMTokens, init_prm, load_prm
from evostar.reward.prm.score import aggregate_scores, score_responses
from evostar.reward.prm.train import PRMExample, PRMTrainer, examples_from_labels

__all__ = [
    "PRM",
    "CompleteFn",
    "PRMExample",
    "PRMTokens",
    "PRMTrainer",
    "StepLabels",
    "aggregate_scores",
    "auroc",
    "examples_from_labels",
    "first_error_f1",
    "hf_completer",
    "init_prm",
    "label_quality",
    "label_responses",
    "load_prm",
    "read_labels",
    "reward_pass_at_k",
    "score_responses",
    "selection_accuracy",
    "step_auroc",
]
