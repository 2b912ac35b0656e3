"""Standard medical benchmarks read from the files their authors publish, turned into scorable questions.

Formats (detected from each file's columns or keys; ``--benchmark_format`` overrides):

    medqa     .jsonl   {"question", "options": {"A": ...}, "answer_idx": "B", ...}
    medmcqa   .json    JSON lines {"question", "opa".."opd", "cop", "subject_name", ...}; ``cop`` is 1-4 (1 = opa)
                       as in the authors' release; a file where some ``cop`` is 0 is read as 0-3 (the Hugging Face
                       export), and the log says which
    pubmedqa  .json    one object {PMID: {"QUESTION", "CONTEXTS", "final_decision": yes|no|maybe}} -> A. yes B. no C. maybe
    cmexam    .csv     Question, Options ("A ...\\nB ..."), Answer (one or several letters), ...
    cmb       .json    [{"question", "option": {"A": ...}, "answer": "AB", "question_type", "exam_type"}, ...]
    ceval     .csv     id,question,A,B,C,D,answer[,explanation]
    cmmlu     .csv     ,Question,A,B,C,D,Answer
    mmlu      .csv     no header: question, four options, answer letter

A folder (C-Eval, CMMLU, MMLU subject files) is one benchmark with one subject per file: the file stem minus a
split suffix (_dev, _val, _test). Few-shot examples come from the benchmark's dev split (see
:func:`find_fewshot_file`). Every problem names its file and line; nothing raises a bare KeyError.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import re
from pathlib import Path
from typing import Sequence

from medgpt.data_files import read_json_records
from medgpt.records import DataError, Problem, question_from_record

logger = logging.getLogger(__name__)

FORMATS = ("medqa", "medmcqa", "pubmedqa", "cmexam", "cmb", "ceval", "cmmlu", "mmlu")
SPLIT_SUFFIXES = ("_dev", "_val", "_test", "_train")
FEWSHOT_SPLITS = ("dev", "val", "train")  # the first found is used
_EXTENSIONS = (".jsonl", ".json", ".csv")
_CJK = re.compile(r"[\u4e00-\u9fff]")


# ---------------------------------------------------------------- items


def _text(value, what: str) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or not str(value).strip():
        raise ValueError(f"{what} must be non-empty text, got {value!r}.")
    return str(value).strip()


def _item(question, options: dict, answer: str, subject: str | None, what: str = "answer") -> dict:
    """One benchmark item: question, options {letter: text}, answer (sorted letters), subject."""
    options = {letter: _text(text, f"option {letter}") for letter, text in options.items()}
    letters = "".join(sorted(set(re.sub(r"[\s,，、]", "", str(answer)).upper())))
    if not letters or any(c not in options for c in letters):
        raise ValueError(f"{what} {answer!r} is not among the option letters {', '.join(options)}.")
    return {"question": _text(question, "the question"), "options": options, "answer": letters, "subject": subject}


def _require(row: dict, keys: tuple[str, ...], shape: str, where: str = "") -> None:
    """ValueError naming the first of ``keys`` that ``row`` lacks, and the format's shape."""
    for key in keys:
        if key not in row:
            raise ValueError(f"{where}has no '{key}' ({shape}).")


def _medqa(row: dict, subject: str | None) -> dict:
    _require(row, ("question", "options", "answer_idx"), "MedQA rows have question, options, answer_idx")
    if not isinstance(row["options"], dict):
        raise ValueError("'options' must be an object {\"A\": \"...\", ...}.")
    return _item(row["question"], {str(k).strip().upper(): v for k, v in row["options"].items()}, row["answer_idx"],
                 subject, "'answer_idx'")


def _medmcqa(row: dict, subject: str | None, zero_based: bool) -> dict:
    _require(row, ("question", "opa", "opb", "opc", "opd", "cop"),
             "MedMCQA rows have question, opa, opb, opc, opd, cop")
    cop = row["cop"]
    first = 0 if zero_based else 1
    if isinstance(cop, bool) or not isinstance(cop, int) or not first <= cop <= first + 3:
        raise ValueError(f"'cop' must be {first}-{first + 3} ({'0-3' if zero_based else '1-4'} in this file), "
                         f"got {cop!r}.")
    options = dict(zip("ABCD", (row[k] for k in ("opa", "opb", "opc", "opd"))))
    return _item(row["question"], options, "ABCD"[cop - first], row.get("subject_name") or subject)


def _cmb(row: dict, subject: str | None) -> dict:
    _require(row, ("question", "option", "answer"), "CMB rows have question, option, answer, question_type")
    if not isinstance(row["option"], dict):
        raise ValueError("'option' must be an object {\"A\": \"...\", ...}.")
    options = {str(k).strip().upper(): v for k, v in row["option"].items() if str(v or "").strip()}
    item = _item(row["question"], options, row["answer"], row.get("exam_type") or subject)
    if "单" in str(row.get("question_type", "")) and len(item["answer"]) != 1:
        raise ValueError(f"question_type {row['question_type']!r} (single choice) but answer {row['answer']!r}.")
    return item


