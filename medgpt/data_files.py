"""Finding and reading data files: one file finder, records with their file:line, invalid records set aside.

Training data is read into Arrow (``datasets``) one line at a time (:func:`raw_records`), so memory stays
flat however large the files are; small inputs (prompts, evaluation sets, data tools) are read into lists
(:func:`load_records`). Every problem names its file and line.
"""

from __future__ import annotations

import codecs
import itertools
import json
import logging
import random
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

from medgpt.records import DataError, Problem, Record, _text, qa_item_from_record

logger = logging.getLogger(__name__)

def find_files(names: Sequence[str], extensions: Sequence[str], flag: str, kind: str = "any") -> list[Path]:
    """The one file finder: each name a file, or a folder searched recursively (``kind``: "file", "folder" or
    "any"). Files of other types in a folder are listed in the log, not read; every problem is reported at once."""
    found: list[Path] = []
    problems = []
    wanted = "/".join(extensions)
    for name in names:
        path = Path(name)
        if path.is_dir() and kind != "file":
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            inside = [p for p in files if p.suffix.lower() in extensions]
            if not inside:
                problems.append(f"{flag} {name}: no {wanted} files found in it or its subfolders.")
            other = [p for p in files if p.suffix.lower() not in extensions]
            if other:
                logger.warning("%s %s: %d file(s) that are not %s are not read: %s%s", flag, name, len(other), wanted,
                               ", ".join(str(p) for p in other[:5]), " ..." if len(other) > 5 else "")
            found += inside
        elif path.is_file() and kind != "folder":
            if path.suffix.lower() not in extensions:
                problems.append(f"{flag} {name}: expected a {wanted} file.")
            else:
                found.append(path)
        else:
            what = {"file": "file", "folder": "folder"}.get(kind, "file or folder")
            problems.append(f"{flag} {name}: no such {what}.")
    if problems:
        raise DataError(problems, what=f"{flag} arguments")
    return found


def find_data_files(directory: str | None, files: Sequence[str] | None, extensions: Sequence[str],
                    flag: str) -> list[Path]:
    """A stage's files: its --{flag}_file_dir folder (searched recursively) plus its --{flag}_files."""
    problems, found = [], []
    for names, option, kind in (([directory] if directory else [], f"--{flag}_file_dir", "folder"),
                                (list(files or []), f"--{flag}_files", "file")):
        try:
            found += find_files(names, extensions, option, kind)
        except DataError as error:
            problems += error.problems
    if problems:
        raise DataError(problems, what=f"{flag} file arguments")
    return found


def read_json_records(paths: Iterable[Path], problems: list[str]) -> list[Record]:
    """Read .jsonl (one object per line) and .json (an array of objects, or JSON lines) files.

    Every problem (malformed JSON, non-UTF-8 bytes, an empty file, a record that is not an object...) is added
    to ``problems`` with its file and line, in the words training reports (both read through
    :func:`_json_rows` and :func:`decode_json_line`); good records are returned.
    """
    records: list[Record] = []
    for path in paths:
        for source, text, problem in _json_rows(path):
            if not problem:
                try:
                    records.append(Record(source, decode_json_line(text)))
                    continue
                except ValueError as error:
                    problem = f"{source}: {error}"
            problems.append(Problem(problem, source or None, text if source else None))
    return records


def load_records(paths: Sequence[Path], convert: Callable[[dict], object]) -> list[tuple[str, object]]:
    """Read JSON files and convert every record; raise one DataError listing every problem."""
    problems: list[str] = []
    records = read_json_records(paths, problems)
    converted = []
    for record in records:
        try:
            converted.append((record.source, convert(record.data)))
        except ValueError as error:
            problems.append(Problem(f"{record.source}: {error}", record.source, record.data))
    if problems:
        raise DataError(problems, kept=converted)
    return converted


def json_reader(convert: Callable[[dict], object]) -> Callable[[Sequence[Path]], list]:
    """A reader for load_train_validation: JSON records converted by ``convert``."""
    return lambda paths: load_records(paths, convert)


