"""The one call shape every model answers to (`complete`), the sampling parameters it takes, and what comes back."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from unifit.config import BackendConfig

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

    @classmethod
    def from_backend(cls, backend: "BackendConfig", seed: int, **overrides: Any) -> "GenerationParams":
        """The backend's sampling settings (token budget, temperature, top_p, repetition penalty) with `seed`;
        `overrides` replace any field (a judge's greedy decoding, a stage's own token budget)."""
        return cls(**{"max_new_tokens": backend.max_new_tokens, "temperature": backend.temperature, "top_p": backend.top_p,
                      "repetition_penalty": backend.repetition_penalty, "seed": seed, **overrides})

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
    """A choice between fixed options: the chosen 0-based index and the normalised probability of every option."""

    index: int
    probs: tuple[float, ...]


@runtime_checkable
class ChatClient(Protocol):
    """Anything that answers chat conversations: a model client (hf, vllm, openai behind it) or a scripted test model."""

    name: str

    def complete(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        """One completion per conversation, in input order."""
        ...


@runtime_checkable
class FreeTextModel(Protocol):
    """A scripted model that only answers in free text (tests, notebooks): no finish reasons, no token counts."""

    name: str

    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[str]:
        ...


class FreeTextClient:
    """A `FreeTextModel` seen as a `ChatClient`; its replies' finish reason is "unknown"."""

    def __init__(self, model: FreeTextModel) -> None:
        self.model = model
        self.name = getattr(model, "name", type(model).__name__)

    def complete(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        return [Completion(text, "unknown") for text in self.model.generate(list(conversations), params)]

    @property
    def offers_choice(self) -> bool:
        """A scripted model that also scores options (`choose`) keeps doing so behind the wrapper."""
        return callable(getattr(self.model, "choose", None))

    def choose(self, conversations: Sequence[Conversation], options: Sequence[str]) -> list[Optional[Choice]]:
        return list(self.model.choose(list(conversations), list(options)))


def as_client(model: ChatClient | FreeTextModel) -> ChatClient:
    """The model as a `ChatClient`: clients pass through, free-text scripted models are wrapped once, at the entry point."""
    if isinstance(model, ChatClient):
        return model
    if isinstance(model, FreeTextModel):
        return FreeTextClient(model)
    raise TypeError(f"{model!r} is not a model: it needs complete(conversations, params) -> list[Completion] "
                    f"or generate(conversations, params) -> list[str]")
