"""Ask questions of a folder of medical documents (.txt, .md, .pdf, .docx), with cited answers.

    python chatpdf.py --question "What blood pressure counts as hypertension?"
    python chatpdf.py --kb_dir my_docs/ --base_model outputs/sft-merged --interactive
    python chatpdf.py --eval_file data/rag/questions.jsonl          # retrieval hit@k, no model needed

The documents are cut into overlapping passages and indexed (BM25 with Chinese word segmentation,
optionally fused with dense embeddings: --dense). The index is saved in --index_dir and reused
while the documents and settings are unchanged. For each question the best --num_passages passages go to
the model, which is asked to cite them as [1], [2]; the answer ends with those sources (file and
lines, or PDF page). When no passage is relevant the answer is "I don't know" rather than a guess.

Answers come from a language model: they can be wrong and are not medical advice.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from medgpt.args import ModelArguments, parse_args, run_cli
from medgpt.data_files import load_records
from medgpt.generation import DISCLAIMER, ChatModel, GenerationArguments
from medgpt.rag import RagArguments, answer_stream, evaluate_retrieval, open_knowledge_base


@dataclass
class ChatPdfArguments:
    """What to do with the knowledge base."""

    question: str | None = field(default=None, metadata={"help": "Answer this one question and exit."})
    interactive: bool = field(default=False, metadata={"help": "Ask questions in the terminal until exit."})
    eval_file: str | None = field(default=None, metadata={
        "help": "Report retrieval hit@k on labeled questions (.jsonl: question, source, evidence; source null "
                "for questions the documents cannot answer). Loads no language model."})
    eval_output: str | None = field(default=None, metadata={"help": "Also write the --eval_file report here (.json)."})


def labeled_question(data: dict) -> dict:
    for key in ("question", "source", "evidence"):
        if key not in data:
            raise ValueError(f"has no '{key}'. Each line needs question, source and evidence "
                             "(source and evidence null when the knowledge base has no answer).")
    if not isinstance(data["question"], str) or not data["question"].strip():
        raise ValueError("'question' must be a non-empty string.")
    if bool(data["source"]) != bool(data["evidence"]):
        raise ValueError("give both 'source' and 'evidence', or neither (null) for an unanswerable question.")
    return data


def run_evaluation(knowledge_base, args: ChatPdfArguments) -> dict:
    path = Path(args.eval_file)
    if not path.is_file():
        raise SystemExit(f"--eval_file {args.eval_file}: no such file.")
    questions = [item for _, item in load_records([path], labeled_question)]
    known = {chunk.source for chunk in knowledge_base.chunks}
    unknown = sorted({q["source"] for q in questions if q["source"] and q["source"] not in known})
    if unknown:
        raise SystemExit(f"--eval_file {path}: sources not in --kb_dir: {', '.join(unknown)}.")
    report = evaluate_retrieval(knowledge_base, questions)
    print(f"Retrieval on {report['answerable']} answerable and {report['unanswerable']} unanswerable questions:")
    for key in [k for k in report if k.startswith("hit@")] + ["answerable_kept", "unanswerable_refused"]:
        print(f"  {key:22s} {report[key]:.3f}")
    for question in report["missed"]:
        print(f"  missed: {question}")
    if args.eval_output:
        Path(args.eval_output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.eval_output).write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    return report


def ask(knowledge_base, chat: ChatModel, question: str, settings: GenerationArguments) -> str:
    answer = ""
    for piece in answer_stream(knowledge_base, chat, question, settings):
        answer += piece
        print(piece, end="", flush=True)
    print("\n")
    return answer


def main(argv: list[str] | None = None) -> None:
    model_args, generation_args, rag_args, args, _ = parse_args(
        (ModelArguments, GenerationArguments, RagArguments, ChatPdfArguments), argv, description=__doc__
    )
    if not (args.question or args.interactive or args.eval_file):
        raise SystemExit("Nothing to do: pass --question TEXT, --interactive, or --eval_file FILE.")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    knowledge_base = open_knowledge_base(rag_args)
    if args.eval_file:
        run_evaluation(knowledge_base, args)
    if not (args.question or args.interactive):
        return
    chat = ChatModel.load(model_args)
    print(DISCLAIMER + "\n")
    if args.question:
        ask(knowledge_base, chat, args.question, generation_args)
    while args.interactive:
        try:
            question = input("Question: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if question.lower() in ("exit", "quit", "/exit", "/quit"):
            return
        if question:
            ask(knowledge_base, chat, question, generation_args)


if __name__ == "__main__":
    run_cli(main)
