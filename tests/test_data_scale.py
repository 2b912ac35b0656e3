"""Data at scale: Arrow all the way, the prepared data cached and reused, streaming, weighted mixing."""

import json
import logging

import pytest

from conftest import sft_records, write_jsonl
from medgpt.args import DataArguments
from medgpt.data_files import InvalidRecords, _arrow_files, column, column_values, load_splits, mix_plan, nonempty
from medgpt.records import DataError

COMMON = ["--per_device_train_batch_size", "2", "--logging_steps", "1", "--report_to", "none",
          "--gradient_checkpointing", "false", "--seed", "3", "--save_strategy", "no", "--dataloader_num_workers", "0"]


def losses(output_dir) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_weighted_files_are_mixed_in_their_proportions(tmp_path):
    medical = write_jsonl(tmp_path / "medical.jsonl", sft_records(100))
    general = write_jsonl(tmp_path / "general.jsonl", [{"question": f"General {i}?", "answer": "An answer."}
                                                       for i in range(100)])
    args = DataArguments(train_files=[f"{medical}=0.8", f"{general}=0.2"], validation_split_percentage=0)
    train, validation = load_splits(args, "SFT data", seed=1)
    sources = [source.rsplit(":", 1)[0] for source in train["source"]]
    assert validation is None and sources.count(str(medical)) == 100 and sources.count(str(general)) == 25
    assert sources.index(str(general)) < 100  # shuffled together, not one source after the other
    again, _ = load_splits(args, "SFT data", seed=1)
    assert again["source"] == train["source"]  # seeded
    assert mix_plan([100, 100], [0.8, 0.2]) == [100, 25] and mix_plan([10, 10], [1, 1], size=6) == [3, 3]
    with pytest.raises(DataError, match="give every file a weight or none"):
        load_splits(DataArguments(train_files=[f"{medical}=0.8", str(general)]), "SFT data", seed=1)
    with pytest.raises(DataError, match="positive weight"):
        load_splits(DataArguments(train_files=[f"{medical}=-1"]), "SFT data", seed=1)


def test_columns_read_from_the_files_equal_the_datasets_own(tmp_path):
    """column_values reads a file-backed dataset's batches with ordinary reads; whatever the layout (shards
    written by map workers, a shuffle's indices mapping, a slice, in memory) it gives the dataset's own column."""
    import datasets
    import numpy as np

    rows = datasets.Dataset.from_dict({"problem": ["" if i % 7 else f"bad {i}" for i in range(5000)],
                                       "hash": list(range(5000, 0, -1))})
    rows = rows.map(lambda batch: batch, batched=True, batch_size=300, writer_batch_size=300, num_proc=2,
                    cache_file_name=str(tmp_path / "rows.arrow"))
    assert len(_arrow_files(rows)) == 2  # the two workers' shards, read in order
    layouts = {"files": rows, "shuffled": rows.shuffle(seed=0), "selected": rows.select([4999, 3, 3, 10]),
               "slice": rows.select(range(100, 2100)), "in memory": rows.flatten_indices(keep_in_memory=True)}
    assert _arrow_files(layouts["in memory"]) is None
    for name, dataset in layouts.items():
        assert column_values(dataset, "hash").tolist() == column(dataset, "hash").to_pylist(), name
        expected = [bool(problem) for problem in column(dataset, "problem").to_pylist()]
        assert column_values(dataset, "problem", nonempty).tolist() == expected, name
    assert np.flatnonzero(column_values(rows, "problem", nonempty)).tolist() == list(range(0, 5000, 7))


def test_problems_keep_their_file_and_line_through_arrow(tmp_path):
    path = tmp_path / "train" / "part.jsonl"
    path.parent.mkdir()
    path.write_bytes(b'{"question": "q", "answer": "a"}\n\n{"question": "q"\n\xff\xfe\n{"title": "x"}\n')
    args = DataArguments(train_file_dir=str(path.parent), validation_split_percentage=0)
    from medgpt.args import ModelArguments
    from medgpt.modeling import load_tokenizer
    from medgpt.tokenization import build_sft_dataset
    from template import get_template

    tokenizer = load_tokenizer(ModelArguments())
    invalid = InvalidRecords()
    train, _ = load_splits(args, "SFT data", seed=0, invalid=invalid)
    build_sft_dataset(train, tokenizer, get_template(None, tokenizer), 128, "skip", invalid=invalid)
    with pytest.raises(DataError) as error:
        invalid.finish("SFT data")
    text = str(error.value)
    assert f"{path}:3: not valid JSON" in text and f"{path}:4: not UTF-8 text (byte 0xff at column 1)" in text
    assert f"{path}:5: matches no known format" in text and f"{path}:1" not in text and "3 problem(s)" in text


