"""Load the tokenizer and the model the same way in every stage.

One place decides the dtype, 4/8-bit quantization, LoRA wrapping, the pad-token fix and whether
remote code may run.
"""

from __future__ import annotations

import logging
import pickle
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

from medgpt.args import LoraArguments, ModelArguments
from medgpt.base_model import prepare_default_model
from medgpt.cast_on_load import cast_mapped_weights

logger = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """A model, tokenizer or adapter folder that cannot be loaded as given: which one, why, what to do."""


@contextmanager
def explain_load_errors(flag: str, path: str):
    """Turn the loaders' errors that the user must act on into one message naming the flag and folder."""
    from safetensors import SafetensorError

    try:
        yield
    except pickle.UnpicklingError as error:
        found = re.search(r"WeightsUnpickler error: (.*?\.)(\s|$)", str(error))
        raise ModelLoadError(
            f"{flag} {path}: its weights are a pickle file that torch refuses to load safely (weights_only"
            f"{': ' + found.group(1) if found else ''}); such a file can run code when loaded. If you trust its "
            "source, convert it once to safetensors (torch.load(file, weights_only=False), then "
            "safetensors.torch.save_file) and point the flag at the converted folder.") from None
    except SafetensorError as error:
        raise ModelLoadError(f"{flag} {path}: a weights file there is damaged ({error}); copy or download the "
                             "model again.") from None
    except ValueError as error:
        if "GGUF" in str(error):  # an architecture transformers' GGUF reader does not load
            raise ModelLoadError(f"{flag} {path}: {error} Load the original Hugging Face folder instead, or run "
                                 "the GGUF file with llama.cpp / Ollama.") from None
        if "trust_remote_code" not in str(error):
            raise
        raise ModelLoadError(f"{flag} {path}: the folder ships its own modeling code (auto_map in its config), "
                             "which runs only with --trust_remote_code true. Pass it if you trust that code.") from None


def resolve_model_path(model_args: ModelArguments) -> str:
    """The model to load: the given one, or the embedded default (prepared on first use)."""
    if not model_args.model_name_or_path:
        model_args.model_name_or_path = str(prepare_default_model())
    return model_args.model_name_or_path


def gguf_location(path: str) -> tuple[str, dict]:
    """Where transformers finds a model given as a GGUF file, or as a folder holding one .gguf and no
    config.json (quantize_model.py writes such a folder): ``(folder, {"gguf_file": name})``; else ``(path, {})``.
    Transformers' GGUF loader de-quantizes the weights."""
    given = Path(path)
    if given.suffix.lower() == ".gguf" and given.is_file():
        return str(given.parent), {"gguf_file": given.name}
    if given.is_dir() and not (given / "config.json").is_file():
        found = sorted(given.glob("*.gguf"))
        if len(found) == 1:
            return str(given), {"gguf_file": found[0].name}
    return path, {}


def _tokenizer_class(folder: str, gguf: dict):
    """AutoTokenizer, but the plain fast tokenizer for a byte-level BPE vocabulary in a GGUF file: AutoTokenizer
    would parse the whole file again only to name that same class (seconds for a 50k-token vocabulary)."""
    if not gguf:
        return AutoTokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(Path(folder, gguf["gguf_file"])))
    return PreTrainedTokenizerFast if metadata.get("tokenizer.ggml.model") == "gpt2" else AutoTokenizer


def _saved_quantization(folder: str, gguf: dict) -> bool:
    """Whether a model folder holds weights saved quantized (e.g. by quantize_model.py --method bnb-4bit)."""
    import json

    config = Path(folder, "config.json")
    return not gguf and config.is_file() and "quantization_config" in json.loads(config.read_text())


def _stored_in_fp32(folder: str, gguf: dict) -> bool:
    """Whether a local model folder holds fp32 safetensors weights (its config.json says so)."""
    import json

    config = Path(folder, "config.json")
    if gguf or not config.is_file() or not any(Path(folder).glob("model*.safetensors")):
        return False
    settings = json.loads(config.read_text())
    return str(settings.get("dtype") or settings.get("torch_dtype")) == "float32"


