"""python -m medgpt.data_tools: validate, convert, dedup, mix and self-instruct, run as a user runs them
(in-process: see data_tool)."""

import contextlib
import io
import json
import logging
import subprocess
import sys

import pytest

from conftest import ROOT, run_script, sft_records, write_jsonl
from medgpt.data_tools import parse_questions
from medgpt.records import conversation_from_record, preference_from_record


def data_tool(*args, check=True) -> subprocess.CompletedProcess:
    """`python -m medgpt.data_tools ARGS` as a user runs it, in this process (a subprocess's start-up was most of
    these tests' time): its exit status, its output, and its messages and log lines on stderr."""
    from medgpt.data_tools import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as ended:  # as the interpreter reports it: a message goes to stderr, status 1
                code = ended.code
                if isinstance(code, str):
                    print(code, file=sys.stderr)
                    code = 1
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    result = subprocess.CompletedProcess(["medgpt.data_tools", *args], code or 0, out.getvalue(), err.getvalue())
    if check:
        assert result.returncode == 0, f"data_tools {' '.join(args)} failed:\n{result.stderr}"
    return result


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_validate_passes_the_shipped_data_and_reports_every_problem_with_file_and_line(tmp_path):
    run = data_tool("validate", "--inputs", "data/sft", "data/preference", "data/pretrain")
    assert "OK:" in run.stdout and "no problems" in run.stdout
    assert "data/preference/train/en_preference.jsonl:" in run.stdout and "preference records" in run.stdout
    assert data_tool("validate", "--inputs", "data/grpo", "--kind", "question").returncode == 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Fever?", "output": "Rest and fluids."}\n'
                   '{"instruction": "Cough?", "output": \n'
                   '{"question": "Headache?"}\n'
                   '{"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hi"}]}\n'
                   '{"prompt": "Which is better?", "chosen": "A careful answer."}\n', encoding="utf-8")
    run = data_tool("validate", "--inputs", str(bad), check=False)
    assert run.returncode == 1
    for line, words in [(2, "not valid JSON"), (3, "no 'answer'"), (4, "roles out of order"), (5, "no 'rejected'")]:
        assert f"{bad}:{line}: " in run.stderr and words in run.stderr, run.stderr
    assert f"{bad}:1:" not in run.stderr
    assert data_tool("validate", "--inputs", str(tmp_path / "missing"), check=False).returncode == 1


def test_convert_round_trips_sft_and_preference_formats_and_keeps_extra_keys(tmp_path):
    records = sft_records(12)
    records[0]["id"] = "case-0"
    records[1] = {"system": "Be careful.", "history": [["Hello", "Hi, how can I help?"]],
                  "instruction": "Is 38.5 C a fever?", "input": "", "output": "Yes, in adults it is."}
    source = write_jsonl(tmp_path / "in.jsonl", records)
    original = [conversation_from_record(r) for r in records]
    previous = source
    for target in ("alpaca", "sharegpt", "openai"):
        out = tmp_path / f"{target}.jsonl"
        assert f"as {target}" in data_tool("convert", "--inputs", str(previous), "--output", str(out), "--to", target).stdout
        assert [conversation_from_record(r) for r in read_jsonl(out)] == original
        previous = out
    assert read_jsonl(previous)[0]["id"] == "case-0" and "messages" in read_jsonl(previous)[0]
    assert read_jsonl(tmp_path / "alpaca.jsonl")[1]["history"] == [["Hello", "Hi, how can I help?"]]

    pairs = tmp_path / "pairs.jsonl"
    out = tmp_path / "trl.jsonl"
    data_tool("convert", "--inputs", "data/preference/eval", "--output", str(pairs), "--to", "alpaca")
    data_tool("convert", "--inputs", str(pairs), "--output", str(out), "--to", "trl")
    shipped = [preference_from_record(json.loads(line)) for path in sorted((ROOT / "data/preference/eval").glob("*.jsonl"))
               for line in path.read_text(encoding="utf-8").splitlines()]
    assert [preference_from_record(r) for r in read_jsonl(out)] == shipped
    assert set(read_jsonl(pairs)[0]) >= {"question", "response_chosen", "response_rejected"}

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a pretraining document"}])
    run = data_tool("convert", "--inputs", str(bad), "--output", str(tmp_path / "x.jsonl"), check=False)
    assert run.returncode == 1 and "nothing to convert" in run.stderr and not (tmp_path / "x.jsonl").exists()


