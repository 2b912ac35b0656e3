"""Records to token ids, through ``datasets``: SFT conversations with their labels, preference pairs,
pretraining blocks; exact-duplicate removal by hashing; the prepared data cached on disk and reused.

Every builder maps the raw rows of :func:`medgpt.data_files.raw_records` (Arrow on disk, batched,
``--preprocessing_num_workers`` processes), so no corpus is ever held in Python lists. A record that
cannot be used gets ``status`` "invalid" and its ``problem`` (file:line: what is wrong) during the map;
the rows with a problem go to InvalidRecords, which stops the run or sets them aside.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Callable

from medgpt.data_files import (
    InvalidRecords,
    _raw_rows,
    column,
    column_values,
    file_fingerprint,
    find_data_files,
    load_splits,
    parse_json_record,
    parse_weighted,
    raw_records,
    row_bytes,
    rows_per_batch,
    take_problems,
)
from medgpt.records import (
    DataError,
    Problem,
    _same_answer,
    _text,
    conversation_from_record,
    preference_from_record,
    qa_item_from_record,
    question_from_record,
)

logger = logging.getLogger(__name__)

DATA_FORMAT_VERSION = 4  # part of every cache key: bump when what the builders write changes


def _where(example: dict, error: Exception) -> str:
    return f"{example['source']}: {error}" if example["source"] else str(error)


def _indices(dataset, name: str, values) -> "list[int]":
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    return np.flatnonzero(pc.is_in(column(dataset, name), value_set=pa.array(list(values))).to_numpy(
        zero_copy_only=False))


def _count(dataset, name: str) -> dict:
    import pyarrow.compute as pc

    return {item["values"].as_py(): item["counts"].as_py() for item in pc.value_counts(column(dataset, name))}


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _int_features(**columns):
    import datasets

    values = {"int": datasets.Sequence(datasets.Value("int32")), "str": datasets.Value("string"),
              "int64": datasets.Value("int64")}
    return datasets.Features({name: values[kind] for name, kind in columns.items()})


# ---------------------------------------------------------------- SFT


def tokenize_for_sft(template, tokenizer, messages: list[dict], max_length: int, overlong_policy: str,
                     tools: list | None = None, train_on_reasoning: bool = True) -> dict:
    """input_ids/labels for one conversation, cut at turn boundaries to ``max_length``.

    ``status`` says what happened: kept, cut (later turns dropped so every trained answer keeps its
    end-of-turn token), truncated (first answer cut, by --overlong_policy truncate) or skipped.
    """
    from medgpt.chat_template import encode_conversation

    input_ids, labels, turn_ends = encode_conversation(template, tokenizer, messages, tools, train_on_reasoning)
    status = "kept"
    if len(input_ids) > max_length:
        fitting = [end for end in turn_ends if end <= max_length]
        if fitting:
            input_ids, labels, status = input_ids[: fitting[-1]], labels[: fitting[-1]], "cut"
        elif overlong_policy == "truncate":
            input_ids, labels, status = input_ids[:max_length], labels[:max_length], "truncated"
        else:
            input_ids, labels, status = [], [], "skipped"
    return {"input_ids": input_ids, "labels": labels, "status": status}


def _sft_example(example, template, tokenizer, max_length, overlong_policy, train_on_reasoning):
    try:
        conversation = conversation_from_record(parse_json_record(example))
        out = tokenize_for_sft(template, tokenizer, conversation, max_length, overlong_policy, conversation.tools,
                               train_on_reasoning)
        return {**out, "length": len(out["input_ids"]), "problem": "", "text": ""}
    except ValueError as error:
        return {"input_ids": [], "labels": [], "length": 0, "status": "invalid", "problem": _where(example, error),
                "text": example["text"]}


def build_sft_dataset(raw, tokenizer, template, max_length: int, overlong_policy: str, num_proc: int | None = None,
                      name: str = "train", invalid: InvalidRecords | None = None, train_on_reasoning: bool = True):
    """Tokenize the raw rows of SFT records into a dataset (input_ids, labels) and report what was cut.

    A record that is not a valid conversation, or that the template cannot render, is an invalid record."""
    invalid = invalid if invalid is not None else InvalidRecords()
    function = partial(_sft_example, template=template, tokenizer=tokenizer, max_length=max_length,
                       overlong_policy=overlong_policy, train_on_reasoning=train_on_reasoning)
    tokenized = raw.map(
        function, num_proc=num_proc, desc=f"Tokenizing {name} conversations",
        features=_int_features(source="str", text="str", problem="str", input_ids="int", labels="int", status="str",
                               length="int64"),
        new_fingerprint=_digest(raw._fingerprint, "sft", template_id(template), tokenizer_id(tokenizer), max_length,
                                overlong_policy, train_on_reasoning, DATA_FORMAT_VERSION),
    )
    take_problems(tokenized, invalid)
    found = _count(tokenized, "status")
    counts = {status: found.get(status, 0) for status in ("kept", "cut", "truncated", "skipped", "invalid")}
    if counts["cut"]:
        logger.warning("%s: %d conversation(s) longer than max_length=%d were cut after their last whole assistant "
                       "turn.", name, counts["cut"], max_length)
    if counts["truncated"]:
        logger.warning("%s: %d conversation(s) had a first exchange longer than max_length=%d and were truncated "
                       "(--overlong_policy truncate); those answers lose their end-of-turn token.",
                       name, counts["truncated"], max_length)
    if counts["skipped"]:
        skipped = tokenized.select(_indices(tokenized, "status", ["skipped"])[:10])["source"]
        logger.warning("%s: skipped %d conversation(s) whose first exchange is longer than max_length=%d (raise "
                       "--max_length or pass --overlong_policy truncate): %s%s", name, counts["skipped"], max_length,
                       ", ".join(skipped), " ..." if counts["skipped"] > 10 else "")
    kept = _select(tokenized, _indices(tokenized, "status", ["kept", "cut", "truncated"]))
    if len(kept) == 0:
        invalid.raise_now()
        raise DataError([f"no {name} conversation is usable: each is invalid or longer than --max_length "
                         f"{max_length} in its first exchange"], what=f"{name} data")
    return kept.select_columns(["input_ids", "labels", "length"]), counts


# ---------------------------------------------------------------- preference pairs


def tokenize_pair(template, tokenizer, pair: dict) -> dict:
    """A preference pair as token ids: the prompt (rendered with its generation prompt), and each answer
    through its end-of-turn marker, located by the template as SFT locates answers; also as text."""
    out = {}
    for key in ("chosen", "rejected"):
        text, spans = template.answer_spans(pair["prompt"] + [pair[key]], pair.get("tools"))
        start, end, _ = spans[-1]
        encoding = tokenizer(text[:end], add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        split = next((i for i, (first, _) in enumerate(encoding["offset_mapping"]) if first >= start), len(ids))
        out.setdefault("prompt_ids", ids[:split])
        out.setdefault("prompt", text[:start])
        out[f"{key}_ids"], out[key] = ids[split:], _answer_text(text[start:end], tokenizer)
    return out


def _answer_text(answer: str, tokenizer) -> str:
    """An answer's text for trainers that tokenize text and append EOS when it is missing: ending on EOS
    (the whitespace a template writes after it is never generated), so EOS is not added twice."""
    stripped = answer.rstrip()
    return stripped if tokenizer.eos_token and stripped.endswith(tokenizer.eos_token) else answer


_EMPTY_PAIR = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "prompt": "", "chosen": "", "rejected": ""}


def truncate_pair(tokens: dict, max_length: int, max_prompt_length: int | None) -> tuple[dict, str]:
    """A pair cut to ``max_length`` tokens (prompt + the longer answer) the way TRL's preference trainers cut:
    the prompt keeps its end (the latest turns), at most ``max_prompt_length`` tokens (default half of
    max_length) and only as much as the answers need; the answers keep their start. Returns the pair and
    what was cut: "" (nothing), "prompt", or "answer" (an answer lost its end, and so its end-of-turn token)."""
    prompt, answers = tokens["prompt_ids"], (tokens["chosen_ids"], tokens["rejected_ids"])
    longest = max(map(len, answers))
    if len(prompt) + longest <= max_length:
        return tokens, ""
    prompt_limit = min(max_prompt_length or max_length // 2, max_length - 1)
    keep = max(prompt_limit, max_length - longest)  # the prompt gives up only what the answers need
    prompt = prompt[-keep:] if len(prompt) > keep else prompt
    room = max_length - len(prompt)
    cut = {"prompt_ids": prompt, "chosen_ids": answers[0][:room], "rejected_ids": answers[1][:room]}
    return cut, "answer" if longest > room else "prompt"


def _pair_example(example, template, tokenizer, max_length, max_prompt_length, overlong_policy):
    try:
        pair = preference_from_record(parse_json_record(example))
        if _same_answer(pair["chosen"], pair["rejected"]):
            return {**_EMPTY_PAIR, "status": "identical", "problem": "", "text": ""}
        tokens = tokenize_pair(template, tokenizer, pair)
    except ValueError as error:
        return {**_EMPTY_PAIR, "status": "invalid", "problem": _where(example, error), "text": example["text"]}
    if max_length is None:
        return {**tokens, "status": "kept", "problem": "", "text": ""}
    cut_ids, cut = truncate_pair(tokens, max_length, max_prompt_length)
    if cut and overlong_policy == "skip":
        return {**tokens, "status": "too_long", "problem": "", "text": ""}
    if cut:  # the text columns (for trainers that tokenize text) say what the ids say
        tokens = {**cut_ids, **{key.removesuffix("_ids"): tokenizer.decode(ids) for key, ids in cut_ids.items()}}
    return {**tokens, "status": {"": "kept", "prompt": "prompt_cut", "answer": "answer_cut"}[cut], "problem": "",
            "text": ""}


def _kto_batch(batch, template, tokenizer):
    """Unpaired examples for KTO: a conversation whose last answer is rated (``"label": true|false``), or a
    preference pair split into its desirable and undesirable answer."""
    out = {key: [] for key in ("source", "text", "problem", "prompt", "completion", "label")}

    def add(source, text, problem, prompt="", completion="", label=False):
        for key, value in zip(out, (source, text, problem, prompt, completion, label)):
            out[key].append(value)

    for example in ({k: batch[k][i] for k in batch} for i in range(len(batch["source"]))):
        try:
            record = parse_json_record(example)
            if any(key in record for key in ("chosen", "rejected", "response_chosen", "response_rejected")):
                pair = preference_from_record(record)
                texts = tokenize_pair(template, tokenizer, pair)
                add(example["source"], "", "", texts["prompt"], texts["chosen"], True)
                add(example["source"], "", "", texts["prompt"], texts["rejected"], False)
                continue
            label = record.get("label")
            if not isinstance(label, bool):
                raise ValueError("a KTO example is a preference pair, or a conversation with \"label\": true or "
                                 f"false for its last answer (got label {label!r}).")
            conversation = conversation_from_record({k: v for k, v in record.items() if k != "label"})
            pair = {"prompt": list(conversation[:-1]), "chosen": conversation[-1], "rejected": conversation[-1],
                    "tools": conversation.tools}
            texts = tokenize_pair(template, tokenizer, pair)
            add(example["source"], "", "", texts["prompt"], texts["chosen"], label)
        except ValueError as error:
            add(example["source"], example["text"], _where(example, error))
    return out


def build_kto_dataset(raw, tokenizer, template, name: str = "train", invalid: InvalidRecords | None = None,
                      num_proc: int | None = None):
    """KTO's unpaired ``prompt``/``completion``/``label`` rows, rendered by the stage's template; counted."""
    import datasets

    invalid = invalid if invalid is not None else InvalidRecords()
    features = datasets.Features({**{key: datasets.Value("string") for key in
                                     ("source", "text", "problem", "prompt", "completion")},
                                  "label": datasets.Value("bool")})
    rows = raw.map(partial(_kto_batch, template=template, tokenizer=tokenizer), batched=True, num_proc=num_proc,
                   remove_columns=raw.column_names, features=features, desc=f"Rendering {name} KTO examples",
                   new_fingerprint=_digest(raw._fingerprint, "kto", template_id(template), tokenizer_id(tokenizer),
                                           DATA_FORMAT_VERSION))
    rows = rows.select(take_problems(rows, invalid)).select_columns(["prompt", "completion", "label"])
    if len(rows) == 0:
        invalid.raise_now()
        raise DataError([f"no usable {name} KTO examples"], what=f"{name} data")
    desirable = _count(rows, "label").get(True, 0)
    counts = {"examples": len(rows), "desirable": desirable, "undesirable": len(rows) - desirable}
    logger.info("%s: %d KTO examples (%d desirable, %d undesirable)", name, *counts.values())
    return rows, counts


def build_preference_dataset(raw, tokenizer, template, max_length: int | None, name: str = "train",
                             invalid: InvalidRecords | None = None, num_proc: int | None = None, kind: str = "dpo",
                             max_prompt_length: int | None = None, overlong_policy: str = "truncate"):
    """Preference pairs tokenized by the stage's template. ``kind``: ``dpo`` gives ``prompt_ids``, ``chosen_ids``,
    ``rejected_ids`` (the answers' own tokens, as DPOTrainer takes them); ``reward`` gives whole sequences
    ``chosen_ids``/``rejected_ids`` (RewardTrainer); ``text`` the rendered ``prompt``/``chosen``/``rejected``
    strings (for trainers that tokenize text themselves).

    Pairs longer than ``max_length`` tokens are cut as TRL cuts them (``truncate_pair``), or skipped with
    ``overlong_policy="skip"``; either way counted and logged with their file:line. Pairs whose answers are
    identical teach nothing and are skipped. Pairs that are not valid records, or that the template cannot
    render, are invalid records.
    """
    invalid = invalid if invalid is not None else InvalidRecords()
    function = partial(_pair_example, template=template, tokenizer=tokenizer, max_length=max_length,
                       max_prompt_length=max_prompt_length, overlong_policy=overlong_policy)
    tokenized = raw.map(
        function, num_proc=num_proc, desc=f"Tokenizing {name} preference pairs",
        features=_int_features(source="str", text="str", problem="str", prompt_ids="int", chosen_ids="int",
                               rejected_ids="int", prompt="str", chosen="str", rejected="str", status="str"),
        new_fingerprint=_digest(raw._fingerprint, "pairs", template_id(template), tokenizer_id(tokenizer), max_length,
                                max_prompt_length, overlong_policy, DATA_FORMAT_VERSION),
    )
    take_problems(tokenized, invalid)
    found = _count(tokenized, "status")
    limits = f"--max_length {max_length}, --max_prompt_length {max_prompt_length or (max_length or 0) // 2}"
    for status, how in (
            ("identical", "skipped {n} pair(s) whose chosen and rejected answers are identical"),
            ("too_long", "skipped {n} pair(s) longer than --max_length " + str(max_length) + " (--overlong_policy "
                         "skip; the default, truncate, cuts them instead)"),
            ("prompt_cut", "truncated {n} pair(s) to " + limits + ": the prompt keeps its latest turns"),
            ("answer_cut", "truncated {n} pair(s) to " + limits + " with an answer cut short: those answers lose "
                           "their end-of-turn token, which teaches answers that never end. Raise --max_length (or "
                           "lower --max_prompt_length) if many answers are cut")):
        if found.get(status):
            sources = tokenized.select(_indices(tokenized, "status", [status])[:10])["source"]
            logger.warning("%s: %s: %s%s", name, how.format(n=found[status]), ", ".join(sources),
                           " ..." if found[status] > 10 else "")
    kept = tokenized.select(_indices(tokenized, "status", ["kept", "prompt_cut", "answer_cut"]))
    if len(kept) == 0:
        invalid.raise_now()
        raise DataError([f"no usable {name} preference pairs remain after skipping the ones above"], what=f"{name} data")
    if kind == "reward":
        kept = kept.map(lambda x: {"chosen_ids": x["prompt_ids"] + x["chosen_ids"],
                                   "rejected_ids": x["prompt_ids"] + x["rejected_ids"]}, desc="Joining prompts")
    columns = {"text": ["prompt", "chosen", "rejected"], "reward": ["chosen_ids", "rejected_ids"]}.get(
        kind, ["prompt_ids", "chosen_ids", "rejected_ids"])
    counts = {"kept": len(kept), "truncated": found.get("prompt_cut", 0) + found.get("answer_cut", 0),
              "answers_cut": found.get("answer_cut", 0), "skipped_identical": found.get("identical", 0),
              "skipped_too_long": found.get("too_long", 0)}
    return kept.select_columns(columns), counts


# ---------------------------------------------------------------- pretraining blocks


def _pt_batch(batch, tokenizer, eos: int):
    """Token ids (ending with EOS) and a 64-bit hash of each document's trimmed text; problems per row."""
    texts, problems = [], []
    for source, text, problem in zip(batch["source"], batch["text"], batch["problem"]):
        is_record = source.endswith("]") or source.rsplit(":", 1)[0].lower().endswith((".jsonl", ".json"))
        if is_record and not problem:
            try:
                text = _text(parse_json_record({"source": source, "text": text, "problem": ""}).get("text"), "'text'")
            except ValueError as error:
                problem = f"{source}: {error} Each record needs a non-empty 'text' string."
        texts.append("" if problem else text)
        problems.append(problem)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return {
        "ids": [[] if problem else row + [eos] for row, problem in zip(ids, problems)],
        "length": [0 if problem else len(row) + 1 for row, problem in zip(ids, problems)],
        "hash": [int.from_bytes(hashlib.blake2b(t.strip().encode(), digest_size=8).digest(), "little", signed=True)
                 for t in texts],
        "problem": problems,
        "text": [raw if problem else "" for raw, problem in zip(batch["text"], problems)],
    }


def tokenize_documents(raw, tokenizer, num_proc: int | None = None, name: str = "train",
                       invalid: InvalidRecords | None = None):
    """Documents (rows of .txt files, or records with a ``text`` field) to token ids ending with EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token to separate documents; set one on the tokenizer.")
    rows = rows_per_batch(row_bytes(raw))
    tokenized = raw.map(
        partial(_pt_batch, tokenizer=tokenizer, eos=tokenizer.eos_token_id), batched=True, num_proc=num_proc,
        batch_size=rows, writer_batch_size=rows, desc=f"Tokenizing {name} documents",
        features=_int_features(source="str", text="str", problem="str", ids="int", hash="int64", length="int64"),
        new_fingerprint=_digest(raw._fingerprint, "documents", tokenizer_id(tokenizer), DATA_FORMAT_VERSION),
    )
    return _select(tokenized, take_problems(tokenized, invalid if invalid is not None else InvalidRecords()))


def _select(dataset, indices):
    """``dataset.select(indices)``, or the dataset itself when every row is kept (the usual case): a dataset
    without an indices mapping reads its columns straight from the memory-mapped file, in any size."""
    return dataset if len(indices) == len(dataset) else dataset.select(indices)


def _first_occurrences(hashes):
    """Indices of the first occurrence of each value, in order. np.unique(return_index=True) needs several times
    the array's size (about 100 MB for 2.7M documents); a stable argsort and one comparison need about three."""
    import numpy as np

    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    new = np.empty(len(ordered), dtype=bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    del ordered
    return np.sort(order[new]) if not new.all() else np.arange(len(hashes))


def deduplicate_documents(train, validation) -> tuple:
    """Drop exact duplicate documents (same trimmed text, by a 64-bit hash, never a set of texts): repeats
    within the training set, and validation documents that also occur in training (they would leak)."""
    import numpy as np

    train_hashes = column_values(train, "hash")
    first = _first_occurrences(train_hashes)
    kept_train = train.select(first) if len(first) != len(train) else train
    counts = {"train_duplicates_removed": int(len(train) - len(first)), "validation_duplicates_removed": 0}
    if validation is not None:
        hashes = column_values(validation, "hash")
        first_validation = _first_occurrences(hashes)
        known = np.sort(train_hashes)  # membership by binary search: no second copy of both arrays (np.isin)
        place = np.minimum(np.searchsorted(known, hashes[first_validation]), max(len(known) - 1, 0))
        keep = first_validation[known[place] != hashes[first_validation]] if len(known) else first_validation
        counts["validation_duplicates_removed"] = int(len(validation) - len(keep))
        validation = validation.select(keep) if len(keep) != len(validation) else validation
    if any(counts.values()):
        logger.warning("Removed exact duplicate documents: %d from training, %d from validation "
                       "(repeats, or also present in training).", *counts.values())
    return kept_train, validation, counts


def build_pretraining_blocks(documents, block_size: int, name: str = "train", num_proc: int | None = None):
    """Concatenate tokenized documents (each ending with EOS) and cut them into blocks of ``block_size``.

    The standard continued-pretraining recipe: every block is exactly ``block_size`` tokens and documents
    inside it are separated by EOS. Each process writes its share batch by batch, carrying the rest of each
    batch into the next, so only the tail of each share (shorter than a block) is dropped, and reported.
    """
    import numpy as np

    carry = {"tokens": np.zeros(0, dtype=np.int32)}  # per process: each gets its own copy of the function

    def group(batch):
        stream = np.concatenate([carry["tokens"], *[np.asarray(ids, dtype=np.int32) for ids in batch["ids"]]])
        blocks = len(stream) // block_size
        carry["tokens"] = stream[blocks * block_size:]
        return {"input_ids": stream[: blocks * block_size].reshape(blocks, block_size).tolist()}

    workers = num_proc if num_proc and len(documents) >= 10000 * num_proc else None
    rows = rows_per_batch(row_bytes(documents))
    blocks = documents.map(group, batched=True, batch_size=rows, remove_columns=documents.column_names,
                           features=_int_features(input_ids="int"), load_from_cache_file=False, num_proc=workers,
                           new_fingerprint=_digest(documents._fingerprint, "blocks", block_size, os.urandom(8).hex()),
                           desc=f"Grouping {name} tokens into blocks of {block_size}")
    total = int(column_values(documents, "length").sum())
    counts = {"documents": len(documents), "tokens": total, "blocks": len(blocks),
              "tail_tokens_dropped": total - len(blocks) * block_size}
    if counts["blocks"] == 0:
        raise DataError([f"the {name} text has {counts['tokens']} tokens, fewer than one block of --block_size "
                         f"{block_size}; add text or lower --block_size"], what=f"{name} text")
    logger.info("%s: %d documents, %d tokens -> %d blocks of %d (last %d tokens, less than a block, dropped)",
                name, counts["documents"], counts["tokens"], counts["blocks"], block_size, counts["tail_tokens_dropped"])
    return blocks, counts


# ---------------------------------------------------------------- the prepared data, cached and reused


def tokenizer_id(tokenizer) -> str:
    """What identifies a tokenizer's behaviour: its vocabulary and rules, special tokens and size."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return _digest(body, tokenizer.special_tokens_map, len(tokenizer))


def template_id(template) -> str:
    return _digest(template.name, template.jinja, template.settings)


def data_sources_id(data_args, seed: int, extensions) -> list:
    """The files (path, size, modification time), weights, split and sample limits that define the data."""
    train_names, weights = parse_weighted(data_args.train_files)
    parts = []
    for flag, directory, files in (("train", data_args.train_file_dir, train_names),
                                   ("validation", data_args.validation_file_dir, data_args.validation_files)):
        if directory or files:
            parts.append([flag, file_fingerprint(find_data_files(directory, files, extensions, flag))])
    return [parts, weights, data_args.validation_split_percentage, seed, data_args.max_train_samples,
            data_args.max_eval_samples]


def data_cache_root(data_args) -> Path:
    if data_args.data_cache_dir or os.environ.get("MEDGPT_DATA_CACHE"):
        return Path(data_args.data_cache_dir or os.environ["MEDGPT_DATA_CACHE"])
    home = os.environ.get("MEDGPT_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "medgpt") / "prepared_data"


def prepare_cached(what: str, key: list, build: Callable[[], tuple[dict, dict]], data_args, training_args,
                   invalid: InvalidRecords):
    """The stage's prepared datasets (``{"train": ..., "validation": ... or None}``) and their counts.

    Built once by ``build`` and saved under the data cache (``--data_cache_dir``) keyed by the files, the
    tokenizer, the template and every length and split setting; a later run with the same key loads them and
    skips reading and tokenization. In a multi-process run the main process prepares, the others load."""
    import datasets

    folder = data_cache_root(data_args) / _digest(key, DATA_FORMAT_VERSION)
    done = folder / "meta.json"
    rebuild = data_args.overwrite_cache and training_args.local_process_index == 0  # the others load its result
    with training_args.main_process_first(desc=f"preparing {what}"):
        if done.is_file() and not rebuild:
            meta = json.loads(done.read_text(encoding="utf-8"))
            prepared = {name: datasets.load_from_disk(str(folder / name)) if present else None
                        for name, present in meta["splits"].items()}
            invalid.total = meta["total_records"]
            invalid.dropped = [Problem(p["problem"], p["source"], p["raw"]) for p in meta["invalid"]]
            logger.info("%s: reusing the prepared data in %s (same files, tokenizer, template and lengths); "
                        "reading and tokenization skipped.", what, folder)
            return prepared, meta["counts"]
        prepared, counts = build()
        if training_args.process_index == 0:
            folder.mkdir(parents=True, exist_ok=True)
            workers = data_args.preprocessing_num_workers
            for name, dataset in prepared.items():
                if dataset is not None:  # written by the workers, so the main process does not read it all
                    dataset.save_to_disk(str(folder / name),
                                         num_proc=workers if workers and len(dataset) >= 1000 * workers else None)
            meta = {"splits": {name: dataset is not None for name, dataset in prepared.items()}, "counts": counts,
                    "total_records": invalid.total,
                    "invalid": [{"problem": str(p), "source": p.source, "raw": p.raw} for p in invalid.dropped]}
            done.write_text(json.dumps(meta, ensure_ascii=False, default=str), encoding="utf-8")  # written last
            logger.info("%s: prepared data saved to %s; a run with the same data and settings reuses it.", what, folder)
        return prepared, counts


# ---------------------------------------------------------------- what the stages call


def prepare_sft_data(data_args, training_args, tokenizer, template, invalid: InvalidRecords):
    """SFT training and validation datasets (input_ids, labels; packed rows with --packing) and their counts;
    cached, or streamed."""
    if data_args.streaming:
        return stream_sft_data(data_args, training_args, tokenizer, template, invalid)
    max_length = training_args.max_length
    options = dict(num_proc=data_args.preprocessing_num_workers, invalid=invalid,
                   train_on_reasoning=data_args.train_on_reasoning)

    def build():
        train_raw, eval_raw = load_splits(data_args, "SFT data", training_args.seed, invalid=invalid)
        train, counts = build_sft_dataset(train_raw, tokenizer, template, max_length, data_args.overlong_policy,
                                          name="train", **options)
        counts = {f"train_records_{k}": v for k, v in counts.items()}
        validation = None
        if eval_raw is not None and len(eval_raw):
            validation, found = build_sft_dataset(eval_raw, tokenizer, template, max_length,
                                                  data_args.overlong_policy, name="validation", **options)
            counts.update({f"eval_records_{k}": v for k, v in found.items()})
        train = train.select_columns(["input_ids", "labels", "length"])
        if validation is not None:
            validation = validation.select_columns(["input_ids", "labels"])
        if training_args.packing:
            from medgpt.packing import pack_sequences

            rows = len(train)
            train = pack_sequences(train, max_length, seed=training_args.seed, num_proc=data_args.preprocessing_num_workers)
            counts["packed_rows"] = len(train)
            logger.info("Packed %d conversations into %d rows of at most %d tokens", rows, len(train), max_length)
        else:
            train = train.select_columns(["input_ids", "labels"])
        return {"train": train, "validation": validation}, counts

    key = ["sft", data_sources_id(data_args, training_args.seed, (".jsonl", ".json")), tokenizer_id(tokenizer),
           template_id(template), max_length, data_args.overlong_policy, data_args.train_on_reasoning,
           bool(training_args.packing)]
    prepared, counts = prepare_cached("SFT data", key, build, data_args, training_args, invalid)
    return prepared["train"], prepared["validation"], counts


def prepare_preference_data(data_args, training_args, tokenizer, template, invalid: InvalidRecords, kind: str):
    """Preference datasets for RM (``kind="reward"``), DPO (``"dpo"``), ORPO/SimPO (``"text"``) or KTO (``"kto"``:
    rated answers and pairs split in two); cached."""
    max_length = training_args.max_length
    options = dict(invalid=invalid, num_proc=data_args.preprocessing_num_workers, kind=kind,
                   max_prompt_length=data_args.max_prompt_length, overlong_policy=data_args.overlong_policy)

    def build():
        train_raw, eval_raw = load_splits(data_args, "preference data", training_args.seed, invalid=invalid)
        if kind == "kto":
            splits = [build_kto_dataset(raw, tokenizer, template, name, invalid, data_args.preprocessing_num_workers)
                      if raw is not None and len(raw) else (None, {}) for name, raw in
                      (("train", train_raw), ("validation", eval_raw))]
            counts = {f"{prefix}_kto_{key}": value for prefix, (_, found) in zip(("train", "eval"), splits)
                      for key, value in found.items()}
            return {"train": splits[0][0], "validation": splits[1][0]}, counts
        train, found = build_preference_dataset(train_raw, tokenizer, template, max_length, "train", **options)
        counts = {f"train_pairs_{key}": value for key, value in found.items()}
        validation = None
        if eval_raw is not None and len(eval_raw):
            validation, found = build_preference_dataset(eval_raw, tokenizer, template, max_length, "validation",
                                                         **options)
            counts.update({f"eval_pairs_{key}": value for key, value in found.items()})
        return {"train": train, "validation": validation}, counts

    key = ["pairs", kind, data_sources_id(data_args, training_args.seed, (".jsonl", ".json")),
           tokenizer_id(tokenizer), template_id(template), max_length, data_args.max_prompt_length,
           data_args.overlong_policy]
    prepared, counts = prepare_cached("preference data", key, build, data_args, training_args, invalid)
    return prepared["train"], prepared["validation"], counts


PRETRAIN_EXTENSIONS = (".txt", ".jsonl", ".json")


def prepare_pretraining_data(data_args, training_args, tokenizer, block_size: int, paragraphs: bool,
                             invalid: InvalidRecords):
    """Blocks of ``block_size`` tokens for training and validation, deduplicated; cached, or streamed."""
    if data_args.streaming:
        return stream_pretraining_data(data_args, training_args, tokenizer, block_size, paragraphs, invalid)
    num_proc = data_args.preprocessing_num_workers

    def build():
        train_raw, eval_raw = load_splits(data_args, "pretraining text", training_args.seed, PRETRAIN_EXTENSIONS,
                                          paragraphs, invalid=invalid)
        train = tokenize_documents(train_raw, tokenizer, num_proc, "train", invalid)
        validation = tokenize_documents(eval_raw, tokenizer, num_proc, "validation", invalid) \
            if eval_raw is not None and len(eval_raw) else None
        train, validation, counts = deduplicate_documents(train, validation)
        train, found = build_pretraining_blocks(train, block_size, "train", num_proc)
        counts.update({f"train_{k}": v for k, v in found.items()})
        if validation is not None and len(validation):
            validation, found = build_pretraining_blocks(validation, block_size, "validation", num_proc)
            counts.update({f"eval_{k}": v for k, v in found.items()})
        return {"train": train, "validation": validation}, counts

    key = ["pt", data_sources_id(data_args, training_args.seed, PRETRAIN_EXTENSIONS), tokenizer_id(tokenizer),
           block_size, paragraphs]
    prepared, counts = prepare_cached("pretraining text", key, build, data_args, training_args, invalid)
    return prepared["train"], prepared["validation"], counts


# ---------------------------------------------------------------- streaming (--streaming true)


def _check_streaming(data_args, training_args) -> None:
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise DataError(["--streaming true reads the data as a stream of unknown length: set --max_steps N "
                         "(the number of optimizer steps to train)"], what="arguments")


def _stream_sources(data_args, extensions, paragraphs, seed):
    """The training files as one IterableDataset of raw rows (weighted files interleaved in their proportions)."""
    import datasets

    names, weights = parse_weighted(data_args.train_files)
    if weights:
        streams = [datasets.IterableDataset.from_generator(
            _raw_rows, gen_kwargs={"paths": [name], "paragraphs": paragraphs, "fingerprint": None}) for name in names]
        total = sum(weights.values())
        return datasets.interleave_datasets(streams, probabilities=[weights[n] / total for n in names], seed=seed,
                                            stopping_strategy="all_exhausted")
    paths = [str(p) for p in find_data_files(data_args.train_file_dir, names, extensions, "train")]
    return datasets.IterableDataset.from_generator(
        _raw_rows, gen_kwargs={"paths": paths, "paragraphs": paragraphs, "fingerprint": None})


def _held_out(stream, data_args, extensions, paragraphs, seed):
    """(the stream to train on, raw validation rows): the validation files, else the stream's first records."""
    import datasets

    if data_args.validation_file_dir or data_args.validation_files:
        paths = find_data_files(data_args.validation_file_dir, data_args.validation_files, extensions, "validation")
        validation = raw_records(paths, paragraphs)
        if data_args.max_eval_samples is not None:
            validation = validation.select(range(min(len(validation), data_args.max_eval_samples)))
        return stream, validation
    count = data_args.max_eval_samples if data_args.max_eval_samples is not None else 200
    if count <= 0:
        return stream, None
    rows = list(stream.take(count))  # a fixed slice, the same in every run
    return stream.skip(count), datasets.Dataset.from_list(rows, features=stream.features)


class _StreamProblems:
    """Invalid records met in a stream: the error policy stops at the first (with its file:line); skip
    writes each to invalid_records.jsonl as it comes and stops when more than the allowed share is invalid."""

    def __init__(self, invalid: InvalidRecords):
        self.invalid, self.seen, self.reported = invalid, 0, set()

    def __call__(self, example) -> bool:
        self.seen += 1
        if not example["problem"]:
            return True
        try:
            raw = json.loads(example["text"])
        except (json.JSONDecodeError, TypeError):
            raw = example["text"]
        problem = Problem(example["problem"], example["source"] or None, raw)
        if self.invalid.policy != "skip" or not problem.source:
            raise DataError([problem], what="streamed data")
        if problem.source in self.reported:  # the stream read again (a later epoch): already set aside
            return False
        self.reported.add(problem.source)
        self.invalid.add(problem)
        self.invalid.total = max(self.invalid.total, self.seen)
        path = Path(self.invalid.output_dir or ".", "invalid_records.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as sink:
            sink.write(json.dumps({"source": problem.source, "reason": str(problem)[len(problem.source) + 2:],
                                   "record": raw}, ensure_ascii=False) + "\n")
        if self.seen >= 100 and len(self.invalid.dropped) / self.seen > self.invalid.max_fraction:
            raise DataError([f"{len(self.invalid.dropped)} of the first {self.seen} streamed records are invalid, more "
                             f"than --max_invalid_fraction {self.invalid.max_fraction}; see {path}"], what="streamed data")
        return False


def stream_sft_data(data_args, training_args, tokenizer, template, invalid: InvalidRecords):
    """SFT over a stream: rows tokenized as they are read, shuffled in a buffer."""
    _check_streaming(data_args, training_args)
    stream, validation_raw = _held_out(_stream_sources(data_args, (".jsonl", ".json"), False, training_args.seed),
                                       data_args, (".jsonl", ".json"), False, training_args.seed)
    function = partial(_sft_example, template=template, tokenizer=tokenizer, max_length=training_args.max_length,
                       overlong_policy=data_args.overlong_policy, train_on_reasoning=data_args.train_on_reasoning)
    train = (stream.map(function).filter(_StreamProblems(invalid))
             .filter(lambda example: example["status"] in ("kept", "cut", "truncated"))
             .shuffle(seed=training_args.seed, buffer_size=data_args.shuffle_buffer_size)
             .select_columns(["input_ids", "labels"]))
    validation, counts = None, {"streaming": True}
    if validation_raw is not None and len(validation_raw):
        validation, found = build_sft_dataset(validation_raw, tokenizer, template, training_args.max_length,
                                              data_args.overlong_policy, name="validation", invalid=invalid,
                                              train_on_reasoning=data_args.train_on_reasoning)
        validation = validation.select_columns(["input_ids", "labels"])
        counts.update({f"eval_records_{k}": v for k, v in found.items()})
    logger.info("SFT data: streaming the training files (shuffle buffer %d); %d validation records",
                data_args.shuffle_buffer_size, len(validation) if validation is not None else 0)
    return train, validation, counts


def _stream_blocks(rows, tokenizer, block_size: int, problems: _StreamProblems):
    """Blocks of ``block_size`` tokens from a stream of raw rows: tokenized in batches, the rest carried on."""
    import numpy as np

    eos, carry, batch = tokenizer.eos_token_id, np.zeros(0, dtype=np.int64), []

    def flush(batch, carry):
        columns = {key: [row[key] for row in batch] for key in ("source", "text", "problem")}
        tokenized = _pt_batch(columns, tokenizer, eos)
        for row, problem, text in zip(batch, tokenized["problem"], tokenized["text"]):
            if problem:
                problems({**row, "problem": problem, "text": text})
        ids = [np.asarray(row, dtype=np.int64) for row in tokenized["ids"]]
        return np.concatenate([carry, *ids])

    for row in rows:
        batch.append(row)
        if len(batch) == 256:
            carry, batch = flush(batch, carry), []
            while len(carry) >= block_size:
                yield {"input_ids": carry[:block_size].tolist()}
                carry = carry[block_size:]
    carry = flush(batch, carry) if batch else carry
    while len(carry) >= block_size:
        yield {"input_ids": carry[:block_size].tolist()}
        carry = carry[block_size:]


def stream_pretraining_data(data_args, training_args, tokenizer, block_size, paragraphs, invalid):
    """Pretraining over a stream: documents tokenized and cut into blocks as they are read, shuffled in a
    buffer of blocks. (Duplicates cannot be found in a stream: deduplicate first with the data tools.)"""
    import datasets

    _check_streaming(data_args, training_args)
    stream, validation_raw = _held_out(_stream_sources(data_args, PRETRAIN_EXTENSIONS, paragraphs, training_args.seed),
                                       data_args, PRETRAIN_EXTENSIONS, paragraphs, training_args.seed)
    problems = _StreamProblems(invalid)
    train = datasets.IterableDataset.from_generator(
        partial(_stream_blocks, stream, tokenizer, block_size, problems)
    ).shuffle(seed=training_args.seed, buffer_size=data_args.shuffle_buffer_size)
    validation, counts = None, {"streaming": True}
    if validation_raw is not None and len(validation_raw):
        documents = tokenize_documents(validation_raw, tokenizer, name="validation", invalid=invalid)
        validation, found = build_pretraining_blocks(documents, block_size, "validation")
        counts.update({f"eval_{k}": v for k, v in found.items()})
    logger.info("pretraining text: streaming the training files in blocks of %d (shuffle buffer %d)", block_size,
                data_args.shuffle_buffer_size)
    return train, validation, counts


# ---------------------------------------------------------------- prompts for the RL stages


def _question_example(example):
    try:
        item = question_from_record(parse_json_record(example))
        return {**item, "problem": "", "text": ""}
    except ValueError as error:
        return {"prompt": [], "answer": "", "kind": "", "problem": _where(example, error), "text": example["text"]}


def prepare_question_data(data_args, training_args, invalid: InvalidRecords):
    """GRPO's questions with checkable answers (prompt, answer, kind) for training and validation, read and
    checked through Arrow; invalid records go to ``invalid``."""
    import datasets

    train_raw, eval_raw = load_splits(data_args, "GRPO questions", training_args.seed, invalid=invalid)
    message = datasets.Features({"role": datasets.Value("string"), "content": datasets.Value("string")})
    features = datasets.Features({"source": datasets.Value("string"), "text": datasets.Value("string"),
                                  "problem": datasets.Value("string"), "prompt": datasets.List(message),
                                  "answer": datasets.Value("string"), "kind": datasets.Value("string")})
    splits = []
    for name, raw in (("train", train_raw), ("validation", eval_raw)):
        if raw is None or not len(raw):
            splits.append(None)
            continue
        items = raw.map(_question_example, num_proc=data_args.preprocessing_num_workers, features=features,
                        desc=f"Reading {name} questions",
                        new_fingerprint=_digest(raw._fingerprint, "questions", DATA_FORMAT_VERSION))
        splits.append(items.select(take_problems(items, invalid)).select_columns(["prompt", "answer", "kind"]))
    return splits[0], splits[1]


def _prompt_example(example, template, tokenizer, max_prompt_length):
    try:
        if example["source"].rsplit(":", 1)[0].lower().endswith(".txt") and not example["problem"]:
            item = {"messages": [{"role": "user", "content": example["text"]}]}
        else:
            item = qa_item_from_record(parse_json_record(example))
        ids = tokenizer(template.render(item["messages"], add_generation_prompt=True, tools=item.get("tools")),
                        add_special_tokens=False)["input_ids"]
    except ValueError as error:
        return {"input_ids": [], "status": "invalid", "problem": _where(example, error), "text": example["text"]}
    if len(ids) > max_prompt_length:
        return {"input_ids": [], "status": "too_long", "problem": "", "text": ""}
    return {"input_ids": ids, "status": "kept", "problem": "", "text": ""}


def prepare_prompt_data(data_args, training_args, tokenizer, template, max_prompt_length: int,
                        invalid: InvalidRecords):
    """PPO's prompts as token ids (rendered with the generation prompt, tools included), from .txt lines and
    records of any format; over-long prompts skipped and reported. Returns (train, validation, counts)."""
    train_raw, eval_raw = load_splits(data_args, "PPO prompts", training_args.seed, (".jsonl", ".json", ".txt"),
                                      invalid=invalid)
    function = partial(_prompt_example, template=template, tokenizer=tokenizer, max_prompt_length=max_prompt_length)
    splits, counts = [], {}
    for name, raw in (("train", train_raw), ("validation", eval_raw)):
        if raw is None or not len(raw):
            splits.append(None)
            continue
        rows = raw.map(function, num_proc=data_args.preprocessing_num_workers, desc=f"Tokenizing {name} prompts",
                       features=_int_features(source="str", text="str", problem="str", input_ids="int", status="str"),
                       new_fingerprint=_digest(raw._fingerprint, "prompts", template_id(template),
                                               tokenizer_id(tokenizer), max_prompt_length, DATA_FORMAT_VERSION))
        take_problems(rows, invalid)
        skipped = _indices(rows, "status", ["too_long"])
        if len(skipped):
            logger.warning("%s: skipped %d prompt(s) longer than --max_prompt_length %d: %s%s", name, len(skipped),
                           max_prompt_length, ", ".join(rows.select(skipped[:10])["source"]),
                           " ..." if len(skipped) > 10 else "")
        counts[f"{'eval' if name == 'validation' else 'train'}_prompts_skipped"] = len(skipped)
        splits.append(rows.select(_indices(rows, "status", ["kept"])).select_columns(["input_ids"]))
    return splits[0], splits[1], counts


# ---------------------------------------------------------------- prompts with their answers (distillation)


def _distill_example(example, template, tokenizer, max_length):
    try:
        conversation = conversation_from_record(parse_json_record(example))
        pair = {"prompt": list(conversation[:-1]), "chosen": conversation[-1], "rejected": conversation[-1],
                "tools": conversation.tools}
        tokens = tokenize_pair(template, tokenizer, pair)
    except ValueError as error:
        return {"prompt_ids": [], "chosen_ids": [], "status": "invalid", "problem": _where(example, error),
                "text": example["text"]}
    too_long = len(tokens["prompt_ids"]) + len(tokens["chosen_ids"]) > max_length
    return {"prompt_ids": tokens["prompt_ids"], "chosen_ids": tokens["chosen_ids"],
            "status": "too_long" if too_long else "kept", "problem": "", "text": ""}


def prepare_distillation_data(data_args, training_args, tokenizer, template, invalid: InvalidRecords):
    """Distillation rows from SFT-format data: ``prompt_ids`` (the conversation up to its last answer, with the
    generation prompt) and ``chosen_ids`` (that answer and its end-of-turn, for the off-policy share)."""

    def build():
        train_raw, eval_raw = load_splits(data_args, "distillation prompts", training_args.seed, invalid=invalid)
        splits, counts = {}, {}
        for name, raw in (("train", train_raw), ("validation", eval_raw)):
            if raw is None or not len(raw):
                splits[name] = None
                continue
            rows = raw.map(partial(_distill_example, template=template, tokenizer=tokenizer,
                                   max_length=training_args.max_length),
                           num_proc=data_args.preprocessing_num_workers, desc=f"Tokenizing {name} prompts",
                           features=_int_features(source="str", text="str", problem="str", prompt_ids="int",
                                                  chosen_ids="int", status="str"),
                           new_fingerprint=_digest(raw._fingerprint, "distill", template_id(template),
                                                   tokenizer_id(tokenizer), training_args.max_length,
                                                   DATA_FORMAT_VERSION))
            take_problems(rows, invalid)
            found = _count(rows, "status")
            if found.get("too_long"):
                logger.warning("%s: skipped %d conversation(s) longer than --max_length %d", name, found["too_long"],
                               training_args.max_length)
            splits[name] = rows.select(_indices(rows, "status", ["kept"])).select_columns(["prompt_ids", "chosen_ids"])
            prefix = "eval" if name == "validation" else "train"
            counts.update({f"{prefix}_prompts": len(splits[name]), f"{prefix}_prompts_too_long": found.get("too_long", 0)})
        return splits, counts

    key = ["distill", data_sources_id(data_args, training_args.seed, (".jsonl", ".json")), tokenizer_id(tokenizer),
           template_id(template), training_args.max_length]
    prepared, counts = prepare_cached("distillation prompts", key, build, data_args, training_args, invalid)
    return prepared["train"], prepared["validation"], counts
