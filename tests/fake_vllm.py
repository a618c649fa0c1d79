"""A stand-in for the `vllm` package (CUDA-only, not installable here), shaped like its offline API.

`LLM(model=..., **engine_kwargs)` checks its keyword arguments against the real constructor's and records every
construction in a file of `UNIFIT_FAKE_VLLM_LOG` (Ray actors are separate processes); `chat(messages, sampling_params,
use_tqdm=...)` returns request outputs with `.outputs[0].text`, `.finish_reason` and `.token_ids`, like vLLM's
`RequestOutput`/`CompletionOutput`. Replies are a deterministic function of the conversation and the seed, so any
number of engines gives the same results. `install()` puts the module into `sys.modules` as `vllm`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Optional

ENGINE_KWARGS = {"tensor_parallel_size", "max_model_len", "gpu_memory_utilization", "trust_remote_code", "load_format",
                 "distributed_executor_backend", "dtype", "seed", "enforce_eager", "tokenizer"}
SAMPLING_KWARGS = {"n", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop",
                   "stop_token_ids", "logprobs", "prompt_logprobs", "structured_outputs"}


@dataclass
class StructuredOutputsParams:
    json: Optional[Any] = None
    json_object: Optional[bool] = None
    choice: Optional[list[str]] = None


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - SAMPLING_KWARGS
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        if kwargs.get("structured_outputs") is not None and not isinstance(kwargs["structured_outputs"], StructuredOutputsParams):
            raise TypeError("structured_outputs must be a StructuredOutputsParams")
        self.max_tokens = kwargs.get("max_tokens", 16)
        self.seed = kwargs.get("seed")
        self.structured_outputs = kwargs.get("structured_outputs")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]


@dataclass
class RequestOutput:
    request_id: str
    prompt: str
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        unknown = set(kwargs) - ENGINE_KWARGS
        if unknown:
            raise TypeError(f"LLM got unexpected keyword arguments {sorted(unknown)}")
        self.model = model
        self.kwargs = kwargs
        with open(os.path.join(os.environ["UNIFIT_FAKE_VLLM_LOG"], f"engine-{os.getpid()}-{id(self)}"), "w") as handle:
            handle.write(model)

    def chat(self, messages: list[list[dict[str, str]]], sampling_params: SamplingParams, use_tqdm: bool = True,
             **kwargs: Any) -> list[RequestOutput]:
        if not messages or not isinstance(messages[0], list):
            raise TypeError("this fake serves batched chat only: a list of conversations")
        outputs = []
        for i, conversation in enumerate(messages):
            digest = hashlib.sha256(f"{conversation}|{sampling_params.seed}".encode()).hexdigest()
            words = [digest[k : k + 4] for k in range(0, 40, 4)]
            if sampling_params.structured_outputs is not None:
                words = ['{"w":', f'"{words[0]}"}}']
            kept = words[: sampling_params.max_tokens]
            reason = "length" if len(words) > sampling_params.max_tokens else "stop"
            outputs.append(RequestOutput(str(i), str(conversation), [CompletionOutput(0, " ".join(kept), list(range(len(kept))), reason)]))
        return outputs


def install() -> None:
    """Make `import vllm` (and `vllm.sampling_params`) resolve to this module."""
    package = types.ModuleType("vllm")
    package.__dict__.update({"LLM": LLM, "SamplingParams": SamplingParams, "__version__": "0.0-fake"})
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.__dict__.update({"SamplingParams": SamplingParams, "StructuredOutputsParams": StructuredOutputsParams})
    package.sampling_params = sampling
    sys.modules["vllm"], sys.modules["vllm.sampling_params"] = package, sampling
