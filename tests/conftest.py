"""Shared fixtures: the embedded tokenizer, a tiny random Llama, small data files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
if "MEDGPT_DATA_CACHE" not in os.environ:  # prepared data of this test session only, removed with it
    import atexit
    import shutil
    import tempfile

    os.environ["MEDGPT_DATA_CACHE"] = tempfile.mkdtemp(prefix="medgpt-prepared-")
    atexit.register(shutil.rmtree, os.environ["MEDGPT_DATA_CACHE"], ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (still run by default)")
    config.addinivalue_line("markers", "extended: another launcher or variant of a path the default run covers; "
                                       "left out by default (pytest.ini), run with `bash run_tests.sh -m ''`")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from medgpt.base_model import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from medgpt.args import ModelArguments
    from medgpt.modeling import load_tokenizer

    return load_tokenizer(ModelArguments(model_name_or_path=str(default_model_dir)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    from medgpt.base_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def raw_dataset(path: Path, records):
    """Records written to a .jsonl file and read back as the stages read them (raw rows in Arrow)."""
    from medgpt.data_files import raw_records

    return raw_records([write_jsonl(path, records)])


def sft_records(count: int = 16) -> list[dict]:
    """Small conversations in all four formats."""
    records = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            records.append({"conversations": [
                {"from": "human", "value": f"What lowers a fever, case {i}?"},
                {"from": "gpt", "value": "Rest, fluids, and paracetamol within the label dose."}]})
        elif kind == 1:
            records.append({"messages": [
                {"role": "system", "content": "You are a careful medical assistant."},
                {"role": "user", "content": f"I have a headache ({i})."},
                {"role": "assistant", "content": "Drink water and rest."},
                {"role": "user", "content": "And if it gets worse?"},
                {"role": "assistant", "content": "See a doctor; sudden severe headache needs emergency care."}]})
        elif kind == 2:
            records.append({"instruction": f"解释高血压 {i}", "input": "", "output": "高血压是动脉血压持续升高。",
                            "history": [["你好", "你好，请问有什么可以帮你？"]]})
        else:
            records.append({"question": f"感冒要吃抗生素吗？{i}", "answer": "普通感冒多由病毒引起，一般不需要抗生素。"})
    return records


@pytest.fixture()
def sft_data_dir(tmp_path) -> Path:
    write_jsonl(tmp_path / "data" / "train" / "part.jsonl", sft_records(16))
    write_jsonl(tmp_path / "data" / "eval" / "part.jsonl", sft_records(4))
    return tmp_path / "data"


def preference_records(count: int) -> list[dict]:
    """Small preference pairs in all three formats (12 train + 4 eval in preference_dir)."""
    records = []
    for i in range(count):
        if i % 3 == 0:
            records.append({"conversations": [{"from": "human", "value": f"Chest pain and sweating, case {i}?"}],
                            "chosen": "Call emergency services now.", "rejected": "Wait and see at home."})
        elif i % 3 == 1:
            records.append({"system": "", "history": [["头痛", "多休息"]], "question": f"还是很痛怎么办 {i}",
                            "response_chosen": "突然剧烈头痛请立即就医。", "response_rejected": "再睡一觉就好了。"})
        else:
            records.append({"prompt": [{"role": "user", "content": f"Max paracetamol per day? {i}"}],
                            "chosen": [{"role": "assistant", "content": "4 g for healthy adults; less with liver disease."}],
                            "rejected": "10 g is fine."})
    return records


@pytest.fixture(scope="session")
def reward_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A reward model trained for one step on the tiny model (what PPO needs)."""
    import reward_modeling

    root = tmp_path_factory.mktemp("rm")
    write_jsonl(root / "pref.jsonl", [{"prompt": f"q{i}", "chosen": "Call emergency services.", "rejected": "Wait."}
                                      for i in range(6)])
    reward_modeling.main(["--model_name_or_path", str(tiny_model_dir), "--train_files", str(root / "pref.jsonl"),
                          "--output_dir", str(root / "rm"), "--max_steps", "1", "--validation_split_percentage", "0",
                          "--per_device_train_batch_size", "2", "--save_strategy", "no", "--logging_steps", "1",
                          "--report_to", "none", "--gradient_checkpointing", "false", "--seed", "5"])
    return root / "rm"


@pytest.fixture()
def preference_dir(tmp_path):
    write_jsonl(tmp_path / "pref" / "train" / "p.jsonl", preference_records(12))
    write_jsonl(tmp_path / "pref" / "eval" / "p.jsonl", preference_records(4))
    return tmp_path / "pref"


def run_main(script: str, *args, check: bool = True):
    """Run a project script's ``__main__`` in this process with these command-line arguments: the command a user
    types, less the interpreter's start-up (each script also starts as a real command in some test). Returns what
    it exited with (None when it returned); a failure raises unless ``check`` is false."""
    import runpy

    argv = sys.argv
    sys.argv = [script, *map(str, args)]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as ended:
        if check and ended.code not in (0, None):
            raise AssertionError(f"{script} {' '.join(sys.argv[1:])} stopped: {ended.code}") from None
        return ended.code
    finally:
        sys.argv = argv
    return None


def run_script(*args: str, timeout: int = 600, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a project script as a user would; fail with its output if it fails (unless ``check`` is false)."""
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, input=input,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result
