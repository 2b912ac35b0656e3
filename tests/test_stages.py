"""Pretraining, reward modeling and DPO end to end on a tiny model; their data readers."""


import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import preference_records, raw_dataset, sft_records, write_jsonl
from medgpt.data_files import json_reader, text_document_reader
from medgpt.records import DataError, preference_from_record
from medgpt.data_files import raw_records
from medgpt.tokenization import (
    build_preference_dataset,
    build_pretraining_blocks,
    deduplicate_documents,
    tokenize_documents,
)
from template import get_template

COMMON = ["--logging_steps", "1", "--report_to", "none", "--gradient_checkpointing", "false", "--seed", "3",
          "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--save_strategy", "no"]


@pytest.fixture()
def text_dir(tmp_path):
    train = tmp_path / "text" / "train"
    train.mkdir(parents=True)
    lines = [f"Document {i}: hypertension is persistently raised blood pressure; measure it twice. " * 3 for i in range(30)]
    (train / "a.txt").write_text("\n".join(lines + [lines[0]]) + "\n")  # one exact duplicate
    write_jsonl(train / "b.jsonl", [{"text": f"高血压是常见的慢性病，第{i}条。" * 4} for i in range(10)])
    (tmp_path / "text" / "eval").mkdir()
    (tmp_path / "text" / "eval" / "c.txt").write_text("\n".join(f"Held-out note {i} about diabetes and HbA1c." * 3 for i in range(6)))
    return tmp_path / "text"


def changed(before: dict, after: dict, pattern: str = "") -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if pattern in k and k in after)


# ---------------------------------------------------------------- pretraining


def test_blocks_are_full_and_documents_end_with_eos(tokenizer, tmp_path):
    docs = ["first document", "second one, a little longer", "third"]
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n")
    documents = tokenize_documents(raw_records([tmp_path / "a.txt"]), tokenizer)
    blocks, counts = build_pretraining_blocks(documents, block_size=4)
    stream = [t for ids in (tokenizer(text, add_special_tokens=False)["input_ids"] for text in docs)
              for t in ids + [tokenizer.eos_token_id]]
    assert all(len(row) == 4 for row in blocks["input_ids"])
    assert [t for row in blocks["input_ids"] for t in row] == stream[: len(blocks) * 4]
    assert counts["tokens"] == len(stream) and counts["tail_tokens_dropped"] == len(stream) % 4
    assert sum(row.count(tokenizer.eos_token_id) for row in blocks["input_ids"]) >= 2


def test_text_reader_modes_and_errors(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("line one\n\nline two\nline three\n")
    assert [d for _, d in text_document_reader()([txt])] == ["line one", "line two", "line three"]
    assert [s for s, _ in text_document_reader(paragraphs=True)([txt])] == [f"{txt}:1", f"{txt}:3"]
    assert text_document_reader(paragraphs=True)([txt])[1][1] == "line two\nline three"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "no text"}, {"text": ""}])
    with pytest.raises(DataError) as error:
        text_document_reader()([bad])
    assert f"{bad}:2:" in str(error.value) and f"{bad}:3:" in str(error.value)


