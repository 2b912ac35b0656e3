"""Verifiable rewards for GRPO on medical questions, and the answer parsing behind them.

Every reward function has TRL's signature ``f(prompts, completions, **columns) -> list[float]``:
``completions`` are strings or conversational message lists, and dataset columns (``answer``,
``options`` ...) arrive as keyword lists. Evaluation uses the same parsing (extract_choice).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

LETTERS = "ABCDE"

# "答案：B", "正确答案是C", "The answer is (c)", "correct options are A and C", "选B" ...
_LETTER_LIST = r"[A-Ea-e](?:\s*(?:,|，|、|and|和|与|及|/|\+|&)?\s*[A-Ea-e])*"
_STATEMENT = re.compile(
    r"(?:正确答案|最佳答案|答案|正确选项|应选|选择|选|answers?|correct\s+(?:answer|option|choice)s?|"
    r"best\s+(?:answer|option|choice))"
    r"\s*(?:is|are|为|是|应为|应该是|should\s+be|would\s+be)?\s*[:：]?\s*(?:option|options|选项)?\s*"
    r"[(\[（【*]*\s*(" + _LETTER_LIST + r")(?![A-Za-z])",
    re.IGNORECASE,
)
_BOLD = re.compile(r"\*\*\s*[(（]?([A-E](?:\s*(?:,|、|and|和)\s*[A-E])*)[)）]?\s*[.:：]?\s*\*\*")
_LINE_START = re.compile(r"^\s*[(（]?([A-E])[)）.:：、](?=\s|$|[^A-Za-z])", re.MULTILINE)
_NEGATED = re.compile(r"(?:not|不是|不选|排除|isn't|is\s+not)\s*$", re.IGNORECASE)
_FINAL_LINE = re.compile(r"^\s*(?:final\s+answer|answer|答案|最终答案)\s*[:：]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


def completion_text(completion) -> str:
    """The text of a completion: a string, or TRL's conversational [{"role", "content"}] list."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def _letters(found: str, valid: str) -> str:
    """Standalone option letters in ``found`` ("A and C" -> "AC"; the a/d of "and" do not count)."""
    tokens = re.findall(r"(?<![A-Za-z])[A-Za-z](?![A-Za-z])|(?<![A-Za-z])[A-Za-z]{2,5}(?![A-Za-z])", found)
    letters = set()
    for token in tokens:
        if token.lower() in ("and", "or"):
            continue
        letters |= set(token.upper())
    return "".join(sorted(c for c in letters if c in valid))


def extract_choice(text: str, valid: str = LETTERS) -> str:
    """The option letter(s) a free-text answer chose, sorted ("B", "AC"), or "" if none is clear.

    Tries, in order: the last explicit answer statement ("答案：B", "The answer is (c)"),
    bold letters ("**D**"), a line starting with an option ("B. ..."), and a bare answer ("C",
    "A, C"). Letters inside words never count, and a statement preceded by "not"/"不是" is skipped.
    """
    text = unicodedata.normalize("NFKC", text or "")
    for match in reversed(list(_STATEMENT.finditer(text))):
        if _NEGATED.search(text[: match.start(1)].rstrip("(（[【* ")[-12:]):
            continue
        letters = _letters(match.group(1), valid)
        if letters:
            return letters
    bold = _BOLD.findall(text)
    if bold:
        return _letters(bold[-1], valid)
    starts = _LINE_START.findall(text)
    if starts:
        return _letters(starts[-1], valid)
    bare = re.fullmatch(r"\W*(" + _LETTER_LIST + r")\W*", text.strip())
    if bare and bare.group(1).upper() == bare.group(1):  # lower-case "a" alone is too likely a word
        return _letters(bare.group(1), valid)
    return ""


def normalize_answer(text: str) -> str:
    """Lower-case, NFKC (full-width to half-width), without spaces and punctuation."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    return "".join(c for c in text if not (c.isspace() or unicodedata.category(c).startswith("P")))


def final_answer(text: str) -> str:
    """The part after the last "Answer:"/"答案：" line, else the last non-empty line."""
    matches = _FINAL_LINE.findall(text or "")
    if matches:
        return matches[-1]
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def char_f1(prediction: str, reference: str) -> float:
    """F1 over characters (a bag of characters), so Chinese answers get sensible partial credit."""
    pred, ref = Counter(normalize_answer(prediction)), Counter(normalize_answer(reference))
    common = sum((pred & ref).values())
    if not common:
        return 0.0
    precision, recall = common / sum(pred.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def open_answer_score(text: str, reference: str) -> float:
    """1.0 when the final answer contains the reference (normalized), else character-level F1."""
    answer = normalize_answer(final_answer(text))
    target = normalize_answer(reference)
    if target and target in answer:
        return 1.0
    return char_f1(answer, target)


# ---------------------------------------------------------------- TRL reward functions


def choice_accuracy_reward(prompts, completions, answer, **columns) -> list[float | None]:
    """1.0 when the chosen letter(s) equal the answer key exactly; 0.0 otherwise or when no letter
    is found. Items without an option-letter answer get None (scored by another reward)."""
    rewards = []
    for completion, gold in zip(completions, answer):
        gold_letters = _letters(gold or "", LETTERS) if re.fullmatch(r"[A-Ea-e]+", (gold or "").strip()) else ""
        if not gold_letters:
            rewards.append(None)
            continue
        rewards.append(1.0 if extract_choice(completion_text(completion)) == gold_letters else 0.0)
    return rewards


def open_answer_reward(prompts, completions, answer, **columns) -> list[float | None]:
    """Free-text answers (e.g. a disease name): containment of the reference, else character F1.
    Multiple-choice items get None (scored by choice_accuracy_reward)."""
    rewards = []
    for completion, gold in zip(completions, answer):
        if re.fullmatch(r"[A-Ea-e]+", (gold or "").strip()):
            rewards.append(None)
        else:
            rewards.append(open_answer_score(completion_text(completion), gold))
    return rewards


def format_reward(prompts, completions, max_reasoning_chars: int = 1200, **columns) -> list[float]:
    """1.0 for a short reasoning section followed by a final "Answer: ..." / "答案：..." line;
    0.5 for the answer line alone or reasoning that runs too long; 0.0 without an answer line."""
    rewards = []
    for completion in completions:
        lines = [line for line in completion_text(completion).strip().splitlines() if line.strip()]
        if not lines or not _FINAL_LINE.fullmatch(lines[-1]):
            rewards.append(0.0)
            continue
        reasoning = "\n".join(lines[:-1])
        rewards.append(1.0 if 0 < len(reasoning) <= max_reasoning_chars else 0.5)
    return rewards


REWARD_FUNCTIONS = {
    "accuracy": choice_accuracy_reward,
    "open_answer": open_answer_reward,
    "format": format_reward,
}