def check_reward_model(path: str, flag: str = "--reward_model_path") -> None:
    """A reward model folder: a full model with a one-score head, as reward_modeling.py saves it.

    Anything else would load with a randomly initialised score head and reward noise.
    """
    import json

    config_file = Path(path, "config.json")
    how = "Train one with reward_modeling.py (it saves the reward model merged, ready for this flag)."
    if not config_file.is_file():
        kind = "a LoRA adapter" if Path(path, "adapter_config.json").is_file() else "not a model folder"
        raise SystemExit(f"{flag} {path}: {kind} (no config.json). {how}")
    config = json.loads(config_file.read_text())
    heads = [a for a in config.get("architectures") or [] if a.endswith("ForSequenceClassification")]
    if not heads or len(config.get("id2label") or {"0": ""}) != 1:
        raise SystemExit(f"{flag} {path}: not a reward model (architectures {config.get('architectures')}, "
                         f"{len(config.get('id2label') or {})} labels; a reward model has one score). {how}")


def load_tokenizer(model_args: ModelArguments, padding_side: str = "right"):
    """Tokenizer with a pad token that is not the end-of-turn token.

    A pad equal to eos would make padding masks hide real end-of-turn tokens in some collators;
    the tokenizer's unk (or other unused special) token serves as pad when there is one.
    """
    path = model_args.tokenizer_name_or_path or resolve_model_path(model_args)
    flag = "--tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "--model_name_or_path"
    folder, gguf = gguf_location(path)
    with explain_load_errors(flag, path):
        tokenizer = _tokenizer_class(folder, gguf).from_pretrained(
            folder, trust_remote_code=model_args.trust_remote_code, **gguf)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        candidates = [tokenizer.unk_token, tokenizer.bos_token]
        spare = next((t for t in candidates if t and t not in (tokenizer.eos_token, None)), None)
        if spare is not None:
            tokenizer.pad_token = spare
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_template(model_args: ModelArguments, tokenizer):
    """The chat template the flags name (--template_name, --tool_format, --enable_thinking) for this tokenizer."""
    from medgpt.chat_template import get_template

    return get_template(model_args.template_name, tokenizer, model_args.tool_format, model_args.enable_thinking)


