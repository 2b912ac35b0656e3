"""quantize_model.py: every CPU method exports, loads back through the project's loader (the one inference.py,
openai_api.py and evaluate_model.py use) and answers; the quality table compares it with the original."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import write_jsonl

QUALITY_KEYS = {"size_mb", "perplexity", "tokens", "mcq_accuracy", "mcq_n", "tokens_per_second"}
COMPARISON_KEYS = {"greedy_answers_identical", "next_token_agreement", "max_abs_logit_diff", "same_tokenization"}


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    """Held-out data in the three kinds --eval_files reads: text, multiple-choice questions, conversations."""
    root = tmp_path_factory.mktemp("quantize-eval")
    (root / "notes.txt").write_text("Aspirin inhibits platelet aggregation.\n高血压会增加中风的风险。\n", encoding="utf-8")
    write_jsonl(root / "mcq.jsonl", [
        {"question": "Which vitamin deficiency causes scurvy?", "options": {"A": "A", "B": "C", "C": "D"}, "answer": "B"},
        {"question": "Normal adult resting heart rate?", "options": ["60-100/min", "20-40/min"], "answer": "A"}])
    write_jsonl(root / "chat.jsonl", [{"messages": [{"role": "user", "content": "Is a fever of 38 C dangerous?"},
                                                    {"role": "assistant", "content": "Usually not; drink fluids."}]}])
    return root


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter that changes the tiny model's outputs (B not zero), as a LoRA stage would save it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "lora"
    model.save_pretrained(out)
    return out


def quantize(model_dir, out, method, eval_dir, *extra):
    import quantize_model

    return quantize_model.main(["--model_name_or_path", str(model_dir), "--method", method, "--output_dir", str(out),
                                "--eval_files", str(eval_dir), "--num_prompts", "3", "--max_new_tokens", "4", *extra])


def check_quality(out, method, quality) -> tuple[dict, dict]:
    """quality.json and quality.md as written; the rows every export must have."""
    assert json.loads((out / "quality.json").read_text(encoding="utf-8")) == json.loads(json.dumps(quality))
    original, exported = quality["models"]["original"], quality["models"][method]
    assert QUALITY_KEYS <= set(original) and QUALITY_KEYS | COMPARISON_KEYS <= set(exported)
    # what must be exactly equal: the same tokenizer and chat template, so the same tokens and items are scored
    assert exported["same_tokenization"] is True
    assert (exported["tokens"], exported["mcq_n"]) == (original["tokens"], original["mcq_n"]) == (original["tokens"], 2)
    assert all(row["tokens_per_second"] > 0 and row["size_mb"] > 0 for row in (original, exported))
    table = (out / "quality.md").read_text(encoding="utf-8")
    assert table.startswith("| model | size MB | PPL | MCQ acc |") and f"| {method} |" in table
    assert "not medical advice" in table
    return original, exported


def tiny_logits(model, tokenizer):
    ids = tokenizer("The patient has chest pain and shortness of breath.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def test_gguf_q8_0_of_a_lora_model_reloads_and_matches_the_merged_model(tiny_model_dir, adapter_dir, eval_dir,
                                                                        tmp_path, tokenizer):
    """The quality stage loads the file as every script does (medgpt.modeling: from_pretrained(dir, gguf_file=))."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q8"
    quality = quantize(tiny_model_dir, out, "gguf-q8_0", eval_dir, "--lora_model", str(adapter_dir))
    original, exported = check_quality(out, "gguf-q8_0", quality)
    assert abs(exported["perplexity"] / original["perplexity"] - 1) < 0.01
    assert exported["max_abs_logit_diff"] < 0.05 and exported["greedy_answers_identical"] >= 2 / 3
    assert exported["size_mb"] < original["size_mb"] / 2  # 8.5 bits per weight instead of 32

    gguf = out / "lora-q8_0.gguf"  # named after the adapter folder
    assert quality["export"] == str(gguf) and gguf.is_file()
    modelfile = (out / "Modelfile").read_text(encoding="utf-8")
    assert modelfile.splitlines()[1] == "FROM ./lora-q8_0.gguf" and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'TEMPLATE """{{ range .Messages }}' in modelfile and "not medical advice" in modelfile
    assert "PARAMETER temperature 0.7" in modelfile and "PARAMETER repeat_penalty 1.1" in modelfile

    # the original of the table is base + adapter, and the adapter matters: so the export holds the merged weights
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = tiny_logits(base, tokenizer)
    merged_logits = tiny_logits(PeftModel.from_pretrained(base, adapter_dir).merge_and_unload(), tokenizer)
    assert (base_logits - merged_logits).abs().max() > 10 * exported["max_abs_logit_diff"]