def text_document_reader(paragraphs: bool = False) -> Callable[[Sequence[Path]], list]:
    """A reader of documents for pretraining: .txt files (one document per line, or per blank-line
    separated paragraph with ``paragraphs``) and .jsonl/.json records with a ``text`` field."""

    def read(paths: Sequence[Path]) -> list[tuple[str, str]]:
        problems: list[str] = []
        documents: list[tuple[str, str]] = []
        for path in paths:
            if path.suffix.lower() in (".jsonl", ".json"):
                for record in read_json_records([path], problems):
                    try:
                        documents.append((record.source, _text(record.data.get("text"), "'text'")))
                    except ValueError as error:
                        problems.append(Problem(f"{record.source}: {error} Each record needs a non-empty 'text' "
                                                "string.", record.source, record.data))
                continue
            documents += _text_documents([path], paragraphs, problems)
        if problems:
            raise DataError(problems, kept=documents)
        return documents

    return read


def _read_text_file(path: Path, paragraphs: bool, problems: list[str]) -> list[tuple[str, str]]:
    """The (source, text) documents of a .txt file, read as training reads them (:func:`_text_rows`)."""
    documents = []
    for source, text, problem in _text_rows(path, paragraphs):
        if problem:
            problems.append(Problem(problem, source, text))
        else:
            documents.append((source, text))
    return documents


def _text_documents(paths: Sequence[Path], paragraphs: bool, problems: list[str]) -> list[tuple[str, str]]:
    """Documents of .txt files (lines, or paragraphs); an empty file is a problem."""
    documents = []
    for path in paths:
        found = _read_text_file(path, paragraphs, problems)
        if not found and not any(p.startswith(f"{path}:") for p in problems):
            problems.append(f"{path}: the file is empty.")
        documents += found
    return documents


def qa_reader(paths: Sequence[Path]) -> list[tuple[str, dict]]:
    """A reader for load_train_validation: prompts (and references) from .txt lines and records of any format."""
    problems: list[str] = []
    items = [(source, {"messages": [{"role": "user", "content": line}]})
             for source, line in _text_documents([p for p in paths if p.suffix.lower() == ".txt"], False, problems)]
    try:
        items += load_records([p for p in paths if p.suffix.lower() != ".txt"], qa_item_from_record)
    except DataError as error:
        problems += error.problems
        items += error.kept or []
    if problems:
        raise DataError(problems, kept=items)
    return items


def split_train_validation(items: list, percentage: float, seed: int) -> tuple[list, list]:
    """Hold out ``percentage`` percent (at least one record when percentage > 0), seeded."""
    if percentage <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    count = max(1, int(len(items) * percentage / 100))
    held = set(order[:count])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


INVALID_RECORDS_FILE = "invalid_records.jsonl"


class InvalidRecords:
    """--on_invalid_record: ``error`` stops at any invalid record (every one listed with its file and line);
    ``skip`` sets them aside, writes each with its file:line and the reason to ``invalid_records.jsonl`` in
    the output folder, and stops only when more than ``max_fraction`` of the records are invalid."""

    def __init__(self, policy: str = "error", max_fraction: float = 0.05, output_dir: str | None = None):
        self.policy, self.max_fraction, self.output_dir = policy, max_fraction, output_dir
        self.dropped: list[Problem] = []
        self.total = 0  # records read, valid or not

    @classmethod
    def from_args(cls, data_args, output_dir: str | None) -> "InvalidRecords":
        return cls(data_args.on_invalid_record, data_args.max_invalid_fraction, output_dir)

    def read(self, read: Callable[[Sequence[Path]], list], paths: Sequence[Path]) -> list:
        """``read(paths)``; under ``skip`` a DataError whose problems are all single records gives the good
        ones, and the problems are set aside."""
        try:
            records = read(paths)
        except DataError as error:
            single = error.kept is not None and all(getattr(p, "source", None) for p in error.problems)
            if self.policy != "skip" or not single:
                raise
            self.dropped += error.problems
            self.total += len(error.kept) + len(error.problems)
            return error.kept
        self.total += len(records)
        return records

    def add(self, problem: Problem) -> None:
        """A record found invalid after reading (e.g. its template cannot render it)."""
        self.dropped.append(problem)

    def raise_now(self) -> None:
        """Stop now under the error policy, or for a problem of a whole file (under any policy)."""
        whole_files = [p for p in self.dropped if not p.source]
        if whole_files or (self.dropped and self.policy != "skip"):
            raise DataError(sorted(whole_files or self.dropped, key=_source_order))

    def finish(self, what: str) -> dict:
        """Stop (error policy, or too many invalid), else write the dropped records; metrics to report."""
        self.raise_now()
        count = len(self.dropped)
        if not count:
            return {"invalid_records": 0}
        self.dropped.sort(key=_source_order)
        path = Path(self.output_dir or ".", INVALID_RECORDS_FILE)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as sink:
            for problem in self.dropped:
                reason = str(problem)[len(problem.source) + 2:] if str(problem).startswith(problem.source) else str(problem)
                sink.write(json.dumps({"source": problem.source, "reason": reason, "record": problem.raw},
                                      ensure_ascii=False, default=str) + "\n")
        fraction = count / max(self.total, 1)
        if fraction > self.max_fraction:
            raise DataError([f"{count} of {self.total} records ({fraction:.1%}) are invalid, more than "
                             f"--max_invalid_fraction {self.max_fraction}; each is listed with its file:line and "
                             f"reason in {path}. Fix the data, or raise --max_invalid_fraction."], what=what)
        logger.warning("%s: skipped %d invalid record(s) of %d (--on_invalid_record skip); each is in %s with its "
                       "file:line and reason. First: %s", what, count, self.total, path, self.dropped[0])
        return {"invalid_records": count}


