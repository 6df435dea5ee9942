"""Rewards: outcome correctness of final answers, and MathVista-compatible scoring."""

from evostar.reward.answer import answers_match, extract_answer, reward_responses
from evostar.reward.mathvista import ScoreInputError, load_mathvista_problems, load_responses_jsonl, score_mathvista

__all__ = [
    "ScoreInputError",
    "answers_match",
    "extract_answer",
    "load_mathvista_problems",
    "load_responses_jsonl",
    "reward_responses",
    "score_mathvista",
]
