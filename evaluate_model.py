"""Evaluate and compare models on held-out medical data; writes JSON and a markdown table.

    python evaluate_model.py --models base=DEFAULT sft=outputs/sft-merged dpo=outputs/sft-merged+outputs/dpo \\
        --qa_files data/sft/eval --text_files data/pretrain/eval --mcq_files data/grpo/eval \\
        --reward_models rm=outputs/rm --preference_files data/preference/eval --output_dir outputs/eval

A model is NAME=PATH (a merged or full model folder), NAME=BASE+ADAPTER (a LoRA adapter on its
base), or NAME=DEFAULT (the embedded default model). Each model is measured on what is given:

    --qa_files          answers to held-out questions vs. their references: BLEU-1..4 and ROUGE-L
                        (sacrebleu / rouge-score; Chinese by characters, English by words)
    --text_files        perplexity on held-out text (.txt lines, or .jsonl with "text")
    --mcq_files         multiple-choice accuracy, by parsing the generated answer and by comparing
                        option-letter likelihoods; open questions scored by containment / char F1
    --preference_files  with --reward_models: pairwise accuracy (chosen scored above rejected)

Files may be folders (searched recursively). --max_samples keeps CPU runs short.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from medgpt.args import parse_args, run_cli
from medgpt.data_files import find_data_files, json_reader, qa_reader, text_document_reader
from medgpt.records import preference_from_record, question_from_record
from medgpt.evaluation import (
    choice_loglik_accuracy,
    generation_metrics,
    perplexity,
    reward_accuracy,
    score_questions,
)
from medgpt.generation import ChatModel, GenerationArguments


@dataclass
class EvaluationArguments:
    """What to evaluate, on which data."""

    models: list[str] = field(default_factory=list, metadata={"help": "NAME=PATH, NAME=BASE+ADAPTER or NAME=DEFAULT."})
    reward_models: list[str] = field(default_factory=list, metadata={"help": "NAME=PATH of reward model folders."})
    qa_files: list[str] = field(default_factory=list, metadata={"help": "Held-out conversations/questions with answers."})
    text_files: list[str] = field(default_factory=list, metadata={"help": "Held-out text for perplexity."})
    mcq_files: list[str] = field(default_factory=list, metadata={"help": "Held-out multiple-choice / open questions."})
    preference_files: list[str] = field(default_factory=list, metadata={"help": "Held-out preference pairs."})
    template_name: str | None = field(default=None, metadata={"help": "Chat template (default: each tokenizer's own)."})
    max_samples: int | None = field(default=None, metadata={"help": "At most this many items per data set."})
    max_new_tokens: int = field(default=128, metadata={"help": "Answer length for generated answers."})
    batch_size: int = field(default=8, metadata={"help": "Items per batch."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where results.json and results.md go."})


def model_arguments(spec: str, template_name: str | None):
    from medgpt.args import ModelArguments

    if "=" not in spec:
        raise SystemExit(f"--models {spec}: expected NAME=PATH, NAME=BASE+ADAPTER or NAME=DEFAULT.")
    name, path = spec.split("=", 1)
    base, _, adapter = path.partition("+")
    try:
        return name, ModelArguments(model_name_or_path=None if base == "DEFAULT" else base,
                                    adapter_name_or_path=adapter or None, template_name=template_name)
    except ValueError as error:
        raise SystemExit(f"--models {spec}: {error}") from None


def read(files: list[str], reader, extensions, flag: str, limit: int | None) -> list:
    if not files:
        return []
    paths = []
    for name in files:
        directory = name if Path(name).is_dir() else None
        paths += find_data_files(directory, None if directory else [name], extensions, flag)
    items = [item for _, item in reader(paths)]
    return items[:limit] if limit else items


def evaluate_chat_model(chat: ChatModel, data: dict, args: EvaluationArguments) -> dict:
    result = {}
    if data["qa"]:
        settings = GenerationArguments(max_new_tokens=args.max_new_tokens, temperature=0.0, repetition_penalty=1.1)
        answers = []
        for start in range(0, len(data["qa"]), args.batch_size):
            answers += chat.generate([i["messages"] for i in data["qa"][start : start + args.batch_size]], settings)
        result.update(generation_metrics(answers, [i["reference"] for i in data["qa"]]))
        result["qa_n"] = len(answers)
        result["qa_examples"] = [{"question": i["messages"][-1]["content"], "answer": a, "reference": i["reference"]}
                                 for i, a in zip(data["qa"][:3], answers[:3])]
    if data["text"]:
        result.update(perplexity(chat.model, chat.tokenizer, data["text"], batch_size=args.batch_size))
    if data["mcq"]:
        result.update({f"mcq_{k}": v for k, v in score_questions(chat, data["mcq"], args.batch_size,
                                                                  args.max_new_tokens).items()})
        result.update({f"mcq_{k}": v for k, v in choice_loglik_accuracy(chat, data["mcq"]).items()})
    return result


def markdown_table(results: dict) -> str:
    columns = [("bleu_1", "BLEU-1"), ("bleu_2", "BLEU-2"), ("bleu_3", "BLEU-3"), ("bleu_4", "BLEU-4"),
               ("rouge_l", "ROUGE-L"), ("perplexity", "PPL"), ("mcq_choice_accuracy", "MCQ acc (generated)"),
               ("mcq_loglik_accuracy", "MCQ acc (likelihood)"), ("mcq_open_accuracy", "Open QA score"),
               ("reward_accuracy", "RM pair acc"), ("reward_margin", "RM margin")]
    used = [(key, title) for key, title in columns if any(key in r for r in results.values())]
    lines = ["| model | " + " | ".join(title for _, title in used) + " |", "|---" * (len(used) + 1) + "|"]
    for name, result in results.items():
        cells = [f"{result[key]:.3f}" if isinstance(result.get(key), float) else str(result.get(key, "-"))
                 for key, _ in used]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    (args, _) = parse_args((EvaluationArguments,), argv, description=__doc__)
    if not args.models and not args.reward_models:
        raise SystemExit("Nothing to evaluate: pass --models and/or --reward_models (see --help).")
    if args.reward_models and not args.preference_files:
        raise SystemExit("--reward_models needs --preference_files (held-out pairs).")
    questions = read(args.qa_files, qa_reader, (".jsonl", ".json", ".txt"), "qa", args.max_samples)
    if unanswered := sum("reference" not in i for i in questions):
        print(f"--qa_files: {unanswered} of {len(questions)} questions have no reference answer and are not "
              "scored (BLEU/ROUGE need one).", file=sys.stderr)
    data = {
        "qa": [i for i in questions if "reference" in i],
        "text": [t for t in read(args.text_files, text_document_reader(), (".txt", ".jsonl", ".json"), "text",
                                 args.max_samples)],
        "mcq": read(args.mcq_files, json_reader(question_from_record), (".jsonl", ".json"), "mcq", args.max_samples),
        "pairs": read(args.preference_files, json_reader(preference_from_record), (".jsonl", ".json"), "preference",
                      args.max_samples),
    }
    models = [model_arguments(spec, args.template_name) for spec in args.models]  # every spec checked first
    reward_models = [model_arguments(spec, args.template_name) for spec in args.reward_models]
    results = {}
    for name, model_args in models:
        print(f"== evaluating {name}", flush=True)
        results[name] = evaluate_chat_model(ChatModel.load(model_args), data, args)
    for name, model_args in reward_models:
        from transformers import AutoModelForSequenceClassification

        from medgpt.modeling import load_tokenizer
        from medgpt.chat_template import get_template

        print(f"== evaluating reward model {name}", flush=True)
        tokenizer = load_tokenizer(model_args)
        model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, num_labels=1).eval()
        model.config.pad_token_id = tokenizer.pad_token_id
        results[name] = reward_accuracy(model, tokenizer, get_template(args.template_name, tokenizer), data["pairs"],
                                        args.batch_size)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table = markdown_table(results)
    (output / "results.md").write_text(table, encoding="utf-8")
    print(table)
    return results


if __name__ == "__main__":
    run_cli(main)