def _source_order(problem: Problem):
    """File, then line (or array index), as numbers: the order of the records in the user's files."""
    match = re.fullmatch(r"(.*?)(?::(\d+)|\[(\d+)\])", problem.source or "")
    return (match.group(1), int(match.group(2) or match.group(3))) if match else (problem.source or str(problem), 0)


def load_train_validation(data_args, read: Callable[[Sequence[Path]], list], what: str, seed: int,
                          extensions: Sequence[str] = (".jsonl", ".json"), invalid: InvalidRecords | None = None):
    """Training and validation records per the data arguments, every problem of both reported at once.

    With no validation files, ``--validation_split_percentage`` of the training records is held out.
    ``read`` turns file paths into ``(source, item)`` pairs (see json_reader, text_document_reader).
    Invalid records stop the run unless ``invalid`` (an InvalidRecords with policy skip) sets them aside;
    the caller then calls ``invalid.finish()`` once its own checks are done.
    Returns ``(train, validation)`` lists of ``(source, item)``.
    """
    invalid = invalid or InvalidRecords()
    problems: list[str] = []
    splits = {}
    for flag, directory, files in (
        ("train", data_args.train_file_dir, data_args.train_files),
        ("validation", data_args.validation_file_dir, data_args.validation_files),
    ):
        if flag == "train" and not (directory or files):
            problems.append("no training data given: pass --train_file_dir DIR and/or --train_files FILE ...")
            continue
        if flag == "validation" and not (directory or files):
            splits[flag] = None
            continue
        try:
            paths = find_data_files(directory, files, extensions, flag)
            splits[flag] = invalid.read(read, paths)
        except DataError as error:
            problems += error.problems
    if problems:
        raise DataError(problems, what=what)
    train, validation = splits["train"], splits["validation"]
    if validation is None:
        train, validation = split_train_validation(train, data_args.validation_split_percentage, seed)
    if data_args.max_train_samples is not None:
        train = train[: data_args.max_train_samples]
    if data_args.max_eval_samples is not None:
        validation = validation[: data_args.max_eval_samples]
    logger.info("%s: %d training and %d validation records", what, len(train), len(validation))
    return train, validation



# ---------------------------------------------------------------- training data in Arrow, one line at a time

RAW_FEATURES = {"source": "string", "text": "string", "problem": "string"}


def parse_weighted(files: Sequence[str] | None) -> tuple[list[str], dict[str, float]]:
    """``--train_files a.jsonl=0.8 b.jsonl=0.2``: the files, and the weights of those that have one."""
    names, weights, problems = [], {}, []
    for item in files or []:
        path, sep, weight = item.rpartition("=")
        if sep and path and not Path(item).exists():
            try:
                value = float(weight)
            except ValueError:
                value = float("nan")
            if not 0 < value < float("inf"):
                problems.append(f"--train_files {item}: expected FILE=WEIGHT with a positive weight, e.g. general.jsonl=0.2.")
                continue
            names.append(path)
            weights[path] = value
        else:
            names.append(item)
    if problems:
        raise DataError(problems, what="--train_files arguments")
    if weights and len(weights) != len(names):
        unweighted = [name for name in names if name not in weights]
        raise DataError([f"--train_files: give every file a weight or none ({', '.join(unweighted)} has none)."],
                        what="--train_files arguments")
    return names, weights


