"""Model loading: the embedded GGUF becomes safetensors with identical logits, random test models are built locally,
and only safetensors and trusted model code are ever loaded."""

from __future__ import annotations

import json
import re
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


def test_a_random_model_over_a_cut_tokenizer_keeps_the_chat_template_and_every_text(cache_dir: Path) -> None:
    """`random_init.tokenizer_size`: the embedded tokenizer's first N ids (specials, bytes, first merges)."""
    cfg = ModelConfig(name="cut_300", source="random", random_init={
        "model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "tokenizer_size": 300})
    full, cut = load_tokenizer(ModelConfig(), cache_dir), load_tokenizer(cfg, cache_dir)
    model = load_model(cfg, cache_dir)
    assert len(cut) == model.config.vocab_size == 300
    text = "Über café: a stateful firewall tracks TCP ✓"
    ids = cut(text)["input_ids"]
    assert cut.decode(ids) == text and max(ids) < 300
    assert len(ids) > len(full(text)["input_ids"])  # fewer merges, more tokens
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert cut.apply_chat_template(messages, tokenize=False) == full.apply_chat_template(messages, tokenize=False)
    assert cut.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == full.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    with pytest.raises(ConfigError, match="tokenizer_size"):
        resolve_model_dir(ModelConfig(name="cut_bad", source="random", random_init={"model_type": "llama",
                          "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "tokenizer_size": 60000}), cache_dir)


def test_missing_local_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_dir(ModelConfig(source="hub", path=str(tmp_path / "nope")), tmp_path)


def test_trust_remote_code_only_for_the_families_that_need_it() -> None:
    from conftest import CONF, compose_config

    names = sorted(path.stem for path in (CONF / "model").glob("*.yaml"))
    assert {"smollm2_135m", "tiny_random", "llama2_7b", "mistral_7b", "baichuan2_7b", "qwen_7b"} <= set(names)
    trusted = {name for name in names if compose_config([f"model={name}"]).model.trust_remote_code}
    assert trusted == {"baichuan2_7b", "qwen_7b"}
    assert ModelConfig().trust_remote_code is False


class _Tripwire:
    """Unpickling this creates `marker`: proof that a loader ran pickle on the weights."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_pickle_only_model_is_refused_before_anything_is_unpickled(tmp_path: Path) -> None:
    import pickle

    from transformers import AutoModelForCausalLM, LlamaConfig

    from unifit.stage import UserError

    directory, marker = tmp_path / "pickled", tmp_path / "unpickled"
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64).save_pretrained(directory)
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Tripwire(marker)}))
    with pytest.raises(UserError, match=rf"model\.path: {re.escape(str(directory))} has only pickle weights \(pytorch_model\.bin\); "
                                        r"unifit loads safetensors only .* set model\.path=new_dir"):
        load_model(ModelConfig(name="pickled", source="hub", path=str(directory)), tmp_path)
    with pytest.raises(OSError, match="model.safetensors"):  # and transformers itself, as load_model calls it, never falls back
        AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True)
    assert not marker.exists()


def test_model_code_runs_only_when_the_config_trusts_it(tmp_path: Path) -> None:
    from unifit.stage import UserError

    directory, marker = tmp_path / "custom", tmp_path / "code_ran"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({
        "model_type": "custom_lm", "architectures": ["CustomLM"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomLM"}}))
    code = f"open({str(marker)!r}, 'w').close()\nfrom transformers import PretrainedConfig\n"
    (directory / "configuration_custom.py").write_text(code + "class CustomConfig(PretrainedConfig):\n    model_type = 'custom_lm'\n")
    (directory / "modeling_custom.py").write_text(code)
    (directory / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"ships its own model code, which unifit runs only with model\.trust_remote_code=true"):
        load_model(ModelConfig(name="custom", source="hub", path=str(directory)), tmp_path)
    assert not marker.exists()


def test_scoring_actors_get_the_model_configs_trust_remote_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Baichuan2/Qwen-7B scoring models keep their remote code: the score stage must pass the setting to its actors."""
    import unifit.raycluster
    import unifit.selection.score
    from unifit.config import UnifitConfig
    from unifit.records import Instance, write_instances
    from unifit.selection.stage import run_score
    from unifit.stage import StageContext

    class Recorded(Exception):
        """Stops the stage once it has called the scorer: what the actors would be built with is all this test needs."""

    built: dict = {}

    def record(*args: object, **kwargs: object) -> None:
        built.update(kwargs)
        raise Recorded

    monkeypatch.setattr(unifit.selection.score, "score_sharded", record)
    monkeypatch.setattr(unifit.raycluster, "ensure_ray", lambda cluster: None)
    messages = [{"role": "user", "content": "What is DNS?"}, {"role": "assistant", "content": "A naming system."}]
    write_instances([Instance(messages, "leaf", ["cyber", "leaf"], "imported", "t")], tmp_path / "generate" / "instances" / "a.parquet")
    (tmp_path / "train_scorer" / "model").mkdir(parents=True)
    (tmp_path / "train_scorer" / "model" / "config.json").write_text("{}")
    for trusted in (True, False):
        model = ModelConfig(name="remote", source="random", random_init={"model_type": "llama"}, trust_remote_code=trusted)
        with pytest.raises(Recorded):
            run_score(StageContext(UnifitConfig(model=model), tmp_path, "score"))
        assert built["trust_remote_code"] is trusted
        with pytest.raises(Recorded):  # a separate scorer's setting, not the base model's
            run_score(StageContext(UnifitConfig(scorer=model), tmp_path, "score"))
        assert built["trust_remote_code"] is trusted
