"""A scripted generator shaped like a model client (`complete`): realistic list/JSON/Q&A replies, malformed ones on demand.

Names are pseudo-words derived from a hash of the prompt, so distinct concepts get distinct vocabulary
(and so distinct questions) while every rerun sees exactly the same replies.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from unifit.config import UnifitConfig, from_container
from unifit.llm.base import Completion, Conversation, GenerationParams

SYLLABLES = ["ka", "lo", "mi", "ra", "ve", "tu", "no", "si", "pe", "za", "qui", "dor", "mel", "vak", "tor", "sen"]


def pseudo_word(text: str, salt: str = "") -> str:
    digest = hashlib.sha256(f"{salt}:{text}".encode()).digest()
    return "".join(SYLLABLES[b % len(SYLLABLES)] for b in digest[:3]).capitalize()


def concepts_reply(concept: str, n: int) -> str:
    items = [f"{pseudo_word(concept, str(i))} {pseudo_word(concept, 'x' + str(i))}" for i in range(n)]
    lines = [f"Here are {n} sub-concepts for {concept}:"]
    lines += [f"{i}. **{item}**: a key part of {concept} that practitioners study" if i % 2 else f"{i}. {item}"
              for i, item in enumerate(items, 1)]
    return "\n".join(lines)


def qa_reply(leaf: str, q: int) -> str:
    blocks = []
    for i in range(1, q + 1):
        words = " ".join(pseudo_word(leaf, f"{i}-{k}").lower() for k in range(4))
        blocks.append(f"**Question {i}:** How does {leaf} handle {words} in practice?\n"
                      f"**Answer {i}:** {leaf} handles {words} by validating every step carefully and logging the result.")
    return "Sure! Here are the questions.\n\n" + "\n\n".join(blocks)


def followup_reply(question: str) -> str:
    words = " ".join(pseudo_word(question, f"f{k}").lower() for k in range(4))
    return f"Question: What happens next with {words}?\nAnswer: Next, {words} is checked again and the outcome is recorded."


@dataclass
class Scripted:
    """A model client; `override(prompt, seed)` may return a Completion to inject special replies."""

    name = "scripted"

    override: Optional[Callable[[str, int], Optional[Completion]]] = None
    calls: list[str] = field(default_factory=list)  # every prompt, in call order
    batches: list[int] = field(default_factory=list)  # size of each batched call
    fail_after_calls: Optional[int] = None  # raise once this many prompts were answered (simulated crash)

    def complete(self, conversations: list[Conversation], params: GenerationParams) -> list[Completion]:
        self.batches.append(len(conversations))
        replies = []
        for conversation in conversations:
            if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
                raise RuntimeError("simulated worker crash")
            prompt = conversation[-1]["content"]
            self.calls.append(prompt)
            replies.append(self.reply(prompt, params.seed))
        return replies

    def reply(self, prompt: str, seed: int) -> Completion:
        if self.override:
            special = self.override(prompt, seed)
            if special is not None:
                return special
        if m := re.match(r"Please generate (\d+) sub-concepts for (.+?) in the domain", prompt):
            return Completion(concepts_reply(m.group(2), int(m.group(1))), "stop", 40)
        if m := re.match(r"Please generate (\d+) questions for (.+?) \(", prompt):
            return Completion(qa_reply(m.group(2), int(m.group(1))), "stop", 80)
        if m := re.match(r'Based on the question "(.+?)", generate', prompt, re.DOTALL):
            return Completion(followup_reply(m.group(1)), "stop", 30)
        if prompt.startswith("Here are some example tasks"):
            n = int(re.search(r"Come up with (\d+) new tasks", prompt).group(1))
            return Completion("\n".join(f"{i}. Explain how {pseudo_word(prompt, str(i))} affects {pseudo_word(prompt, 'y' + str(i))} "
                                        f"when {pseudo_word(prompt, 'z' + str(i))} is enabled." for i in range(1, n + 1)), "stop", 50)
        return Completion(f"A detailed answer about {prompt[:60]} covering the main points and caveats.", "stop", 20)


def make_cfg(tmp_path, **generate) -> UnifitConfig:
    gen = {"scopes": ["Email", "DNS"], "n_subconcepts": 2, "depth": 1, "questions_per_leaf": 2, "turns": 1,
           "shard_size": 2, "self_instruct": {"enabled": False}, **generate}
    return from_container({"domain": "cybersecurity", "run_dir": str(tmp_path / "run"), "generate": gen,
                           "cache_dir": str(tmp_path / "cache")})
