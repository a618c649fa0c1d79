"""A scripted judge answering in free text (`generate`), as a test may pass one in: it reads the prompt it is given and answers by a policy.

Policies see the whole conversation (the first user turn is the judge prompt; a retry appends the bad
reply and a reminder), so retries are exercised exactly as with a real model.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from unifit.llm.base import Conversation, GenerationParams

_BLOCK = re.compile(r"\[Answer (\d+)\]\n(.*?)(?=\n\n\[Answer \d+\]|\n\nStart your reply)", re.DOTALL)


def answers_in_prompt(prompt: str) -> list[str]:
    """The answers as the judge sees them, in displayed order (parsed from the default judge prompt)."""
    blocks = _BLOCK.findall(prompt)
    assert [int(i) for i, _ in blocks] == list(range(1, len(blocks) + 1)), "answers must be labelled [Answer 1]..[Answer k]"
    return [text for _, text in blocks]


class ScriptedJudge:
    def __init__(self, policy: Callable[[Conversation], str], name: str = "scripted") -> None:
        self.name = name
        self.policy = policy
        self.conversations: list[Conversation] = []
        self.params: list[GenerationParams] = []

    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[str]:
        self.params.append(params)
        self.conversations.extend(conversations)
        return [self.policy(list(c)) for c in conversations]


def picks_first(conversation: Conversation) -> str:
    return "Answer 1 is the most helpful. [[1]]"


def picks_longest(conversation: Conversation) -> str:
    answers = answers_in_prompt(conversation[0]["content"])
    best = max(range(len(answers)), key=lambda i: len(answers[i]))
    return f"The most detailed one. [[{best + 1}]]"


def garbage_then_second(conversation: Conversation) -> str:
    return "They are all fine, really." if len(conversation) == 1 else "[[2]]"


def always_garbage(conversation: Conversation) -> str:
    return "I cannot decide [[maybe]]."


class ScriptedLogitJudge:
    """A judge with `choose`, shaped like HFChatModel's: the verdict `[[i]]` gets the log-probability
    `strength[model shown at i] + position_bonus[i]` (known logits), normalised by the real choice code."""

    def __init__(self, strength: dict[str, float], position_bonus: Sequence[float], model_of: Callable[[str], str]) -> None:
        self.name = "scripted-logits"
        self.strength = strength
        self.position_bonus = list(position_bonus)
        self.model_of = model_of  # answer text -> model name
        self.calls: list[tuple[Conversation, list[str]]] = []

    def logits(self, prompt: str) -> list[float]:
        shown = [self.model_of(text) for text in answers_in_prompt(prompt)]
        return [self.strength[m] + self.position_bonus[i] for i, m in enumerate(shown)]

    def choose(self, conversations: Sequence[Conversation], options: Sequence[str]):
        from unifit.llm.choice import choice_from_logprobs

        choices = []
        for conversation in conversations:
            self.calls.append((list(conversation), list(options)))
            logits = self.logits(conversation[0]["content"])
            assert list(options) == [f"[[{i}]]" for i in range(1, len(logits) + 1)]
            choices.append(choice_from_logprobs(logits))
        return choices
