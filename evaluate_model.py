"""Evaluate and compare models on held-out medical data; writes JSON and a markdown table.

    python evaluate_model.py --models base=DEFAULT sft=outputs/sft-merged dpo=outputs/sft-merged+outputs/dpo \\
        --qa_files data/sft/eval --text_files data/pretrain/eval --mcq_files data/grpo/eval \\
        --reward_models rm=outputs/rm --preference_files data/preference/eval --output_dir outputs/eval

A model is NAME=PATH (a merged or full model folder, a 4/8-bit folder or a .gguf file from
quantize_model.py), NAME=BASE+ADAPTER (a LoRA adapter on its base), or NAME=DEFAULT (the embedded
default model). Each model is measured on what is given:

    --qa_files          answers to held-out questions vs. their references: BLEU-1..4 and ROUGE-L
                        (sacrebleu / rouge-score; Chinese by characters, English by words), and the answer
                        loss (the SFT loss of the reference answers after their prompts)
    --text_files        perplexity on held-out text (.txt lines, or .jsonl with "text")
    --mcq_files         multiple-choice accuracy, by parsing the generated answer and by comparing
                        option-letter likelihoods; open questions scored by containment / char F1
    --preference_files  with --reward_models: pairwise accuracy (chosen scored above rejected)
    --benchmark_files   standard benchmarks in their published files (MedQA, MedMCQA, PubMedQA, CMExam, CMB,
                        C-Eval, CMMLU, MMLU; a folder of subject files is one benchmark, reported per subject):
                        accuracy with its 95% Wilson interval, by option likelihood and/or by the generated
                        answer (--benchmark_scoring), zero-shot or --num_fewshot k from the benchmark's dev split;
                        written to benchmarks.json and benchmarks.md

Files may be folders (searched recursively; benchmark folders are not). --max_samples keeps CPU runs short.

    python evaluate_model.py --models base=DEFAULT --benchmark_files data/benchmarks/medqa/test.jsonl \\
        data/benchmarks/ceval/val --num_fewshot 2 --benchmark_scoring likelihood generation
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from medgpt.args import parse_args, run_cli
from medgpt.data_files import find_data_files, json_reader, qa_reader, text_document_reader
from medgpt.records import preference_from_record, question_from_record
from medgpt.benchmarks import FORMATS, accuracy_summary, benchmark_question, fewshot_examples, read_benchmark
from medgpt.evaluation import (
    answer_loss,
    choice_loglik_accuracy,
    choice_loglik_predictions,
    generation_metrics,
    perplexity,
    question_scores,
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
    benchmark_files: list[str] = field(default_factory=list, metadata={
        "help": "Benchmark files or folders of subject files, in their published formats."})
    benchmark_format: str | None = field(default=None, metadata={
        "help": "Read every --benchmark_files as this format (default: detected): medqa, medmcqa, pubmedqa, cmexam, "
                "cmb, ceval, cmmlu, mmlu."})
    num_fewshot: int = field(default=0, metadata={"help": "Examples from each benchmark's dev split before a question."})
    benchmark_scoring: list[str] = field(default_factory=lambda: ["likelihood"], metadata={
        "help": "likelihood (the most likely option letters) and/or generation (letters parsed from the greedy "
                "answer, after any <think> reasoning); the first gives 'accuracy'."})
    generation_models: list[str] = field(default_factory=list, metadata={
        "help": "NAMEs of --models whose answers are generated (BLEU/ROUGE-L, MCQ accuracy of the generated answer; "
                "default: every model). The others get the likelihood measures only (answer loss, perplexity, MCQ "
                "by option likelihood): one forward pass per item instead of a generation."})
    template_name: str | None = field(default=None, metadata={"help": "Chat template (default: each tokenizer's own)."})
    torch_dtype: str = field(default="auto", metadata={
        "help": "Every model's weights dtype, as the stages' --torch_dtype (auto: float32 on CPU). bfloat16 on a CPU "
                "with native bf16 (AVX512-BF16/AMX) evaluates ~2x faster than float32, with likelihoods that differ "
                "in the third digit."})
    max_samples: int | None = field(default=None, metadata={"help": "At most this many items per data set."})
    max_new_tokens: int = field(default=128, metadata={"help": "Answer length for generated answers."})
    batch_size: int = field(default=8, metadata={"help": "Items per batch."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where results.json and results.md go."})

    def __post_init__(self):
        from medgpt.modeling import resolve_dtype

        resolve_dtype(self.torch_dtype)  # an unknown name: a usage error naming --torch_dtype


def model_arguments(spec: str, template_name: str | None, torch_dtype: str = "auto"):
    from medgpt.args import ModelArguments

    if "=" not in spec:
        raise SystemExit(f"--models {spec}: expected NAME=PATH, NAME=BASE+ADAPTER or NAME=DEFAULT.")
    name, path = spec.split("=", 1)
    base, _, adapter = path.partition("+")
    try:
        return name, ModelArguments(model_name_or_path=None if base == "DEFAULT" else base,
                                    adapter_name_or_path=adapter or None, template_name=template_name,
                                    torch_dtype=torch_dtype)
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


def evaluate_chat_model(chat: ChatModel, data: dict, args: EvaluationArguments, generate: bool = True) -> dict:
    result = {}
    if data["qa"] and generate:
        settings = GenerationArguments(max_new_tokens=args.max_new_tokens, temperature=0.0, repetition_penalty=1.1)
        answers = []
        for start in range(0, len(data["qa"]), args.batch_size):
            answers += chat.generate([i["messages"] for i in data["qa"][start : start + args.batch_size]], settings)
        result.update(generation_metrics(answers, [i["reference"] for i in data["qa"]]))
        result["qa_n"] = len(answers)
        result["qa_examples"] = [{"question": i["messages"][-1]["content"], "answer": a, "reference": i["reference"]}
                                 for i, a in zip(data["qa"][:3], answers[:3])]
    if data["qa"]:
        result.update(answer_loss(chat, data["qa"], args.batch_size))
    if data["text"]:
        result.update(perplexity(chat.model, chat.tokenizer, data["text"], batch_size=args.batch_size))
    if data["mcq"] and generate:
        result.update({f"mcq_{k}": v for k, v in score_questions(chat, data["mcq"], args.batch_size,
                                                                  args.max_new_tokens).items()})
    if data["mcq"]:
        result.update({f"mcq_{k}": v for k, v in choice_loglik_accuracy(chat, data["mcq"],
                                                                                         args.batch_size).items()})
    return result


SCORINGS = ("likelihood", "generation")


def read_benchmarks(args: EvaluationArguments) -> list[dict]:
    """Every --benchmark_files argument read, with its questions (few-shot prompts built); all problems at once."""
    from medgpt.records import DataError

    problems = [f"--benchmark_scoring {s}: choose likelihood and/or generation." for s in args.benchmark_scoring
                if s not in SCORINGS]
    if args.benchmark_format and args.benchmark_format not in FORMATS:
        problems.append(f"--benchmark_format {args.benchmark_format}: choose one of {', '.join(FORMATS)}.")
    if args.num_fewshot < 0:
        problems.append(f"--num_fewshot {args.num_fewshot}: must be 0 or more.")
    if problems:
        raise DataError(problems, what="benchmark arguments", outcome="nothing was evaluated")
    benchmarks = []
    for name in args.benchmark_files:
        try:
            benchmark = read_benchmark(name, args.benchmark_format)
            shots = fewshot_examples(benchmark, args.num_fewshot)
        except DataError as error:
            problems += error.problems
            continue
        items = benchmark["items"][: args.max_samples] if args.max_samples else benchmark["items"]
        benchmark["questions"] = [benchmark_question(item, shots.get(item["file"], ())) for item in items]
        benchmarks.append(benchmark)
    names = [b["name"] for b in benchmarks]
    problems += [f"--benchmark_files: two benchmarks are named {n!r} (by file stem or folder name); rename one."
                 for n in sorted({n for n in names if names.count(n) > 1})]
    if problems:
        raise DataError(problems, what="benchmark files", outcome="nothing was evaluated")
    return benchmarks


def evaluate_benchmarks(chat: ChatModel, benchmarks: list[dict], args: EvaluationArguments) -> dict:
    """{benchmark: {"accuracy", "n", "correct", "ci95", "format", "scoring", "subjects", <other scoring>: {...}}}."""
    results = {}
    for benchmark in benchmarks:
        questions = benchmark["questions"]
        subjects = [q["subject"] for q in questions]
        summaries = {}
        for scoring in dict.fromkeys(args.benchmark_scoring):
            if scoring == "likelihood":
                predictions = choice_loglik_predictions(chat, questions, args.batch_size, desc=benchmark["name"])
                scores = [float(p == q["answer"]) for p, q in zip(predictions, questions)]
            else:
                scores = question_scores(chat, questions, args.batch_size, args.max_new_tokens, desc=benchmark["name"])
            summaries[scoring] = accuracy_summary(scores, subjects)
        first, *others = summaries
        results[benchmark["name"]] = {**summaries[first], "format": benchmark["format"], "scoring": first,
                                      "num_fewshot": args.num_fewshot, **{o: summaries[o] for o in others}}
    return results


def benchmark_table(results: dict) -> str:
    """One row per model, one column per benchmark: accuracy [95% interval] (n), then per-subject rows."""
    names = list(dict.fromkeys(b for r in results.values() for b in r))
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def cell(entry: dict | None) -> str:
        if not entry:
            return "-"
        low, high = entry["ci95"]
        return f"{entry['accuracy']:.3f} [{low:.3f}, {high:.3f}] (n={entry['n']})"

    for model, result in results.items():
        lines.append(f"| {model} | " + " | ".join(cell(result.get(b)) for b in names) + " |")
    for name in names:
        subjects = list(dict.fromkeys(s for r in results.values() for s in r.get(name, {}).get("subjects", {})))
        if subjects:
            lines += ["", f"{name} by subject:", "", "| model | " + " | ".join(subjects) + " |",
                      "|---" * (len(subjects) + 1) + "|"]
            lines += [f"| {model} | " + " | ".join(cell(r.get(name, {}).get("subjects", {}).get(s)) for s in subjects)
                      + " |" for model, r in results.items()]
    scoring = {r[b]["scoring"] for r in results.values() for b in r}
    lines += ["", f"Accuracy by {', '.join(sorted(scoring))} scoring, with its 95% Wilson interval."]
    return "\n".join(lines) + "\n"


def markdown_table(results: dict) -> str:
    columns = [("bleu_1", "BLEU-1"), ("bleu_2", "BLEU-2"), ("bleu_3", "BLEU-3"), ("bleu_4", "BLEU-4"),
               ("rouge_l", "ROUGE-L"), ("answer_loss", "answer loss"), ("perplexity", "PPL"), ("mcq_choice_accuracy", "MCQ acc (generated)"),
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
    benchmarks = read_benchmarks(args)
    if benchmarks and not args.models:
        raise SystemExit("--benchmark_files needs --models.")
    models = [model_arguments(spec, args.template_name, args.torch_dtype) for spec in args.models]  # every spec checked first
    if unknown := sorted(set(args.generation_models) - {name for name, _ in models}):
        raise SystemExit(f"--generation_models {' '.join(unknown)}: not among the --models names "
                         f"({', '.join(name for name, _ in models) or 'none given'}).")
    reward_models = [model_arguments(spec, args.template_name) for spec in args.reward_models]
    results, benchmark_results = {}, {}
    evaluated = any(data.values()) or not benchmarks  # the measures above, unless only benchmarks are asked for
    for name, model_args in models:
        print(f"== evaluating {name}", flush=True)
        chat = ChatModel.load(model_args)
        if evaluated:
            results[name] = evaluate_chat_model(chat, data, args,
                                                generate=not args.generation_models or name in args.generation_models)
        if benchmarks:
            benchmark_results[name] = evaluate_benchmarks(chat, benchmarks, args)
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
    if benchmark_results:
        (output / "benchmarks.json").write_text(json.dumps(benchmark_results, indent=2, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
        table = benchmark_table(benchmark_results)
        (output / "benchmarks.md").write_text(table, encoding="utf-8")
        print(table)
    if not results:
        return benchmark_results  # only benchmarks were asked for
    (output / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table = markdown_table(results)
    (output / "results.md").write_text(table, encoding="utf-8")
    print(table)
    return results


if __name__ == "__main__":
    run_cli(main)