def file_fingerprint(paths: Sequence[Path]) -> list[list]:
    """What identifies the files' contents cheaply: path, size and modification time of each."""
    return [[str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns] for p in paths]


def _raw_rows(paths: list[str], paragraphs: bool, fingerprint: list | None, version: int | None = None):
    """Rows {source, text, problem} of the files: a JSON line, an element of a .json array, a .txt line
    (or paragraph). Unreadable lines become rows with a problem; a problem of a whole file, a row with no source."""
    del fingerprint, version  # only part of the cache key of this generator
    for name in paths:
        path = Path(name)
        rows = _text_rows(path, paragraphs) if path.suffix.lower() == ".txt" else _json_rows(path)
        for source, text, problem in rows:
            yield {"source": source, "text": text, "problem": problem}


# ---------------------------------------------------------------- decoding: the one copy every reader uses


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """object_pairs_hook: json keeps the last value of a repeated key without a word; refuse the record instead."""
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        key = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key {json.dumps(key, ensure_ascii=False)} appears more than once in one object; "
                         "keep one (JSON readers differ on which one wins).")
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _json_problem(error: Exception) -> str:
    """What is wrong with a JSON text, for an error of the JSON decoder."""
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON ({error.msg} at column {error.colno})."
    if isinstance(error, RecursionError):
        return "nested too deeply (more levels of {...} and [...] than a JSON reader can follow)."
    return str(error)  # a repeated key (_unique_keys)


def decode_json_line(text: str) -> dict:
    """The record in a JSON line, or in an element of a .json array: the one JSON decoding of data files (training
    rows, the data tools, evaluation sets), so all report a problem in the same words. ValueError says what is wrong."""
    try:
        value = _DECODER.decode(text)
    except (ValueError, RecursionError) as error:
        raise ValueError(_json_problem(error)) from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object {{...}}, got {type(value).__name__}.")
    return value


def _utf8(raw: bytes, path: Path, line: int = 1) -> tuple[str, str]:
    """(text, "") of bytes that start at ``line`` of a file; (text with replacement characters, the problem) if
    they are not UTF-8."""
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as error:
        line += raw.count(b"\n", 0, error.start)
        column = error.start - raw.rfind(b"\n", 0, error.start)
        return raw.decode("utf-8", "replace"), (f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at "
                                                f"column {column}). Re-save the file as UTF-8.")


# UTF-32 first: its little-endian mark begins with UTF-16's
_OTHER_ENCODINGS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def _encoding_problem(path: Path) -> str:
    """One problem for a file in UTF-16 or UTF-32 (known by its byte order mark), rather than one for each line."""
    with path.open("rb") as stream:
        head = stream.read(4)
    for mark, encoding in _OTHER_ENCODINGS:
        if head.startswith(mark):
            return (f"{path}: the file is {encoding} text (it starts with a {encoding} byte order mark); data files "
                    f"must be UTF-8. Convert it, e.g. iconv -f {encoding} -t UTF-8 {path} > "
                    f"{path.with_name(path.stem + '.utf8' + path.suffix)}")
    return ""


def _lines(path: Path):
    """(line number, bytes) of the file's lines, a UTF-8 byte order mark left out."""
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, start=1):
            yield number, raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw


def _or_empty(path: Path, rows):
    """The rows; if there are none, one problem: the file is empty."""
    found = False
    for row in rows:
        found = True
        yield row
    if not found:
        yield "", "", f"{path}: the file is empty."


def _json_rows(path: Path):
    """(source, text, problem) of a .jsonl/.json file: each JSON line, or each element of a .json array, with its
    text as written (decode_json_line decodes it); a problem of the whole file has no source."""
    problem = _encoding_problem(path)
    if problem:
        yield "", "", problem
    elif path.suffix.lower() == ".json" and _starts_with_bracket(path):
        text, problem = _utf8(path.read_bytes().removeprefix(codecs.BOM_UTF8), path)
        yield from [("", "", problem)] if problem else _or_empty(path, _json_array_rows(path, text))
    elif path.suffix.lower() == ".json" and (problem := _one_object_problem(path)):
        yield "", "", problem
    else:
        yield from _or_empty(path, _json_lines(path))


