"""The comparison scripts in bench/ run end to end (tiny model, two steps): both sides train and the ratios print.
Their figures are for docs/benchmarks.md, not asserted here (no timing in tests)."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT


def run_bench(script, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    output = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=900)
    assert output.returncode == 0, output.stderr[-3000:]
    return output.stdout


@pytest.mark.slow
def test_sft_throughput_bench_runs_both_sides(tiny_model_dir, tmp_path):
    out = run_bench("sft_throughput.py", "--model", str(tiny_model_dir), "--steps", "2", "--rows", "2",
                    "--max_length", "128", "--workdir", str(tmp_path))
    lines = out.splitlines()
    assert any(line.startswith("baseline ") and "padded" in line for line in lines)
    assert any(line.startswith("medgpt ") and "packed" in line for line in lines)
    assert "medgpt / baseline:" in out and "target:" in out


@pytest.mark.extended  # DPO's bench path is the stage's own (covered by test_dpo_memory); ~25 s
def test_dpo_memory_bench_runs_both_sides(tiny_model_dir):
    out = run_bench("dpo_memory.py", "--model", str(tiny_model_dir), "--steps", "2", "--batch_size", "2",
                    "--max_length", "128")
    assert "baseline" in out and "medgpt" in out and "medgpt / baseline" in out
