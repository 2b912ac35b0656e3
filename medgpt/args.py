"""The arguments every stage shares, and the one way stages parse them.

Each stage parses ``ModelArguments``, ``DataArguments``, ``LoraArguments`` and its TRL/HF config
class (``SFTConfig``, ``DPOConfig`` ...), so every TrainingArguments flag works everywhere.
``--config file.yaml`` supplies defaults; flags on the command line override them; a key that no
argument has is an error that names the closest valid ones.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


@dataclass
class ModelArguments:
    """Which model to load and how."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model folder or hub name (alias --base_model). Default: the embedded SmolLM2-135M-Instruct, "
            "prepared on first use by `python -m medgpt.base_model`.",
            "aliases": ["--base_model"],
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or hub name, if not the model's own."}
    )
    adapter_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A LoRA adapter folder from an earlier stage (alias --lora_model). It is merged into the model "
            "first, so a new LoRA (--use_peft) or full training starts from that stage; with 4/8-bit weights it "
            "cannot be merged and is trained further instead.",
            "aliases": ["--lora_model"],
        },
    )
    template_name: str | None = field(
        default=None,
        metadata={"help": "Chat template name (see `python template.py`). Default: the tokenizer's own chat template."},
    )
    tool_format: str | None = field(
        default=None,
        metadata={"help": "How tool calls are written for a template without tool support of its own: default "
                  "(Action / Action Input / Observation), qwen, llama3, mistral or glm4. Default: the template's own "
                  "tool rendering where it has one, else default. Saved with the model."},
    )
    enable_thinking: bool | None = field(
        default=None,
        metadata={"help": "For templates with a thinking switch (Qwen3...): false renders the non-thinking form "
                  "(answers without their reasoning), true the thinking form. Default: the template's own default; "
                  "answers that carry no reasoning use the non-thinking form where the template has one. Saved "
                  "with the model."},
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype: auto (bfloat16 on GPUs that support it, float16 on other GPUs, float32 on CPU), "
            "float32, bfloat16 or float16."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: sdpa, eager or flash_attention_2. Default: the model's default (sdpa); "
                          "for packed SFT rows on CPUs, medgpt_packed_sdpa (each packed sequence attended on its own; "
                          "medgpt/packed_attention.py)."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modeling code shipped with the model folder. Only for models you trust."}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load weights in 4-bit (bitsandbytes)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load weights in 8-bit (bitsandbytes)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit quantization type: nf4 or fp4.",
                                                              "requires": "load_in_4bit"})
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={
        "help": "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).", "requires": "load_in_4bit"})
    checkpointed_blocks: float | None = field(default=None, metadata={
        "help": "With --gradient_checkpointing true: the share of the transformer blocks whose activations are "
                "recomputed in the backward pass instead of kept, spread evenly over the depth (1.0: every block, "
                "TRL's way). Default: 1.0 on GPUs; 0.8 on CPUs (every fifth block keeps its activations), where "
                "memory is plentiful next to compute and the recomputation is a large part of a step.",
        "stages": ("sft",)})

    def __post_init__(self):
        if self.checkpointed_blocks is not None and not 0 <= self.checkpointed_blocks <= 1:
            raise ValueError(f"--checkpointed_blocks must be between 0 and 1, got {self.checkpointed_blocks}.")
        for flag, value in (("--model_name_or_path (--base_model)", self.model_name_or_path),
                            ("--tokenizer_name_or_path", self.tokenizer_name_or_path),
                            ("--adapter_name_or_path (--lora_model)", self.adapter_name_or_path)):
            if value and looks_like_a_path(value) and not Path(value).expanduser().exists():
                raise ValueError(f"{flag} {value}: no such folder. Check the path (each stage writes its model "
                                 "to its --output_dir).")
        if self.adapter_name_or_path and Path(self.adapter_name_or_path).is_dir() and not Path(
                self.adapter_name_or_path, "adapter_config.json").is_file():
            raise ValueError(f"--adapter_name_or_path (--lora_model) {self.adapter_name_or_path}: no "
                             "adapter_config.json there, so not a LoRA adapter. Point it at the output folder of a "
                             "LoRA run, or pass a full or merged model as --model_name_or_path.")


def looks_like_a_path(name: str) -> bool:
    """A local path rather than a hub name (namespace/name): absolute, ./ ../ ~, deeper than one slash, or its
    first folder exists here (outputs/sft-mergd is a mistyped folder, not a hub model)."""
    parts = Path(name).parts
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1
            or (len(parts) > 1 and Path(parts[0]).is_dir()))


