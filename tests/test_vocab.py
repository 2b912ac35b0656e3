"""Domain vocabulary: learn tokens from text, add them with mean-initialised embeddings, then PT, merge, SFT."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_main, run_script, sft_records, write_jsonl

TERMS = ["metformin", "hypertension", "胰岛素抵抗", "creatinine clearance", "anticoagulation", "高血压"]


@pytest.mark.slow
def test_extend_vocabulary_then_pretrain_merge_and_finetune(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [f"Case {i}: {TERMS[i % 6]} and {TERMS[(i + 2) % 6]} were reviewed; {TERMS[(i + 4) % 6]} noted."
             for i in range(400)]
    (corpus / "notes.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_jsonl(corpus / "more.jsonl", [{"text": f"{TERMS[i % 6]} follow-up {i}."} for i in range(100)])
    extended = tmp_path / "extended"
    result = run_script("-m", "medgpt.vocab", "--model_name_or_path", str(tiny_model_dir), "--inputs", str(corpus),
                        "--num_new_tokens", "24", "--min_frequency", "3", "--output_dir", str(extended))
    report = json.loads((extended / "medgpt_vocab.json").read_text())
    assert "fewer" in result.stdout and 0 < report["new_tokens"] <= 24
    assert report["tokens_per_character_after"] < 0.9 * report["tokens_per_character_before"]

    old_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(extended)
    assert len(tokenizer) == len(old_tokenizer) + report["new_tokens"]
    assert len(tokenizer(" metformin", add_special_tokens=False)["input_ids"]) == 1
    text = "Patient on metformin with hypertension."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text  # spaces kept
    old = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight
    new = AutoModelForCausalLM.from_pretrained(extended).get_input_embeddings().weight
    assert new.shape[0] == len(tokenizer) and torch.equal(new[: old.shape[0]], old)
    added = tokenizer.convert_tokens_to_ids(report["examples"][0])
    pieces = old_tokenizer(report["examples"][0], add_special_tokens=False)["input_ids"]
    assert torch.allclose(new[added], old[pieces].mean(0))  # starts as the mean of the sub-tokens it replaces

    # continued pretraining with LoRA trains the embeddings too (modules_to_save), kept tied to the output layer
    pt = tmp_path / "pt"
    run_script("pretraining.py", "--model_name_or_path", str(extended), "--train_file_dir", str(corpus),
               "--output_dir", str(pt), "--max_steps", "3", "--block_size", "32", "--learning_rate", "1e-2",
               "--validation_split_percentage", "0", "--report_to", "none", "--save_strategy", "no",
               "--per_device_train_batch_size", "4", "--gradient_checkpointing", "false")
    adapter = load_file(pt / "adapter_model.safetensors")
    embedding = next(value for key, value in adapter.items() if "embed_tokens" in key)
    assert embedding.shape[0] == len(tokenizer) and not torch.equal(embedding[added], new[added])

    merged = tmp_path / "merged"
    run_main("merge_peft_adapter.py", "--base_model", str(extended), "--lora_model", str(pt), "--output_dir",
             str(merged))
    merged_model = AutoModelForCausalLM.from_pretrained(merged)
    assert torch.equal(merged_model.get_input_embeddings().weight[added], embedding[added])
    data = write_jsonl(tmp_path / "sft" / "train.jsonl", sft_records(4))
    run_main("supervised_finetuning.py", "--model_name_or_path", str(merged), "--train_files", str(data),
             "--output_dir", str(tmp_path / "sft-out"), "--max_steps", "1", "--validation_split_percentage", "0",
             "--report_to", "none", "--save_strategy", "no", "--per_device_train_batch_size", "2",
             "--max_length", "128", "--gradient_checkpointing", "false")
    assert (tmp_path / "sft-out" / "metrics.json").is_file()
