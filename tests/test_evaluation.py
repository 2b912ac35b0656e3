"""Evaluation: metric values on known inputs, evaluate_model.py end to end, the pipeline's stop-on-failure."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, sft_records, write_jsonl
from medgpt.evaluation import generation_metrics


def test_bleu_and_rouge_on_known_inputs():
    perfect = generation_metrics(["高血压是常见的慢性病。", "Take it with food."], ["高血压是常见的慢性病。", "Take it with food."])
    assert perfect["bleu_4"] == pytest.approx(100) and perfect["rouge_l"] == pytest.approx(100)
    none = generation_metrics(["完全不同"], ["高血压"])
    assert none["bleu_1"] == 0 and none["rouge_l"] == 0
    # Chinese is scored by characters: a close paraphrase gets partial credit, not zero
    partial = generation_metrics(["高血压很常见"], ["高血压是常见病"])
    assert 0 < partial["bleu_1"] < 100 and partial["rouge_l"] == pytest.approx(100 * 2 * (5 / 6) * (5 / 7) / (5 / 6 + 5 / 7))
    # BLEU-n falls as n grows on a partial match
    english = generation_metrics(["the patient has a mild fever today"], ["the patient has a high fever today"])
    assert english["bleu_1"] > english["bleu_2"] > english["bleu_3"] > english["bleu_4"] > 0


@pytest.mark.slow
def test_evaluate_model_compares_models_and_reward_model(tiny_model_dir, tmp_path):
    import evaluate_model
    import reward_modeling

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q{i}", "chosen": "Call 120 now.", "rejected": "Wait."}
                                                   for i in range(4)])
    reward_modeling.main(["--model_name_or_path", str(tiny_model_dir), "--train_files", str(pairs),
                          "--output_dir", str(tmp_path / "rm"), "--max_steps", "1", "--validation_split_percentage", "0",
                          "--save_strategy", "no", "--report_to", "none", "--per_device_train_batch_size", "2"])
    qa = write_jsonl(tmp_path / "qa.jsonl", sft_records(4))
    text = tmp_path / "text.txt"
    text.write_text("Hypertension is persistently raised blood pressure.\n高血压是常见的慢性病。\n", encoding="utf-8")
    mcq = write_jsonl(tmp_path / "mcq.jsonl", [
        {"question": "First-line drug for type 2 diabetes?", "options": {"A": "Insulin", "B": "Metformin"}, "answer": "B"},
        {"question": "Which TWO?", "options": {"A": "x", "B": "y", "C": "z"}, "answer": "AC"},
        {"question": "缺铁最常见的贫血类型？", "answer": "缺铁性贫血"}])
    results = evaluate_model.main([
        "--models", f"a={tiny_model_dir}", f"b={tiny_model_dir}", "--reward_models", f"rm={tmp_path / 'rm'}",
        "--qa_files", str(qa), "--text_files", str(text), "--mcq_files", str(mcq), "--preference_files", str(pairs),
        "--max_new_tokens", "4", "--output_dir", str(tmp_path / "eval")])
    assert results["a"] == results["b"]  # same model, same greedy answers, same numbers
    for key in ("bleu_1", "bleu_4", "rouge_l", "answer_loss", "perplexity", "mcq_choice_accuracy", "mcq_open_accuracy",
                "mcq_loglik_accuracy"):
        assert key in results["a"], key
    assert results["a"]["qa_n"] == 4 and results["a"]["mcq_loglik_n"] == 1
    assert results["a"]["mcq_loglik_skipped_multi_answer"] == 2 and results["a"]["perplexity"] > 1
    assert results["rm"]["pairs"] == 4 and 0 <= results["rm"]["reward_accuracy"] <= 1
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "| a |" in table and "BLEU-4" in table and "answer loss" in table and "RM pair acc" in table
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["b"]["qa_n"] == 4
    # --generation_models: the others get the likelihood measures only, the same numbers
    only = evaluate_model.main([
        "--models", f"a={tiny_model_dir}", f"b={tiny_model_dir}", "--generation_models", "a", "--qa_files", str(qa),
        "--mcq_files", str(mcq), "--max_new_tokens", "4", "--output_dir", str(tmp_path / "eval2")])
    assert "bleu_1" in only["a"] and "bleu_1" not in only["b"] and "mcq_choice_accuracy" not in only["b"]
    for key in ("answer_loss", "mcq_loglik_accuracy"):
        assert only["b"][key] == only["a"][key] == results["a"][key], key
    with pytest.raises(SystemExit, match="--generation_models c: not among the --models names"):
        evaluate_model.main(["--models", f"a={tiny_model_dir}", "--generation_models", "c", "--qa_files", str(qa)])


def test_answer_loss_is_the_sft_loss_of_the_reference_answers(tiny_model_dir):
    """The held-out answer loss equals the model's own token-mean loss over SFT labels (prompt masked), in any
    batch size: the figure that says what SFT learned, comparable between the base and the SFT model."""
    import torch

    from medgpt.args import ModelArguments
    from medgpt.evaluation import answer_loss
    from medgpt.generation import ChatModel
    from medgpt.modeling import load_model, load_template, load_tokenizer
    from medgpt.tokenization import tokenize_for_sft

    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir))
    tokenizer = load_tokenizer(model_args)
    chat = ChatModel(load_model(model_args, training=False).eval(), tokenizer, load_template(model_args, tokenizer))
    items = [{"messages": [{"role": "user", "content": f"Question {i}: when is chest pain an emergency?"}],
              "reference": "Call emergency services at once if it is crushing or spreads to the arm." * (1 + i % 2)}
             for i in range(5)]
    total, count = 0.0, 0
    for item in items:
        tokens = tokenize_for_sft(chat.template, tokenizer, item["messages"] + [
            {"role": "assistant", "content": item["reference"]}], 1024, "truncate")
        labels = torch.tensor([tokens["labels"]])
        with torch.no_grad():
            loss = chat.model(input_ids=torch.tensor([tokens["input_ids"]]), labels=labels).loss.item()
        answered = int((labels[0, 1:] != -100).sum())
        total, count = total + loss * answered, count + answered
    one, batched = answer_loss(chat, items, batch_size=1), answer_loss(chat, items, batch_size=4)
    assert one["answer_tokens"] == batched["answer_tokens"] == count
    assert abs(one["answer_loss"] - total / count) < 1e-4 and abs(batched["answer_loss"] - total / count) < 1e-4


def test_pipeline_stops_with_the_failing_stage_named(tmp_path):
    result = subprocess.run([sys.executable, "run_pipeline.py", "--output_dir", str(tmp_path), "--stages", "pt-merge"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "stage 'pt-merge' failed" in result.stderr and str(tmp_path / "logs" / "pt-merge.log") in result.stderr


def test_pipeline_skips_completed_stages(tmp_path):
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "metrics.json").write_text("{}")
    result = subprocess.run([sys.executable, "run_pipeline.py", "--output_dir", str(tmp_path), "--stages", "pt"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "pt: complete" in result.stdout and "skipped" in result.stdout
    assert (tmp_path / "report.md").is_file()


def test_pipeline_rag_stage_measures_retrieval_into_the_report(tmp_path):
    result = subprocess.run([sys.executable, "run_pipeline.py", "--output_dir", str(tmp_path), "--stages", "rag"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    retrieval = json.loads((tmp_path / "rag" / "retrieval.json").read_text())
    assert retrieval["hit@3"] >= 0.75
    assert "## Knowledge-base retrieval" in (tmp_path / "report.md").read_text()


def test_smoothed_curve_is_a_bias_corrected_moving_average(tmp_path):
    from medgpt.training import plot_loss, smoothed

    assert all(abs(value - 2.0) < 1e-12 for value in smoothed([2.0, 2.0, 2.0]))  # no pull toward zero at the start
    first, second = smoothed([1.0, 0.0], weight=0.5)
    assert first == 1.0 and abs(second - 1 / 3) < 1e-12
    noisy = [3.0 - 0.05 * step + (0.4 if step % 2 else -0.4) for step in range(40)]
    trend = smoothed(noisy)
    assert max(abs(a - b) for a, b in zip(trend[10:], trend[11:])) < 0.2 < max(abs(a - b) for a, b in zip(noisy, noisy[1:]))
    history = [{"step": step, "loss": value} for step, value in enumerate(noisy, start=1)]
    assert plot_loss(history, tmp_path / "loss.png").stat().st_size > 0
    # the report's curve column: a last step above the first, while the trend falls, says both
    sys.path.insert(0, str(ROOT))
    from run_pipeline import first_last

    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history[:-1] + [{"loss": 3.1}]}))
    text = first_last(tmp_path, "loss")
    head, trend = text.split(" (smoothed ")
    assert head == "2.600 -> 3.100"
    start, end = (float(value) for value in trend.rstrip(")").split(" -> "))
    assert start == 2.6 and end < 2.2


def test_perplexity_is_the_exponent_of_the_models_own_loss(tiny_model_dir):
    """Perplexity over documents of different lengths, in any batch size, equals exp of the model's own token-mean
    loss over each document followed by EOS (padding excluded)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medgpt.evaluation import perplexity

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    texts = ["Sepsis needs antibiotics within the first hour.", "Stroke: call emergency services. " * 7, "Fever."]
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]])
        with torch.no_grad():
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    for batch_size in (1, 2, 3):
        result = perplexity(model, tokenizer, texts, batch_size=batch_size)
        assert result["tokens"] == count
        assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_pipeline_resumes_a_resumable_stage_and_restarts_the_others(tmp_path):
    """An incomplete earlier attempt of a stage: kept for a resumable stage (SFT resumes from its newest
    checkpoint), removed for the others and under --force (fresh)."""
    sys.path.insert(0, str(ROOT))
    from run_pipeline import Stage, run_stage

    script = tmp_path / "stage.py"
    script.write_text("import sys, pathlib\nout = pathlib.Path(sys.argv[sys.argv.index('--output_dir') + 1])\n"
                      "print('found' if (out / 'checkpoint-20').is_dir() else 'fresh')\n"
                      "out.mkdir(parents=True, exist_ok=True)\n", encoding="utf-8")
    out = tmp_path / "out"
    for resumable, fresh, expected in ((True, False, "found"), (True, True, "fresh"), (False, False, "fresh")):
        (out / "sft" / "checkpoint-20").mkdir(parents=True, exist_ok=True)  # what a crash left
        run_stage(Stage("sft", str(script), [], "sft", resumable=resumable), out, 1, 1, fresh=fresh)
        assert (out / "logs" / "sft.log").read_text().strip() == expected, (resumable, fresh)
