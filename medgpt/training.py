"""Trainer glue every stage shares: logging, the resolved config, resuming, saving, the loss plot."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from medgpt.chat_template import SETTINGS_FILE, split_stop_words

logger = logging.getLogger("medgpt")

CONFIG_FILE = "medgpt_config.yaml"
METRICS_FILE = "metrics.json"
PLOT_FILE = "loss.png"


def start_run(training_args, resolved: dict) -> None:
    """What every stage does first: logging, the resolved config on screen and on disk, the seed.

    The seed is set before the model is built so LoRA's random initialisation repeats too.
    """
    from transformers import set_seed

    setup_logging(training_args)
    record_config(resolved, training_args.output_dir, training_args.process_index == 0)
    set_seed(training_args.seed)
    # --deepspeed ds.json, or `accelerate launch --use_deepspeed` (which leaves --deepspeed unset)
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if plugin is not None:
        logger.info("DeepSpeed ZeRO stage %s", plugin.zero_stage)
        _init_deepspeed_comm()


def _init_deepspeed_comm() -> None:
    """Make DeepSpeed's communication layer use the process group torchrun/accelerate created.

    On GPUs accelerate does this; on CPU (use_cpu) it does not, and ZeRO-3's model initialisation
    would then see a world size of 1 and reject the batch configuration.
    """
    import deepspeed
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized() and not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


def evaluate_before_training(trainer) -> dict | None:
    """``trainer.evaluate()`` on the untrained model, or None under DeepSpeed, where the Trainer cannot
    evaluate before training: ZeRO-1/2 refuse ("ZeRO inference only makes sense with ZeRO Stage 3"),
    and under ZeRO-3 the inference engine it builds is kept, so train() then has no optimizer to step."""
    if trainer.is_deepspeed_enabled:
        logger.warning("DeepSpeed: no evaluation before training (the Trainer cannot evaluate before train() "
                       "under DeepSpeed); the *_before metrics are left out.")
        return None
    return trainer.evaluate()


def setup_logging(training_args) -> None:
    """INFO on the main process, warnings only on the others."""
    import datasets
    import transformers

    level = logging.INFO if training_args.process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level)
    logging.getLogger().setLevel(level)
    transformers.utils.logging.set_verbosity(max(level, logging.WARNING))  # keep config dumps out of the log
    datasets.utils.logging.set_verbosity(logging.WARNING)


def record_config(resolved: dict, output_dir: str, is_main: bool) -> None:
    """Print the resolved config and save it next to the outputs."""
    if not is_main:
        return
    text = yaml.safe_dump(resolved, sort_keys=True, allow_unicode=True)
    logger.info("Resolved configuration:\n%s", text)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / CONFIG_FILE).write_text(text, encoding="utf-8")


def resolve_resume(training_args) -> str | None:
    """``--resume_from_checkpoint`` as a path; ``auto``/``true`` means the newest complete checkpoint in
    output_dir (one cut short while it was written, e.g. a truncated file, is skipped with a warning)."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() in ("auto", "true"):
        last = newest_complete_checkpoint(training_args.output_dir)
        if last is None and str(value).lower() == "true":
            raise SystemExit(
                f"--resume_from_checkpoint true: no complete checkpoint-* folder in {training_args.output_dir}. "
                "Pass a checkpoint folder, or 'auto' to start fresh when there is none."
            )
        if last:
            logger.info("Resuming from %s", last)
        return last
    problem = checkpoint_problem(Path(value))
    if problem:
        raise SystemExit(f"--resume_from_checkpoint {value}: {problem}. Pass another checkpoint folder "
                         "(or 'auto': the newest complete one).")
    return value


def newest_complete_checkpoint(output_dir: str) -> str | None:
    """The checkpoint-N folder with the highest N whose files are all whole; None when there is none."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = [path for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if path.is_dir() and path.name.rsplit("-", 1)[1].isdigit()]
    for path in sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("Skipping checkpoint %s: %s (its save was cut short?). Resuming from an earlier one; delete "
                       "that folder once you have checked it.", path, problem)
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (missing state, a truncated weights or optimizer
    file), or None. Reads only file headers and zip directories, not the tensors."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    if not (path / "trainer_state.json").is_file():
        return "not a checkpoint folder (no trainer_state.json)"
    for file in sorted(path.rglob("*")):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt"):
                    pass
            elif file.suffix in (".pt", ".pth", ".bin") and file.is_file():
                with file.open("rb") as handle:
                    zipped = handle.read(2) == b"PK"  # torch.save's format since torch 1.6
                if zipped:
                    zipfile.ZipFile(file).close()  # a cut-off file has no zip directory at its end
        except (SafetensorError, zipfile.BadZipFile, OSError) as error:
            return f"{file.relative_to(path)} is damaged ({error})"
    return None


def final_eval_metrics(trainer, perplexity: bool = True) -> dict:
    """Evaluation metrics at the last step: reused when the loop just evaluated there, else computed.
    With ``perplexity``, exp(eval_loss) is added (meaningful for language-model losses only)."""
    import math

    logged = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if logged and logged[-1].get("step") == trainer.state.global_step:
        metrics = {key: value for key, value in logged[-1].items() if key.startswith("eval_")}
    else:
        metrics = trainer.evaluate()
    if perplexity:
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    return metrics


def save_model(trainer, tokenizer, template, output_dir: str, merge_adapter: bool = False) -> None:
    """Model or adapter, tokenizer with the chat template it was trained with, trainer state.

    Every stage calls this as soon as ``trainer.train()`` returns, before any evaluation or report:
    nothing that happens after training (a failing metric, evaluation, plot) can cost the trained model.
    ``merge_adapter`` saves a LoRA run as a complete model (adapter merged), for stages whose
    output is loaded as a whole model by the next one (the reward model).
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if merge_adapter and hasattr(model, "merge_and_unload") and not quantized and not trainer.is_deepspeed_enabled:
        if trainer.is_world_process_zero():
            model.merge_and_unload().save_pretrained(output_dir)
    else:
        if merge_adapter and hasattr(model, "merge_and_unload"):
            logger.warning("Saved a LoRA adapter (4/8-bit or DeepSpeed run); merge it with merge_peft_adapter.py "
                           "before loading the folder as a whole model.")
        initial = getattr(model, "medgpt_initial_adapter", None)
        if initial and trainer.is_world_process_zero():  # PiSSA/OLoRA: saved as a plain LoRA of the original base
            model.save_pretrained(output_dir, path_initial_model_for_weight_conversion=initial)
        elif not initial:
            trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        if template.jinja and template.jinja != tokenizer.chat_template:
            tokenizer.chat_template = template.jinja  # later stages, inference and vLLM render the same way
        tokenizer.save_pretrained(output_dir)
        save_template_settings(template, output_dir)
        turn_end = turn_end_generation_config(model, tokenizer, template)
        if turn_end is not None:  # also next to an adapter: merge_peft_adapter.py and vllm_deployment.sh use it
            turn_end.save_pretrained(output_dir)
        trainer.save_state()
        logger.info("Saved the trained model and tokenizer to %s", output_dir)
    trainer.accelerator.wait_for_everyone()


