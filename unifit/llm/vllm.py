"""vLLM on GPUs through `ray.data.llm` (installed by the `[gpu]` extra; vLLM wheels are CUDA-only).

The processor rows are the boundary with vLLM: `to_vllm_row` builds exactly what ray.data.llm's vLLM
stage consumes (`messages`, `sampling_params` given to `vllm.SamplingParams`), `from_vllm_row` reads what
it emits (`generated_text`, `num_generated_tokens`, `__inference_error__`).
"""

from __future__ import annotations

from typing import Any

from unifit.config import BackendConfig
from unifit.llm.base import Completion, GenerationParams


class NoGPUError(RuntimeError):
    """backend=vllm on a cluster without GPUs: vLLM's stage would wait forever for one."""


def sampling_params(params: GenerationParams) -> dict[str, Any]:
    sampling: dict[str, Any] = {
        "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
        "repetition_penalty": params.repetition_penalty, "seed": params.seed,
    }
    if params.json_mode:
        sampling["guided_decoding"] = {"json_object": True}
    return sampling


def to_vllm_row(row: dict[str, Any], params: GenerationParams) -> dict[str, Any]:
    return {"index": row["index"], "messages": row["messages"], "sampling_params": sampling_params(params)}


def from_vllm_row(row: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """Finish reason is derived from the token count: vLLM stops at max_tokens only when it was cut off."""
    error = row.get("__inference_error__")
    generated = int(row.get("num_generated_tokens") or 0)
    text = "" if error else str(row.get("generated_text") or "")
    reason = "error" if error else ("length" if generated >= max_new_tokens else "stop")
    return {"index": row["index"], "text": text, "finish_reason": reason, "num_output_tokens": generated}


def engine_kwargs(backend: BackendConfig, max_model_len: int, trust_remote_code: bool) -> dict[str, Any]:
    """vLLM engine settings; weights load from safetensors only, like `unifit.models` (no pickle is unpickled)."""
    return {
        "tensor_parallel_size": backend.tensor_parallel_size, "max_model_len": max_model_len,
        "gpu_memory_utilization": backend.gpu_memory_utilization, "trust_remote_code": trust_remote_code,
        "load_format": "safetensors",
    }


def build_vllm_processor(model_dir: str, backend: BackendConfig, params: GenerationParams, engines: int,
                         max_model_len: int, trust_remote_code: bool) -> Any:
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model_dir, batch_size=backend.batch_size, concurrency=engines,
        engine_kwargs=engine_kwargs(backend, max_model_len, trust_remote_code),
    )
    return build_processor(
        config,
        preprocess=lambda row: to_vllm_row(row, params),
        postprocess=lambda row: from_vllm_row(row, params.max_new_tokens),
    )


def completions_from_rows(rows: list[dict[str, Any]], count: int) -> list[Completion]:
    ordered: list[Completion | None] = [None] * count
    for row in rows:
        ordered[int(row["index"])] = Completion(row["text"], row["finish_reason"], int(row["num_output_tokens"]))
    missing = [i for i, c in enumerate(ordered) if c is None]
    if missing:
        raise RuntimeError(f"vLLM processor returned no row for {len(missing)} prompt(s), e.g. index {missing[0]}")
    return [c for c in ordered if c is not None]
