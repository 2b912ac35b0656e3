"""Evaluation that several callers share: accuracy on questions with checkable answers."""

from __future__ import annotations

from typing import Sequence

from tqdm import tqdm

from medgpt.generation import ChatModel, GenerationArguments
from medgpt.rewards import extract_choice, open_answer_score


def score_questions(chat: ChatModel, items: Sequence[dict], batch_size: int = 8, max_new_tokens: int = 128,
                    desc: str = "Answering") -> dict:
    """Greedy answers to ``question_from_record`` items, scored: multiple-choice by exact letters,
    open answers by containment / character F1. Returns accuracy per kind and overall."""
    settings = GenerationArguments(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    scores = {"choice": [], "open": []}
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch"):
        chunk = items[start : start + batch_size]
        answers = chat.generate([item["prompt"] for item in chunk], settings)
        for item, text in zip(chunk, answers):
            if item["kind"] == "choice":
                scores["choice"].append(float(extract_choice(text) == item["answer"]))
            else:
                scores["open"].append(open_answer_score(text, item["answer"]))
    every = scores["choice"] + scores["open"]
    result = {"n": len(every), "accuracy": sum(every) / len(every) if every else float("nan")}
    for kind, values in scores.items():
        if values:
            result[f"{kind}_accuracy"] = sum(values) / len(values)
            result[f"{kind}_n"] = len(values)
    return result
