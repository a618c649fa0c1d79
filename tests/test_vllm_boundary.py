"""vLLM cannot run here (CUDA-only): test the rows we hand to ray.data.llm and read back, and the GPU guard."""

from __future__ import annotations

from pathlib import Path

import pytest

from unifit.config import BackendConfig, UnifitConfig
from unifit.llm.base import GenerationParams
from unifit.llm.vllm import build_vllm_processor, completions_from_rows, engine_kwargs, from_vllm_row, to_vllm_row
from unifit.stage import UserError


def test_rows_match_ray_data_llm_contract() -> None:
    params = GenerationParams(max_new_tokens=32, temperature=0.5, top_p=0.9, repetition_penalty=1.1, seed=4, json_mode=True)
    row = to_vllm_row({"index": 3, "messages": [{"role": "user", "content": "hi"}]}, params)
    assert row["messages"] == [{"role": "user", "content": "hi"}]
    assert row["sampling_params"] == {"max_tokens": 32, "temperature": 0.5, "top_p": 0.9, "repetition_penalty": 1.1,
                                      "seed": 4, "guided_decoding": {"json_object": True}}


def test_output_rows_become_ordered_completions_with_finish_reason() -> None:
    emitted = [  # what ray.data.llm's vLLM stage emits (plus our index), in completion order
        {"index": 1, "generated_text": "cut off", "num_generated_tokens": 16, "__inference_error__": None},
        {"index": 0, "generated_text": "done", "num_generated_tokens": 3, "__inference_error__": None},
        {"index": 2, "generated_text": None, "num_generated_tokens": 0, "__inference_error__": "CUDA OOM"},
    ]
    completions = completions_from_rows([from_vllm_row(r, max_new_tokens=16) for r in emitted], 3)
    assert [(c.text, c.finish_reason) for c in completions] == [("done", "stop"), ("cut off", "length"), ("", "error")]
    with pytest.raises(RuntimeError, match="no row for 1"):
        completions_from_rows([from_vllm_row(emitted[0], 16)], 2)


def test_engines_load_safetensors_only_and_trust_code_only_when_configured() -> None:
    kwargs = engine_kwargs(BackendConfig(name="vllm", tensor_parallel_size=2), max_model_len=4096, trust_remote_code=False)
    assert kwargs["load_format"] == "safetensors" and kwargs["trust_remote_code"] is False
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["max_model_len"] == 4096


def test_processor_builds_without_vllm_installed(tmp_path: Path) -> None:
    pytest.importorskip("ray.data.llm")
    processor = build_vllm_processor(str(tmp_path), BackendConfig(name="vllm", batch_size=4), GenerationParams(), engines=2,
                                     max_model_len=512, trust_remote_code=False)
    assert processor is not None


def test_vllm_refused_up_front_without_gpus(ray_local: None, tiny_model_cfg, cache_dir: Path) -> None:
    from unifit.llm.ray_generate import generate_with_ray

    cfg = UnifitConfig(model=tiny_model_cfg, backend=BackendConfig(name="vllm", cache=False), cache_dir=str(cache_dir))
    with pytest.raises(UserError, match="needs GPUs"):
        generate_with_ray(cfg, [[{"role": "user", "content": "x"}]], GenerationParams())
