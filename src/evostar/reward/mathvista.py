"""MathVista scoring without an LLM judge.

MathVista's official pipeline (lupantech/MathVista, ``evaluation/extract_answer.py`` and
``evaluation/calculate_score.py``) asks GPT-4 to pull the answer out of a response, then
normalises it by answer type and compares strings. Our responses end with an explicit
``# Answer`` block, so a rule-based extractor stands in for GPT-4; the normalisation
(``normalize_extracted_answer``), the edit-distance fallback for options (``get_most_similar``)
and the comparison (``safe_equal``) follow the official code so our numbers are comparable with
published ones. Nothing is ever eval()'d.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evostar.errors import UserError
from evostar.records import ANSWER_MARKER
from evostar.reward.answer import find_boxed

__all__ = [
    "GROUP_FIELDS",
    "TASK_ABBREVIATIONS",
    "ScoreInputError",
    "extract_mathvista_answer",
    "get_most_similar",
    "load_mathvista_problems",
    "load_responses_jsonl",
    "normalize_extracted_answer",
    "safe_equal",
    "score_mathvista",
]

TASK_ABBREVIATIONS: dict[str, str] = {
    "figure question answering": "FQA",
    "geometry problem solving": "GPS",
    "math word problem": "MWP",
    "textbook question answering": "TQA",
    "visual question answering": "VQA",
}

# (result key, record field): the breakdowns of MathVista's calculate_score.py ("target_keys").
# question_type/answer_type live at the top of a record, the rest under "metadata".
GROUP_FIELDS: tuple[tuple[str, str], ...] = (
    ("by_question_type", "question_type"),
    ("by_answer_type", "answer_type"),
    ("by_language", "language"),
    ("by_source", "source"),
    ("by_category", "category"),
    ("by_task", "task"),
    ("by_context", "context"),
    ("by_grade", "grade"),
    ("by_skill", "skills"),
)


class ScoreInputError(UserError):
    """A problems or responses file that cannot be scored; the message names file, line, field."""


# ---------------------------------------------------------------------------------------------
# Normalisation and comparison: the official calculate_score.py semantics.


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (python-Levenshtein's ``distance``, which is not a dependency)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def get_most_similar(prediction: str, choices: list[str]) -> str:
    """The option closest to ``prediction`` in edit distance; the first one on ties (as official)."""
    distances = [_edit_distance(prediction, str(c)) for c in choices]
    return choices[distances.index(min(distances))]


_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER_RE = re.compile(_NUMBER)


def _format_number(x: float) -> int | float:
    return int(x) if x.is_integer() and abs(x) < 1e15 else x


def _parse_number_list(text: Any) -> list[int | float] | None:
    """Numbers of a list answer like "[1, 2.5]" or "1, 2.5": a regex, where MathVista had str()."""
    if isinstance(text, (list, tuple)):
        text = ", ".join(str(t) for t in text)
    values = [float(m) for m in _NUMBER_RE.findall(str(text))]
    if not values or not all(math.isfinite(v) for v in values):
        return None
    return [_format_number(v) for v in values]


def _decimals(answer: Any) -> int:
    s = str(answer).strip()
    return len(s.split(".", 1)[1]) if "." in s else 0


def normalize_extracted_answer(
    extraction: Any, choices: list[str] | None, question_type: str, answer_type: str, precision: Any, answer: Any = None
) -> str | None:
    """Map an extraction onto the form of the gold answer, as MathVista does before comparing.

    multi_choice: "(B) ..." or "B" -> option text, otherwise the most similar option by edit
    distance. integer -> ``str(int(float(x)))``; float -> ``str(round(float(x), precision))``;
    list -> ``str([...])`` of the parsed numbers; text -> stripped string. None when the
    extraction does not fit the type (always wrong). ``answer`` is only used to guess the
    precision of float problems that do not give one.
    """
    if question_type == "multi_choice":
        if not choices:
            return None
        extraction = extraction.strip() if isinstance(extraction, str) else str(extraction or "")
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in letters:
            return choices[letters.index(extraction)]
        return get_most_similar(extraction, choices)
    if extraction is None:
        return None
    if answer_type == "integer":
        try:
            return str(int(float(extraction)))
        except (TypeError, ValueError, OverflowError):
            return None
    if answer_type == "float":
        try:
            digits = int(precision) if precision is not None else _decimals(answer)
            return str(round(float(extraction), digits))
        except (TypeError, ValueError, OverflowError):
            return None
    if answer_type == "list":
        values = _parse_number_list(extraction)
        return None if values is None else str(values)
    return str(extraction).strip()


def safe_equal(prediction: Any, answer: Any) -> bool:
    """Official comparison: plain equality that never raises."""
    try:
        return bool(prediction == answer)
    except Exception:
        return False


def _gold(problem: Mapping[str, Any]) -> str | None:
    """The gold answer in the form a normalised prediction takes.

    Official testmini answers are already strings in that form; this only tolerates records
    whose answer is a number, a list, or (multiple choice) a letter instead of the option text.
    """
    answer = problem.get("answer")
    if answer is None:
        return None
    if problem.get("answer_type") == "list":
        values = _parse_number_list(answer)
        return str(values) if values is not None else str(answer).strip()
    answer = str(answer).strip() if not isinstance(answer, str) else answer
    choices = problem.get("choices") or []
    if problem.get("question_type") == "multi_choice" and answer not in choices:
        if len(answer) == 1 and "A" <= answer.upper() < chr(ord("A") + len(choices)):
            return choices[ord(answer.upper()) - ord("A")]
    return answer


# ---------------------------------------------------------------------------------------------
# Rule-based extraction: stands in for MathVista's GPT-4 extractor.

_QUICK = re.compile(r'The answer is "(.*)"\.')
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+)", re.IGNORECASE)
_ANSWER_COLON = re.compile(r"^\s*(?:final\s+)?answer\s*:\s*(.+)$", re.IGNORECASE | re.MULTILINE)
_ANSWER_PREFIX = re.compile(
    r"^(?:the\s+)?(?:final\s+|correct\s+)?(?:answer|option|choice)\s*(?:is\s*:?|:)\s*", re.IGNORECASE
)
_TEXT_CMD = re.compile(r"\\(?:text|mathrm|textbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(" + _NUMBER + r")\s*\}\s*\{\s*(" + _NUMBER + r")\s*\}")
_SLASH = re.compile(r"(?<![\d.])(" + _NUMBER + r")\s*/\s*(" + _NUMBER + r")(?![\d.])")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LETTER_FORMS = (
    re.compile(r"^\(?([A-Z])\)?[.:)]?$"),
    re.compile(r"^\(([A-Za-z])\)(?:\s.*)?$", re.DOTALL),
    re.compile(r"^([A-Z])[.):]\s+\S"),
    re.compile(r"^(?:option|choice)\s*:?\s*\(?([A-Za-z])\)?[.:)]?$", re.IGNORECASE),
)
_PAREN_ANYWHERE = re.compile(r"\(([A-Z])\)")
_OPTION_WORD = re.compile(r"\b(?:[Oo]ption|[Cc]hoice)\s*:?\s*\(?([A-Z])\b\)?")


def _answer_span(response: str) -> str | None:
    """Where the response states its answer: ``# Answer`` block, boxed, "answer is"/"Answer:"."""
    idx = response.rfind(ANSWER_MARKER)
    if idx >= 0:
        tail = response[idx + len(ANSWER_MARKER) :]
        line = next((ln.strip() for ln in tail.splitlines() if ln.strip()), "")
        return line or None
    boxed = find_boxed(response)
    if boxed:
        return boxed
    for pattern in (_ANSWER_COLON, _ANSWER_IS):
        matches = list(pattern.finditer(response))
        if matches:
            # "The answer is 7. So we are done." -> "7"
            return re.split(r"\.\s", matches[-1].group(1), maxsplit=1)[0].strip()
    return None


