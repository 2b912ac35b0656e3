"""Make a smaller student from a model: keep N of its transformer blocks, evenly spaced (first and last kept).

    python -m medgpt.student --model_name_or_path outputs/sft-merged --num_layers 15 --output_dir outputs/student

The student shares the model's tokenizer, embeddings and head, so it can be distilled from it
(opd_training.py) token by token. Its answers are poor until it is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medgpt.args import ModelArguments, parse_args, run_cli


@dataclass
class StudentArguments:
    """How small, and where to write it."""

    num_layers: int = field(metadata={"help": "Transformer blocks to keep."})
    output_dir: str = field(metadata={"help": "Folder for the student model and tokenizer."})


def make_student(model_args: ModelArguments, args: StudentArguments) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from medgpt.modeling import load_tokenizer, resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_args), dtype="auto",
                                                 trust_remote_code=model_args.trust_remote_code)
    path, blocks = max(((name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)),
                       key=lambda item: len(item[1]))
    if not 1 <= args.num_layers < len(blocks):
        raise SystemExit(f"--num_layers {args.num_layers}: the model has {len(blocks)} blocks; keep 1 to "
                         f"{len(blocks) - 1}.")
    total = len(blocks)
    keep = sorted({round(i * (total - 1) / max(args.num_layers - 1, 1)) for i in range(args.num_layers)})
    kept = torch.nn.ModuleList([blocks[i] for i in keep])
    for index, block in enumerate(kept):  # caches and masks index the blocks by position
        if hasattr(getattr(block, "self_attn", None), "layer_idx"):
            block.self_attn.layer_idx = index
    parent, _, attribute = path.rpartition(".")
    setattr(model.get_submodule(parent), attribute, kept)
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(args.output_dir)
    load_tokenizer(model_args).save_pretrained(args.output_dir)
    print(f"Kept blocks {keep} of {total} -> {args.output_dir} "
          f"({sum(p.numel() for p in model.parameters()):,} parameters)")
    return args.output_dir


def main(argv: list[str] | None = None) -> str:
    model_args, student_args, _ = parse_args((ModelArguments, StudentArguments), argv, description=__doc__)
    return make_student(model_args, student_args)


if __name__ == "__main__":
    run_cli(main)
