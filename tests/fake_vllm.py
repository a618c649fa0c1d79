"""A stand-in for the `vllm` package (CUDA-only, not installable here), shaped like its offline API.

`LLM(model=..., **engine_kwargs)` checks its keyword arguments against the real constructor's and records every
construction in a file of `UNIFIT_FAKE_VLLM_LOG` (Ray actors are separate processes); `chat(messages, sampling_params,
use_tqdm=...)` returns request outputs with `.outputs[0].text`, `.finish_reason` and `.token_ids`, like vLLM's
`RequestOutput`/`CompletionOutput`. Replies are a deterministic function of the conversation and the seed, so any
number of engines gives the same results. With a structured-output `choice`, the fake model has a known
distribution over the options (`option_probs`), replies greedily with the most probable one and, with
`logprobs=k`, reports per generated token the k most probable tokens as vLLM does (token id -> `Logprob`, the
sampled token always included), a non-option token ("The") taking `OFF_OPTION_MASS` of the raw distribution.
`install()` puts the module into `sys.modules` as `vllm`.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Optional

ENGINE_KWARGS = {"tensor_parallel_size", "max_model_len", "gpu_memory_utilization", "trust_remote_code", "load_format",
                 "distributed_executor_backend", "dtype", "seed", "enforce_eager", "tokenizer"}
SAMPLING_KWARGS = {"n", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop",
                   "stop_token_ids", "logprobs", "prompt_logprobs", "structured_outputs"}


OFF_OPTION_MASS = 0.1  # raw probability of a token that starts no option, at every step of a constrained reply


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


def tokenize(text: str) -> list[str]:
    """The fake's tokenizer: "[[", "]]", digit runs, words, any other character."""
    return re.findall(r"\[\[|\]\]|\d+|\w+|\S", text)


def token_id(token: str) -> int:
    return int(hashlib.sha256(token.encode()).hexdigest()[:6], 16)


def option_probs(conversation: Any, options: list[str]) -> list[float]:
    """The fake model's probability of each option as the reply to `conversation` (a softmax of hashed scores)."""
    scores = [int(hashlib.sha256(f"{conversation}|{option}".encode()).hexdigest()[:8], 16) / 16**8 * 4 for option in options]
    weights = [math.exp(score) for score in scores]
    return [w / sum(weights) for w in weights]


def _constrained_reply(conversation: Any, options: list[str], top: Optional[int]) -> tuple[str, list[int], Optional[list[dict[int, Logprob]]]]:
    """The greedy option, its token ids and, when `top` is set, each step's top-`top` tokens (vLLM's logprobs)."""
    probs = option_probs(conversation, options)
    chosen = options[max(range(len(options)), key=lambda i: probs[i])]
    tokens = tokenize(chosen)
    steps: list[dict[int, Logprob]] = []
    for j, token in enumerate(tokens):
        consistent = [i for i, o in enumerate(options) if tokenize(o)[:j] == tokens[:j] and len(tokenize(o)) > j]
        total = sum(probs[i] for i in consistent)
        mass: dict[str, float] = {"The": OFF_OPTION_MASS}
        for i in consistent:
            next_token = tokenize(options[i])[j]
            mass[next_token] = mass.get(next_token, 0.0) + (1 - OFF_OPTION_MASS) * probs[i] / total
        ranked = sorted(mass.items(), key=lambda item: -item[1])
        kept = dict(ranked[: top or 0])
        kept.setdefault(token, mass[token])  # vLLM always returns the sampled token's logprob
        steps.append({token_id(t): Logprob(math.log(p), 1 + [r for r, _ in ranked].index(t), t) for t, p in kept.items()})
    return chosen, [token_id(t) for t in tokens], steps if top is not None else None


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
        self.temperature = kwargs.get("temperature", 1.0)  # the fake's constrained replies are greedy whatever it is
        self.seed = kwargs.get("seed")
        self.logprobs = kwargs.get("logprobs")
        self.structured_outputs = kwargs.get("structured_outputs")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]
    logprobs: Optional[list[dict[int, Logprob]]] = None


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
        self.last_sampling = sampling_params
        outputs = []
        structured = sampling_params.structured_outputs
        for i, conversation in enumerate(messages):
            if structured is not None and structured.choice:
                text, ids, logprobs = _constrained_reply(conversation, structured.choice, sampling_params.logprobs)
                outputs.append(RequestOutput(str(i), str(conversation), [CompletionOutput(0, text, ids, "stop", logprobs)]))
                continue
            digest = hashlib.sha256(f"{conversation}|{sampling_params.seed}".encode()).hexdigest()
            words = [digest[k : k + 4] for k in range(0, 40, 4)]
            if structured is not None:
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
