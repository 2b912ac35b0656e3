"""Every script answers --help; configs parse; unknown keys and flags are errors with a hint."""


import re
import sys

import pytest
import yaml

from conftest import ROOT, run_main, run_script
from medgpt.args import DataArguments, LoraArguments, ModelArguments, parse_args

SCRIPTS = ["pretraining.py", "supervised_finetuning.py", "reward_modeling.py", "dpo_training.py", "ppo_training.py",
           "grpo_training.py", "merge_peft_adapter.py", "inference.py", "gradio_demo.py", "openai_api.py", "evaluate_model.py", "run_pipeline.py", "template.py", "chatpdf.py", "opd_training.py",
           "-m medgpt.vocab", "-m medgpt.student", "quantize_model.py"]
STAGE_OF_CONFIG = {"pt.yaml": "pretraining", "sft.yaml": "supervised_finetuning", "rm.yaml": "reward_modeling",
                   "dpo.yaml": "dpo_training", "ppo.yaml": "ppo_training", "grpo.yaml": "grpo_training",
                   "opd.yaml": "opd_training"}


COMMAND_LINE_HELP = {"template.py", "evaluate_model.py"}  # the others start as commands in other tests


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.removesuffix(".py") not in STAGE_OF_CONFIG.values()])
def test_help(script, capsys, monkeypatch):
    """Every script answers --help: two from the command line, the others run as ``__main__`` in this
    process (each starts as a command in another test; the interpreter's start-up is what costs). The
    training stages' --help: below and in test_flags_a_stage_does_not_read_are_hidden_and_refused."""
    import runpy

    if script in COMMAND_LINE_HELP:
        text = run_script(*script.split(), "--help").stdout
    else:
        monkeypatch.setattr(sys, "argv", [script.split()[-1], "--help"])
        with pytest.raises(SystemExit) as exited:
            if script.startswith("-m "):
                runpy.run_module(script.split()[-1], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(ROOT / script), run_name="__main__")
        assert exited.value.code in (0, None)
        text = capsys.readouterr().out
    assert "usage" in text.lower() or "Registered templates" in text


def test_sft_help_explains_flags(capsys):
    import supervised_finetuning

    with pytest.raises(SystemExit):
        supervised_finetuning.main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage")
    for flag in ("--train_file_dir", "--template_name", "--use_peft", "--load_in_4bit", "--packing", "--max_length",
                 "--overlong_policy", "--neftune_noise_alpha", "--resume_from_checkpoint", "--config"):
        assert flag in text, flag


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(config):
    import importlib

    values = yaml.safe_load(config.read_text())
    module = importlib.import_module(STAGE_OF_CONFIG[config.name])
    parsed = module.parse(["--config", str(config)])
    resolved = parsed[0][-1] if module.__name__ == "dpo_training" else parsed[-1]
    for key, value in values.items():
        actual = resolved[key]
        if key == "report_to" and value == "none":
            value = []  # TrainingArguments turns "none" into an empty list
        elif isinstance(actual, list) and not isinstance(value, list):
            value = [value]  # list-valued flags such as DPO's loss_type accept one value
        assert actual == value, key


def test_cli_overrides_config_and_unknown_keys_fail(tmp_path):
    from trl import SFTConfig

    config = tmp_path / "c.yaml"
    config.write_text("lora_r: 4\nlearning_rate: 0.1\noutput_dir: somewhere\n")
    types = (ModelArguments, DataArguments, LoraArguments, SFTConfig)
    _, _, lora_args, training_args, _ = parse_args(types, ["--config", str(config), "--lora_r", "8"])
    assert lora_args.lora_r == 8 and training_args.learning_rate == 0.1

    config.write_text("lora_rank: 4\n")
    with pytest.raises(SystemExit) as error:
        parse_args(types, ["--config", str(config)])
    assert "lora_rank" in str(error.value) and "lora_r" in str(error.value)

    with pytest.raises(SystemExit):
        parse_args(types, ["--no_such_flag", "1"])


def test_shared_flag_fills_every_dataclass():
    from trl import SFTConfig

    model_args, _, _, training_args, _ = parse_args(
        (ModelArguments, DataArguments, LoraArguments, SFTConfig), ["--trust_remote_code", "true"]
    )
    assert model_args.trust_remote_code and training_args.trust_remote_code


def test_vllm_flag_without_vllm_says_how_to_install(tmp_path):
    import importlib.util

    import inference

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    questions = tmp_path / "q.txt"
    questions.write_text("What is a fever?\n")
    with pytest.raises(SystemExit, match="requirements-vllm.txt"):
        inference.main(["--vllm", "--data_file", str(questions)])


