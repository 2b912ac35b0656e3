"""DPO's memory: answer log-probabilities without full-vocabulary logits, and fp32 weights cast to bf16 as they
load."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT

COMMON = ["--logging_steps", "1", "--report_to", "none", "--seed", "3", "--per_device_train_batch_size", "2",
          "--per_device_eval_batch_size", "2", "--save_strategy", "no"]


def full_logits_logps(model, input_ids, attention_mask, answer_mask):
    """The usual way (TRL's): logits at every position over the vocabulary, log-softmax, the next token's entry."""
    from trl.trainer.utils import selective_log_softmax

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    per_token = selective_log_softmax(logits, input_ids[:, 1:])
    return (per_token * answer_mask[:, 1:]).sum(-1)


def test_answer_logps_equal_the_full_logits_way_in_value_and_gradient(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    import medgpt.answer_logps as answer_logps_module
    from medgpt.answer_logps import answer_logps, backbone_and_head, chunk_tokens

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    vocab = model.config.vocab_size
    monkeypatch.setattr(answer_logps_module, "LOGITS_PER_CHUNK", 16 * vocab)  # 16 tokens a chunk: several chunks
    assert chunk_tokens(vocab) == 16
    torch.manual_seed(0)
    input_ids = torch.randint(0, vocab, (4, 30))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -7:] = 0  # right padding, as TRL's collator pads
    answer_mask = torch.zeros_like(input_ids)
    answer_mask[:, 12:] = 1
    answer_mask[1, -7:] = 0
    answer_mask[3, :20] = 0  # rows' answers start at different places

    expected = full_logits_logps(model, input_ids, attention_mask, answer_mask)
    expected.sum().backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    got = answer_logps(*backbone_and_head(model), input_ids, attention_mask, answer_mask)
    got.sum().backward()

    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert answer_mask[:, 1:].sum() > 3 * 16  # the comparison spans several chunks
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected_grads[name], rtol=1e-4, atol=1e-4, msg=name)  # grads up to ~5


@pytest.mark.slow
def test_dpo_with_chunked_logps_trains_exactly_as_with_trls_logits(tiny_model_dir, preference_dir, tmp_path):
    import dpo_training

    common = ["--model_name_or_path", str(tiny_model_dir), "--train_file_dir", str(preference_dir / "train"),
              "--validation_file_dir", str(preference_dir / "eval"), "--max_steps", "3", "--learning_rate", "1e-2",
              "--max_length", "256", "--use_peft", "true", "--lora_r", "8", *COMMON,
              "--bf16", "false"]  # fp32: TRL takes the log-softmax of bf16 logits under bf16 autocast, MedGPT in fp32
    chunked = dpo_training.main([*common, "--output_dir", str(tmp_path / "chunked")])
    trl_way = dpo_training.main([*common, "--output_dir", str(tmp_path / "trl"), "--chunked_logps", "false"])

    assert chunked["chunked_logps"] is True and trl_way["chunked_logps"] is False
    # three steps at a high learning rate: any difference in the loss or its gradient would show by now
    for key in ("train_loss", "eval_loss", "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected"):
        assert chunked[key] == pytest.approx(trl_way[key], rel=1e-4, abs=1e-5), key
    assert chunked["eval_rewards/margins"] != 0  # the adapter moved the policy away from the reference


def test_losses_the_chunked_path_does_not_serve_fall_back_to_trls(tiny_model_dir, preference_dir, tmp_path):
    import dpo_training

    metrics = dpo_training.main([
        "--model_name_or_path", str(tiny_model_dir), "--train_file_dir", str(preference_dir / "train"),
        "--validation_split_percentage", "0", "--max_steps", "1", "--max_length", "128", "--loss_type", "ipo",
        "--output_dir", str(tmp_path / "ipo"), *COMMON])
    assert metrics["chunked_logps"] is False and metrics["loss_type"] == "ipo"


# ---------------------------------------------------------------- fp32 weights loaded in bf16


def test_fp32_checkpoint_loaded_in_bf16_has_exactly_transformers_weights(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from medgpt.args import ModelArguments
    from medgpt.modeling import load_model

    assert json.loads((tiny_model_dir / "config.json").read_text())["dtype"] == "float32"
    ours = load_model(ModelArguments(model_name_or_path=str(tiny_model_dir), torch_dtype="bfloat16"), training=False)
    theirs = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for name, value in theirs_state.items():
        assert ours_state[name].dtype == value.dtype and torch.equal(ours_state[name], value), name
    assert ours.config.dtype == torch.bfloat16
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # still tied


LOAD_PEAK = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    from transformers import AutoModelForCausalLM
    from medgpt.args import ModelArguments
    from medgpt.modeling import load_model
    def load(path):
        if sys.argv[1] == "medgpt":
            return load_model(ModelArguments(model_name_or_path=path, torch_dtype="bfloat16"), training=False)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    load(sys.argv[3])  # the tiny model first: what loading imports on first use is not counted
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    before = rss("VmRSS")
    load(sys.argv[2])
    print("PEAK", rss("VmHWM") - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures /proc/self/status")
def test_loading_fp32_weights_in_bf16_does_not_hold_the_whole_fp32_file(tmp_path, tiny_model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "fp32")  # 45M parameters: a 180 MB fp32 file
    file_bytes = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    script = tmp_path / "peak.py"
    script.write_text(LOAD_PEAK.format(root=str(ROOT)))
    peaks = {}
    for side in ("medgpt", "transformers"):
        out = subprocess.run([sys.executable, str(script), side, str(tmp_path / "fp32"), str(tiny_model_dir)], capture_output=True,
                             text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        peaks[side] = int(out.stdout.split("PEAK")[-1])
    # transformers maps and touches the whole fp32 file while it builds the bf16 weights; MedGPT casts tensor by
    # tensor and gives each one's pages back: the difference is most of the file
    assert peaks["transformers"] - peaks["medgpt"] > 0.6 * file_bytes, peaks
    assert peaks["medgpt"] < 0.5 * file_bytes + 80 * 2**20, peaks  # the bf16 weights (half the file) + one tensor
