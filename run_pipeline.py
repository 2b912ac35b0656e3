"""The whole pipeline on the embedded default model and the shipped data, then a report.

    python run_pipeline.py                 # PT -> SFT -> RM -> DPO -> PPO -> GRPO, evaluation, report
    python run_pipeline.py --force         # rerun every stage, even completed ones
    python run_pipeline.py --stages pt,sft # only some stages (their inputs must exist)
    python run_pipeline.py --with_opd      # also distill the SFT model into a half-depth student (+ ~10 min)

Each stage runs its own script with its configs/*.yaml plus the short CPU settings below, so the
whole run takes about 18 minutes on 2 CPU cores, half of them SFT: one full epoch of the shipped
conversations (checkpointed: an interrupted SFT resumes on a rerun). LoRA stages are merged before the next stage
builds on them (PT -> pt-merged -> SFT -> sft-merged -> RM, DPO, PPO, GRPO). A stage whose output is
complete (metrics.json written last) is skipped on a rerun; a failing stage stops the pipeline
with its name and log. The base model and every stage's model are evaluated on the held-out
splits, knowledge-base retrieval is measured on data/rag/questions.jsonl, and
outputs/pipeline/report.md gathers the losses, metrics and plots.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from medgpt.allocator import launch_env

ROOT = Path(__file__).resolve().parent


@dataclass
class Stage:
    name: str
    script: str
    args: list[str]
    output: str  # folder name under --output_dir
    done_file: str = "metrics.json"  # written last by every stage
    output_flag: str | None = "--output_dir"  # how the script is told its folder (None: its args already say)
    resumable: bool = False  # saves checkpoints: a rerun after a crash resumes from the newest (--force: afresh)


def stages(out: Path) -> list[Stage]:
    """The pipeline: each stage's script, its config and the short CPU settings."""
    common = ["--save_strategy", "no", "--report_to", "none"]
    sft_merged = str(out / "sft-merged")
    return [
        Stage("pt", "pretraining.py", ["--config", "configs/pt.yaml", "--max_steps", "8", *common], "pt"),
        Stage("pt-merge", "merge_peft_adapter.py", ["--lora_model", str(out / "pt")], "pt-merged", "config.json"),
        # One full epoch of the shipped conversations (205 packed rows of 1024 tokens, 103 steps of 2 rows in one
        # forward: 11% faster than 1 x 2 accumulated); no LoRA dropout: one pass over the data does not overfit, and
        # on a CPU dropout is a fifth of the step.
        Stage("sft", "supervised_finetuning.py", [
            "--config", "configs/sft.yaml", "--model_name_or_path", str(out / "pt-merged"), "--max_steps", "-1",
            "--num_train_epochs", "1", "--lora_dropout", "0", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--eval_strategy", "no", "--max_eval_samples", "16",
            "--save_strategy", "steps", "--save_steps", "20", "--save_total_limit", "1",
            "--resume_from_checkpoint", "auto", "--report_to", "none"], "sft", resumable=True),
        Stage("sft-merge", "merge_peft_adapter.py", [
            "--base_model", str(out / "pt-merged"), "--lora_model", str(out / "sft")], "sft-merged", "config.json"),
        Stage("rm", "reward_modeling.py", [
            "--config", "configs/rm.yaml", "--model_name_or_path", sft_merged, "--max_steps", "12",
            "--max_eval_samples", "24", *common], "rm"),
        Stage("dpo", "dpo_training.py", [
            "--config", "configs/dpo.yaml", "--model_name_or_path", sft_merged, "--max_steps", "6",
            "--max_eval_samples", "12", *common], "dpo"),
        Stage("ppo", "ppo_training.py", [
            "--config", "configs/ppo.yaml", "--model_name_or_path", sft_merged, "--reward_model_path", str(out / "rm"),
            "--total_episodes", "8", "--response_length", "48", *common], "ppo"),
        Stage("grpo", "grpo_training.py", [
            "--config", "configs/grpo.yaml", "--model_name_or_path", sft_merged, "--max_steps", "4",
            "--max_eval_samples", "12", "--eval_max_new_tokens", "64", "--max_completion_length", "64", *common],
            "grpo"),
    ]


def distillation_stages(out: Path) -> list[Stage]:
    """Optional: the SFT model as teacher, a student of half its blocks, on-policy distillation."""
    common = ["--save_strategy", "no", "--report_to", "none"]
    return [
        Stage("student", "-m", ["medgpt.student", "--model_name_or_path", str(out / "sft-merged"), "--num_layers",
                                "15"], "student", "config.json"),
        Stage("opd", "opd_training.py", [
            "--config", "configs/opd.yaml", "--model_name_or_path", str(out / "student"),
            "--teacher_model_name_or_path", str(out / "sft-merged"), "--max_steps", "8", "--max_eval_samples", "12",
            *common], "opd"),
    ]


def complete(stage: Stage, out: Path) -> bool:
    return (out / stage.output / stage.done_file).is_file()