def _clean(text: str) -> str:
    """Drop answer prefixes, boxed/math delimiters and trailing punctuation."""
    s = text.strip()
    for _ in range(3):
        before = s
        s = _ANSWER_PREFIX.sub("", s, count=1).strip()
        if "\\boxed" in s or "\\fbox" in s:
            s = find_boxed(s) or s
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : -len(right)].strip()
        s = s.rstrip().rstrip(".;,").rstrip()
        if len(s) > 1 and s[0] == s[-1] and s[0] in "\"'`*":
            s = s[1:-1].strip()
        if s == before:
            break
    return s


def _norm_option(s: str) -> str:
    return " ".join(_clean(s).casefold().split())


def _extract_choice(text: str, choices: list[str], whole_response: bool) -> str:
    """A letter ("B") or an option's text; otherwise the cleaned text, for get_most_similar."""
    s = _clean(text)
    letters = "".join(chr(ord("A") + i) for i in range(len(choices)))
    for pattern in _LETTER_FORMS:
        m = pattern.match(s)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    key = _norm_option(s)
    for c in choices:
        if key == _norm_option(str(c)):
            return str(c)
    # The answer is buried in a sentence ("so the correct option is (B) 5 cm").
    for pattern in (_PAREN_ANYWHERE, _OPTION_WORD):
        found = [m.group(1) for m in pattern.finditer(s) if m.group(1) in letters]
        if found:
            return found[-1]
    low = s.casefold()
    best: tuple[int, int, str] | None = None  # (position, length, option): last, then longest
    for c in choices:
        opt = _norm_option(str(c))
        if not opt:
            continue
        for m in re.finditer(r"(?<!\w)" + re.escape(opt) + r"(?!\w)", low):
            cand = (m.start(), len(opt), str(c))
            if best is None or cand[:2] > best[:2]:
                best = cand
    if best is not None:
        return best[2]
    if whole_response:
        lines = [ln.strip() for ln in s.splitlines() if ln.strip()]
        return lines[-1] if lines else s
    return s