def _json_lines(path: Path):
    """(path:line, the line's text, problem) of each line that is not blank."""
    for number, raw in _lines(path):
        if raw.strip():
            text, problem = _utf8(raw, path, number)
            yield f"{path}:{number}", text.strip(), problem


def _starts_with_bracket(path: Path) -> bool:
    with path.open("rb") as stream:
        return stream.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"["


_ELEMENT = json.JSONDecoder()  # only finds where each element of an array ends; decode_json_line checks the element
_SPACE = re.compile(r"\s*")


def _json_array_rows(path: Path, text: str):
    """(source, text, problem) of each element of a .json array: its text as written, decoded later as a JSON line
    is, so that a bad element is one problem and the others are read. JSON that cannot be followed ends the file
    with one problem."""
    position = _SPACE.match(text).end() + 1  # after the [
    for index in itertools.count():
        position = _SPACE.match(text, position).end()
        if index == 0 and text.startswith("]", position):
            break
        try:
            _, end = _ELEMENT.raw_decode(text, position)
        except (ValueError, RecursionError) as error:
            line = error.lineno if isinstance(error, json.JSONDecodeError) else text.count("\n", 0, position) + 1
            yield "", "", f"{path}:{line}: {_json_problem(error)}"
            return
        yield f"{path}[{index}]", text[position:end], ""
        position = _SPACE.match(text, end).end()
        if not text.startswith(",", position):
            break
        position += 1
    what = "expected ',' or the closing ']'"
    if text.startswith("]", position):
        position = _SPACE.match(text, position + 1).end()
        if position == len(text):
            return
        what = "more text after the closing ']'"
    line, column = text.count("\n", 0, position) + 1, position - text.rfind("\n", 0, position)
    yield "", "", f"{path}:{line}: not valid JSON ({what} at column {column})."


def _one_object_problem(path: Path) -> str:
    """A .json file holding one object over several lines (e.g. {"data": [...]}) rather than records: one problem
    for the file, naming the key that holds a list, rather than one for each line."""
    first = next((raw for _, raw in _lines(path) if raw.strip()), b"")
    try:
        json.loads(first)
        return ""  # JSON lines
    except (ValueError, RecursionError):
        pass
    try:
        value = json.loads(path.read_bytes().removeprefix(codecs.BOM_UTF8))
    except (ValueError, RecursionError):
        return ""  # broken JSON: each line says what is wrong
    if not isinstance(value, dict):
        return ""
    lists = [json.dumps(key, ensure_ascii=False) for key, item in value.items() if isinstance(item, list)]
    hint = (f" Its key {lists[0]} holds a list: if that list is the records, make it the whole file, e.g. "
            f"jq '.[{lists[0]}]' {path} > {path.with_name(path.stem + '.records.json')}") if lists else ""
    return (f"{path}: the file holds one JSON object, not records: records must be a top-level list "
            f"[{{...}}, {{...}}] or JSON lines (one object a line).{hint}")


def _text_rows(path: Path, paragraphs: bool):
    """(source, text, problem) of a .txt file: a document a line, or a blank-line separated paragraph."""
    problem = _encoding_problem(path)
    if problem:
        yield "", "", problem
    else:
        yield from _or_empty(path, _lines_or_paragraphs(path, paragraphs))


def _lines_or_paragraphs(path: Path, paragraphs: bool):
    current, start = [], 0
    for number, raw in _lines(path):
        line, problem = _utf8(raw, path, number)
        line = line.strip()
        if problem:
            yield f"{path}:{number}", line, problem
        elif not paragraphs:
            if line:
                yield f"{path}:{number}", line, ""
        elif line:
            start = start or number
            current.append(line)
        elif current:
            yield f"{path}:{start}", "\n".join(current), ""
            current, start = [], 0
    if current:
        yield f"{path}:{start}", "\n".join(current), ""


RAW_ROWS_VERSION = 3  # part of the raw rows' cache key (datasets hashes arguments, not code): bump when _raw_rows changes


def raw_records(paths: Sequence[Path], paragraphs: bool = False):
    """The files' records as an Arrow dataset (columns source, text, problem), written to disk as they are
    read: memory stays flat however large the files are. Cached by datasets until a file changes."""
    import datasets

    features = datasets.Features({key: datasets.Value(kind) for key, kind in RAW_FEATURES.items()})
    names = [str(p) for p in paths]
    return datasets.Dataset.from_generator(
        _raw_rows, features=features, writer_batch_size=rows_per_batch(_line_bytes(paths)),
        gen_kwargs={"paths": names, "paragraphs": paragraphs, "fingerprint": file_fingerprint(paths),
                    "version": RAW_ROWS_VERSION})