def test_vllm_lora_rank_and_deployment_script_without_vllm(tmp_path):
    import json
    import subprocess

    from medgpt.vllm_cli import max_lora_rank

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for config, expected in [({"r": 8}, 16), ({"r": 24}, 32), ({"r": 16, "rank_pattern": {"q_proj": 64}}, 64)]:
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        assert max_lora_rank(str(adapter)) == expected
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 1024}))
    with pytest.raises(SystemExit, match="merge the adapter"):
        max_lora_rank(str(adapter))
    run = subprocess.run(["bash", "vllm_deployment.sh", "outputs/sft-merged"], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "MEDGPT_VLLM_PYTHON": str(tmp_path / "none" / "python")})
    assert run.returncode == 1 and "requirements-vllm.txt" in run.stderr


def test_merge_never_deletes_what_it_did_not_write(tiny_model_dir, tmp_path):
    from merge_peft_adapter import main as merge

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="holds more than a merged model.*train.jsonl.*--overwrite_output_dir"):
        merge(["--base_model", str(tiny_model_dir), "--lora_model", str(adapter), "--output_dir", str(mine)])
    with pytest.raises(SystemExit, match="holds more than a merged model"):  # the embedded default as the base
        merge(["--lora_model", str(adapter), "--output_dir", str(mine)])
    with pytest.raises(SystemExit, match="is the --lora_model folder"):
        merge(["--base_model", str(tiny_model_dir), "--lora_model", str(adapter), "--output_dir", str(adapter),
               "--overwrite_output_dir", "true"])
    with pytest.raises(SystemExit, match="no adapter_config.json there, so not a LoRA adapter"):
        merge(["--base_model", str(tiny_model_dir), "--lora_model", str(tiny_model_dir), "--output_dir", str(tmp_path / "m")])
    assert (mine / "train.jsonl").is_file() and (adapter / "adapter_config.json").is_file()


def ends_with(script: str, argv: list, capsys) -> str:
    """What a script's ``__main__`` (run in this process) stops with: its exit message and what it wrote to stderr."""
    code = run_main(script, *argv, check=False)
    assert code not in (0, None)
    return f"{code}\n{capsys.readouterr().err}"


