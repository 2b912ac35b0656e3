"""Quantized exports of a model: bitsandbytes 4/8-bit folders, GGUF files for llama.cpp / Ollama, and the
quality of each export against the original (used by quantize_model.py).

The GGUF converter is deliberately small: it covers the decoder architectures that transformers' GGUF
reader loads back (Llama family: Llama 3, SmolLM2; Qwen2/2.5; Qwen3) with byte-level BPE tokenizers, and
writes what llama.cpp's own converter writes for them (tensor names from ``gguf.tensor_mapping``, Llama's
rotary permutation of the query/key rows, Llama 3's rope frequency factors, the tokenizer and its chat
template). Any other architecture or tokenizer is refused with the supported ones named.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


class ExportError(ValueError):
    """A model or flag this export cannot take: what, why, and what to do instead."""


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "bnb", "gguf" or "gpu"
    summary: str
    ggml_type: str | None = None  # the GGML type of the big weight matrices


METHODS = {m.name: m for m in (
    Method("bnb-4bit", "bnb", "bitsandbytes NF4 (double-quantized), a folder that from_pretrained loads; QLoRA-ready"),
    Method("bnb-8bit", "bnb", "bitsandbytes LLM.int8(), a folder that from_pretrained loads"),
    Method("gguf-f16", "gguf", "GGUF, 16-bit weights (llama.cpp / Ollama; the input to llama-quantize)", "F16"),
    Method("gguf-q8_0", "gguf", "GGUF, 8-bit blocks (near-lossless)", "Q8_0"),
    Method("gguf-q5_0", "gguf", "GGUF, 5-bit blocks; embeddings and output in Q8_0", "Q5_0"),
    Method("gguf-q4_0", "gguf", "GGUF, 4-bit blocks; embeddings and output in Q8_0", "Q4_0"),
    Method("gptq", "gpu", "GPTQ 4-bit (needs a CUDA GPU and a calibration library)"),
    Method("awq", "gpu", "AWQ 4-bit (needs a CUDA GPU and a calibration library)"),
)}

# Hugging Face class -> llama.cpp architecture, for the models transformers' GGUF reader loads back.
GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
FILE_TYPES = {"F16": 1, "Q4_0": 2, "Q8_0": 7, "Q5_0": 8}  # general.file_type (gguf.LlamaFileType)

# Pre-tokenizer splits that llama.cpp knows by name (tokenizer.ggml.pre); transformers' reader knows them too.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}

OLLAMA_SYSTEM = ("You are a medical information assistant. Your answers can be wrong and are not medical advice: "
                 "tell the user to see a doctor, and to call the local emergency number in an emergency.")


# ---------------------------------------------------------------- GGUF


def gguf_architecture(model) -> str:
    """The llama.cpp architecture of ``model``, or an ExportError naming it and the supported ones."""
    name = type(model).__name__
    if name not in GGUF_ARCHITECTURES:
        raise ExportError(f"--method gguf-*: the model is a {name} ({model.config.model_type}); this converter "
                          f"writes {', '.join(GGUF_ARCHITECTURES)} (Llama 3, SmolLM2, Qwen2/2.5, Qwen3). Use "
                          "--method bnb-4bit / bnb-8bit for it, or llama.cpp's convert_hf_to_gguf.py.")
    return GGUF_ARCHITECTURES[name]


def _rope(config) -> tuple[float, dict]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ExportError(f"--method gguf-*: rope scaling '{kind}' is not written by this converter (default, linear "
                          "and llama3 are). Use llama.cpp's convert_hf_to_gguf.py for this model.")
    return float(theta), {**params, "rope_type": kind}


def _llama3_rope_factors(head_dim: int, theta: float, params: dict) -> np.ndarray:
    """Llama 3.1+'s per-frequency rope factors, as llama.cpp stores them (rope_freqs.weight)."""
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    original = params.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _permute_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """Llama's query/key rows in llama.cpp's rotary layout (pairs interleaved, not halves)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensor_type(gguf_name: str, shape: tuple, method: Method):
    """The GGML type of one tensor: vectors in F32; embeddings and output in Q8_0 under a 4/5-bit type (as
    llama.cpp keeps them in a higher type); a row length that is not a multiple of the block size in F16."""
    import gguf

    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    wanted = gguf.GGMLQuantizationType[method.ggml_type]
    if wanted in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q5_0) and \
            gguf_name in ("token_embd.weight", "output.weight"):
        wanted = gguf.GGMLQuantizationType.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _gguf_tensors(model, arch: str):
    """(gguf name, float32 array) of every weight, in llama.cpp's names and layouts (tied output left out)."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    theta, rope = _rope(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if arch == "llama" and rope["rope_type"] == "llama3":
        yield "rope_freqs.weight", _llama3_rope_factors(head_dim, theta, rope)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        base, _, suffix = hf_name.rpartition(".")
        name = names.get_name(base)
        if name is None:
            if "rotary_emb" in hf_name:
                continue  # computed, not a weight
            raise ExportError(f"--method gguf-*: the weight {hf_name} has no llama.cpp name for {arch}; this model "
                              "differs from the architectures the converter supports.")
        weights = tensor.detach().to(torch.float32).cpu().numpy()
        if arch == "llama" and name.endswith(".attn_q"):
            weights = _permute_rows(weights, config.num_attention_heads)
        elif arch == "llama" and name.endswith(".attn_k"):
            weights = _permute_rows(weights, config.num_key_value_heads)
        yield f"{name}.{suffix}", weights


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for how this byte-level tokenizer splits text before BPE."""
    steps = (spec or {}).get("pretokenizers", [spec] if spec else [])
    kinds = [step["type"] for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in PRE_TOKENIZER_SPLITS.items():
            if pattern == split:
                return name
    raise ExportError(f"--method gguf-*: the tokenizer splits text in a way this converter does not know "
                      f"({json.dumps(spec)[:200]}); it knows GPT-2/SmolLM2, Llama 3 and Qwen2 byte-level BPE. Use "
                      "llama.cpp's convert_hf_to_gguf.py for this tokenizer.")


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """The vocabulary as GGUF stores a byte-level BPE tokenizer: tokens by id (padded to the model's
    embedding rows), their types, the merges, the pre-tokenizer name and the special token ids."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError("--method gguf-*: this converter writes byte-level BPE tokenizers (Llama 3, Qwen, SmolLM2); "
                          f"this one is {model['type']}{' with byte fallback (SentencePiece)' if model.get('byte_fallback') else ''}. "
                          "Use llama.cpp's convert_hf_to_gguf.py for it.")
    reverse = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if len(reverse) > vocab_size:
        raise ExportError(f"--method gguf-*: the tokenizer has {len(reverse)} tokens but the model only {vocab_size} "
                          "embedding rows; pass the tokenizer the model was trained with (--tokenizer_name_or_path).")
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in reverse:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(reverse[index])
            types.append(gguf.TokenType.NORMAL if index not in added else
                         gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
    merges = [merge if isinstance(merge, str) else
              " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in merge)
              for merge in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": _pre_tokenizer(spec.get("pre_tokenizer")),
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
            "pad": tokenizer.pad_token_id,
            "add_bos": bool(probe) and probe[0] == tokenizer.bos_token_id,
            "add_eos": bool(probe) and probe[-1] == tokenizer.eos_token_id}


def check_gguf(model, tokenizer) -> None:
    """Raise ExportError now if write_gguf would refuse this model or tokenizer."""
    gguf_architecture(model)
    _rope(model.config)
    tokenizer_metadata(tokenizer, model.config.vocab_size)


def write_gguf(model, tokenizer, chat_template: str | None, path: Path, method: Method, name: str) -> Path:
    """Write ``model`` (an unquantized transformers model) with its tokenizer as one GGUF file.

    Tensors are converted one at a time while the file is written, so memory stays at the model plus one
    tensor. Raises ExportError for an architecture, rope scaling or tokenizer it does not write."""
    import gguf

    arch = gguf_architecture(model)
    config = model.config
    theta, rope = _rope(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    vocab = tokenizer_metadata(tokenizer, config.vocab_size)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(theta)
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch == "qwen3" or head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_file_type(FILE_TYPES[method.ggml_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for key in ("bos", "eos", "unk", "pad"):
        if vocab[key] is not None:
            getattr(writer, f"add_{key}_token_id")(vocab[key])
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if chat_template:
        writer.add_chat_template(chat_template)

    plan = []  # first every tensor's name, shape and type (the header), then the data one tensor at a time
    for gguf_name, weights in _gguf_tensors(model, arch):
        qtype = _tensor_type(gguf_name, weights.shape, method)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(gguf_name, weights.shape, np.dtype(dtype), weights.size * np.dtype(dtype).itemsize)
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(weights.shape, qtype)
            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        plan.append((gguf_name, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for (gguf_name, qtype), (_, weights) in zip(plan, _gguf_tensors(model, arch)):
        writer.write_tensor_data(gguf.quants.quantize(weights, qtype))
    writer.close()
    return path


# ---------------------------------------------------------------- Ollama


def _go_template(template, tokenizer) -> str | None:
    """The chat template as an Ollama (Go) template, found by rendering marked messages; None when the
    template's turns cannot be cut into a fixed text before and after each role's content."""
    marks = {"system": "SYSTEM_PROBE_5e1c", "user": "USER_PROBE_5e1c", "assistant": "ANSWER_PROBE_5e1c"}
    conversation = [{"role": "system", "content": marks["system"]}, {"role": "user", "content": marks["user"]},
                    {"role": "assistant", "content": marks["assistant"]},
                    {"role": "user", "content": marks["user"] + "2"}]
    try:
        text = template.render(conversation, add_generation_prompt=True)
        prompt = template.render(conversation[:2], add_generation_prompt=True)
        plain = template.render(conversation[:2], add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - any template error means: no Go template, Ollama reads the GGUF's own
        return None
    bos = tokenizer.bos_token or ""
    if bos and text.startswith(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text, prompt, plain = text[len(bos):], prompt[len(bos):], plain[len(bos):]  # llama.cpp adds BOS itself
    if not prompt.startswith(plain):
        return None
    generation = prompt[len(plain):]
    pieces = re.split("(" + "|".join(marks.values()) + ")2?", text)
    if len(pieces) != 9:
        return None
    before_system, _, system_user, _, user_answer, _, answer_user, _, end = pieces
    stops = [w for w in template.stop_words if w]

    def cut(gap: str) -> tuple[str, str]:  # end of one turn | start of the next: after the end-of-turn word
        for word in stops:
            if word in gap:
                at = gap.index(word) + len(word)
                at += len(gap[at:]) - len(gap[at:].lstrip("\n"))
                return gap[:at], gap[at:]
        return "", gap

    answer_end, user_start = cut(answer_user)
    if not user_answer.endswith(generation) or not system_user.endswith(user_start):
        return None
    user_end = user_answer[: len(user_answer) - len(generation)]
    parts = {"system": (before_system, system_user[: len(system_user) - len(user_start)]),
             "user": (user_start, user_end), "assistant": (generation, answer_end)}
    if end != user_end + generation or any('"""' in s or "{{" in s for pair in parts.values() for s in pair):
        return None
    branches = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{start}{{{{ .Content }}}}{stop}'
                       for i, (role, (start, stop)) in enumerate(parts.items()))
    return f"{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{generation}"


def ollama_modelfile(gguf_name: str, template, tokenizer, system: str | None) -> tuple[str, bool]:
    """An Ollama Modelfile for the GGUF file beside it, and whether it carries a TEMPLATE (without one,
    Ollama picks a template from the chat template stored in the GGUF)."""
    go = _go_template(template, tokenizer)
    stops = list(dict.fromkeys(w for w in [*template.stop_words, tokenizer.eos_token] if w and w.strip()))
    lines = ["# ollama create medgpt -f Modelfile && ollama run medgpt", f"FROM ./{gguf_name}", ""]
    if go:
        lines += [f'TEMPLATE """{go}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(word, ensure_ascii=False)}" for word in stops]
    from medgpt.generation import GenerationArguments

    defaults = GenerationArguments()  # the sampling every other MedGPT path uses when a request sets none
    lines += [f"PARAMETER temperature {defaults.temperature}", f"PARAMETER top_p {defaults.top_p}",
              f"PARAMETER top_k {defaults.top_k}", f"PARAMETER repeat_penalty {defaults.repetition_penalty}"]
    if system:
        lines += ["", f'SYSTEM """{system}"""']
    return "\n".join(lines) + "\n", go is not None


# ---------------------------------------------------------------- quality


BUILTIN_PROMPTS = [  # used for answer agreement and speed when no --eval_files are given
    "What are the warning signs of a stroke?",
    "How much paracetamol can an adult take in one day?",
    "What is the difference between type 1 and type 2 diabetes?",
    "高血压患者日常生活中应该注意什么？",
]


def read_eval_files(files: Sequence[str], template, limit: int | None) -> dict:
    """Held-out data for the quality table, from files in the formats the other stages read:

    - ``.txt`` lines and records with ``text``: documents for perplexity;
    - records with ``question`` + ``answer`` (+ ``options``): questions (multiple-choice accuracy by option
      likelihood when they have options; their prompts for answer agreement);
    - conversations in any SFT format: their prompts for answer agreement, and the whole conversation
      rendered in the chat template as a document for perplexity.

    Every problem is reported at once, with its file and line (a DataError)."""
    from medgpt.data_files import find_files, read_json_records, text_document_reader
    from medgpt.records import DataError, Problem, _text, qa_item_from_record, question_from_record

    paths = find_files(files, (".txt", ".jsonl", ".json"), "--eval_files")
    problems: list[str] = []
    texts, questions, prompts = [], [], []
    try:
        texts += [text for _, text in text_document_reader()([p for p in paths if p.suffix.lower() == ".txt"])]
    except DataError as error:
        problems += error.problems
    for record in read_json_records([p for p in paths if p.suffix.lower() != ".txt"], problems):
        data = record.data
        try:
            if "text" in data:
                texts.append(_text(data["text"], "'text'"))
            elif "question" in data and "answer" in data:
                questions.append(question_from_record(data))
            else:
                item = qa_item_from_record(data)
                prompts.append(item["messages"])
                if "reference" in item:
                    texts.append(template.render([*item["messages"],
                                                  {"role": "assistant", "content": item["reference"]}]))
        except ValueError as error:
            problems.append(Problem(f"{record.source}: {error}", record.source, data))
    if problems:
        raise DataError(problems, what="--eval_files", outcome="nothing was exported")
    if limit:
        texts, questions, prompts = texts[:limit], questions[:limit], prompts[:limit]
    return {"texts": texts, "questions": questions, "prompts": prompts}


def agreement_prompts(data: dict, count: int) -> list[list[dict]]:
    """The prompts whose greedy answers are compared: questions first, then conversations, else built-in."""
    prompts = [q["prompt"] for q in data["questions"]] + data["prompts"]
    prompts = prompts or [[{"role": "user", "content": p}] for p in BUILTIN_PROMPTS]
    return prompts[:count]


@torch.inference_mode()
def probe_logits(chat, texts: Sequence[str], max_tokens: int = 64) -> list[torch.Tensor]:
    """The logits of each text's first ``max_tokens`` tokens (one forward pass per text)."""
    device = next(chat.model.parameters()).device
    outputs = []
    for text in texts:
        ids = chat.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :max_tokens]
        outputs.append(chat.model(input_ids=ids.to(device)).logits[0].float().cpu())
    return outputs


@torch.inference_mode()
def tokens_per_second(chat, messages: list[dict], new_tokens: int) -> float:
    """Greedy generation speed on one prompt, exactly ``new_tokens`` tokens: the faster of two runs after a
    short warm-up (other work on the machine slows single runs down)."""
    device = next(chat.model.parameters()).device
    batch = chat.tokenizer([chat.prompt(messages)], add_special_tokens=False, return_tensors="pt").to(device)
    settings = dict(do_sample=False, pad_token_id=chat.tokenizer.pad_token_id, temperature=None, top_p=None,
                    top_k=None)
    chat.model.generate(**batch, max_new_tokens=2, min_new_tokens=2, **settings)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        chat.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def measure(chat, data: dict, prompts: list, max_new_tokens: int, batch_size: int) -> dict:
    """What the quality table reports of one model, and the raw outputs to compare another model with."""
    from medgpt.evaluation import choice_loglik_accuracy, perplexity
    from medgpt.generation import GenerationArguments

    result, raw = {}, {}
    if data["texts"]:
        result.update(perplexity(chat.model, chat.tokenizer, data["texts"], batch_size=batch_size))
    if any(q["kind"] == "choice" for q in data["questions"]):
        scores = choice_loglik_accuracy(chat, data["questions"], batch_size)
        result.update(mcq_accuracy=scores["loglik_accuracy"], mcq_n=scores["loglik_n"])
    settings = GenerationArguments(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    answers = []
    for start in range(0, len(prompts), batch_size):
        answers += chat.generate(prompts[start : start + batch_size], settings)
    raw["answers"] = answers
    rendered = [chat.prompt(p) for p in prompts]
    raw["logits"] = probe_logits(chat, (data["texts"] or rendered)[:4])
    raw["tokens"] = [chat.tokenizer(t, add_special_tokens=False)["input_ids"] for t in data["texts"] + rendered]
    result["tokens_per_second"] = tokens_per_second(chat, prompts[0], max_new_tokens)
    return result, raw


def compare(raw: dict, reference: dict) -> dict:
    """How close a quantized model's outputs are to the original's."""
    same = [a == b for a, b in zip(raw["answers"], reference["answers"])]
    top1 = [float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(raw["logits"], reference["logits"])]
    return {
        "greedy_answers_identical": sum(same) / len(same) if same else float("nan"),
        "next_token_agreement": sum(top1) / len(top1) if top1 else float("nan"),
        "max_abs_logit_diff": max(float((a - b).abs().max()) for a, b in zip(raw["logits"], reference["logits"])),
        "same_tokenization": raw["tokens"] == reference["tokens"],
    }


def weights_size(model) -> int:
    """Bytes of the model's weights in their loaded dtype (tied tensors counted once)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


COLUMNS = [("size_mb", "size MB", "{:.1f}"), ("perplexity", "PPL", "{:.3f}"), ("mcq_accuracy", "MCQ acc", "{:.3f}"),
           ("greedy_answers_identical", "same answers", "{:.2f}"), ("next_token_agreement", "top-1 agree", "{:.3f}"),
           ("max_abs_logit_diff", "max logit diff", "{:.3f}"), ("tokens_per_second", "tokens/s", "{:.1f}")]


def quality_table(rows: dict) -> str:
    """The markdown table of quality.md: one row per model, the measures any row has."""
    used = [c for c in COLUMNS if any(c[0] in r for r in rows.values())]
    lines = ["| model | " + " | ".join(title for _, title, _ in used) + " |", "|---" * (len(used) + 1) + "|"]
    for name, row in rows.items():
        cells = [fmt.format(row[key]) if isinstance(row.get(key), (int, float)) else "-" for key, _, fmt in used]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