def _pubmedqa(pmid: str, row, subject: str | None) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"PMID {pmid} must map to an object with QUESTION, CONTEXTS, final_decision.")
    _require(row, ("QUESTION", "CONTEXTS", "final_decision"), "PubMedQA items have QUESTION, CONTEXTS, final_decision", f"PMID {pmid} ")
    decision = str(row["final_decision"]).strip().lower()
    if decision not in ("yes", "no", "maybe"):
        raise ValueError(f"PMID {pmid}: final_decision must be yes, no or maybe, got {row['final_decision']!r}.")
    contexts = row["CONTEXTS"] if isinstance(row["CONTEXTS"], list) else [row["CONTEXTS"]]
    question = "Context: " + " ".join(_text(c, "a context") for c in contexts) + "\nQuestion: " + \
        _text(row["QUESTION"], "QUESTION")
    return _item(question, {"A": "yes", "B": "no", "C": "maybe"}, "ABC"[("yes", "no", "maybe").index(decision)],
                 subject)


def _csv_columns(fmt: str, row: list[str], header: list[str] | None, subject: str | None) -> dict:
    if fmt == "cmexam":
        record = dict(zip(header, row))
        options = {}
        for line in str(record.get("Options", "")).splitlines():
            match = re.match(r"\s*([A-Ha-h])[\s.、．:：]+(.*)", line)
            if match:
                options[match.group(1).upper()] = match.group(2)
            elif line.strip() and options:  # an option's text went on over lines
                last = list(options)[-1]
                options[last] += "\n" + line.strip()
        if not options:
            raise ValueError(f"'Options' must be lines like \"A 选项\", got {record.get('Options')!r}.")
        return _item(record.get("Question"), options, record.get("Answer", ""), subject, "'Answer'")
    if len(row) < 6:
        raise ValueError(f"expected {'question, A, B, C, D, answer' if fmt == 'mmlu' else 'id, question, A-D, answer'}"
                         f" columns, got {len(row)}.")
    offset = 0 if fmt == "mmlu" else 1  # C-Eval and CMMLU start with an id / index column
    question, *options, answer = row[offset : offset + 6]
    return _item(question, dict(zip("ABCD", options)), answer, subject)


# ---------------------------------------------------------------- files and formats