def _numeric_text(text: str, thousands: bool = True) -> str:
    """Strip LaTeX units and decorations so numbers are easy to read off."""
    s = _TEXT_CMD.sub(" ", text)
    for token in ("^\\circ", "^{\\circ}", "\\circ", "°", "\\%", "%", "\\,", "\\!", "\\;", "~"):
        s = s.replace(token, " ")
    if thousands:  # "1,234" is one number, except in a list answer
        s = _THOUSANDS.sub("", s)
    s = _FRAC.sub(lambda m: f" {_divide(m.group(1), m.group(2))} ", s)
    return _SLASH.sub(lambda m: f" {_divide(m.group(1), m.group(2))} ", s)


def _divide(a: str, b: str) -> str:
    try:
        return repr(float(a) / float(b))
    except (ValueError, ZeroDivisionError):
        return f"{a}/{b}"


def _extract_free_form(text: str, answer_type: str, whole_response: bool) -> str:
    """The number(s) of a free-form answer, as text; the cleaned text when there are none."""
    s = _clean(text)
    if answer_type not in ("integer", "float", "list"):
        return s
    num = _numeric_text(s, thousands=answer_type != "list")
    if not whole_response:
        # "x = 12", "AB \approx 3.2": the value is on the right.
        for sep in ("\\approx", "≈", "="):
            if sep in num:
                num = num.rsplit(sep, 1)[1]
                break
    numbers = _NUMBER_RE.findall(num)
    if not numbers:
        return s
    if answer_type == "list":
        values = _parse_number_list(" ".join(numbers))
        return str(values) if values is not None else s
    # An answer span states its value first ("12 cm^2"); a whole response ends with it.
    return numbers[-1] if whole_response else numbers[0]


def extract_mathvista_answer(response: str | None, problem: Mapping[str, Any]) -> str:
    """Rule-based version of MathVista's ``extract_answer``; "" when nothing is found.

    The official rules come first (response equal to an option, a bare int/float, 'The answer
    is "x".'); then our ``# Answer`` block, ``\\boxed{}``, "answer is"/"Answer:", option letters
    or texts for multiple choice, and the number for free-form answers.
    """
    if not isinstance(response, str):
        return ""
    response = response.strip()
    if not response:
        return ""
    question_type = problem.get("question_type")
    answer_type = str(problem.get("answer_type") or "text")
    choices = [str(c) for c in problem.get("choices") or []]
    if question_type == "multi_choice" and response in choices:
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    quick = _QUICK.search(response)
    span = quick.group(1) if quick else _answer_span(response)
    whole = span is None
    text = response if whole else span
    if question_type == "multi_choice" and choices:
        return _extract_choice(text, choices, whole)
    return _extract_free_form(text, answer_type, whole)


# ---------------------------------------------------------------------------------------------
# Scoring.


def _group_values(problem: Mapping[str, Any], field: str) -> list[str]:
    meta = problem.get("metadata") or {}
    value = problem.get(field) if field in ("question_type", "answer_type") else None
    if value is None:
        value = meta.get(field, problem.get(field))
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, set)):
        return sorted({str(v) for v in value})  # each skill once per item
    return [str(value)]