@pytest.mark.extended  # every GGUF type reloads below (small vocabulary); this is q4_0 through the whole script
def test_gguf_q4_0_exports_reloads_and_answers(tiny_model_dir, eval_dir, tmp_path):
    out = tmp_path / "q4"
    quality = quantize(tiny_model_dir, out, "gguf-q4_0", eval_dir, "--gguf_name", "tiny")
    original, exported = check_quality(out, "gguf-q4_0", quality)
    assert (out / "tiny.gguf").is_file() and (out / "Modelfile").is_file()
    # 4 bits: a random tiny model stays near its (uniform) perplexity; answers are still generated
    assert abs(exported["perplexity"] / original["perplexity"] - 1) < 0.1 and exported["max_abs_logit_diff"] < 1.0
    assert exported["size_mb"] < original["size_mb"] / 2 and 0 <= exported["greedy_answers_identical"] <= 1


@pytest.mark.parametrize("method", ["bnb-4bit", "bnb-8bit"])
def test_bitsandbytes_exports_reload_with_from_pretrained(tiny_model_dir, adapter_dir, eval_dir, tmp_path, method):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (requirements.txt pins it)")
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    extra = ["--lora_model", str(adapter_dir)] if method == "bnb-8bit" else []  # the merge-then-quantize path
    quality = quantize(tiny_model_dir, out, method, eval_dir, *extra)
    original, exported = check_quality(out, method, quality)
    tolerance = {"bnb-4bit": 0.05, "bnb-8bit": 0.01}[method]
    assert abs(exported["perplexity"] / original["perplexity"] - 1) < tolerance
    model = AutoModelForCausalLM.from_pretrained(out)
    layer = type(model.model.layers[0].mlp.up_proj).__name__
    assert layer == {"bnb-4bit": "Linear4bit", "bnb-8bit": "Linear8bitLt"}[method]
    answer = model.generate(torch.tensor([[1, 20, 30]]), max_new_tokens=3, do_sample=False)
    assert answer.shape == (1, 6)
    assert (out / "tokenizer.json").is_file() and (out / "quantized_from.json").is_file()


def test_ollama_template_renders_like_the_chat_template(tokenizer):
    """The Modelfile's Go template, filled in as Ollama does, gives the text the chat template gives."""
    from medgpt.chat_template import get_template
    from medgpt.quantization import _go_template

    template = get_template(None, tokenizer)
    go = _go_template(template, tokenizer)
    branches = dict(re.findall(r'eq \.Role "(\w+)" }}(.*?)(?={{ else if|{{ end }}{{ end }})', go, flags=re.S))
    generation = go.rsplit("{{ end }}", 1)[1]
    messages = [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "头痛怎么办？"}]
    ollama = "".join(branches[m["role"]].replace("{{ .Content }}", m["content"]) for m in messages) + generation
    assert ollama == template.render(messages, add_generation_prompt=True)


def test_refusals_name_the_flag_and_the_way_out(tiny_model_dir, tmp_path, eval_dir, capsys):
    import quantize_model
    from medgpt.records import DataError

    def refused(*argv) -> str:
        with pytest.raises(SystemExit) as stop:
            quantize_model.main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "o"),
                                 *argv])
        return str(stop.value) + capsys.readouterr().err

    assert "CUDA GPU" in refused("--method", "gptq") and "gguf-q4_0" in refused("--method", "awq")
    assert "--method" in refused("--method", "bnb-4bit", "--load_in_4bit", "true")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    assert "--overwrite_output_dir" in refused("--method", "gguf-f16")
    assert (tmp_path / "o" / "notes.txt").is_file()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q?", "options": {"A": "x"}, "answer": "Z"}])
    with pytest.raises(DataError) as error:
        quantize_model.main(["--model_name_or_path", str(tiny_model_dir), "--method", "gguf-f16",
                             "--output_dir", str(tmp_path / "new"), "--eval_files", str(bad), str(tmp_path / "nope")])
    assert f"--eval_files {tmp_path / 'nope'}: no such file or folder." in str(error.value)
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}:1: .*'Z' is not one of the option letters"):
        quantize_model.main(["--model_name_or_path", str(tiny_model_dir), "--method", "gguf-f16",
                             "--output_dir", str(tmp_path / "new"), "--eval_files", str(bad)])
    assert not (tmp_path / "new").exists()


