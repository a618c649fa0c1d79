"""Ask a model for replies that must parse, with bounded retries — shared by the judge and diversity scoring.

Model output that does not parse is re-asked with the bad reply and a reminder in the conversation
(so a greedy model sees something new), at most `max_retries` times; what still fails comes back as
`None` and is counted by the caller, never dropped and never a crash.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence, TypeVar

from unifit.llm.base import ChatClient, Conversation, FreeTextModel, GenerationParams, as_client

T = TypeVar("T")


def ask_with_retries(
    model: ChatClient | FreeTextModel,
    prompts: Sequence[str],
    parse: Callable[[str, int], Optional[T]],
    retry_messages: Sequence[str],
    params: GenerationParams,
    *,
    max_retries: int,
) -> tuple[list[Optional[T]], list[str], int]:
    """Parsed result per prompt (None = still unparseable), the last raw reply per prompt, and the retry count.

    `parse(reply, i)` gets the prompt index so one call can serve prompts with different answer counts.
    Each retry round uses `params.seed + round` so sampling backends and the completion cache give a fresh reply.
    """
    client = as_client(model)
    results: list[Optional[T]] = [None] * len(prompts)
    replies: list[str] = [""] * len(prompts)
    pending = list(range(len(prompts)))
    retries = 0
    for attempt in range(max_retries + 1):
        if not pending:
            break
        conversations: list[Conversation] = []
        for i in pending:
            conversation = [{"role": "user", "content": prompts[i]}]
            if attempt > 0:
                conversation += [{"role": "assistant", "content": replies[i]}, {"role": "user", "content": retry_messages[i]}]
            conversations.append(conversation)
        round_params = replace(params, seed=params.seed + attempt)
        texts = [c.text for c in client.complete(conversations, round_params)]
        if len(texts) != len(conversations):
            raise RuntimeError(f"{client.name!r} returned {len(texts)} replies for {len(conversations)} conversations")
        retries += len(pending) if attempt > 0 else 0
        still: list[int] = []
        for i, text in zip(pending, texts):
            replies[i] = text
            results[i] = parse(text, i)
            if results[i] is None:
                still.append(i)
        pending = still
    return results, replies, retries