def finish_run(trainer, metrics: dict, output_dir: str, plot_keys: tuple[str, ...] = ("loss", "eval_loss")) -> None:
    """The report after save_model: final metrics in the log, the loss plot, metrics.json.

    A metric without a value (e.g. a reward that no question exercised) is logged as such; a plot that
    fails is a warning. metrics.json is written last: a folder without it is an interrupted run (the
    pipeline and the run_*.sh scripts treat it so); resume such a run with --resume_from_checkpoint auto.
    """
    if trainer.is_world_process_zero():
        logger.info("Final metrics:\n%s", "\n".join(f"  {key} = {_shown(value)}" for key, value in metrics.items()))
        trainer.save_state()  # again: with the evaluation that followed training
        try:
            plot = plot_loss(trainer.state.log_history, Path(output_dir) / PLOT_FILE, plot_keys)
        except Exception as error:  # noqa: BLE001 - a plot is never worth a failed run
            logger.warning("No loss plot: %s", error)
            plot = None
        (Path(output_dir) / METRICS_FILE).write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")  # last
        logger.info("Saved %s and %s to %s", METRICS_FILE, plot.name if plot else "no plot", output_dir)
    trainer.accelerator.wait_for_everyone()


def _shown(value) -> str:
    if value is None:
        return "- (no value)"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def save_template_settings(template, output_dir: str) -> None:
    """--enable_thinking / --tool_format beside the saved chat template, so later stages and servers render
    conversations exactly as this stage did without repeating the flags."""
    settings = {key: value for key, value in template.settings.items() if value is not None}
    path = Path(output_dir) / SETTINGS_FILE
    if settings:
        path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    elif path.exists():
        path.unlink()


def turn_end_generation_config(model, tokenizer, template):
    """The model's generation config with the template's end-of-turn token(s) added to ``eos_token_id``.

    A base model trained with a named template (e.g. Qwen base with ChatML) ends its turns with a
    token that is not its EOS; without this, `generate()` and vLLM would run past the answer.
    None for models without a generation config (reward models)."""
    config = getattr(model, "generation_config", None)
    if config is None or not getattr(model, "can_generate", lambda: False)():
        return None
    import copy

    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    stops, _ = split_stop_words(template, tokenizer)
    config = copy.deepcopy(config)
    config.eos_token_id = list(dict.fromkeys(i for i in [*eos, *stops, tokenizer.eos_token_id] if i is not None))
    return config


SMOOTHED_FROM = 8  # a curve of at least this many points is drawn (and reported) with its smoothed trend


def smoothed(values, weight: float = 0.8) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled toward zero (the
    smoothing TensorBoard shows): a noisy per-step loss curve shows its trend."""
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**count))
    return out


def plot_loss(log_history: list[dict], path: Path, keys: tuple[str, ...] = ("loss", "eval_loss")) -> Path | None:
    """Plot the logged curves named by ``keys`` against the step; None if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {key: [(e["step"], e[key]) for e in log_history if key in e and "step" in e] for key in keys}
    series = {key: points for key, points in series.items() if points}
    if not series:
        logger.warning("No %s values were logged; no plot written (lower --logging_steps).", "/".join(keys))
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    for key, points in series.items():
        steps, values = zip(*points)
        if len(points) < SMOOTHED_FROM:
            axis.plot(steps, values, marker="o", label=key)
            continue
        line, = axis.plot(steps, values, alpha=0.35, label=f"{key} (per step)")
        axis.plot(steps, smoothed(values), color=line.get_color(), label=f"{key} (smoothed)")
    axis.set_xlabel("step")
    axis.set_ylabel("value")
    axis.set_title(path.parent.name)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