@dataclass
class LoraArguments:
    """Full fine-tuning or LoRA (with --load_in_4bit/8bit: QLoRA)."""

    use_peft: bool = field(
        default=True, metadata={"help": "Train a LoRA adapter (true) or all weights (false: full fine-tuning)."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "Comma-separated module names to adapt, or all-linear (every linear layer but the head)."},
    )
    modules_to_save: str | None = field(
        default=None,
        metadata={"help": "Comma-separated modules trained in full next to the adapter, e.g. embed_tokens,lm_head."},
    )
    use_dora: bool = field(default=False, metadata={
        "help": "DoRA: the adapter learns each weight's direction and magnitude apart (often closer to full training)."})
    use_rslora: bool = field(default=False, metadata={
        "help": "rsLoRA: scale the adapter by alpha/sqrt(r) instead of alpha/r (stable at high ranks)."})
    init_lora_weights: str = field(default="true", metadata={
        "help": "How the adapter starts: true (B zero: the model is unchanged at first), gaussian, pissa (the "
                "weights' principal components; pissa_niter_4 for a fast randomized SVD), olora (QR). With pissa "
                "and olora the saved adapter is converted to a plain LoRA of the original base model."})
    freeze_trainable_layers: int = field(default=0, metadata={
        "help": "Freeze tuning (with --use_peft false): train only the last N transformer blocks in full, the rest "
                "frozen. 0: off."})

    INIT_CHOICES = ("true", "false", "gaussian", "pissa", "olora", "eva", "corda", "orthogonal")

    def __post_init__(self):
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be at least 1, got {self.lora_r}.")
        base = self.init_lora_weights.lower().split("_niter_")[0]
        if base not in self.INIT_CHOICES:
            raise ValueError(f"--init_lora_weights {self.init_lora_weights}: use one of "
                             f"{', '.join(self.INIT_CHOICES)} (or pissa_niter_N).")
        if self.freeze_trainable_layers < 0:
            raise ValueError("--freeze_trainable_layers must be 0 (off) or a number of blocks.")
        if self.freeze_trainable_layers and self.use_peft:
            raise ValueError("--freeze_trainable_layers trains whole blocks: pass --use_peft false with it.")

    def init_weights(self):
        """--init_lora_weights as PEFT takes it (booleans for true/false)."""
        value = self.init_lora_weights.lower()
        return {"true": True, "false": False}.get(value, value)

    @property
    def converts_on_save(self) -> bool:
        """PiSSA / OLoRA change the base weights: the saved adapter is converted back to plain LoRA."""
        return str(self.init_weights()).startswith(("pissa", "olora"))


CACHED_STAGES = ("pt", "sft", "rm", "dpo", "opd")  # stages whose prepared data is cached on disk


