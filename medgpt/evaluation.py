"""Evaluation metrics: question accuracy (generated and by likelihood), BLEU/ROUGE-L, perplexity,
reward-model pairwise accuracy. Used by evaluate_model.py and by the stages that report them."""

from __future__ import annotations

import itertools
import re
from typing import Sequence

import torch
from tqdm import tqdm

from medgpt.tokenization import tokenize_for_sft, tokenize_pair
from medgpt.generation import ChatModel, GenerationArguments
from medgpt.chat_template import THINK_CLOSE, THINK_OPEN
from medgpt.rewards import LETTERS, extract_choice, open_answer_score


def answer_after_reasoning(text: str) -> str:
    """The answer of a reasoning model's output: what follows the last </think> ("" when it never closed)."""
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1]
    return "" if text.lstrip().startswith(THINK_OPEN) else text


def question_scores(chat: ChatModel, items: Sequence[dict], batch_size: int = 8, max_new_tokens: int = 128,
                    desc: str = "Answering") -> list[float]:
    """Each item's score from its greedy answer (after any reasoning): a choice item 1.0 when the letters it
    chose are exactly its answer's (all of them for a multi-answer item), an open one by containment / char F1."""
    settings = GenerationArguments(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    scores = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch"):
        chunk = items[start : start + batch_size]
        answers = chat.generate([item["prompt"] for item in chunk], settings)
        for item, text in zip(chunk, answers):
            text = answer_after_reasoning(text)
            if item["kind"] == "choice":
                scores.append(float(extract_choice(text, item.get("letters") or LETTERS) == item["answer"]))
            else:
                scores.append(open_answer_score(text, item["answer"]))
    return scores


def score_questions(chat: ChatModel, items: Sequence[dict], batch_size: int = 8, max_new_tokens: int = 128,
                    desc: str = "Answering") -> dict:
    """Greedy answers to ``question_from_record`` items, scored: multiple-choice by exact letters,
    open answers by containment / character F1. Returns accuracy per kind and overall."""
    every = question_scores(chat, items, batch_size, max_new_tokens, desc)
    scores = {"choice": [], "open": []}
    for item, score in zip(items, every):
        scores[item["kind"]].append(score)
    result = {"n": len(every), "accuracy": sum(every) / len(every) if every else float("nan")}
    for kind, values in scores.items():
        if values:
            result[f"{kind}_accuracy"] = sum(values) / len(values)
            result[f"{kind}_n"] = len(values)
    return result


# ---------------------------------------------------------------- generation metrics


def _mixed_tokens(text: str) -> list[str]:
    """Chinese by characters, English by words (sacrebleu's zh tokenizer handles mixed text)."""
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    return TokenizerZh()(text.strip()).split()


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU-1..4 (sacrebleu, zh tokenization: CJK characters, English words) and mean
    ROUGE-L F1 (rouge-score with the same tokenization), all in percent."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    result = {}
    for order in range(1, 5):
        bleu = BLEU(tokenize="zh", max_ngram_order=order, effective_order=True)
        result[f"bleu_{order}"] = bleu.corpus_score(list(predictions), [list(references)]).score

    class _Tokenizer:
        def tokenize(self, text):
            return _mixed_tokens(text)

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    result["rouge_l"] = 100 * sum(scores) / len(scores) if scores else float("nan")
    return result


# ---------------------------------------------------------------- likelihood-based metrics


@torch.inference_mode()
def perplexity(model, tokenizer, texts: Sequence[str], max_length: int = 1024, batch_size: int = 4) -> dict:
    """Token-level perplexity over documents (each ends with EOS, cut to ``max_length`` tokens)."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    encoded = [(tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_length] for t in texts]
    for start in tqdm(range(0, len(encoded), batch_size), desc="Perplexity", unit="batch"):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(chunk):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, sequence in enumerate(chunk):  # one row in fp32 at a time: the whole batch's is GBs, and slow
            scored = len(sequence) - 1
            total_nll += torch.nn.functional.cross_entropy(logits[row, :scored].float(), ids[row, 1 : scored + 1].to(device),
                                                           reduction="sum").item()
            total_tokens += scored
    return {"perplexity": float(torch.exp(torch.tensor(total_nll / max(total_tokens, 1)))), "tokens": total_tokens}


@torch.inference_mode()
def answer_loss(chat: ChatModel, items: Sequence[dict], batch_size: int = 4, max_length: int = 1024) -> dict:
    """The SFT loss on held-out answers: mean negative log-likelihood of each reference answer's tokens (its
    end-of-turn included) after its prompt, rendered by the model's template exactly as SFT trains on it."""
    rows, positions, targets = [], [], []
    for item in items:
        messages = list(item["messages"]) + [{"role": "assistant", "content": item["reference"]}]
        tokens = tokenize_for_sft(chat.template, chat.tokenizer, messages, max_length, "truncate")
        wanted = [i - 1 for i, label in enumerate(tokens["labels"]) if label != -100 and i > 0]
        if wanted:
            rows.append(tokens["input_ids"])
            positions.append(wanted)
            targets.append([tokens["labels"][i + 1] for i in wanted])
    total, count = 0.0, 0
    for start in tqdm(range(0, len(rows), batch_size), desc="Answer loss", unit="batch"):
        logprobs = _forward_logprobs(chat, rows[start:start + batch_size], positions[start:start + batch_size])
        for row_logprobs, row_targets in zip(logprobs, targets[start:start + batch_size]):
            total -= row_logprobs.gather(-1, torch.tensor(row_targets, device=row_logprobs.device)[:, None]).sum().item()
            count += len(row_targets)
    return {"answer_loss": total / count if count else float("nan"), "answer_tokens": count}