def _summary(correct: int, n: int) -> dict[str, Any]:
    return {"accuracy": correct / n if n else 0.0, "n": n, "correct": correct}


def _sorted_groups(groups: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    """Highest accuracy first, like the official score file (ties by name, for stability)."""
    summaries = {k: _summary(c, n) for k, (c, n) in groups.items()}
    return dict(sorted(summaries.items(), key=lambda kv: (-kv[1]["accuracy"], kv[0])))


def score_mathvista(problems: Mapping[str, Mapping[str, Any]], responses: Mapping[str, str]) -> dict[str, Any]:
    """Accuracy over all ``problems``, overall and per MathVista breakdown.

    Every problem counts: a pid without a response is wrong and listed under ``missing``.
    Responses for pids that are not problems are ignored and counted under ``extra``.
    Returns accuracy/n/correct, ``by_task`` (full task names, as official) and
    ``by_task_short`` (FQA, GPS, MWP, TQA, VQA), ``by_<field>`` for the other official
    breakdowns (``by_skill``: an item counts once for each of its skills), and ``items``.
    """
    items: list[dict[str, Any]] = []
    groups: dict[str, dict[str, list[int]]] = {key: {} for key, _ in GROUP_FIELDS}
    short: dict[str, list[int]] = {}
    missing: list[str] = []
    n_correct = 0
    for pid, problem in problems.items():
        pid = str(pid)
        answer = _gold(problem)
        response = responses.get(pid)
        if response is None:
            missing.append(pid)
            extraction, prediction, ok = None, None, False
        else:
            extraction = extract_mathvista_answer(response, problem)
            prediction = normalize_extracted_answer(
                extraction,
                [str(c) for c in problem.get("choices") or []],
                str(problem.get("question_type")),
                str(problem.get("answer_type")),
                problem.get("precision"),
                answer=answer,
            )
            ok = prediction is not None and answer is not None and safe_equal(prediction, answer)
        n_correct += ok
        items.append(
            {
                "pid": pid,
                "extraction": extraction,
                "prediction": prediction,
                "answer": answer,
                "true_false": ok,
                "missing": response is None,
            }
        )
        for key, field in GROUP_FIELDS:
            for value in _group_values(problem, field):
                tally = groups[key].setdefault(value, [0, 0])
                tally[0] += ok
                tally[1] += 1
                if field == "task":
                    abbrev = TASK_ABBREVIATIONS.get(value.lower(), value)
                    tally = short.setdefault(abbrev, [0, 0])
                    tally[0] += ok
                    tally[1] += 1
    result: dict[str, Any] = _summary(n_correct, len(items))
    result["missing"] = len(missing)
    result["missing_pids"] = missing
    result["extra"] = sum(1 for pid in responses if pid not in problems)
    for key, _ in GROUP_FIELDS:
        result[key] = _sorted_groups(groups[key])
        if key == "by_task":
            result["by_task_short"] = _sorted_groups(short)
    result["items"] = items
    return result


# ---------------------------------------------------------------------------------------------
# Loading.

_REQUIRED_FIELDS = ("question_type", "answer_type", "answer")


def _check_problem(path: Path, where: str, record: Any) -> None:
    if not isinstance(record, dict):
        raise ScoreInputError(f"{path}: {where}: expected a JSON object, got {type(record).__name__}")
    for field in _REQUIRED_FIELDS:
        if field not in record:
            raise ScoreInputError(f"{path}: {where}: missing field {field!r}")
    if record["question_type"] not in ("multi_choice", "free_form"):
        raise ScoreInputError(
            f"{path}: {where}: field 'question_type' must be 'multi_choice' or 'free_form', "
            f"got {record['question_type']!r}"
        )
    if record["question_type"] == "multi_choice":
        choices = record.get("choices")
        if not isinstance(choices, list):
            raise ScoreInputError(f"{path}: {where}: field 'choices' must be a list for multi_choice")
        if not choices:
            raise ScoreInputError(f"{path}: {where}: field 'choices' is empty for a multi_choice problem")
        if not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in choices):
            raise ScoreInputError(f"{path}: {where}: field 'choices' must list text options")
    if "metadata" in record and not isinstance(record["metadata"], dict):
        raise ScoreInputError(f"{path}: {where}: field 'metadata' must be an object")
    answer = record.get("answer")
    if answer is None or isinstance(answer, (bool, dict, list)):
        raise ScoreInputError(f"{path}: {where}: field 'answer' must be text or a number, got {answer!r}")
    if record.get("answer_type", "text") not in ("text", "integer", "float", "list"):
        raise ScoreInputError(
            f"{path}: {where}: field 'answer_type' must be text, integer, float or list, got {record['answer_type']!r}"
        )
    precision = record.get("precision")
    if precision is not None and (
        isinstance(precision, bool) or not isinstance(precision, (int, float)) or precision < 0
    ):
        raise ScoreInputError(f"{path}: {where}: field 'precision' must be a number >= 0, got {precision!r}")
    if isinstance(record.get("pid"), (bool, dict, list)):
        raise ScoreInputError(f"{path}: {where}: field 'pid' must be text or a number")


