"""The `ChatModel` protocol every backend implements, and the sampling parameters it takes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings; part of the completion-cache key, so every field changes the cache entry."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    json_mode: bool = False  # ask for a JSON object where the backend supports structured output

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    """One reply and why it stopped: "stop" (end of turn) or "length" (hit max_new_tokens: truncated)."""

    text: str
    finish_reason: str
    num_output_tokens: int = 0


@dataclass(frozen=True)
class Choice:
    """A model's pick among fixed options: the 0-based index chosen and the normalised probability of every option."""

    index: int
    probs: tuple[float, ...]


@runtime_checkable
class ChatModel(Protocol):
    """Anything that answers chat conversations. Backends: hf, vllm, openai; tests use scripted models."""

    name: str

    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[str]:
        """One reply per conversation, in input order."""
        ...


def complete(model: ChatModel, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
    """Replies with finish reasons where the backend reports them (`complete`), else from `generate`."""
    if hasattr(model, "complete"):
        return list(model.complete(conversations, params))
    return [Completion(text, "unknown") for text in model.generate(conversations, params)]