def subject_of(path: Path) -> str:
    """A subject file's subject: its stem without a split suffix (anatomy_test -> anatomy)."""
    stem = path.stem
    for suffix in SPLIT_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _csv_rows(path: Path):
    """(line where the row starts, row) of a UTF-8 csv file; a problem of the file raises DataError."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as stream:
            reader = csv.reader(stream)
            start = 1
            for row in reader:
                if any(cell.strip() for cell in row):
                    yield start, row
                start = reader.line_num + 1
    except UnicodeDecodeError as error:
        raise DataError([f"{path}: not UTF-8 text ({error.reason} at byte {error.start}). Re-save it as UTF-8."],
                        what="benchmark files", outcome="nothing was evaluated") from None
    except csv.Error as error:
        raise DataError([f"{path}: {error}"], what="benchmark files", outcome="nothing was evaluated") from None


def _whole_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError):
        return None


def detect_format(path: Path) -> str | None:
    """The benchmark format of a file, from its columns or keys; None when none fits."""
    if path.suffix.lower() == ".csv":
        first = next((row for _, row in _csv_rows(path)), [])
        names = [c.strip() for c in first]
        lower = [c.lower() for c in names]
        if {"question", "options", "answer"} <= set(lower):
            return "cmexam"
        if lower[:1] == ["id"] and lower[1:7] == ["question", "a", "b", "c", "d", "answer"]:
            return "ceval"
        if names[:1] == [""] and lower[1:7] == ["question", "a", "b", "c", "d", "answer"]:
            return "cmmlu"
        if len(first) == 6 and first[5].strip().upper() in ("A", "B", "C", "D"):
            return "mmlu"
        return None
    first_line = next((line for line in path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
                       if line.strip()), "")
    try:
        record = json.loads(first_line)
    except (ValueError, RecursionError):
        whole = _whole_json(path)
        if isinstance(whole, dict) and whole and all(isinstance(v, dict) and "QUESTION" in v
                                                     for v in itertools.islice(whole.values(), 3)):
            return "pubmedqa"
        record = whole[0] if isinstance(whole, list) and whole else None
    if isinstance(record, list) and record:
        record = record[0]
    if not isinstance(record, dict):
        return None
    if isinstance(record.get(next(iter(record), ""), None), dict) and "QUESTION" in next(iter(record.values())):
        return "pubmedqa"  # a PubMedQA file written on one line
    if {"opa", "opb", "opc", "opd", "cop"} <= record.keys():
        return "medmcqa"
    if {"question", "options", "answer_idx"} <= record.keys():
        return "medqa"
    if {"question", "option", "answer"} <= record.keys():
        return "cmb"
    return None


_FORMAT_HINTS = ("medqa (question, options, answer_idx), medmcqa (opa..opd, cop), pubmedqa ({PMID: {QUESTION, "
                 "CONTEXTS, final_decision}}), cmexam (Question, Options, Answer), cmb (question, option, answer), "
                 "ceval (id,question,A,B,C,D,answer), cmmlu (,Question,A,B,C,D,Answer), mmlu (no header: question, "
                 "A, B, C, D, answer)")


def read_benchmark_file(path: Path, fmt: str | None = None, subject: str | None = None) -> tuple[str, list[dict]]:
    """(format, items) of one benchmark file; every problem of the file in one DataError."""
    fmt = fmt or detect_format(path)
    if fmt is None:
        raise DataError([f"{path}: not a benchmark format MedGPT recognizes. Tried {_FORMAT_HINTS}. Pass "
                         f"--benchmark_format NAME to read it as one of them."], what="benchmark files",
                        outcome="nothing was evaluated")
    if fmt not in FORMATS:
        raise DataError([f"--benchmark_format {fmt}: unknown; choose one of {', '.join(FORMATS)}."],
                        what="benchmark arguments", outcome="nothing was evaluated")
    problems: list[str] = []
    items: list[dict] = []

    def add(source: str, make, raw=None):
        try:
            items.append({**make(), "source": source})
        except ValueError as error:
            problems.append(Problem(f"{source}: {error}", source, raw))

    if fmt == "pubmedqa":
        text = path.read_text(encoding="utf-8-sig", errors="replace")
        data = _whole_json(path)
        if not isinstance(data, dict) or not data:
            problems.append(f"{path}: expected one JSON object {{PMID: {{QUESTION, CONTEXTS, final_decision}}}} "
                            "(PubMedQA's ori_pqal.json / test_set.json).")
        for pmid, row in (data or {}).items() if isinstance(data, dict) else ():
            position = text.find(json.dumps(pmid))
            add(f"{path}:{text.count(chr(10), 0, position) + 1 if position >= 0 else 1}",
                lambda pmid=pmid, row=row: _pubmedqa(pmid, row, subject), row)
    elif fmt in ("cmexam", "ceval", "cmmlu", "mmlu"):
        rows = list(_csv_rows(path))
        header = None
        if fmt != "mmlu" and rows:
            header = [c.strip() for c in rows[0][1]]
            rows = rows[1:]
        for line, row in rows:
            add(f"{path}:{line}", lambda row=row: _csv_columns(fmt, row, header, subject), row)
    else:
        records = read_json_records([path], problems)
        zero_based = fmt == "medmcqa" and any(r.data.get("cop") == 0 for r in records)
        if fmt == "medmcqa":
            logger.info("%s: MedMCQA 'cop' read as %s", path, "0-3 (0 = opa)" if zero_based else "1-4 (1 = opa)")
        convert = {"medqa": lambda d: _medqa(d, subject), "cmb": lambda d: _cmb(d, subject),
                   "medmcqa": lambda d: _medmcqa(d, subject, zero_based)}[fmt]
        for record in records:
            add(record.source, lambda record=record: convert(record.data), record.data)
    if not items and not problems:
        problems.append(f"{path}: the file has no items.")
    if problems:
        raise DataError(problems, what="benchmark files", outcome="nothing was evaluated")
    return fmt, items


def benchmark_files(name: str) -> list[Path]:
    """The files of a benchmark argument: the file itself, or a folder's benchmark files (not its subfolders,
    so that a benchmark's dev/ beside test/ is not read as test items)."""
    path = Path(name)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _EXTENSIONS)
    return [path]


def read_benchmark(name: str, fmt: str | None = None) -> dict:
    """A benchmark argument (a file, or a folder of subject files) as
    ``{"name", "format", "items", "files"}``; every problem of every file in one DataError."""
    path = Path(name)
    problems: list[str] = []
    if not path.exists():
        raise DataError([f"--benchmark_files {name}: no such file or folder."], what="benchmark arguments",
                        outcome="nothing was evaluated")
    files = benchmark_files(name)
    if not files:
        problems.append(f"--benchmark_files {name}: no {', '.join(_EXTENSIONS)} files in this folder.")
    formats, items = set(), []
    for file in files:
        try:
            found, file_items = read_benchmark_file(file, fmt, subject_of(file) if path.is_dir() else None)
        except DataError as error:
            problems += error.problems
            continue
        formats.add(found)
        items += [{**item, "file": file} for item in file_items]
    if len(formats) > 1:
        problems.append(f"--benchmark_files {name}: its files are in different formats ({', '.join(sorted(formats))});"
                        " give each benchmark its own folder.")
    if problems:
        raise DataError(problems, what="benchmark files", outcome="nothing was evaluated")
    return {"name": benchmark_name(path), "format": formats.pop(), "items": items, "files": files}