@dataclass
class DataArguments:
    """Where the data is and how records are cut to length."""

    train_file_dir: str | None = field(
        default=None, metadata={"help": "Folder searched recursively for training .jsonl/.json files."}
    )
    validation_file_dir: str | None = field(
        default=None, metadata={"help": "Folder searched recursively for validation .jsonl/.json files."}
    )
    train_files: list[str] | None = field(default=None, metadata={
        "help": "Training files, in addition to the folder. FILE=WEIGHT for each mixes them in those proportions "
                "(e.g. medical.jsonl=0.8 general.jsonl=0.2: seeded, the most records possible without repeats)."})
    validation_files: list[str] | None = field(
        default=None, metadata={"help": "Validation files, in addition to the folder."}
    )
    validation_split_percentage: float = field(
        default=5,
        metadata={"help": "With no validation files: percent of the training records held out for evaluation."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training records (quick runs)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation records."})
    overlong_policy: str = field(
        default="skip",
        metadata={
            "help": "Records longer than --max_length. SFT (default skip): a conversation whose first exchange alone "
            "is too long is skipped (counted and reported) or, with truncate, cut to max_length tokens (that answer "
            "loses its end-of-turn token); longer conversations are always cut at turn boundaries. RM/DPO (default "
            "truncate): a pair is cut as TRL cuts it (the prompt keeps its latest turns, at most "
            "--max_prompt_length tokens; the answers keep their start), counted as pairs_truncated in metrics.json, "
            "or skipped with skip. KTO: TRL truncates.",
            "stages": ("sft", "rm", "dpo"),
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "RM/DPO: an over-long pair's prompt keeps at most its last N tokens (default: half of "
                  "--max_length). PPO (default 512): prompts longer than this are skipped (counted and reported).",
                  "stages": ("rm", "dpo", "ppo")},
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization (datasets.map num_proc)."}
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the training files as a stream (for corpora bigger than the disk cache): "
                  "tokenized on the fly, shuffled in a buffer of --shuffle_buffer_size records; needs --max_steps. "
                  "Validation: the validation files, else the first --max_eval_samples (default 200) records.",
                  "stages": ("pt", "sft")},
    )
    shuffle_buffer_size: int = field(
        default=10000, metadata={"help": "With --streaming: records shuffled together (a buffer, not the corpus).",
                                 "stages": ("pt", "sft"), "requires": "streaming"}
    )
    data_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where prepared (tokenized) data is kept and reused by later runs with the same files, "
                  "tokenizer, template and lengths. Default: $MEDGPT_DATA_CACHE, else ~/.cache/medgpt/prepared_data "
                  "($MEDGPT_HOME/prepared_data when MEDGPT_HOME is set).", "stages": CACHED_STAGES},
    )
    overwrite_cache: bool = field(default=False, metadata={
        "help": "Prepare the data again even when a cached copy matches.", "stages": CACHED_STAGES})
    train_on_reasoning: bool = field(
        default=True,
        metadata={"help": "Train on the reasoning an answer carries (reasoning_content or a leading <think> block). "
                  "false keeps the reasoning in the input but out of the loss.", "stages": ("sft",)},
    )
    on_invalid_record: str = field(
        default="error",
        metadata={"help": "A record that is not valid (bad JSON, unknown format, roles out of order, a template "
                  "that cannot render it): error (stop and list every one with its file:line) or skip (drop it, "
                  "count it, and write it with its file:line and reason to <output_dir>/invalid_records.jsonl)."},
    )
    max_invalid_fraction: float = field(
        default=0.05,
        metadata={"help": "With --on_invalid_record skip: stop anyway when more than this share of the records is "
                  "invalid (something is wrong with the data, not with a few records)."},
    )

    def __post_init__(self):
        if self.on_invalid_record not in ("error", "skip"):
            raise ValueError(f"--on_invalid_record must be error or skip, got '{self.on_invalid_record}'.")
        if self.shuffle_buffer_size < 1:
            raise ValueError("--shuffle_buffer_size must be at least 1.")
        if not 0 <= self.max_invalid_fraction <= 1:
            raise ValueError("--max_invalid_fraction must be between 0 and 1.")
        if self.overlong_policy not in ("skip", "truncate"):
            raise ValueError(f"--overlong_policy must be skip or truncate, got '{self.overlong_policy}'.")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError("--validation_split_percentage must be in [0, 100).")


# Ranges that hold for a flag of this name in any stage (None: not set, e.g. max_length off).
_AT_LEAST_ONE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "block_size", "max_length", "max_prompt_length", "max_completion_length", "max_new_tokens",
                 "eval_max_new_tokens", "num_generations", "batch_size", "eval_batch_size", "logging_steps",
                 "max_train_samples", "max_eval_samples", "num_layers")
_NOT_NEGATIVE = ("learning_rate", "weight_decay", "warmup_ratio", "warmup_steps", "max_grad_norm", "num_train_epochs",
                 "lora_alpha", "temperature", "beta", "save_total_limit")
_FRACTIONS = ("lora_dropout", "warmup_ratio", "top_p")


def check_ranges(instances) -> list[str]:
    """The flags whose values are out of range (before any data or model is loaded), and an --output_dir
    that is a file."""
    problems = []
    for instance in instances:
        for name, value in vars(instance).items():
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if name in _AT_LEAST_ONE and value < 1:
                problems.append(f"--{name} {value}: must be at least 1.")
            elif name in _NOT_NEGATIVE and value < 0:
                problems.append(f"--{name} {value}: must not be negative.")
            elif name in _FRACTIONS and not 0 <= value <= 1:
                problems.append(f"--{name} {value}: must be between 0 and 1.")
        output_dir = getattr(instance, "output_dir", None)
        if output_dir and Path(output_dir).exists() and not Path(output_dir).is_dir():
            problems.append(f"--output_dir {output_dir}: a file, not a folder. Choose a folder path (it is created).")
    return list(dict.fromkeys(problems))


