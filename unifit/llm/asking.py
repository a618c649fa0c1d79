"""Ask a model for replies that must parse, with bounded retries: the one retry loop of generation and evaluation.

Every conversation goes out in one batched call; only the unusable replies are asked again, at most
`max_retries` times, and what still fails comes back with `value=None` for the caller to count, never
dropped and never a crash. Each result keeps its last completion, so callers see its finish reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, TypeVar

from unifit.llm.base import ChatClient, Completion, Conversation, FreeTextModel, GenerationParams, as_client
from unifit.text import foreign_script

T = TypeVar("T")


@dataclasses.dataclass
class Asked:
    """Outcome of one request after retries: the parsed value (None = failed), the last completion, items lost to a cut."""

    value: Any
    completion: Completion
    attempts: int
    cut_items: int = 0


def outcomes(asked: Sequence[Asked]) -> tuple[list[Any], list[str], int]:
    """The parsed values (None = failed), the last reply texts and the number of re-asks, aligned with `asked`."""
    return [a.value for a in asked], [a.completion.text for a in asked], sum(a.attempts - 1 for a in asked)


def _parse_reply(completion: Completion, conversation: Conversation, parse: Callable[[str], Optional[Any]],
                 cut: Optional[Callable[[Any, str], Any]], reject_foreign_script: bool) -> tuple[Any, int]:
    """The parsed value (None = unusable) and how many items the cut took."""
    if reject_foreign_script and foreign_script(completion.text, " ".join(m["content"] for m in conversation)):
        return None, 0
    value = parse(completion.text)
    if value is None or cut is None or completion.finish_reason != "length":
        return value, 0
    kept = cut(value, completion.text)
    return (kept or None), len(value) - len(kept)


def ask(
    model: ChatClient | FreeTextModel,
    conversations: Sequence[Conversation],
    params: GenerationParams,
    parse: Callable[[str], Optional[T]],
    *,
    max_retries: int,
    retry_prompt: Optional[str] = None,
    cut: Optional[Callable[[T, str], T]] = None,
    reject_foreign_script: bool = False,
) -> list[Asked]:
    """One `Asked` per conversation, in order.

    Unusable: `parse` returns None; with `reject_foreign_script`, a reply in another writing system than the
    prompt; with `cut` (for list-valued parses), a reply cut off by the token limit where `cut(items, text)`
    leaves nothing whole, so a reply truncated inside its first item is re-asked rather than read as an empty list.
    A retry sends the same conversation again, or, with `retry_prompt`, the conversation followed by the bad
    reply and that reminder (so a greedy model sees something new). Retry round r uses `params.seed + r`:
    re-asking with the same seed would get the same bad reply from sampling backends and the completion cache,
    and a rerun hits the cache.
    """
    client = as_client(model)
    results: list[Optional[Asked]] = [None] * len(conversations)
    pending = list(range(len(conversations)))
    for attempt in range(max_retries + 1):
        if not pending:
            break
        sent = [list(conversations[i]) for i in pending]
        if attempt > 0 and retry_prompt is not None:
            sent = [c + [{"role": "assistant", "content": results[i].completion.text}, {"role": "user", "content": retry_prompt}]  # type: ignore[union-attr]
                    for c, i in zip(sent, pending)]
        completions = client.complete(sent, dataclasses.replace(params, seed=params.seed + attempt))
        if len(completions) != len(pending):
            raise RuntimeError(f"{client.name!r} returned {len(completions)} completions for {len(pending)} conversations")
        still: list[int] = []
        for index, completion in zip(pending, completions):
            value, cut_items = _parse_reply(completion, conversations[index], parse, cut, reject_foreign_script)
            results[index] = Asked(value, completion, attempt + 1, cut_items)
            if value is None:
                still.append(index)
        pending = still
    return [r for r in results if r is not None]