def test_unsupported_architecture_is_refused_by_name(tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    import quantize_model

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with pytest.raises(SystemExit, match="GPT2LMHeadModel.*LlamaForCausalLM.*bnb-4bit"):
        quantize_model.main(["--model_name_or_path", str(model_dir), "--method", "gguf-q8_0",
                             "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def small_tokenizer():
    """A byte-level BPE tokenizer of a few hundred tokens (a GGUF of the 49k-token one takes seconds to read)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["The patient has a fever and a cough.", "Drink water and rest."] * 4,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                                    "<|im_end|>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tokenizer


def tiny_family_model(family: str, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, \
        Qwen3ForCausalLM

    shape = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=family == "llama")
    torch.manual_seed(0)
    model = {"llama": lambda: LlamaForCausalLM(LlamaConfig(**shape)),
             "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**shape)),
             "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=128)),
             "llama3": lambda: LlamaForCausalLM(LlamaConfig(**shape, rope_parameters={
                 "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))}[family]().eval()
    for parameter in model.parameters():  # biases and norms away from their initial zeros / ones
        parameter.data += 0.05 * torch.randn_like(parameter)
    return model


def export_and_reload(model, tokenizer, method: str, folder):
    """write_gguf, then the loader every GGUF consumer goes through: from_pretrained(dir, gguf_file=...)."""
    from transformers import AutoModelForCausalLM

    from medgpt.quantization import METHODS, write_gguf

    write_gguf(model, tokenizer, tokenizer.chat_template, folder / "m.gguf", METHODS[method], "tiny")
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="m.gguf").eval()


IDS = torch.tensor([[5, 17, 42, 99, 120, 7, 64, 200]])


@pytest.mark.parametrize("method, tolerance", [("gguf-f16", 0.002), ("gguf-q8_0", 0.04), ("gguf-q5_0", 0.25),
                                               ("gguf-q4_0", 0.35)])
def test_every_gguf_type_reloads_through_transformers_and_answers(method, tolerance, tmp_path):
    tokenizer = small_tokenizer()
    model = tiny_family_model("llama", len(tokenizer))
    reloaded = export_and_reload(model, tokenizer, method, tmp_path)
    with torch.no_grad():
        expected, got = model(input_ids=IDS).logits, reloaded(input_ids=IDS).logits
    assert (got - expected).abs().max() < tolerance * expected.abs().max()
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    answer = reloaded.generate(IDS, **greedy)
    assert answer.shape == (1, IDS.shape[1] + 6)
    if method in ("gguf-f16", "gguf-q8_0"):
        assert torch.equal(answer, model.generate(IDS, **greedy))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama3"])
def test_gguf_converter_covers_qwen_and_llama3_layouts(family, tmp_path):
    """Qwen2 (q/k/v biases), Qwen3 (q/k norms, head_dim 128), Llama 3.1 rope factors; untied output layers.
    (Transformers' reader ignores the rope factors, which llama.cpp applies; at these positions they change
    nothing measurable.)"""
    tokenizer = small_tokenizer()
    model = tiny_family_model(family, len(tokenizer))
    reloaded = export_and_reload(model, tokenizer, "gguf-f16", tmp_path)
    with torch.no_grad():
        difference = (reloaded(input_ids=IDS).logits - model(input_ids=IDS).logits).abs().max()
    assert difference < 0.01 and not reloaded.config.tie_word_embeddings
    if family == "llama3":  # the rope factors llama.cpp applies are transformers' own llama3 frequencies
        import gguf
        import numpy as np

        stored = next(t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "rope_freqs.weight")
        default = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)  # head_dim 16
        assert np.allclose(stored.data, (default / model.model.rotary_emb.inv_freq.double()).numpy(), rtol=1e-4)
        assert stored.data.max() == 8.0 and stored.data.min() == 1.0


def test_bad_method_is_one_message_naming_the_choices(tiny_model_dir, tmp_path, capsys):
    import quantize_model

    with pytest.raises(SystemExit) as stop:
        quantize_model.main(["--model_name_or_path", str(tiny_model_dir), "--method", "gguf-q4_k",
                             "--output_dir", str(tmp_path / "x")])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in error
    assert "--method: invalid choice: 'gguf-q4_k'" in error and "gguf-q4_0" in error