def _option_letters(item: dict) -> list[str]:
    return sorted(item.get("letters") or set(re.findall(r"^([A-H])\. ", item["prompt"][-1]["content"],
                                                        flags=re.MULTILINE)) or "ABCD")


def _forward_logprobs(chat: ChatModel, rows: list[list[int]], positions: list[list[int]]) -> list[torch.Tensor]:
    """Next-token log-probabilities at the given positions of each row, in one right-padded forward pass
    (only those positions are normalized: the whole (rows, width, vocab) tensor would dominate the time)."""
    device = next(chat.model.parameters()).device
    width = max(len(r) for r in rows)
    pad = chat.tokenizer.pad_token_id if chat.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(rows):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    logits = chat.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    return [torch.log_softmax(logits[row, wanted].float(), dim=-1) for row, wanted in enumerate(positions)]


@torch.inference_mode()
def choice_loglik_predictions(chat: ChatModel, items: Sequence[dict], batch_size: int = 8,
                              desc: str = "Option likelihoods") -> list[str]:
    """Each choice item's answer by likelihood, "" for open items: after the prompt and "Answer: " / "答案：",
    the option letter the model finds most likely (one forward pass for ``batch_size`` items); for a
    multi-answer item, the most likely of all letter sets written as its answer is ("AC": summed token
    log-probabilities), so it is scored by exact set match."""
    predictions = [""] * len(items)
    prefixes = {}
    for index, item in enumerate(items):
        if item["kind"] == "choice":
            prefix = chat.prompt(item["prompt"]) + ("答案：" if _is_chinese(item) else "Answer: ")
            prefixes[index] = chat.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    letter_id = {}

    def first_token(letter: str) -> int:
        if letter not in letter_id:
            letter_id[letter] = chat.tokenizer(letter, add_special_tokens=False)["input_ids"][0]
        return letter_id[letter]

    single = [i for i in prefixes if len(items[i]["answer"]) == 1]
    multi = [i for i in prefixes if len(items[i]["answer"]) > 1]
    progress = tqdm(total=len(single) + len(multi), desc=desc, unit="question")
    for start in range(0, len(single), batch_size):
        chunk = single[start : start + batch_size]
        logprobs = _forward_logprobs(chat, [prefixes[i] for i in chunk], [[len(prefixes[i]) - 1] for i in chunk])
        for row, index in enumerate(chunk):
            letters = _option_letters(items[index])
            last = logprobs[row][0]
            predictions[index] = letters[int(torch.argmax(last[[first_token(c) for c in letters]]))]
        progress.update(len(chunk))
    for index in multi:
        letters = _option_letters(items[index])
        candidates = ["".join(c) for size in range(1, len(letters) + 1) for c in itertools.combinations(letters, size)]
        prefix, totals = prefixes[index], []
        for start in range(0, len(candidates), max(batch_size, 1) * 4):
            chunk = candidates[start : start + max(batch_size, 1) * 4]
            continuations = [chat.tokenizer(c, add_special_tokens=False)["input_ids"] for c in chunk]
            logprobs = _forward_logprobs(chat, [prefix + c for c in continuations],
                                         [list(range(len(prefix) - 1, len(prefix) - 1 + len(c))) for c in continuations])
            for row, continuation in enumerate(continuations):
                picked = logprobs[row][torch.arange(len(continuation)), torch.tensor(continuation)]
                totals.append(float(picked.sum()))
        predictions[index] = candidates[max(range(len(totals)), key=totals.__getitem__)]
        progress.update(1)
    progress.close()
    return predictions


@torch.inference_mode()
def choice_loglik_accuracy(chat: ChatModel, items: Sequence[dict], batch_size: int = 8,
                           multi_answer: bool = False) -> dict:
    """Multiple-choice accuracy by likelihood (:func:`choice_loglik_predictions`). Multi-answer items are
    scored with ``multi_answer``, else left out (counted, with the open items)."""
    scored = [item for item in items if item["kind"] == "choice" and (multi_answer or len(item["answer"]) == 1)]
    predictions = choice_loglik_predictions(chat, scored, batch_size)
    correct = sum(p == item["answer"] for p, item in zip(predictions, scored))
    return {"loglik_accuracy": correct / len(scored) if scored else float("nan"), "loglik_n": len(scored),
            "loglik_skipped_multi_answer": len(items) - len(scored)}


def _is_chinese(item: dict) -> bool:
    return bool(re.search(r"[\u4e00-\u9fff]", item["prompt"][-1]["content"]))


@torch.inference_mode()
def reward_accuracy(model, tokenizer, template, pairs: Sequence[dict], batch_size: int = 8) -> dict:
    """Pairwise accuracy of a reward model on preference pairs: chosen scored above rejected."""
    device = next(model.parameters()).device
    margins = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="Reward pairs", unit="batch"):
        chunk = pairs[start : start + batch_size]
        pairs_ids = [tokenize_pair(template, tokenizer, pair) for pair in chunk]  # as reward_modeling.py trains
        rows = [{"input_ids": ids["prompt_ids"] + ids[key]} for ids in pairs_ids for key in ("chosen_ids", "rejected_ids")]
        batch = tokenizer.pad(rows, padding=True, return_tensors="pt").to(device)
        scores = model(**batch).logits[:, 0].float().view(-1, 2)
        margins += (scores[:, 0] - scores[:, 1]).tolist()
    return {"reward_accuracy": sum(m > 0 for m in margins) / len(margins) if margins else float("nan"),
            "reward_margin": sum(margins) / len(margins) if margins else float("nan"), "pairs": len(margins)}
