"""Outcome reward: extract the final answer of a response and check it against the gold answer.

The CPU loop calls `answers_match` about ten thousand times per iteration, so the common cases
(identical strings, plain numbers, multiple-choice letters) are settled with string and float
arithmetic; only genuinely mathematical answers (fractions, radicals, expressions) reach
math-verify, whose results are cached because many responses to one prompt share an answer.
Nothing here raises on bad model output and nothing is ever eval()'d.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Mapping
from functools import lru_cache

from evostar.records import ANSWER_MARKER, Response, Sample

__all__ = ["answers_match", "extract_answer", "find_boxed", "reward_responses"]

_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+)", re.IGNORECASE)
_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+|correct\s+)?answer\s*(?:is\s*:?|:)\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.\s")
_PLAIN_NUMBER = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][+-]?\d+)?$")
_HAS_DIGIT = re.compile(r"\d")
_PROSE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")  # a word that is not a LaTeX command
_WORDS = re.compile(r"^[A-Za-z][A-Za-z\s'\-]*$")
_BARE_LETTER = re.compile(r"^\(?([A-Z])\)?[.:)]?$")
_PAREN_LETTER = re.compile(r"^\(([A-Za-z])\)(?:\s.*)?$", re.DOTALL)
_LETTER_DOT_TEXT = re.compile(r"^([A-Z])[.):]\s+\S")
_OPTION_LETTER = re.compile(r"^(?:option|choice)\s*:?\s*\(?([A-Za-z])\)?[.:)]?$", re.IGNORECASE)
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))

# Far beyond any real comparison; only guards against sympy hanging on a pathological input.
_MATH_VERIFY_TIMEOUT_S = 5


def find_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), matching braces; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None  # "\boxed 5": no braces, no answer
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None  # unbalanced: a truncated generation


def _strip_trailing(s: str) -> str:
    """Drop sentence punctuation after an answer ("5." -> "5") but keep decimals and "...": cheap."""
    s = s.strip()
    while s and s[-1] in ".;," and not s.endswith(".."):
        s = s[:-1].rstrip()
    return s


def extract_answer(text: str) -> str | None:
    """The final answer of a response; None when it has none.

    Responses are trained to end with ``# Answer\\n\\n<answer>``; the text after the *last*
    marker wins (a model may quote the format earlier). Without a marker, fall back to the last
    ``\\boxed{}``, then to "The (final) answer is X", so untrained base models still score.
    """
    if not text:
        return None
    idx = text.rfind(ANSWER_MARKER)
    if idx >= 0:
        tail = text[idx + len(ANSWER_MARKER) :]
        line = next((ln.strip() for ln in tail.splitlines() if ln.strip()), "")
        return _clean(_ANSWER_PREFIX.sub("", line, count=1)) or None
    boxed = find_boxed(text)
    if boxed:
        return _clean(boxed) or None
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        # "The answer is 7. So we are done." -> "7"
        return _clean(_SENTENCE_END.split(matches[-1].group(1), maxsplit=1)[0]) or None
    return None


def _clean(s: str) -> str:
    """Canonical surface form: no boxed/math delimiters, no trailing period, single spaces."""
    s = s.strip()
    if "\\boxed" in s or "\\fbox" in s:
        s = find_boxed(s) or s
    changed = True
    while changed:
        changed = False
        for left, right in _WRAPPERS:
            if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : -len(right)].strip()
                changed = True
    s = _strip_trailing(s)
    return " ".join(s.split())


def _plain_number(s: str) -> tuple[float, bool] | None:
    """(value, had_percent) for strings like "12", "-3.5", "1,000", "50%"; None otherwise."""
    pct = False
    if s.endswith("%"):
        pct = True
        s = s[:-2] if s.endswith("\\%") else s[:-1]
        s = s.rstrip()
    if not s or not _PLAIN_NUMBER.match(s) or not _HAS_DIGIT.search(s):
        return None
    try:
        return float(s.replace(",", "")), pct
    except ValueError:
        return None


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def _numbers_equal(p: tuple[float, bool], g: tuple[float, bool]) -> bool:
    """Equal values; a percent on one side may also mean the fraction ("50%" vs "0.5")."""
    (a, pa), (b, pb) = p, g
    if _close(a, b):
        return True
    if pa and not pb and _close(a / 100, b):
        return True
    return pb and not pa and _close(a, b / 100)


def _timeout() -> int | None:
    """math-verify's timeouts use SIGALRM, which only the main thread may set."""
    if threading.current_thread() is threading.main_thread():
        return _MATH_VERIFY_TIMEOUT_S
    return None