# Options of TRL's configs for work MedGPT does itself before the trainer sees the data (each stage names the
# ones its trainer would ignore): not in that stage's --help, and refused with what to use instead.
REPLACED_TRL_OPTIONS = {
    "dataset_num_proc": "MedGPT prepares the data itself: use --preprocessing_num_workers.",
    "dataset_text_field": "MedGPT reads its record formats itself (README: data formats).",
    "dataset_kwargs": "MedGPT prepares the data itself; see the data flags in --help.",
    "chat_template_path": "use --template_name (a registered template) or the model's own chat template.",
    "eos_token": "the chat template decides where a turn ends (--template_name).",
    "truncation_mode": "MedGPT cuts over-long data itself: see --overlong_policy.",
    "packing_strategy": "--packing true packs with MedGPT's best-fit packing (conversations kept whole).",
    "eval_packing": "validation rows are packed exactly when training rows are (--packing).",
    "shuffle_dataset": "the Trainer shuffles the prepared rows every epoch (--seed).",
    "assistant_only_loss": "SFT always trains on the answers only (labels from the chat template).",
    "completion_only_loss": "SFT always trains on the answers only; for whole texts use pretraining.py.",
    "padding_free": "use --packing true (block-diagonal masks; padding-free rows under flash-attention).",
    "pad_to_multiple_of": "MedGPT's collator pads each batch to its longest row (packed rows need none).",
    "packing": "this stage does not pack rows.",
    "model_init_kwargs": "MedGPT loads the model: use --torch_dtype, --attn_implementation, --load_in_4bit.",
    "teacher_model_init_kwargs": "MedGPT loads the teacher like the student (--teacher_* flags, --torch_dtype).",
}


def trl_options(*names: str) -> dict[str, str]:
    """The REPLACED_TRL_OPTIONS a stage names, with their reasons (for parse_args' ``replaced``)."""
    return {name: REPLACED_TRL_OPTIONS[name] for name in names}


def unused_flags(types: tuple, stage: str | None, replaced: dict[str, str]) -> dict[str, str]:
    """Flags the parser knows that this stage does not read: name -> why and what to use instead."""
    unused = dict(replaced)
    for dtype in types:
        for item in dataclasses.fields(dtype):
            stages = item.metadata.get("stages")
            if stage and stages and stage not in stages:
                unused[item.name] = f"only the {', '.join(s.upper() for s in stages)} stage(s) read it."
    return unused


# Field metadata MedGPT reads (argparse does not): the stages that read a flag, and the flag it only matters with.
MEDGPT_METADATA = {"stages", "requires"}


class _SharedFieldParser(HfArgumentParser):
    """An HfArgumentParser where a field defined by several dataclasses (e.g. trust_remote_code in
    ModelArguments and TRL's configs) is one flag that fills all of them."""

    @staticmethod
    def _parse_dataclass_field(parser, field):
        if any(f"--{field.name}" in action.option_strings for action in parser._actions):
            return
        if set(field.metadata) & MEDGPT_METADATA:  # ours, not argparse's
            field = copy.copy(field)
            field.metadata = {key: value for key, value in field.metadata.items() if key not in MEDGPT_METADATA}
        HfArgumentParser._parse_dataclass_field(parser, field)