def run_stage(stage: Stage, out: Path, index: int, total: int, fresh: bool = False) -> float:
    """Run one stage as a subprocess, echoing and logging its output; stop the pipeline if it fails. An earlier
    incomplete attempt is removed first, unless the stage is resumable (and ``fresh`` is not asked for)."""
    folder = out / stage.output
    args = [*stage.args, *([stage.output_flag, str(folder)] if stage.output_flag else [])]
    log_path = out / "logs" / f"{stage.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n== [{index}/{total}] {stage.name}: python {stage.script} {' '.join(args)}", flush=True)
    if fresh or not stage.resumable:
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete earlier attempt
    started = time.time()
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen([sys.executable, stage.script, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1, env=launch_env())
        for line in process.stdout:
            log.write(line)
            sys.stdout.write(line)
        code = process.wait()
    if code != 0:
        raise SystemExit(f"\nPipeline stopped: stage '{stage.name}' failed (exit code {code}). "
                         f"Its log: {log_path}. Fix the cause and rerun; completed stages are skipped.")
    return time.time() - started


def first_last(output: Path, key: str) -> str:
    from medgpt.training import SMOOTHED_FROM, smoothed

    state = output / "trainer_state.json"
    if not state.is_file():
        return "-"
    values = [entry[key] for entry in json.loads(state.read_text())["log_history"] if key in entry]
    if not values:
        return "-"
    text = f"{values[0]:.3f} -> {values[-1]:.3f}"
    if len(values) >= SMOOTHED_FROM:  # a long per-step curve is noisy: its trend too, as the plot draws it
        trend = smoothed(values)
        text += f" (smoothed {trend[0]:.3f} -> {trend[-1]:.3f})"
    return text


def stage_summary(out: Path) -> list[tuple[str, str, str]]:
    """(stage, training curve first -> last, held-out metric) rows for the report."""
    def metrics(name):
        path = out / name / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    pt, sft, rm, dpo, ppo, grpo, opd = (metrics(n) for n in ("pt", "sft", "rm", "dpo", "ppo", "grpo", "opd"))
    fmt = lambda value: f"{value:.3f}" if isinstance(value, (int, float)) else "-"  # noqa: E731
    evaluated = out / "eval" / "results.json"
    answers = {name: result.get("answer_loss") for name, result in json.loads(evaluated.read_text()).items()} \
        if evaluated.is_file() else {}
    return [
        ("PT", "loss " + first_last(out / "pt", "loss"),
         f"validation perplexity {fmt(pt.get('eval_perplexity_before'))} -> {fmt(pt.get('eval_perplexity'))}"),
        ("SFT", "loss " + first_last(out / "sft", "loss"),
         f"held-out answer loss {fmt(answers.get('base'))} (base) -> {fmt(answers.get('sft'))} (SFT); "
         f"validation loss {fmt(sft.get('eval_loss'))}, perplexity {fmt(sft.get('eval_perplexity'))}"),
        ("RM", "loss " + first_last(out / "rm", "loss"),
         f"pair accuracy {fmt(rm.get('eval_accuracy_before'))} -> {fmt(rm.get('eval_accuracy'))}, "
         f"margin {fmt(rm.get('eval_margin_before'))} -> {fmt(rm.get('eval_margin'))}"),
        ("DPO", "loss " + first_last(out / "dpo", "loss"),
         f"reward accuracy {fmt(dpo.get('eval_rewards/accuracies'))}, margin {fmt(dpo.get('eval_rewards/margins'))}"),
        ("PPO", "reward " + first_last(out / "ppo", "objective/scores"),
         f"KL {fmt(ppo.get('objective/kl_first'))} -> {fmt(ppo.get('objective/kl_last'))}"),
        ("GRPO", "reward " + first_last(out / "grpo", "reward"),
         f"held-out accuracy {fmt(grpo.get('eval_accuracy_before'))} -> {fmt(grpo.get('eval_accuracy'))}"),
    ] + ([("OPD (student of half the blocks)", "loss " + first_last(out / "opd", "loss"),
           f"divergence to the teacher {fmt(opd.get('eval_divergence_before'))} -> {fmt(opd.get('eval_divergence'))}, "
           f"answer loss {fmt(opd.get('eval_answer_loss_before'))} -> {fmt(opd.get('eval_answer_loss'))}")]
         if opd else [])


def write_report(out: Path, durations: dict[str, float]) -> Path:
    lines = ["# MedGPT pipeline report", "",
             "The embedded SmolLM2-135M-Instruct through every stage on the shipped data, with the short CPU "
             "settings of run_pipeline.py. A demo of the machinery, not a useful medical model: "
             "answers are not medical advice.", "",
             "| stage | training curve (first -> last) | held-out |", "|---|---|---|"]
    lines += [f"| {stage} | {curve} | {held} |" for stage, curve, held in stage_summary(out)]
    evaluation = out / "eval" / "results.md"
    if evaluation.is_file():
        lines += ["", "## Held-out evaluation", "", evaluation.read_text(encoding="utf-8")]
    benchmarks = out / "bench" / "benchmarks.md"
    if benchmarks.is_file():
        lines += ["", "## Standard benchmarks (the shipped samples: a few project-written items per format)", "",
                  benchmarks.read_text(encoding="utf-8")]
    retrieval = out / "rag" / "retrieval.json"
    if retrieval.is_file():
        found = json.loads(retrieval.read_text(encoding="utf-8"))
        keys = [k for k in found if k.startswith("hit@")] + ["answerable_kept", "unanswerable_refused"]
        lines += ["", "## Knowledge-base retrieval (chatpdf.py, BM25)", "",
                  f"{found['answerable']} answerable and {found['unanswerable']} unanswerable questions "
                  "(data/rag/questions.jsonl).", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                  "| " + " | ".join(f"{found[k]:.2f}" for k in keys) + " |"]
    lines += ["", "## Stage times", ""] + [f"- {name}: {seconds / 60:.1f} min" for name, seconds in durations.items()]
    plots = [(name, out / name / "loss.png") for name in ("pt", "sft", "rm", "dpo", "ppo", "grpo")]
    lines += ["", "## Curves", ""] + [f"![{name}]({name}/loss.png)" for name, path in plots if path.is_file()]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def inference_dtype() -> str:
    """bf16 evaluation where the CPU computes it natively (about 2x faster than float32); on GPUs auto is bf16."""
    from medgpt.args import cpu_supports_bf16

    return "bfloat16" if cpu_supports_bf16() else "auto"


def evaluation_stage(out: Path, max_samples: int) -> Stage:
    merged = str(out / "sft-merged")
    models = ["base=DEFAULT", f"pt={out / 'pt-merged'}", f"sft={merged}", f"dpo={merged}+{out / 'dpo'}",
              f"ppo={merged}+{out / 'ppo'}", f"grpo={merged}+{out / 'grpo'}"]
    return Stage("eval", "evaluate_model.py", [
        "--models", *models, "--reward_models", f"rm={out / 'rm'}", "--qa_files", "data/sft/eval",
        "--text_files", "data/pretrain/eval", "--mcq_files", "data/grpo/eval",
        "--preference_files", "data/preference/eval", "--max_samples", str(max_samples), "--max_new_tokens", "64",
        "--generation_models", "base", "sft", "grpo",  # DPO/PPO's few steps: likelihood measures only
        "--torch_dtype", inference_dtype(),
    ], "eval", "results.json")


BENCHMARK_SAMPLES = ["data/benchmarks/medqa/test.jsonl", "data/benchmarks/medmcqa/dev.json",
                     "data/benchmarks/pubmedqa/test_set.json", "data/benchmarks/cmexam/test.csv",
                     "data/benchmarks/cmb/CMB-val-merge.json", "data/benchmarks/ceval/val", "data/benchmarks/cmmlu/test",
                     "data/benchmarks/mmlu/test"]


def benchmark_stage(out: Path) -> Stage:
    """The shipped samples of the standard benchmarks (one per published format), scored by option likelihood
    for the base, SFT and final model: a check that every reader and the scoring run, not a measurement."""
    merged = str(out / "sft-merged")
    return Stage("bench", "evaluate_model.py", [
        "--models", "base=DEFAULT", f"sft={merged}", f"grpo={merged}+{out / 'grpo'}",
        "--benchmark_files", *BENCHMARK_SAMPLES, "--torch_dtype", inference_dtype(),
    ], "bench", "benchmarks.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/pipeline", help="Where every stage's folder goes.")
    parser.add_argument("--force", action="store_true", help="Rerun stages even when their outputs are complete.")
    parser.add_argument("--stages", default=None, help="Comma-separated subset of: pt, pt-merge, sft, sft-merge, rm, "
                        "dpo, ppo, grpo, student, opd (with --with_opd), eval, bench, rag (default: all).")
    parser.add_argument("--eval_samples", type=int, default=16, help="Held-out items per data set in the evaluation.")
    parser.add_argument("--with_opd", action="store_true", help="Also distill the SFT model into a student of half "
                        "its blocks (opd_training.py; about 10 more minutes on 2 CPU cores).")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    rag = Stage("rag", "chatpdf.py", ["--eval_file", "data/rag/questions.jsonl", "--index_dir", str(out / "rag" / "index"),
                                      "--eval_output", str(out / "rag" / "retrieval.json")], "rag", "retrieval.json", None)
    plan = [*stages(out), *(distillation_stages(out) if args.with_opd else []),
            evaluation_stage(out, args.eval_samples), benchmark_stage(out), rag]
    if args.stages is not None:
        wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = set(wanted) - {s.name for s in plan}
        if unknown or not wanted:
            parser.error(f"--stages: unknown {', '.join(sorted(unknown)) or '(none given)'}; valid: {', '.join(s.name for s in plan)}")
        plan = [s for s in plan if s.name in wanted]
    durations = {}
    for index, stage in enumerate(plan, start=1):
        if complete(stage, out) and not args.force:
            print(f"== [{index}/{len(plan)}] {stage.name}: complete in {out / stage.output}, skipped (--force reruns)")
            continue
        durations[stage.name] = run_stage(stage, out, index, len(plan), fresh=args.force)
    report = write_report(out, durations)
    print(f"\nReport: {report}")
    print((out / "report.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