def load_mathvista_problems(path: str | Path) -> dict[str, dict[str, Any]]:
    """Problems keyed by pid, from testmini.json (an object keyed by pid) or a list of records."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ScoreInputError(f"{path}: cannot read problems file: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise ScoreInputError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise ScoreInputError(f"{path}: cannot read problems file as UTF-8 text: {e}") from e
    problems: dict[str, dict[str, Any]] = {}
    if isinstance(data, dict):
        for key, record in data.items():
            _check_problem(path, f"problem {key!r}", record)
            problems[str(key)] = {**record, "pid": str(record.get("pid", key))}
    elif isinstance(data, list):
        for i, record in enumerate(data):
            where = f"record {i}"
            _check_problem(path, where, record)
            if record.get("pid") is None:
                raise ScoreInputError(f"{path}: {where}: missing field 'pid'")
            pid = str(record["pid"])
            if pid in problems:
                raise ScoreInputError(f"{path}: {where}: duplicate pid {pid!r}")
            problems[pid] = {**record, "pid": pid}
    else:
        raise ScoreInputError(
            f"{path}: expected an object keyed by pid or a list of records, got {type(data).__name__}"
        )
    if not problems:
        raise ScoreInputError(f"{path}: no problems to score")
    return problems


def load_responses_jsonl(path: str | Path, id_field: str = "pid", text_field: str = "response") -> dict[str, str]:
    """``{id: response}`` from JSONL lines ``{"pid": ..., "response": ...}``; blank lines skipped.

    `id_field` / `text_field` read other layouts, e.g. `evostar eval --responses` records
    (``sample_id`` / ``text``).
    """
    path = Path(path)
    responses: dict[str, str] = {}
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}: line {lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ScoreInputError(f"{where}: invalid JSON: {e.msg}") from e
                if not isinstance(record, dict):
                    raise ScoreInputError(f"{where}: expected a JSON object")
                pid = record.get(id_field)
                if pid is None or isinstance(pid, (bool, dict, list)):
                    raise ScoreInputError(f"{where}: field {id_field!r} missing or not a string/number")
                if not isinstance(record.get(text_field), str):
                    raise ScoreInputError(f"{where}: field {text_field!r} missing or not a string")
                pid = str(pid)
                if pid in responses:
                    raise ScoreInputError(f"{where}: field {id_field!r}: duplicate {id_field} {pid!r}")
                responses[pid] = record[text_field]
    except OSError as e:
        raise ScoreInputError(f"{path}: cannot read responses file: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ScoreInputError(f"{path}: cannot read responses file: {e}") from e
    return responses


def read_responses(path: str | Path) -> dict[str, str]:
    """``{pid: response}`` from ``{"pid", "response"}`` JSONL, or from the records `evostar eval
    --responses` writes (``sample_id`` / ``text``), told apart by the first record's fields."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ScoreInputError(f"{path}: cannot read responses file: {getattr(e, 'strerror', None) or e}") from e
    first = next((ln for ln in lines if ln.strip()), None)
    try:
        head = json.loads(first) if first is not None else {}
    except json.JSONDecodeError:
        head = {}  # load_responses_jsonl reports it with its line number
    if isinstance(head, dict) and "sample_id" in head and "pid" not in head:
        return load_responses_jsonl(path, id_field="sample_id", text_field="text")
    return load_responses_jsonl(path)
