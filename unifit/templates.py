"""Conversation -> token ids with assistant-span offsets, from the model's own chat template.

IFD scoring (context/header/answer ids) and training (label masks) both use this module, so the two
can never disagree about where an answer starts. Spans come from rendering the template on prefixes
of the conversation and mapping the character boundaries onto the tokenizer's offsets — never from
searching the rendered string for the answer text.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Sequence

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


class TemplateError(ValueError):
    """The chat template cannot be used to locate assistant turns (not prefix-stable)."""


class MessagesError(ValueError):
    """A conversation that is not a valid chat; `reason` buckets it for the data-import report."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class AssistantSpan:
    """Token range [start, end) of one assistant turn's answer: its content plus the end-of-turn token."""

    start: int
    end: int


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: list[int]
    spans: list[AssistantSpan]  # one per assistant message, in order

    def context_ids(self, turn: int) -> list[int]:
        """Everything up to and including the assistant header of `turn`."""
        return self.input_ids[: self.spans[turn].start]

    def answer_ids(self, turn: int) -> list[int]:
        span = self.spans[turn]
        return self.input_ids[span.start : span.end]

    def labels(self, ignore_index: int = -100) -> list[int]:
        """Training labels: the answer tokens of every assistant turn, everything else ignored."""
        labels = [ignore_index] * len(self.input_ids)
        for span in self.spans:
            labels[span.start : span.end] = self.input_ids[span.start : span.end]
        return labels


def validate_messages(messages: Any, where: str = "messages") -> list[Message]:
    """Check chat structure; the error names the offending message, what is wrong and what a valid chat looks like."""
    if not isinstance(messages, list) or not messages:
        raise MessagesError("bad_messages", f"{where}: expected a non-empty list of {{role, content}} messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise MessagesError("bad_messages", f"{where}[{index}]: expected a {{role, content}} object, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise MessagesError("bad_messages", f"{where}[{index}]: field '{key}' must be a string, "
                                    f"got {type(message.get(key)).__name__}")
        if message["role"] not in ROLES:
            raise MessagesError("unknown_role", f"{where}[{index}]: unknown role {message['role']!r}; use one of {ROLES}")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if any(m["role"] == "system" for m in messages[1:]):
        raise MessagesError("role_order", f"{where}: a system message may only come first")
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if turns != expected[: len(turns)] or not turns or turns[-1] != "assistant":
        raise MessagesError("role_order", f"{where}: roles must alternate user/assistant, starting with user and ending "
                            f"with an assistant answer; got {turns}")
    for index, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise MessagesError("empty_answer", f"{where}[{index}]: empty assistant answer; give every assistant turn "
                                "its answer text (or drop the row)")
    return messages


def _render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def _end_of_answer(special: set[int], ids: list[int], start: int, stop: int) -> int:
    """Answer end: just past the last special token in [start, stop) (the end-of-turn), else `stop`."""
    for index in range(stop - 1, start - 1, -1):
        if ids[index] in special:
            return index + 1
    return stop


def tokenize_conversation(tokenizer: Any, messages: Sequence[Message]) -> TokenizedConversation:
    """Token ids of the templated conversation and the span of every assistant answer."""
    full_text = _render(tokenizer, messages, add_generation_prompt=False)
    encoding = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoding["input_ids"])
    token_ends = [end for _, end in encoding["offset_mapping"]]

    def first_token_ending_after(char_pos: int) -> int:
        # tokens are in text order; a token straddling the boundary belongs to the answer side
        return bisect.bisect_right(token_ends, char_pos)

    special = set(tokenizer.all_special_ids)
    spans: list[AssistantSpan] = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = _render(tokenizer, messages[:turn], add_generation_prompt=True)
        through_text = (full_text if turn == len(messages) - 1  # the whole conversation, rendered above
                        else _render(tokenizer, messages[: turn + 1], add_generation_prompt=False))
        if not (full_text.startswith(prompt_text) and full_text.startswith(through_text)):
            raise TemplateError(
                "the chat template does not render conversations prefix-stably (e.g. it rewrites earlier turns); "
                "set model.chat_template to one that does"
            )
        start = first_token_ending_after(len(prompt_text))
        stop = first_token_ending_after(len(through_text))
        spans.append(AssistantSpan(start, _end_of_answer(special, ids, start, stop)))
    return TokenizedConversation(ids, spans)


def assistant_header_ids(tokenizer: Any) -> list[int]:
    """The assistant header as the template renders it with no prior conversation (IFD's direct pass).

    Rendered as the text a generation prompt appends after a lone user turn, minus any system prompt the
    template injects for the first message; if a template has no header (LLaMA-2 puts [/INST] in the user
    turn), fall back to the BOS token so the first answer token is still conditioned on something.
    """
    probe = [{"role": "user", "content": "x"}]
    with_header = _render(tokenizer, probe, add_generation_prompt=True)
    without = _render(tokenizer, probe, add_generation_prompt=False)
    header = with_header[len(without):] if with_header.startswith(without) else ""
    ids = tokenizer(header, add_special_tokens=False)["input_ids"] if header else []
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    return list(ids)