@lru_cache(maxsize=65536)
def _parse(expr: str, wrap: bool) -> tuple:
    from math_verify import parse

    return tuple(parse(f"${expr}$" if wrap else expr, parsing_timeout=_timeout()))


@lru_cache(maxsize=65536)
def _math_verify_equal(pred: str, gold: str) -> bool:
    """Symbolic/numeric equivalence via math-verify; any failure counts as a mismatch."""
    try:
        from math_verify import verify

        g = _parse(gold, True)
        if not g:
            return False
        if verify(list(g), list(_parse(pred, True)), timeout_seconds=_timeout()):
            return True
        # "$...$" turns prose ("12 apples") into a product of symbols; the raw text lets
        # math-verify find the number itself. Only worth a second parse when there is prose.
        if _PROSE.search(pred):
            return bool(verify(list(g), list(_parse(pred, False)), timeout_seconds=_timeout()))
        return False
    except Exception:  # math-verify/sympy can raise almost anything on odd input
        return False


def _free_form_match(pred: str, gold: str) -> bool:
    p, g = _clean(pred), _clean(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    pn = _plain_number(p)
    gn = _plain_number(g)
    if pn is not None and gn is not None:
        return _numbers_equal(pn, gn)
    if _WORDS.match(p) and _WORDS.match(g):
        # Plain words: math-verify would read "garbage" as a product of symbols, so anagrams
        # would match. Compare as text instead.
        return p.casefold() == g.casefold()
    return _math_verify_equal(p, g)


def _letter_index(s: str, n: int) -> int | None:
    """Index of a choice letter written as B, (B), B., B), (B) text, B. text, Option B."""
    m = _BARE_LETTER.match(s) or _PAREN_LETTER.match(s) or _OPTION_LETTER.match(s) or _LETTER_DOT_TEXT.match(s)
    if not m:
        return None
    i = ord(m.group(1).upper()) - ord("A")
    return i if 0 <= i < n else None


def _norm_text(s: str) -> str:
    return " ".join(_clean(s).casefold().split())


def _choice_index(ans: str, choices: list[str]) -> int | None:
    """Which option an answer names: by letter, by option text, or by numeric value."""
    s = _clean(ans)
    i = _letter_index(s, len(choices))
    if i is not None:
        return i
    key = _norm_text(s)
    for j, c in enumerate(choices):
        if key == _norm_text(c):
            return j
    num = _plain_number(s)
    if num is not None:
        hits = [
            j for j, c in enumerate(choices) if (cn := _plain_number(_clean(c))) is not None and _close(num[0], cn[0])
        ]
        if len(hits) == 1:
            return hits[0]
    return None


def answers_match(pred: str | None, gold: str, choices: list[str] | None = None) -> bool:
    """Is the predicted final answer the gold one? Never raises.

    With ``choices`` the answer may be a letter ("B", "(B)", "B.", "B)", "\\boxed{B}",
    "Option B") or an option's text; gold may be either too. Otherwise plain numbers are
    compared as floats and anything else goes to math-verify (``\\frac{1}{2}`` == ``0.5``).
    """
    try:
        if pred is None or gold is None:
            return False
        pred, gold = str(pred), str(gold)
        if choices:
            gi = _choice_index(gold, choices)
            if gi is not None:
                pi = _choice_index(pred, choices)
                if pi is not None:
                    return pi == gi
                return _free_form_match(pred, choices[gi])
        return _free_form_match(pred, gold)
    except Exception:
        return False


def reward_responses(samples_by_id: Mapping[str, Sample], responses: Iterable[Response]) -> list[Response]:
    """Fill ``extracted`` and ``correct`` of each response in place; return them as a list.

    Responses to unlabeled samples get ``correct=None`` (unknown, not wrong). A response whose
    sample is not in ``samples_by_id`` is a pipeline bug and raises KeyError.
    """
    out = list(responses)
    for r in out:
        sample = samples_by_id.get(r.sample_id)
        if sample is None:
            raise KeyError(f"response refers to unknown sample id {r.sample_id!r}")
        r.extracted = extract_answer(r.text)
        if sample.answer is None:
            r.correct = None
        else:
            r.correct = answers_match(r.extracted, sample.answer, sample.choices)
    return out