def test_dedup_removes_exact_and_near_duplicates_and_keeps_them_aside(tmp_path):
    base = "Adults can take paracetamol 500 mg to 1 g every 4 to 6 hours, no more than 4 g in 24 hours."
    records = [
        {"question": "What is the paracetamol limit?", "answer": base},
        {"question": "What is the paracetamol limit?", "answer": base},  # exact copy
        {"question": "what is the paracetamol limit", "answer": base.upper()},  # same after normalization
        {"question": "What is the paracetamol limit for adults?", "answer": base.replace("every 4 to 6", "each 4-6")},
        {"question": "How is gout treated?", "answer": "Colchicine or an NSAID early in an attack; see a doctor."},
    ]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    run = data_tool("dedup", "--inputs", str(source), "--output", str(out), "--threshold", "0.7")
    assert "2 exact and 1 near duplicates removed" in run.stdout
    assert read_jsonl(out) == [records[0], records[4]]
    removed = read_jsonl(tmp_path / "out.removed.jsonl")
    assert [r["duplicate"] for r in removed] == ["exact", "exact", "near"]
    assert all(r["duplicate_of"] == f"{source}:1" for r in removed)
    assert removed[2]["source_line"] == f"{source}:4"

    run = data_tool("dedup", "--inputs", "data/sft/train", "--output", str(tmp_path / "sft.jsonl"))
    assert "455 records: 0 exact and 0 near duplicates removed" in run.stdout  # the shipped data has none


def test_mix_follows_the_ratios_is_seeded_and_reports_repeats(tmp_path):
    medical = write_jsonl(tmp_path / "medical.jsonl", [{"question": f"Medical {i}?", "answer": "An answer."}
                                                        for i in range(40)])
    general = write_jsonl(tmp_path / "general" / "g.jsonl", [{"instruction": f"General {i}", "output": "Done."}
                                                             for i in range(10)])

    def mixed(*extra, name="mix.jsonl"):
        out = tmp_path / name
        run = data_tool("mix", "--sources", f"{medical}=3", f"{tmp_path / 'general'}=1", "--output", str(out), *extra)
        return run, read_jsonl(out)

    run, rows = mixed()
    assert len(rows) == 40  # the most possible without repeats: all 10 general records are a quarter of 40
    contents = [r["messages"][0]["content"] for r in rows]
    assert sum(c.startswith("Medical") for c in contents) == 30 and sum(c.startswith("General") for c in contents) == 10
    assert all(conversation_from_record(r) for r in rows)
    assert mixed(name="again.jsonl")[1] == rows  # seeded
    assert mixed("--seed", "7", name="other.jsonl")[1] != rows

    run, rows = mixed("--size", "80", name="big.jsonl")
    assert len(rows) == 80 and "10 of them repeats" in run.stdout
    run = data_tool("mix", "--sources", f"{medical}=3", f"{general}=1", "--size", "80", "--allow_repeats", "false",
                    "--output", str(tmp_path / "no.jsonl"), check=False)
    assert run.returncode != 0 and "60 records needed for --size 80, it has 40" in run.stderr
    run = data_tool("mix", "--sources", f"{medical}", "--output", str(tmp_path / "no.jsonl"), check=False)
    assert run.returncode != 0 and "PATH=WEIGHT" in run.stderr


def test_parse_questions_takes_question_lines_from_model_output():
    output = "Here are two questions:\n1. Why does high blood pressure damage the kidneys?\n" \
             "Q2: What reading means stage 2 hypertension?\n- Why?\n问题：痛风发作时为什么不能用阿司匹林？\nThanks."
    assert parse_questions(output, 5) == ["Why does high blood pressure damage the kidneys?",
                                          "What reading means stage 2 hypertension?", "痛风发作时为什么不能用阿司匹林？"]
    assert parse_questions(output, 1) == ["Why does high blood pressure damage the kidneys?"]
    assert parse_questions("No questions here.", 2) == []


def test_self_instruct_writes_sft_pairs_from_a_document_with_the_embedded_model(tmp_path):
    document = tmp_path / "fever.md"
    document.write_text("# Fever in adults\n\nA fever is a body temperature of 38 C or higher. Paracetamol can "
                        "ease discomfort: adults take at most 4 g in 24 hours. Seek urgent care for a stiff neck, "
                        "confusion or a rash that does not fade under pressure.\n", encoding="utf-8")
    out = tmp_path / "generated.jsonl"
    run = data_tool("self-instruct", "--inputs", str(document), "--output", str(out), "--temperature", "0",
                    "--max_new_tokens", "48", "--questions_per_passage", "2")
    rows = read_jsonl(out)
    assert f"1 passages -> {len(rows)} question/answer pairs" in run.stdout
    assert 1 <= len(rows) <= 2  # greedy decoding of the embedded model asks at least one question here
    for row in rows:
        assert conversation_from_record(row)[0]["content"].endswith("?")
        assert row["source"].startswith(f"{document}:")
    assert data_tool("validate", "--inputs", str(out)).returncode == 0