def test_duplicates_are_removed_and_counted(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("x\ny \nx\ny\n")
    (tmp_path / "b.txt").write_text("x\nz\n")
    train = tokenize_documents(raw_records([tmp_path / "a.txt"]), tokenizer)
    validation = tokenize_documents(raw_records([tmp_path / "b.txt"]), tokenizer)
    kept_train, kept_validation, counts = deduplicate_documents(train, validation)
    assert kept_train["source"] == [f"{tmp_path}/a.txt:1", f"{tmp_path}/a.txt:2"]
    assert kept_validation["source"] == [f"{tmp_path}/b.txt:2"]
    assert counts == {"train_duplicates_removed": 2, "validation_duplicates_removed": 1}


@pytest.mark.slow
@pytest.mark.parametrize("use_peft", ["true", "false"])
def test_pretraining_then_sft_loads_it(tiny_model_dir, text_dir, sft_data_dir, tmp_path, use_peft):
    import pretraining
    import supervised_finetuning

    out = tmp_path / "pt"
    metrics = pretraining.main([
        "--model_name_or_path", str(tiny_model_dir), "--train_file_dir", str(text_dir / "train"),
        "--validation_file_dir", str(text_dir / "eval"), "--output_dir", str(out), "--block_size", "32",
        "--max_steps", "2", "--use_peft", use_peft, "--learning_rate", "1e-2", *COMMON,
    ])
    assert metrics["train_duplicates_removed"] == 1 and metrics["train_documents"] == 40
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert metrics["eval_perplexity"] != metrics["eval_perplexity_before"]
    assert (out / "loss.png").is_file() and (out / "metrics.json").is_file()
    if use_peft == "true":
        assert changed({k: torch.zeros_like(v) for k, v in load_file(out / "adapter_model.safetensors").items()},
                       load_file(out / "adapter_model.safetensors"), "lora_B")
        source = ["--model_name_or_path", str(tiny_model_dir), "--adapter_name_or_path", str(out)]
    else:
        assert changed(load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors"))
        source = ["--model_name_or_path", str(out)]
    sft = supervised_finetuning.main([
        *source, "--train_file_dir", str(sft_data_dir / "train"), "--output_dir", str(tmp_path / "sft"),
        "--max_steps", "1", "--max_length", "128", "--validation_split_percentage", "0", *COMMON,
    ])
    assert torch.isfinite(torch.tensor(sft["train_loss"]))


# ---------------------------------------------------------------- preference data


def test_preference_formats_convert():
    converted = [preference_from_record(r) for r in preference_records(3)]
    assert converted[0] == {"prompt": [{"role": "user", "content": "Chest pain and sweating, case 0?"}],
                            "chosen": {"role": "assistant", "content": "Call emergency services now."},
                            "rejected": {"role": "assistant", "content": "Wait and see at home."}}
    assert [m["role"] for m in converted[1]["prompt"]] == ["user", "assistant", "user"]
    assert converted[2]["chosen"]["content"].startswith("4 g")
    assert converted[2]["rejected"] == {"role": "assistant", "content": "10 g is fine."}


@pytest.mark.parametrize("record, message", [
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": "a"}, "has no 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "no prompt"),
    ({"question": "q", "response_chosen": "a"}, "no 'response_rejected'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "chosen": "a", "rejected": "b"},
     "must end with a user turn"),
    ({"prompt": "q", "chosen": "a", "rejected": ["b"]}, "one {\"role\": \"assistant\""),
    ({"text": "x"}, "matches no preference format"),
])
def test_bad_preference_records_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "p.jsonl", [preference_records(1)[0], record])
    with pytest.raises(DataError) as error:
        json_reader(preference_from_record)([path])
    assert f"{path}:2:" in str(error.value) and message in str(error.value)


def test_identical_pairs_are_skipped_and_answers_are_the_answer_tokens(tokenizer, tmp_path):
    template = get_template(None, tokenizer)
    pairs = preference_records(3) + [{"prompt": "q", "chosen": "same", "rejected": "same "}]
    records = raw_dataset(tmp_path / "p.jsonl", pairs)
    dataset, counts = build_preference_dataset(records, tokenizer, template, max_length=200)
    assert counts == {"kept": 3, "truncated": 0, "answers_cut": 0, "skipped_identical": 1, "skipped_too_long": 0}
    # the answer's own tokens: the text and its end-of-turn, after the prompt's generation prompt
    assert tokenizer.decode(dataset[0]["chosen_ids"]) == "Call emergency services now.<|im_end|>\n"
    assert tokenizer.decode(dataset[0]["prompt_ids"]).endswith("<|im_start|>assistant\n")
    text, _ = build_preference_dataset(records.select([0]), tokenizer, template, max_length=200, kind="text")
    assert text[0]["chosen"] == "Call emergency services now.<|im_end|>"  # ends on EOS: TRL adds none again