def resolve_dtype(name: str, frozen_bf16: bool = False) -> torch.dtype:
    """The weights' dtype for --torch_dtype. ``frozen_bf16``: the weights stay frozen (LoRA) and training runs
    bf16 mixed precision, so ``auto`` loads them in bf16 on the CPU too (only the adapter and its optimizer
    state, kept fp32 by PEFT, are updated): half the weight memory, and autocast no longer casts every fp32
    weight to bf16 (and keeps that copy for the backward pass) at every step."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if frozen_bf16 else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"--torch_dtype must be auto, float32, bfloat16 or float16, got '{name}'.") from None


def quantization_config(model_args: ModelArguments, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise ValueError("--load_in_4bit and --load_in_8bit exclude each other; pass one of them.")
    if model_args.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=model_args.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(
    model_args: ModelArguments,
    lora_args: LoraArguments | None = None,
    *,
    task: str = "causal-lm",
    num_labels: int = 1,
    training: bool = True,
    gradient_checkpointing: bool = False,
    train_embeddings: bool = False,
    mixed_precision: bool = False,
    packed: bool = False,
):
    """Load a causal LM (or a sequence-classification head for reward models), quantized and
    LoRA-wrapped as the arguments say. With ``training=False`` an adapter is loaded for inference.
    ``mixed_precision`` (the trainer's --bf16): with LoRA, where every weight outside the adapter is
    frozen, ``--torch_dtype auto`` loads the weights in bf16 on the CPU as it does on GPUs.
    ``packed`` (training rows packed from several sequences): on a CPU, where the model attends with sdpa and
    --attn_implementation names no kernel, attention runs sequence by sequence over flattened batches
    (packed_attention.py).
    """
    path = resolve_model_path(model_args)
    # bf16 frozen weights only where nothing but the fp32 adapter trains (no head, embeddings or blocks in full,
    # which would train in bf16) and the weights are not quantized (QLoRA keeps its own dtype policy).
    frozen = (training and mixed_precision and lora_args is not None and lora_args.use_peft and task == "causal-lm"
              and not (train_embeddings or lora_args.modules_to_save or lora_args.freeze_trainable_layers
                       or model_args.load_in_4bit or model_args.load_in_8bit))
    dtype = resolve_dtype(model_args.torch_dtype, frozen_bf16=frozen)
    quant = quantization_config(model_args, dtype)
    if quant is not None and lora_args is not None and training and not lora_args.use_peft:
        raise ValueError(
            "Quantized weights cannot be trained directly: --load_in_4bit/--load_in_8bit need --use_peft true (QLoRA)."
        )
    kwargs = dict(dtype=dtype, trust_remote_code=model_args.trust_remote_code)
    if quant is not None:  # passing None would also drop the quantization a saved 4/8-bit folder declares
        kwargs["quantization_config"] = quant
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    folder, gguf = gguf_location(path)
    if (quant is not None or _saved_quantization(folder, gguf)) and torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    # fp32 weights wanted in 16 bits: loaded as they are (memory-mapped) and cast one by one (cast_on_load.py)
    cast_to = dtype if dtype != torch.float32 and quant is None and _stored_in_fp32(folder, gguf) else None
    if cast_to is not None:
        kwargs["dtype"] = torch.float32
    with explain_load_errors("--model_name_or_path", path):
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(folder, **gguf, **kwargs)
        elif task == "sequence-classification":
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels, **gguf, **kwargs)
        else:
            raise ValueError(f"unknown task {task}")
    if cast_to is not None:
        cast_mapped_weights(model, cast_to)
    if packed and training and not model_args.attn_implementation and not torch.cuda.is_available() \
            and model.config._attn_implementation == "sdpa":  # models that default to eager (soft-capped) keep it
        from medgpt.packed_attention import register

        model.set_attn_implementation(register())

    if quant is not None and training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if model_args.adapter_name_or_path:
        model = load_adapter(model, model_args.adapter_name_or_path, trainable=quant is not None and training, task=task)
        if training and quant is None:
            model.requires_grad_(True)  # PEFT froze the base while loading; full training needs it back
    if training and lora_args is not None and lora_args.use_peft and not _is_peft(model):
        model = wrap_lora(model, lora_args, task, train_embeddings)
    if not torch.cuda.is_available():
        from medgpt.allocator import preloaded
        from medgpt.cpu_training import keep_freed_memory, use_bulk_dropout

        if not preloaded():  # glibc's malloc: tuned to reuse memory (tcmalloc does that itself)
            keep_freed_memory()
        if training and _is_peft(model):
            use_bulk_dropout(model)
    if training and lora_args is not None and lora_args.freeze_trainable_layers:
        freeze_all_but_last_blocks(model, lora_args.freeze_trainable_layers)
    if training:
        log_trainable_parameters(model)
    return model


CPU_CHECKPOINTED_BLOCKS = 0.8  # --checkpointed_blocks' default on CPUs (see its help)


def checkpoint_some_blocks(trainer, share: float | None):
    """Adds to the trainer (and returns) a callback that, once the trainer has turned gradient checkpointing on,
    leaves it on for ``share`` of the transformer blocks, spread evenly (None: 0.8 on a CPU, all on a GPU), and
    off for the others, whose activations are then kept for the backward pass. None (and nothing added) without
    gradient checkpointing or where every block stays checkpointed."""
    from transformers import TrainerCallback
    from transformers.modeling_layers import GradientCheckpointingLayer

    if share is None:
        share = 1.0 if torch.cuda.is_available() else CPU_CHECKPOINTED_BLOCKS
    blocks = [module for module in trainer.model.modules() if isinstance(module, GradientCheckpointingLayer)]
    kept = len(blocks) - round(share * len(blocks))  # blocks not checkpointed
    if not trainer.args.gradient_checkpointing or not blocks or kept == 0:
        return None
    uncheckpointed = {int(index * len(blocks) / kept) for index in range(kept)}

    class CheckpointSomeBlocks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            for index, block in enumerate(blocks):
                block.gradient_checkpointing = block.gradient_checkpointing and index not in uncheckpointed

    callback = CheckpointSomeBlocks()
    trainer.add_callback(callback)
    return callback


def adapter_inputs_in_bf16(trainer):
    """Adds to the trainer (and returns) a callback for LoRA over bf16 weights under bf16 autocast; None (and
    nothing added) where it does not apply.

    PEFT casts each adapter's input to the adapter's fp32 dtype, then autocast casts it back to bf16 for the
    matmul: per step and adapted layer, an fp32 copy of its input, the dropout of that copy kept for the
    backward pass, and a second cast, for the same bf16 product. During each training step (forward, backward,
    recomputed checkpoints) the callback lets the adapters take their bf16 inputs as they are; outside the
    steps (evaluation, generation) PEFT casts as usual."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import TrainerCallback

    model = trainer.model
    if not (trainer.args.bf16 and _is_peft(model)) or getattr(model, "dtype", None) != torch.bfloat16:
        return None
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]

    class AdapterInputsInBf16(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            for layer in layers:
                layer.cast_input_dtype_enabled = False

        def on_step_end(self, args, state, control, **kwargs):
            for layer in layers:
                layer.cast_input_dtype_enabled = True

    callback = AdapterInputsInBf16()
    trainer.add_callback(callback)
    return callback


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def wrap_lora(model, lora_args: LoraArguments, task: str = "causal-lm", train_embeddings: bool = False):
    """LoRA on the model as the flags say; ``train_embeddings`` also trains the input and output embeddings in
    full (kept tied when the model ties them), as an extended vocabulary needs."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = lora_args.lora_target_modules
    target_modules = targets if targets == "all-linear" else [name.strip() for name in targets.split(",")]
    modules_to_save = [name.strip() for name in lora_args.modules_to_save.split(",")] if lora_args.modules_to_save else None
    if train_embeddings:
        names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                 if module is model.get_input_embeddings() or module is model.get_output_embeddings()}
        modules_to_save = sorted(set(modules_to_save or []) | names)
        logger.info("Extended vocabulary: the embeddings (%s) train in full next to the adapter.", ", ".join(names))
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS,
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        ensure_weight_tying=train_embeddings,
        use_dora=lora_args.use_dora,
        use_rslora=lora_args.use_rslora,
        init_lora_weights=lora_args.init_weights(),
    )
    from transformers.integrations import is_deepspeed_zero3_enabled

    # ZeRO-3 needs one dtype across the trainable tensors; a head trained next to the adapter (the reward
    # model's score, modules_to_save) keeps the weights' dtype, so there the adapter does too (DeepSpeed
    # keeps fp32 master copies for the optimizer anyway). Elsewhere PEFT keeps adapters in fp32.
    model = get_peft_model(model, config, autocast_adapter_dtype=not is_deepspeed_zero3_enabled())
    if lora_args.converts_on_save:
        # PiSSA/OLoRA moved part of the base weights into the adapter; the adapter as it starts is kept so the
        # trained one can be saved as a plain LoRA of the original base model (save_model does it).
        import tempfile

        initial = tempfile.mkdtemp(prefix="medgpt-initial-adapter-")
        config.init_lora_weights = True
        model.save_pretrained(initial)
        model.medgpt_initial_adapter = initial
    return model


def freeze_all_but_last_blocks(model, count: int) -> None:
    """Freeze tuning: only the last ``count`` transformer blocks train (the rest, embeddings and head frozen)."""
    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=None)
    if blocks is None or count > len(blocks):
        raise ValueError(f"--freeze_trainable_layers {count}: the model has {len(blocks) if blocks else 0} "
                         "transformer blocks; pass at most that many.")
    model.requires_grad_(False)
    for block in blocks[len(blocks) - count:]:
        block.requires_grad_(True)
    logger.info("Freeze tuning: the last %d of %d blocks train, everything else is frozen.", count, len(blocks))


def load_adapter(model, adapter_path: str, trainable: bool = False, task: str = "causal-lm"):
    """Load an earlier stage's LoRA adapter and merge it into the weights.

    Merging makes the earlier stage part of the model: a new LoRA trained on top starts from it,
    and with the adapter disabled (DPO's and PPO's reference model) the model *is* the earlier
    stage. Quantized weights cannot absorb an adapter, so there it stays (trainable for QLoRA).
    """
    from peft import PeftConfig, PeftModel, TaskType

    if not (Path(adapter_path) / "adapter_config.json").is_file():
        raise ValueError(
            f"--adapter_name_or_path {adapter_path}: no adapter_config.json there. Point it at the output folder "
            "of a LoRA run, or use --model_name_or_path for a merged/full model."
        )
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    config = PeftConfig.from_pretrained(adapter_path)
    if task == "sequence-classification" and config.task_type != TaskType.SEQ_CLS:
        config.task_type = None  # an SFT (causal-LM) adapter on a reward model's body: load it task-agnostic
    with explain_load_errors("--adapter_name_or_path", adapter_path):
        model = PeftModel.from_pretrained(model, adapter_path, config=config, is_trainable=trainable and quantized)
    return model if quantized else model.merge_and_unload()


def log_trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("Trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return trainable, total
