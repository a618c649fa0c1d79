"""vLLM on GPUs: one `vllm.LLM` engine per Ray actor, loaded once and serving every call of a stage.

Written against vLLM's offline API (installed by the `[gpu]` extra; its wheels are CUDA-only):
`LLM(model=..., tensor_parallel_size=..., ...)`, `LLM.chat(conversations, SamplingParams)` applying the
model's own chat template, request outputs with `.outputs[0].text`, `.finish_reason`, `.token_ids` and, with
`SamplingParams(logprobs=k)`, `.logprobs` (per generated token, token id -> `Logprob(logprob, rank, decoded_token)`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from unifit.config import BackendConfig, ClusterConfig
from unifit.llm.base import Choice, Completion, Conversation, GenerationParams

CHOICE_LOGPROBS = 20  # top log-probabilities per generated token: vLLM's default cap (`max_logprobs`)
CHOICE_MAX_TOKENS = 16  # an option (a verdict "[[2]]", a score "7") is a few tokens


def sampling_kwargs(params: GenerationParams) -> dict[str, Any]:
    """`vllm.SamplingParams` keyword arguments; a per-request seed keeps replies independent of batching and engines."""
    return {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "repetition_penalty": params.repetition_penalty, "seed": params.seed}


def structured_constraint(vllm_module: Any, **constraint: Any) -> dict[str, Any]:
    """Structured output (`json_object=True`, `choice=[...]`): `structured_outputs` in recent vLLM,
    `guided_decoding` in releases before it."""
    from importlib import import_module

    sampling = import_module(f"{vllm_module.__name__}.sampling_params")
    if hasattr(sampling, "StructuredOutputsParams"):
        return {"structured_outputs": sampling.StructuredOutputsParams(**constraint)}
    return {"guided_decoding": sampling.GuidedDecodingParams(**constraint)}


def engine_kwargs(backend: BackendConfig, max_model_len: int, trust_remote_code: bool) -> dict[str, Any]:
    """vLLM engine settings; weights load from safetensors only, like `unifit.models` (no pickle is unpickled).

    With tensor parallelism the engine's workers are Ray tasks inside the placement group its actor holds.
    """
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": backend.tensor_parallel_size, "max_model_len": max_model_len,
        "gpu_memory_utilization": backend.gpu_memory_utilization, "trust_remote_code": trust_remote_code,
        "load_format": "safetensors",
    }
    if backend.tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "ray"
    return kwargs


def engine_resources(backend: BackendConfig, cluster: ClusterConfig) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(Ray resources of one engine actor, placement-group bundles it needs: none for one GPU).

    One GPU: the actor holds it. Tensor parallel T: a placement group of T one-GPU bundles packed on one node,
    the actor in its first bundle asking for no GPU itself, so vLLM's Ray executor places its T workers there.
    """
    tp = backend.tensor_parallel_size
    if tp == 1:
        return {"num_cpus": cluster.cpus_per_actor, "num_gpus": 1}, []
    return {"num_cpus": 0, "num_gpus": 0}, [{"GPU": 1, "CPU": cluster.cpus_per_actor}] * tp


def finish_reason(reason: Any) -> str:
    """vLLM says "stop" (end of turn or stop string) or "length"; anything else (an aborted request) is an error, never cached."""
    return reason if reason in ("stop", "length") else "error"


class VLLMChatModel:
    """One vLLM engine in this process (a Ray actor), kept for every call of the stage."""

    def __init__(self, model_dir: str, backend: BackendConfig, max_model_len: int, trust_remote_code: bool, name: str) -> None:
        import vllm

        self.name = name
        self._vllm = vllm
        self.llm = vllm.LLM(model=model_dir, **engine_kwargs(backend, max_model_len, trust_remote_code))

    def _chat(self, conversations: Sequence[Conversation], sampling: Any) -> list[Any]:
        """One engine call, one output per conversation (a short list would misalign replies with prompts)."""
        outputs = self.llm.chat([list(c) for c in conversations], sampling, use_tqdm=False)
        if len(outputs) != len(conversations):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(conversations)} conversations")
        return outputs

    def complete(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        extra = structured_constraint(self._vllm, json_object=True) if params.json_mode else {}
        sampling = self._vllm.SamplingParams(**sampling_kwargs(params), **extra)
        outputs = self._chat(conversations, sampling)
        completions = []
        for output in outputs:
            best = output.outputs[0]
            completions.append(Completion(best.text, finish_reason(best.finish_reason), len(best.token_ids)))
        return completions

    def choose(self, conversations: Sequence[Conversation], options: Sequence[str]) -> list[Optional[Choice]]:
        """Pick one option per conversation by the model's probabilities: a greedy reply constrained to the options
        (structured-output `choice`), with the top log-probabilities of every generated token; the options'
        probabilities are read at the token where the reply commits to one (the mass of each option's token
        there, renormalised over the options). A reply whose commit token lists no option falls back to the
        option its text is (one-hot); None only where neither gives one."""
        from unifit.llm.choice import choice_from_text, choice_from_vllm_logprobs

        sampling = self._vllm.SamplingParams(max_tokens=CHOICE_MAX_TOKENS, temperature=0.0, logprobs=CHOICE_LOGPROBS,
                                             **structured_constraint(self._vllm, choice=list(options)))
        outputs = self._chat(conversations, sampling)
        choices = []
        for output in outputs:
            best = output.outputs[0]
            choice = choice_from_vllm_logprobs(best.token_ids, best.logprobs, options) if best.logprobs else None
            choices.append(choice or choice_from_text(best.text, options))
        return choices