def test_overlong_pairs_are_cut_like_trl_or_skipped(tokenizer, tmp_path, caplog):
    """The prompt keeps its end (the latest turns), the answers their start; counted, with file:line."""
    template = get_template(None, tokenizer)
    long_prompt = {"prompt": "Earlier notes: " + "stable vitals, " * 150 + "Now: sudden chest pain, what first?",
                   "chosen": "Call emergency services now.", "rejected": "Wait and see."}
    long_answer = {"prompt": "What does fever mean?", "chosen": "A raised body temperature. " * 60,
                   "rejected": "Nothing."}
    records = raw_dataset(tmp_path / "p.jsonl", [*preference_records(2), long_prompt, long_answer])
    whole, _ = build_preference_dataset(records, tokenizer, template, max_length=None)
    dataset, counts = build_preference_dataset(records, tokenizer, template, max_length=128, max_prompt_length=48)
    assert counts == {"kept": 4, "truncated": 2, "answers_cut": 1, "skipped_identical": 0, "skipped_too_long": 0}
    # prompt cut: only as much as the answers need, from its start; the answers whole (end-of-turn kept)
    full, cut = whole[2], dataset[2]
    longest = max(len(full["chosen_ids"]), len(full["rejected_ids"]))
    assert cut["prompt_ids"] == full["prompt_ids"][-(128 - longest):]
    assert tokenizer.decode(cut["prompt_ids"]).endswith("what first?<|im_end|>\n<|im_start|>assistant\n")
    assert (cut["chosen_ids"], cut["rejected_ids"]) == (full["chosen_ids"], full["rejected_ids"])
    # answer cut: the prompt keeps up to --max_prompt_length, the answer its first tokens (no end-of-turn)
    full, cut = whole[3], dataset[3]
    assert cut["prompt_ids"] == full["prompt_ids"] and len(full["prompt_ids"]) < 48
    assert cut["chosen_ids"] == full["chosen_ids"][:128 - len(full["prompt_ids"])]
    assert cut["rejected_ids"] == full["rejected_ids"]  # short enough to stay whole
    assert "truncated 1 pair(s)" in caplog.text and f"{tmp_path / 'p.jsonl'}:4" in caplog.text
    assert "lose their end-of-turn token" in caplog.text
    assert all(len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= 128
               for row in dataset)
    # --overlong_policy skip: today's behaviour, counted
    kept, counts = build_preference_dataset(records, tokenizer, template, max_length=128, overlong_policy="skip")
    assert len(kept) == 2 and counts["skipped_too_long"] == 2 and counts["truncated"] == 0
    # the text form (ORPO/SimPO) says what the ids say
    text, _ = build_preference_dataset(records.select([3]), tokenizer, template, max_length=128, kind="text")
    assert text[0]["chosen"] == tokenizer.decode(cut["chosen_ids"])


# ---------------------------------------------------------------- reward model and DPO


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory):
    import supervised_finetuning

    root = tmp_path_factory.mktemp("sft_for_rm")
    write_jsonl(root / "train.jsonl", sft_records(8))
    supervised_finetuning.main([
        "--model_name_or_path", str(tiny_model_dir), "--train_files", str(root / "train.jsonl"),
        "--output_dir", str(root / "sft"), "--max_steps", "1", "--max_length", "128",
        "--validation_split_percentage", "0", "--learning_rate", "1e-2", *COMMON,
    ])
    return root / "sft"


@pytest.fixture(scope="module")
def sft_merged(tiny_model_dir, sft_adapter):
    from merge_peft_adapter import main as merge

    return merge(["--base_model", str(tiny_model_dir), "--lora_model", str(sft_adapter),
                  "--output_dir", str(sft_adapter.parent / "sft_merged")])