def _hardware_defaults() -> dict[str, Any]:
    """Defaults that depend on the machine: bf16 mixed precision where the GPU, or the CPU (AVX512-BF16
    or AMX), computes it natively (TRL's configs assume a GPU otherwise); pinned memory only with a GPU."""
    import torch

    gpu = torch.cuda.is_available()
    if gpu:
        return {"bf16": torch.cuda.is_bf16_supported(), "dataloader_pin_memory": True}
    return {"bf16": cpu_supports_bf16(), "use_cpu": cpu_supports_bf16(), "dataloader_pin_memory": False}


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (then bf16 autocast is ~4x faster than fp32)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def parse_args(types: tuple, argv: list[str] | None = None, description: str | None = None,
               defaults: dict[str, Any] | None = None, stage: str | None = None,
               replaced: dict[str, str] | None = None):
    """Parse ``types`` (dataclasses) from ``--config`` YAML and the command line; CLI wins.

    ``defaults`` are a stage's own defaults for fields of the config classes (below YAML and CLI).
    ``stage`` (pt, sft, rm, dpo, grpo, ppo, opd) hides the shared flags whose ``stages`` metadata leaves
    it out, and ``replaced`` (name -> reason, e.g. ``trl_options(...)``) names options the stage does not
    read: such a flag is not in --help and is refused when given, on the command line or in the YAML file.

    Returns the dataclass instances in order, followed by the resolved config dict.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _SharedFieldParser(types, description=description)
    parser.add_argument(
        "--config", default=None, help="YAML file of argument defaults; command-line flags override its values."
    )
    unused = unused_flags(types, stage, replaced or {})
    for action in parser._actions:
        if action.dest in unused:
            action.help = argparse.SUPPRESS
    known = {action.dest for action in parser._actions}
    values = {key: value for key, value in {**_hardware_defaults(), **(defaults or {})}.items() if key in known}
    config_path = _pop_config(argv)
    given = {token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")}
    if config_path:
        config = _read_config(config_path, {action.dest: action for action in parser._actions})
        values.update(config)
        given |= set(config)
    refused = [f"--{name}: {parser.prog} does not use it; {unused[name.removeprefix('no_')]}"
               for name in sorted(given) if name.removeprefix("no_") in unused]
    if refused:
        raise SystemExit(f"{parser.prog}: error: " + " ".join(refused))
    parser.set_defaults(**values)
    namespace, extra = parser.parse_known_args(args=argv)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)} (see --help)")
    parsed = vars(namespace)
    try:  # a value that the dataclass itself rejects: a usage error naming the flag, not a traceback
        instances = [
            dtype(**{f.name: parsed[f.name] for f in dataclasses.fields(dtype) if f.init and f.name in parsed})
            for dtype in types
        ]
    except ValueError as error:
        raise SystemExit(f"{parser.prog}: error: {error} (see --help)") from None
    problems = check_ranges(instances)
    if problems:
        raise SystemExit(f"{parser.prog}: error: " + " ".join(problems) + " (see --help)")
    resolved = {}
    for instance in instances:
        resolved.update(_to_plain(instance))
    resolved["config"] = config_path
    return (*instances, resolved)


def run_cli(main) -> None:
    """Run a script's ``main()`` so that problems in the user's data or choices end with their message
    (every problem with its file and line, or the flag), not a Python traceback."""
    from medgpt.chat_template import TemplateError
    from medgpt.modeling import ModelLoadError
    from medgpt.records import DataError

    try:
        main(sys.argv[1:])
    except (DataError, TemplateError, ModelLoadError) as error:
        raise SystemExit(f"{Path(sys.argv[0]).name}: error: {error}") from None


def _pop_config(argv: list[str]) -> str | None:
    for index, token in enumerate(argv):
        if token == "--config":
            if index + 1 >= len(argv):
                raise SystemExit("--config needs a YAML file path")
            path = argv[index + 1]
            del argv[index : index + 2]
            break
        if token.startswith("--config="):
            del argv[index]
            path = token.split("=", 1)[1]
            break
    else:
        return None
    if any(token == "--config" or token.startswith("--config=") for token in argv):
        raise SystemExit("--config given more than once: only one YAML file is read. Put the values in one file "
                         "and override single values with flags.")
    return path


def _read_config(path: str, actions: dict) -> dict[str, Any]:
    """The YAML file's values, checked and converted as the same flags on the command line would be."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"--config {path}: no such file.")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise SystemExit(f"--config {path}: not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path}: expected a mapping of argument names to values at the top level.")
    problems = []
    for key, value in values.items():
        if key not in actions:
            close = difflib.get_close_matches(str(key), sorted(actions), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            problems.append(f"  unknown key '{key}'.{hint}")
            continue
        try:
            values[key] = _config_value(actions[key], value)
        except (TypeError, ValueError) as error:
            problems.append(f"  {key}: {error}")
    if problems:
        raise SystemExit(f"--config {path}: values that this script cannot take:\n" + "\n".join(problems))
    return values


def _config_value(action, value):
    """One YAML value as argparse would have made it from the command line."""
    many = action.nargs in ("+", "*")
    if isinstance(value, dict) or (isinstance(value, list) and not many):
        raise TypeError(f"expected one value, got a {type(value).__name__} ({value!r}).")
    items = value if isinstance(value, list) else [value]
    if action.type is not None:
        expected = {int: "a whole number", float: "a number"}.get(action.type, "a value this flag takes")
        try:
            items = [action.type(item) if isinstance(item, str) else item for item in items]
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not {expected}.") from None
    if action.choices is not None:
        for item in items:
            if item not in action.choices:
                raise ValueError(f"{item!r} is not one of {', '.join(map(str, action.choices))}.")
    return items if many else items[0]


def _to_plain(instance) -> dict[str, Any]:
    if hasattr(instance, "to_dict"):
        # TrainingArguments: serializable values, every field ending in "_token" redacted; only the hub
        # credentials are secret, so settings such as PPO's stop_token are put back.
        plain = instance.to_dict()
        for key, value in plain.items():
            if value == f"<{key.upper()}>" and "hub" not in key:
                plain[key] = getattr(instance, key)
        return plain
    return dataclasses.asdict(instance)
