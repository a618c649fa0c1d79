"""The embedded GGUF becomes a plain safetensors model with identical logits; random test models are built locally."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unifit.config import ConfigError, ModelConfig
from unifit.models import embedded_gguf_dir, load_model, load_tokenizer, resolve_model_dir


def test_embedded_model_converts_once_with_identical_logits(cache_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig()
    directory = Path(resolve_model_dir(cfg, cache_dir))
    assert (directory / "model.safetensors").exists() and not list(directory.glob("*.bin"))
    tokenizer = load_tokenizer(cfg, cache_dir)
    assert "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer("DNSSEC signs DNS records.", return_tensors="pt")["input_ids"]
    converted = load_model(cfg, cache_dir).eval()
    original = AutoModelForCausalLM.from_pretrained(embedded_gguf_dir(), gguf_file=cfg.gguf_file).eval()
    with torch.inference_mode():
        assert torch.equal(converted(ids).logits, original(ids).logits)
    assert resolve_model_dir(cfg, cache_dir) == directory  # second call reuses the conversion


def test_random_models_are_built_from_config(cache_dir: Path) -> None:
    from conftest import tiny_model_config

    for model_type in ("llama", "mistral", "qwen2"):
        model = load_model(tiny_model_config(model_type), cache_dir)
        assert model.config.model_type == model_type
        assert model.config.vocab_size == len(load_tokenizer(tiny_model_config(model_type), cache_dir))


def test_missing_local_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_dir(ModelConfig(source="hub", path=str(tmp_path / "nope")), tmp_path)
