"""Evaluation metrics: question accuracy (generated and by likelihood), BLEU/ROUGE-L, perplexity,
reward-model pairwise accuracy. Used by evaluate_model.py and by the stages that report them."""

from __future__ import annotations

import re
from typing import Sequence

import torch
from tqdm import tqdm

from medgpt.tokenization import tokenize_pair
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
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:].to(device)
        nll = -logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask[:, 1:].to(device)
        total_nll += nll.sum().item()
        total_tokens += int(mask[:, 1:].sum())
    return {"perplexity": float(torch.exp(torch.tensor(total_nll / max(total_tokens, 1)))), "tokens": total_tokens}


@torch.inference_mode()
def choice_loglik_accuracy(chat: ChatModel, items: Sequence[dict]) -> dict:
    """Multiple-choice accuracy by likelihood: after the prompt and "Answer: ", the option letter
    the model finds most likely is its choice. Multi-answer items are left out (counted)."""
    device = next(chat.model.parameters()).device
    correct, scored, skipped = 0, 0, 0
    for item in tqdm(items, desc="Option likelihoods", unit="question"):
        if item["kind"] != "choice" or len(item["answer"]) != 1:
            skipped += 1
            continue
        letters = sorted(set(re.findall(r"^([A-H])\. ", item["prompt"][-1]["content"], flags=re.MULTILINE))) or list("ABCD")
        prefix = chat.prompt(item["prompt"]) + ("答案：" if _is_chinese(item) else "Answer: ")
        ids = chat.tokenizer(prefix, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        logprobs = torch.log_softmax(chat.model(input_ids=ids).logits[0, -1].float(), dim=-1)
        letter_ids = [chat.tokenizer(letter, add_special_tokens=False)["input_ids"][0] for letter in letters]
        choice = letters[int(torch.argmax(logprobs[letter_ids]))]
        correct += int(choice == item["answer"])
        scored += 1
    return {"loglik_accuracy": correct / scored if scored else float("nan"), "loglik_n": scored,
            "loglik_skipped_multi_answer": skipped}


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