_SPLIT_NAMES = {"train", "dev", "val", "valid", "validation", "test", "test_set", "eval"}


def benchmark_name(path: Path) -> str:
    """A benchmark's name in the results: the file stem (folder name), or parent/stem when that is only a split
    name (medqa/test, mmlu/test, CMB-val-merge)."""
    stem = path.stem if path.is_file() else path.name
    return f"{path.resolve().parent.name}/{stem}" if stem.lower() in _SPLIT_NAMES else stem


def find_fewshot_file(path: Path) -> Path | None:
    """The dev split of a benchmark file, for few-shot examples: the first that exists of, for each split in
    dev, val, train: ``../<split>/<subject>.<ext>`` or ``../<split>/<subject>_<split>.<ext>`` (C-Eval, CMMLU,
    MMLU folder layouts), ``<subject>_<split>.<ext>`` beside the file, ``<split>.<ext>`` beside the file (MedQA's
    dev.jsonl, MedMCQA's train.json, CMExam's val.csv). Never the file itself."""
    subject, suffix = subject_of(path), path.suffix
    for split in FEWSHOT_SPLITS:
        for candidate in (path.parent.parent / split / f"{subject}{suffix}",
                          path.parent.parent / split / f"{subject}_{split}{suffix}",
                          path.parent / f"{subject}_{split}{suffix}", path.parent / f"{split}{suffix}"):
            if candidate.is_file() and candidate.resolve() != path.resolve():
                return candidate
    return None


def fewshot_examples(benchmark: dict, k: int) -> dict[Path, list[dict]]:
    """The first ``k`` dev-split items for each file of a benchmark (DataError naming the files without one)."""
    if k <= 0:
        return {}
    examples, problems = {}, []
    for file in benchmark["files"]:
        dev = find_fewshot_file(file)
        if dev is None:
            problems.append(f"--num_fewshot {k}: no dev split found for {file} (looked for dev/, val/, train/ beside "
                            f"its folder and {subject_of(file)}_dev{file.suffix} / dev{file.suffix} beside it).")
            continue
        try:
            examples[file] = read_benchmark_file(dev, benchmark["format"], subject_of(dev))[1][:k]
        except DataError as error:
            problems += error.problems
    if problems:
        raise DataError(problems, what="few-shot splits", outcome="nothing was evaluated")
    return examples


# ---------------------------------------------------------------- prompts and statistics


def _record(item: dict) -> dict:
    return {"question": item["question"], "options": item["options"], "answer": item["answer"]}


def benchmark_question(item: dict, shots: Sequence[dict] = ()) -> dict:
    """A benchmark item as evaluation.py's question (``question_from_record``'s prompt, answer, kind), with
    ``letters`` (its option letters) and each few-shot example before it as a user turn and an
    "Answer: X" / "答案：X" assistant turn."""
    question = question_from_record(_record(item))
    chinese = bool(_CJK.search(item["question"]))
    turns = []
    for shot in shots:
        turns += question_from_record(_record(shot))["prompt"]
        turns.append({"role": "assistant", "content": ("答案：" if chinese else "Answer: ") + shot["answer"]})
    return {**question, "prompt": turns + question["prompt"], "letters": "".join(item["options"]),
            "subject": item.get("subject")}


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> list[float]:
    """The 95% Wilson score interval of an accuracy (correct of n)."""
    if n == 0:
        return [float("nan"), float("nan")]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def accuracy_summary(scores: Sequence[float], subjects: Sequence[str | None] | None = None) -> dict:
    """accuracy, n, correct and the 95% Wilson interval; per subject when items have one."""
    correct, n = int(sum(scores)), len(scores)
    summary = {"accuracy": correct / n if n else float("nan"), "n": n, "correct": correct,
               "ci95": wilson_interval(correct, n)}
    if subjects and any(s is not None for s in subjects):
        by_subject = {}
        for subject, score in zip(subjects, scores):
            by_subject.setdefault(str(subject), []).append(score)
        summary["subjects"] = {name: {k: v for k, v in accuracy_summary(values).items() if k != "subjects"}
                               for name, values in sorted(by_subject.items())}
    else:
        summary["subjects"] = {}
    return summary