BATCH_BYTES = 4 * 2**20


def rows_per_batch(row_bytes: float) -> int:
    """Rows per Arrow record batch for rows of about ``row_bytes``: batches of about BATCH_BYTES. Every batch
    that is read maps its pages (and the kernel's read-around) into the reading process, so a few large batches
    keep the memory of reading a dataset flat where thousands of small ones (datasets' 1,000 rows) grow with it."""
    return int(min(max(BATCH_BYTES // max(row_bytes, 1), 10), 100_000))


def row_bytes(dataset) -> float:
    """Average bytes per row of a dataset's Arrow table, from its buffer sizes. (``Table.nbytes`` reads the
    offsets of every string and list array: for a memory-mapped dataset, pages of the whole file mapped into
    this process, about 0.1 GiB for a 1 GB corpus.)"""
    table = dataset.data.table
    return table.get_total_buffer_size() / max(table.num_rows, 1)


def _line_bytes(paths: Sequence[Path], sample: int = 2**20) -> float:
    """The average line length at the start of the first files (a row is a line, or a paragraph of a few: an
    estimate is enough); for .json arrays, whose records span many lines, what gives datasets' 1,000 rows."""
    if any(Path(p).suffix.lower() == ".json" for p in paths):
        return BATCH_BYTES / 1000
    size = lines = 0
    for path in paths[:8]:
        with open(path, "rb") as source:
            head = source.read(sample)
        size, lines = size + len(head), lines + head.count(b"\n") + 1
    return size / max(lines, 1)


def parse_json_record(example: dict) -> dict:
    """The JSON object of a raw row, or ValueError with what is wrong (the row's own problem first)."""
    if example["problem"]:
        raise ValueError(example["problem"].split(": ", 1)[-1] if example["source"] else example["problem"])
    return decode_json_line(example["text"])


def mix_plan(sizes: Sequence[int], weights: Sequence[float], size: int | None = None) -> list[int]:
    """How many records to take from each source for shares proportional to ``weights``: ``size`` in all, or
    the most possible without repeating any source's records. One implementation for the data tools' ``mix``
    and for weighted ``--train_files``."""
    total = sum(weights)
    shares = [weight / total for weight in weights]
    size = size or int(min(n / share for n, share in zip(sizes, shares)))
    return [round(size * share) for share in shares]


def mix_datasets(sources: Sequence[tuple[str, object]], weights: Sequence[float], seed: int):
    """One shuffled dataset with the sources in the given proportions (seeded); the realized mix is logged."""
    import datasets
    import numpy as np

    wants = mix_plan([len(ds) for _, ds in sources], weights)
    rng = np.random.default_rng(seed)
    parts = []
    for (name, dataset), want in zip(sources, wants):
        order = rng.permutation(len(dataset))
        indices = np.concatenate([order] * (want // max(len(dataset), 1)) + [order[: want % max(len(dataset), 1)]])
        parts.append(dataset.select(indices))
        logger.info("mix: %s: %d of its %d records (%.0f%% of the mix)", name, want, len(dataset),
                    100 * want / max(sum(wants), 1))
    return datasets.concatenate_datasets(parts).shuffle(seed=seed)


def load_splits(data_args, what: str, seed: int, extensions: Sequence[str] = (".jsonl", ".json"),
                paragraphs: bool = False, invalid: InvalidRecords | None = None):
    """Training and validation records as Arrow datasets of raw rows (see raw_records), from the data
    arguments: folders and files (weighted files mixed), validation files or a seeded held-out share of the
    training records, --max_train_samples / --max_eval_samples. Missing files are reported together."""
    train_names, weights = parse_weighted(data_args.train_files)
    problems, splits = [], {}
    for flag, directory, files in (("train", data_args.train_file_dir, train_names),
                                   ("validation", data_args.validation_file_dir, data_args.validation_files)):
        if not (directory or files):
            if flag == "train":
                problems.append("no training data given: pass --train_file_dir DIR and/or --train_files FILE ...")
            splits[flag] = None
            continue
        try:
            paths = find_data_files(directory, files, extensions, flag)
        except DataError as error:
            problems += error.problems
            continue
        if flag == "train" and weights:
            if directory:
                problems.append("--train_files with weights: list every source as FILE=WEIGHT (a folder of "
                                "--train_file_dir cannot be weighted); leave --train_file_dir out.")
                continue
            splits[flag] = mix_datasets([(name, raw_records([Path(name)], paragraphs)) for name in train_names],
                                        [weights[name] for name in train_names], seed)
        else:
            splits[flag] = raw_records(paths, paragraphs)
    if problems:
        raise DataError(problems, what=what)
    train, validation = splits["train"], splits["validation"]
    if validation is None and data_args.validation_split_percentage > 0 and len(train) >= 2:
        held = max(1, int(len(train) * data_args.validation_split_percentage / 100))
        parts = train.train_test_split(test_size=held, seed=seed, shuffle=True)
        train, validation = parts["train"], parts["test"]
    train_limit, eval_limit = data_args.max_train_samples, data_args.max_eval_samples
    if train_limit is not None:
        train = train.select(range(min(len(train), train_limit)))
    if validation is not None and eval_limit is not None:
        validation = validation.select(range(min(len(validation), eval_limit)))
    if invalid is not None:
        invalid.total += len(train) + (len(validation) if validation is not None else 0)
    logger.info("%s: %d training and %d validation records", what, len(train),
                len(validation) if validation is not None else 0)
    return train, validation


def column(dataset, name: str):
    """One column of a dataset as a pyarrow array (after any select/shuffle), without Python objects."""
    return dataset.with_format("arrow")[name]


def _arrow_files(dataset) -> list[str] | None:
    """The Arrow files that hold exactly a dataset's table, in order; None when the table is in memory, a slice,
    a cast or a join of files."""
    from datasets.table import ConcatenationTable, MemoryMappedTable

    table = dataset.data
    blocks = table.blocks if isinstance(table, ConcatenationTable) else [[table]]
    if any(len(row) != 1 or not isinstance(row[0], MemoryMappedTable)
           or any(replay[0] != "replace_schema_metadata" for replay in row[0].replays) for row in blocks):
        return None
    return [row[0].path for row in blocks]


def column_values(dataset, name: str, convert: Callable | None = None):
    """One column as a numpy array, ``convert`` (default: to numpy) applied to each record batch's pyarrow array.

    A memory-mapped dataset's batches are read from its files with ordinary reads, one at a time: reading
    a column through the memory map leaves every page that holds it (and the kernel's read-around of the
    other columns) mapped in this process, which grows the main process's memory with the corpus (about
    0.1 GiB for the ``problem`` and ``hash`` columns of a 1 GB corpus's 2.7M documents)."""
    import numpy as np
    import pyarrow as pa

    convert = convert or (lambda values: values.to_numpy(zero_copy_only=False))
    files = _arrow_files(dataset)
    if files is None:
        return np.asarray(convert(column(dataset, name)))
    out, start = None, 0
    for path in files:
        with pa.OSFile(path) as source:
            for batch in pa.ipc.open_stream(source):
                part = convert(batch.column(name))
                if out is None:
                    out = np.empty(dataset.data.num_rows, dtype=part.dtype)
                out[start:start + len(part)] = part
                start += len(part)
    if out is None:
        return np.asarray(convert(column(dataset, name)))
    return out if dataset._indices is None else out[dataset._indices.column(0).to_numpy()]


def nonempty(values):
    """Per row: is this string set (for :func:`column_values`)."""
    import pyarrow.compute as pc

    return pc.not_equal(values, "").to_numpy(zero_copy_only=False)


def take_problems(dataset, invalid: InvalidRecords):
    """Rows of a prepared dataset whose ``problem`` is set go to ``invalid`` (with the raw record text); returns
    the indices of the other rows (one read of the ``problem`` column for both)."""
    import numpy as np

    problem = column_values(dataset, "problem", nonempty)
    flagged = np.flatnonzero(problem)
    if not len(flagged):
        return np.arange(len(problem))
    for row in dataset.select(flagged).select_columns(["source", "text", "problem"]):
        try:
            raw = json.loads(row["text"])
        except (ValueError, TypeError, RecursionError):  # the text as it is, when it is not JSON
            raw = row["text"]
        invalid.add(Problem(row["problem"], row["source"] or None, raw))
    return np.flatnonzero(~problem)