@pytest.mark.slow
def test_reward_model_from_sft_adapter(tiny_model_dir, sft_adapter, sft_merged, preference_dir, tmp_path):
    import reward_modeling
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    metrics = reward_modeling.main([
        "--model_name_or_path", str(tiny_model_dir), "--adapter_name_or_path", str(sft_adapter),
        "--train_file_dir", str(preference_dir / "train"), "--validation_file_dir", str(preference_dir / "eval"),
        "--output_dir", str(out), "--max_steps", "2", "--learning_rate", "1e-2", "--max_length", "256", *COMMON,
    ])
    for key in ("eval_accuracy_before", "eval_margin_before", "eval_accuracy", "eval_margin"):
        assert key in metrics
    assert metrics["eval_margin"] != metrics["eval_margin_before"] and metrics["train_pairs_kept"] == 12
    # a complete reward model: loads directly, scores text, its head was trained
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    saved = load_file(out / "model.safetensors")
    assert "score.weight" in saved
    # the body is the SFT model (its adapter merged in) plus the reward model's own trained LoRA
    assert changed(load_file(sft_merged / "model.safetensors"), saved, "q_proj")
    with torch.no_grad():
        value = model(**{k: torch.tensor([v]) for k, v in {"input_ids": [5, 6, 7]}.items()}).logits
    assert value.shape == (1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [["--loss_type", "sigmoid"], ["--loss_type", "ipo"], ["--use_peft", "false"],
                                     ["--loss_type", "orpo"], ["--loss_type", "simpo"]],
                         ids=["dpo-lora", "ipo-lora", "dpo-full", "orpo", "simpo"])
def test_dpo_variants_train_and_load_in_inference(tiny_model_dir, sft_adapter, sft_merged, preference_dir, tmp_path,
                                                  variant):
    import dpo_training
    from medgpt.args import ModelArguments
    from medgpt.generation import ChatModel, GenerationArguments

    out = tmp_path / "dpo"
    metrics = dpo_training.main([
        "--model_name_or_path", str(tiny_model_dir), "--adapter_name_or_path", str(sft_adapter),
        "--train_file_dir", str(preference_dir / "train"), "--validation_file_dir", str(preference_dir / "eval"),
        "--output_dir", str(out), "--max_steps", "2", "--learning_rate", "1e-2", "--max_length", "256",
        *COMMON, *variant,
    ])
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert "eval_rewards/accuracies" in metrics and "eval_rewards/margins" in metrics
    if (out / "adapter_config.json").exists():
        assert changed({k: torch.zeros_like(v) for k, v in load_file(out / "adapter_model.safetensors").items()},
                       load_file(out / "adapter_model.safetensors"), "lora_B")
        # the DPO adapter sits on the SFT model (the SFT adapter merged in)
        model_args = ModelArguments(model_name_or_path=str(sft_merged), adapter_name_or_path=str(out))
    else:
        assert changed(load_file(sft_merged / "model.safetensors"), load_file(out / "model.safetensors"))
        model_args = ModelArguments(model_name_or_path=str(out))
    chat = ChatModel.load(model_args)
    answers = chat.generate([[{"role": "user", "content": "Chest pain?"}]], GenerationArguments(max_new_tokens=3, temperature=0))
    assert len(answers) == 1 and isinstance(answers[0], str)


@pytest.mark.slow
def test_dpo_truncates_long_pairs_by_default_and_reports_them(tiny_model_dir, preference_dir, tmp_path):
    import dpo_training

    common = ["--model_name_or_path", str(tiny_model_dir), "--train_file_dir", str(preference_dir / "train"),
              "--validation_split_percentage", "0", "--max_steps", "1", "--max_length", "40", *COMMON]
    metrics = dpo_training.main([*common, "--output_dir", str(tmp_path / "cut")])
    saved = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    # every shipped-style pair is longer than 40 tokens with the system prompt: all kept, all cut
    assert saved["train_pairs_truncated"] == saved["train_pairs_kept"] == metrics["train_pairs_kept"] > 0
    assert saved["train_pairs_skipped_too_long"] == 0
    with pytest.raises(DataError, match="no usable train preference pairs"):  # today's behaviour, on request
        dpo_training.main([*common, "--output_dir", str(tmp_path / "skip"), "--overlong_policy", "skip"])