def test_every_command_explains_its_flags(capsys):
    from medgpt.data_tools import main

    assert main(["--help"]) == 0
    overview = capsys.readouterr().out
    for command, flag in [("validate", "--kind"), ("convert", "--to"), ("dedup", "--threshold"), ("mix", "--sources"),
                          ("self-instruct", "--questions_per_passage")]:
        assert command in overview
        with pytest.raises(SystemExit) as ended:
            main([command, "--help"])
        explained = capsys.readouterr().out
        assert ended.value.code == 0 and flag in explained
        assert "--overwrite" in explained  # every command that writes may be told to replace
    run = run_script("-m", "medgpt.data_tools", "shuffle", check=False)  # and from the command line
    assert run.returncode == 2 and "Unknown command 'shuffle'" in run.stderr


def test_mix_keeps_multiple_choice_questions_whole_and_bad_arguments_lose_nothing(tmp_path):
    mcq = [{"question": f"Which drug is a beta blocker ({i})?", "options": {"A": "Metoprolol", "B": "Amlodipine"},
            "answer": "A"} for i in range(4)]
    source = write_jsonl(tmp_path / "q.jsonl", mcq)
    data_tool("mix", "--sources", f"{source}=1", "--output", str(tmp_path / "mixed.jsonl"))
    assert sorted(map(json.dumps, read_jsonl(tmp_path / "mixed.jsonl"))) == sorted(map(json.dumps, mcq))

    kept = tmp_path / "kept.jsonl"
    for args, message in [
        (("dedup", "--inputs", str(source), "--output", str(kept), "--removed_output", str(kept)), "would be overwritten"),
        (("mix", "--sources", f"{source}=nan", "--output", str(kept)), "positive weight"),
        (("mix", "--sources", f"{source}=1", "--size", "-3", "--output", str(kept)), "--size -3"),
        (("dedup", "--inputs", str(source), "--output", str(kept), "--shingle_size", "0"), "--shingle_size"),
    ]:
        result = data_tool(*args, check=False)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, args
    assert not kept.exists()


def test_an_output_that_is_an_input_is_refused_and_the_input_kept_unless_overwrite(tmp_path):
    from medgpt.data_tools import main

    source = write_jsonl(tmp_path / "F.jsonl", [{"question": f"Q{i}?", "answer": "A."} for i in range(10)])
    original = source.read_bytes()
    run = data_tool("mix", "--sources", f"{source}=1.0", "--size", "2", "--output", str(source), check=False)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert f"--output {source} is the input file {source}: writing it would replace" in run.stderr
    assert "--overwrite true" in run.stderr and source.read_bytes() == original

    folder = tmp_path / "data"
    inside = write_jsonl(folder / "part.jsonl", [{"question": "Fever?", "answer": "Rest."}])
    link = tmp_path / "link.jsonl"
    link.symlink_to(source)
    for args, message in [
        (["convert", "--inputs", str(source), "--output", str(source)], f"--output {source} is the input file"),
        (["dedup", "--inputs", str(source), "--output", str(link)], f"--output {link} is the input file {source}"),
        (["dedup", "--inputs", str(source), "--output", str(tmp_path / "k.jsonl"), "--removed_output", str(source)],
         f"--removed_output {source} is the input file"),
        (["dedup", "--inputs", str(folder), "--output", str(folder / "sub" / "dedup.jsonl")],
         f"--output {folder / 'sub' / 'dedup.jsonl'} is inside the input folder {folder}"),
        (["validate", "--inputs", str(source), "--on_invalid_record", "skip", "--output", str(link)],
         f"--output {link} is the input file {source}"),
        (["mix", "--sources", f"{folder}=1", "--output", str(tmp_path)], f"--output {tmp_path} is a folder"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert message in str(stop.value.code), args
    assert source.read_bytes() == original and [p.name for p in folder.rglob("*")] == ["part.jsonl"]
    assert inside.is_file() and link.is_symlink()

    assert main(["mix", "--sources", f"{source}=1.0", "--size", "2", "--output", str(source), "--overwrite", "true"]) == 0
    assert len(read_jsonl(source)) == 2 and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_interrupted_write_leaves_the_previous_output_whole(tmp_path):
    from medgpt.data_tools import write_jsonl as write

    out = write_jsonl(tmp_path / "out.jsonl", [{"text": "previous"}])

    def rows():
        yield {"text": "new"}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write(str(out), rows())
    assert read_jsonl(out) == [{"text": "previous"}] and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_validate_reports_what_it_checked_not_training(tmp_path):
    from medgpt.data_tools import ValidateArguments, validate

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Fever?", "answer": "Rest."}\n{"question": "Cough?"}\n[1]\n', encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert validate(ValidateArguments(inputs=[str(tmp_path)])) == 1
    header = stderr.getvalue().splitlines()[0]
    assert header == ("Found 3 problem(s) in the data; validated 2 file(s): 1 valid and 2 invalid record(s), "
                      "1 problem(s) with a whole file. Fix these and rerun:")