@pytest.mark.slow
def test_prepared_data_is_cached_and_reused_until_a_file_changes(tiny_model_dir, sft_data_dir, tmp_path, caplog):
    import supervised_finetuning

    cache = tmp_path / "cache"

    def run(name):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            metrics = supervised_finetuning.main([
                "--model_name_or_path", str(tiny_model_dir), "--train_file_dir", str(sft_data_dir / "train"),
                "--validation_file_dir", str(sft_data_dir / "eval"), "--output_dir", str(tmp_path / name),
                "--max_steps", "2", "--max_length", "128", "--data_cache_dir", str(cache), "--packing", "true",
                *COMMON])
        return metrics, "reading and tokenization skipped" in caplog.text

    first, reused_first = run("first")
    second, reused_second = run("second")
    assert not reused_first and reused_second
    assert losses(tmp_path / "first") == losses(tmp_path / "second")  # the same data, to the token
    assert second["train_records_kept"] == first["train_records_kept"] == 16
    write_jsonl(sft_data_dir / "train" / "part.jsonl", sft_records(17))  # a changed file is prepared again
    third, reused_third = run("third")
    assert not reused_third and third["train_records_kept"] == 17


@pytest.mark.slow
def test_streaming_sft_trains_and_needs_max_steps(tiny_model_dir, tmp_path):
    import supervised_finetuning

    records = sft_records(40)
    records[7] = {"conversations": [{"from": "human", "value": "only a question"}]}
    data = write_jsonl(tmp_path / "train.jsonl", records)
    common = ["--model_name_or_path", str(tiny_model_dir), "--train_files", str(data), "--streaming", "true",
              "--packing", "false", "--max_length", "128", "--max_eval_samples", "4", "--learning_rate", "1e-2",
              *COMMON]
    with pytest.raises(DataError, match="set --max_steps"):
        supervised_finetuning.main([*common, "--output_dir", str(tmp_path / "no-steps")])
    with pytest.raises(DataError, match=f"{data}:8: the conversation has no assistant reply"):
        supervised_finetuning.main([*common, "--output_dir", str(tmp_path / "strict"), "--max_steps", "12"])
    out = tmp_path / "stream"
    metrics = supervised_finetuning.main([*common, "--output_dir", str(out), "--max_steps", "12",
                                          "--on_invalid_record", "skip", "--max_invalid_fraction", "0.5"])
    curve = losses(out)
    assert len(curve) == 12 and sum(curve[-3:]) < sum(curve[:3]), curve
    assert metrics["streaming"] and metrics["eval_records_kept"] == 4 and "eval_loss" in metrics
    dropped = [json.loads(line) for line in (out / "invalid_records.jsonl").read_text().splitlines()]
    assert [d["source"] for d in dropped] == [f"{data}:8"]


@pytest.mark.slow
def test_streaming_pretraining_trains_in_full_blocks(tiny_model_dir, tmp_path):
    import pretraining

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(f"Note {i}: metformin is first-line for type 2 diabetes; check kidney "
                                            "function before and during treatment." for i in range(300)))
    write_jsonl(corpus / "b.jsonl", [{"text": f"Record {i}: hypertension is treated with lifestyle change and "
                                              "medicines such as ACE inhibitors."} for i in range(300)])
    out = tmp_path / "pt"
    metrics = pretraining.main([
        "--model_name_or_path", str(tiny_model_dir), "--train_file_dir", str(corpus), "--output_dir", str(out),
        "--streaming", "true", "--max_steps", "10", "--block_size", "64", "--max_eval_samples", "20",
        "--learning_rate", "1e-2", "--shuffle_buffer_size", "50", *COMMON])
    curve = losses(out)
    assert len(curve) == 10 and sum(curve[-3:]) < sum(curve[:3]), curve
    assert metrics["streaming"] and metrics["eval_blocks"] >= 1 and metrics["eval_perplexity"] > 1
