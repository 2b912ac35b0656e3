"""Extend a model's vocabulary with domain tokens learned from your text.

    python -m medgpt.vocab --model_name_or_path Qwen/Qwen2.5-7B --inputs data/pretrain/train my_corpus/ \\
        --num_new_tokens 2000 --output_dir outputs/qwen-med-vocab

A tokenizer of the same kind as the model's (byte-level BPE, SentencePiece ...) is trained on the text with
the `tokenizers` library; of its tokens that the model splits into several, those that save the most tokens
on the text (occurrences x tokens saved) are added, as they read in text (so " hypertension" after a space
is one token); the embeddings are resized and each new row starts
as the mean of the rows of the old sub-tokens it replaces (input and, when untied, output embeddings).
Tokens per character on held-out text, before and after, are printed and saved in medgpt_vocab.json.

Continued pretraining on the extended model (pretraining.py) then trains the embeddings and the output
layer too (with LoRA they are added to modules_to_save automatically); merge_peft_adapter.py and every later
stage load the result like any model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from medgpt.args import ModelArguments, parse_args, run_cli
from medgpt.records import record_to_messages

logger = logging.getLogger(__name__)

VOCAB_FILE = "medgpt_vocab.json"  # marks an extended model (pretraining.py trains its embeddings)
TEXT_EXTENSIONS = (".txt", ".jsonl", ".json")


@dataclass
class VocabArguments:
    """What text to learn tokens from, how many to add, and where to write the extended model."""

    inputs: list[str] = field(metadata={"help": "Text files or folders (.txt lines; .jsonl/.json records with 'text')."})
    output_dir: str = field(metadata={"help": "Folder for the extended model and tokenizer."})
    num_new_tokens: int = field(default=1000, metadata={"help": "Tokens to add at most."})
    min_frequency: int = field(default=5, metadata={"help": "A token must occur this often in the text to be added."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Share of the documents held out to measure "
                                                                 "tokens per character before and after."})
    seed: int = field(default=42, metadata={"help": "Which documents are held out."})

    def __post_init__(self):
        if self.num_new_tokens < 1:
            raise ValueError(f"--num_new_tokens must be at least 1, got {self.num_new_tokens}.")
        if not 0 < self.eval_fraction < 1:
            raise ValueError("--eval_fraction must be between 0 and 1.")


def documents(raw):
    """The text of each raw row: a .txt line, a JSON record's 'text', or the turns of a conversation record."""
    for batch in raw.iter(batch_size=1000):
        for source, text, problem in zip(batch["source"], batch["text"], batch["problem"]):
            if problem:
                continue
            if source.endswith("]") or source.rsplit(":", 1)[0].lower().endswith((".jsonl", ".json")):
                try:
                    record = json.loads(text)
                    text = record.get("text") or "\n".join(m["content"] for m in record_to_messages(record))
                except (json.JSONDecodeError, AttributeError, ValueError):
                    continue  # not text, not a conversation: nothing to learn from
            if isinstance(text, str) and text.strip():
                yield text


def tokens_per_character(tokenizer, texts: list[str]) -> float:
    characters = sum(len(text) for text in texts)
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return tokens / max(characters, 1)


def learn_tokens(tokenizer, texts, count: int, min_frequency: int) -> list[str]:
    """Up to ``count`` tokens, as text, that save the most tokens on ``texts``: a tokenizer of the model's kind
    is trained on the text, and each of its tokens that the model splits into several is scored by how often
    it occurs times the tokens it saves (occurrences below ``min_frequency`` are left out)."""
    from collections import Counter

    texts = list(texts)
    domain = tokenizer.train_new_from_iterator(texts, vocab_size=count * 8 + 512, min_frequency=min_frequency)
    frequency: Counter = Counter()
    for start in range(0, len(texts), 1000):
        for ids in domain(texts[start : start + 1000], add_special_tokens=False)["input_ids"]:
            frequency.update(ids)
    gains = []
    special = set(domain.all_special_ids)
    for token_id, occurrences in frequency.items():
        text = domain.decode([token_id])
        if token_id in special or occurrences < min_frequency or len(text.strip()) < 2:
            continue
        saved = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 1
        if saved > 0:
            gains.append((occurrences * saved, text))
    return [text for _, text in sorted(gains, key=lambda item: (-item[0], item[1]))[:count]]


def extend(model_args: ModelArguments, args: VocabArguments) -> dict:
    import numpy as np
    import torch
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM

    from medgpt.data_files import find_files, raw_records
    from medgpt.modeling import load_tokenizer, resolve_model_path

    raw = raw_records(find_files(args.inputs, TEXT_EXTENSIONS, "--inputs"))
    order = np.random.default_rng(args.seed).permutation(len(raw))
    held = max(1, int(len(raw) * args.eval_fraction))
    held_out = list(documents(raw.select(order[:held])))
    if not held_out:
        raise SystemExit("--inputs: no text found (.txt lines, records with 'text', or conversations).")
    train = raw.select(order[held:])
    tokenizer = load_tokenizer(model_args)
    before = tokens_per_character(tokenizer, held_out)
    new_tokens = learn_tokens(tokenizer, documents(train), args.num_new_tokens, args.min_frequency)
    if not new_tokens:
        raise SystemExit("No token occurs often enough to add: give more text or lower --min_frequency.")
    old_ids = {text: tokenizer(text, add_special_tokens=False)["input_ids"] for text in new_tokens}
    tokenizer.add_tokens([AddedToken(text, normalized=False, special=False) for text in new_tokens])
    after = tokens_per_character(tokenizer, held_out)

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_args), dtype="auto",
                                                 trust_remote_code=model_args.trust_remote_code)
    inputs = model.get_input_embeddings().weight.detach().clone()
    outputs = model.get_output_embeddings()
    outputs = outputs.weight.detach().clone() if outputs is not None else None
    tied = outputs is not None and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for text, ids in old_ids.items():
            row = tokenizer.convert_tokens_to_ids(text)
            model.get_input_embeddings().weight[row] = inputs[ids].mean(0)
            if outputs is not None and not tied:
                model.get_output_embeddings().weight[row] = outputs[ids].mean(0)
    output = Path(args.output_dir)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    report = {"base_model": resolve_model_path(model_args), "new_tokens": len(new_tokens),
              "vocab_size": len(tokenizer), "held_out_documents": len(held_out),
              "tokens_per_character_before": before, "tokens_per_character_after": after,
              "examples": new_tokens[:20]}
    (output / VOCAB_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"Added {len(new_tokens)} tokens (vocabulary {len(tokenizer)}); held-out tokens per character "
          f"{before:.4f} -> {after:.4f} ({100 * (1 - after / before):.1f}% fewer). Examples: "
          f"{', '.join(repr(t) for t in new_tokens[:10])}. Saved to {output}.")
    print("Next: continued pretraining trains the new embeddings, e.g. python pretraining.py --config "
          f"configs/pt.yaml --model_name_or_path {output}")
    return report


def main(argv: list[str] | None = None) -> dict:
    model_args, vocab_args, _ = parse_args((ModelArguments, VocabArguments), argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return extend(model_args, vocab_args)


def is_extended(model_path: str | None) -> bool:
    """Whether a model folder was written by this tool (its new embedding rows still need training)."""
    return bool(model_path) and Path(model_path, VOCAB_FILE).is_file()


if __name__ == "__main__":
    run_cli(main)