def test_data_problems_and_repeated_configs_end_with_a_message_not_a_traceback(tiny_model_dir, tmp_path, capsys):
    """From the command line (the first), and the scripts' ``__main__`` in-process (the others)."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}\n'
                      '{"conversations": [\n')
    common = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]
    result = run_script("supervised_finetuning.py", *common, "--train_files", str(broken), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "supervised_finetuning.py: error: Found 1 problem(s)" in result.stderr and f"{broken}:2:" in result.stderr
    ended = ends_with("supervised_finetuning.py", [*common, "--train_files", broken, "--template_name", "nope"],
                      capsys)
    assert "Unknown --template_name 'nope'" in ended and "Traceback" not in ended
    config = tmp_path / "a.yaml"
    config.write_text("max_steps: 3\n")
    ended = ends_with("supervised_finetuning.py", ["--config", config, "--config", config, *common], capsys)
    assert "--config given more than once" in ended
    ended = ends_with("inference.py", ["--base_model", tmp_path / "sft-mergd", "--interactive"], capsys)
    assert "sft-mergd: no such folder" in ended and "Traceback" not in ended
    ended = ends_with("merge_peft_adapter.py", ["--base_model", tiny_model_dir, "--lora_model", tiny_model_dir],
                      capsys)
    assert "not a LoRA adapter" in ended
    assert "--stages: unknown (none given)" in ends_with("run_pipeline.py", ["--stages", ""], capsys)


class NotATensor:  # pickled into a checkpoint: torch's safe loader refuses it
    pass


def refused_models(tiny_model_dir, tmp_path):
    """A model folder that needs its own code, and one whose weights are an unsafe pickle."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    remote = tmp_path / "remote-code"
    shutil.copytree(tiny_model_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="medgpt_custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                        "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (remote / "config.json").write_text(json.dumps(config))
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    weights = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save({**weights, "extra": NotATensor()}, pickled / "pytorch_model.bin")
    return remote, pickled


@pytest.mark.parametrize("script, flags, message", [
    ("supervised_finetuning", ["--learning_rate", "-1"], "--learning_rate -1.0: must not be negative"),
    ("supervised_finetuning", ["--lora_r", "0"], "--lora_r must be at least 1, got 0"),
    ("supervised_finetuning", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be at least 1"),
    ("pretraining", ["--block_size", "0"], "--block_size 0: must be at least 1"),
    ("dpo_training", ["--lora_dropout", "1.5"], "--lora_dropout 1.5: must be between 0 and 1"),
    ("supervised_finetuning", ["--output_dir", "{file}"], ": a file, not a folder"),
    ("supervised_finetuning", ["--config", "{yaml_list}"], "template_name: expected one value, got a list"),
    ("supervised_finetuning", ["--config", "{yaml_number}"], "lora_r: 'four' is not a whole number"),
    ("supervised_finetuning", ["--model_name_or_path", "{remote}"], "runs only with --trust_remote_code true"),
    ("supervised_finetuning", ["--model_name_or_path", "{pickled}"], "refuses to load safely (weights_only"),
])
def test_bad_flags_and_models_end_with_a_message_naming_them(script, flags, message, tiny_model_dir, tmp_path,
                                                               monkeypatch):
    """The message run_cli ends with (what the user sees instead of a traceback), before any training."""
    import importlib
    import sys

    from medgpt.args import run_cli

    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "list.yaml").write_text("template_name: [chatml, vicuna]\n")
    (tmp_path / "number.yaml").write_text("lora_r: four\n")
    remote, pickled = refused_models(tiny_model_dir, tmp_path) if "{remote}" in flags or "{pickled}" in flags else (0, 0)
    places = {"file": tmp_path / "file", "yaml_list": tmp_path / "list.yaml", "yaml_number": tmp_path / "number.yaml",
              "remote": remote, "pickled": pickled}
    flags = [flag.format(**places) for flag in flags]
    data = ROOT / ("data/pretrain" if script == "pretraining" else "data/sft/train")
    argv = [f"{script}.py", "--model_name_or_path", str(tiny_model_dir), "--train_file_dir", str(data),
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--max_train_samples", "8", *flags]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as ended:
        run_cli(importlib.import_module(script).main)
    assert message in str(ended.value)
    assert not (tmp_path / "out" / "metrics.json").exists()


STAGE_MODULES = ["pretraining", "supervised_finetuning", "reward_modeling", "dpo_training", "grpo_training",
                 "ppo_training", "opd_training"]


@pytest.mark.parametrize("script", STAGE_MODULES)
def test_flags_a_stage_does_not_read_are_hidden_and_refused(script, tmp_path, capsys):
    """Shared flags outside a stage's `stages` and TRL options the stage does itself: not in --help, and a
    one-line refusal with the reason, from the command line and from a YAML file alike."""
    import importlib

    from medgpt.args import unused_flags

    module = importlib.import_module(script)
    calls = []
    real = module.parse_args

    def spy(types, *args, **kwargs):
        calls.append((types, kwargs.get("stage"), kwargs.get("replaced") or {}))
        return real(types, *args, **kwargs)

    module.parse_args = spy
    try:
        with pytest.raises(SystemExit):
            module.main(["--help"])
    finally:
        module.parse_args = real
    shown = capsys.readouterr().out
    types, stage, replaced = calls[0]
    unused = unused_flags(types, stage, replaced)
    assert stage and unused  # every stage has some
    config = tmp_path / "c.yaml"
    for name, why in unused.items():
        assert not re.search(rf"^\s+--{name}[ ,]", shown, flags=re.M), name
        with pytest.raises(SystemExit, match=f"--{name}: \\S+ does not use it; {re.escape(why)}"):
            module.main([f"--{name}", "1", "--output_dir", str(tmp_path)])
    name = sorted(unused)[0]
    config.write_text(f"{name}: 1\n")
    with pytest.raises(SystemExit, match=f"--{name}: \\S+ does not use it"):
        module.main(["--config", str(config), "--output_dir", str(tmp_path)])


def test_each_stage_shows_the_data_flags_it_reads():
    """Spot checks of the `stages` metadata: streaming for PT/SFT only, pair truncation for RM/DPO."""
    from medgpt.args import DataArguments, unused_flags

    hidden = {stage: set(unused_flags((DataArguments,), stage, {})) for stage in ("pt", "sft", "rm", "dpo", "grpo")}
    assert "streaming" not in hidden["pt"] | hidden["sft"] and "streaming" in hidden["rm"] & hidden["dpo"]
    assert "max_prompt_length" not in hidden["rm"] | hidden["dpo"] and "max_prompt_length" in hidden["sft"]
    assert "train_on_reasoning" in hidden["pt"] & hidden["grpo"] and "overlong_policy" in hidden["pt"]


def test_hostile_data_ends_in_a_message_and_loses_nothing(tiny_model_dir, tmp_path):
    """From the command line: a mix that would overwrite its input, records nested too deeply or with a
    repeated key; each ends in one message naming the file (and line), no traceback, the input intact."""
    source = tmp_path / "f.jsonl"
    source.write_text("".join(f'{{"instruction": "q{i}", "output": "a{i}"}}\n' for i in range(10)))
    before = source.read_bytes()
    result = run_script("-m", "medgpt.data_tools", "mix", "--sources", f"{source}=1.0", "--size", "2",
                        "--output", str(source), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"--output {source} is the input file" in result.stderr and source.read_bytes() == before
    deep, repeated = tmp_path / "deep.jsonl", tmp_path / "dup.jsonl"
    deep.write_text('{"instruction": "q", "output": "a"}\n' + '{"a":' * 100000 + "\n")
    repeated.write_text('{"instruction": "a", "instruction": "b", "output": "c"}\n')
    result = run_script("supervised_finetuning.py", "--model_name_or_path", str(tiny_model_dir), "--train_files",
                        str(deep), str(repeated), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                        check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Found 2 problem(s)" in result.stderr and f"{deep}:2: nested too deeply" in result.stderr
    assert f'{repeated}:1: the key "instruction" appears more than once' in result.stderr
