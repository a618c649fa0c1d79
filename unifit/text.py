"""Checks on model text that need no model: the writing system of a reply, refusals, an instance's opening question.

Shared by generation (filtering what the generator wrote) and evaluation (filtering test questions, drawing
instructions for the diversity judge), so both apply the same rules.
"""

from __future__ import annotations

import functools
import unicodedata
from collections import Counter
from typing import Sequence

REFUSAL_PATTERNS = (
    "i'm sorry", "i am sorry", "as an ai", "as a language model", "i cannot", "i can't", "i can not",
    "i'm unable to", "i am unable to", "i won't be able", "i do not have the ability", "i'm not able to",
)


def is_refusal(text: str) -> bool:
    """True when a reply opens with a refusal or disclaimer ("I'm sorry", "As an AI", "I cannot", ...)."""
    opening = text.strip().casefold().replace("’", "'")[:200]
    return any(pattern in opening for pattern in REFUSAL_PATTERNS)


@functools.lru_cache(maxsize=65536)
def _script(char: str) -> str:
    """The writing system of a letter, from its Unicode name: LATIN, CYRILLIC, CJK, ARABIC, HANGUL, ..."""
    return unicodedata.name(char, "?").split(" ")[0]


def foreign_script(text: str, reference: str) -> bool:
    """True when most letters of `text` are in a writing system that `reference` (the prompt) does not use at all.

    Catches a reply in another language than the prompt's (Chinese or Russian for an English prompt)
    without a language model; another language in the same script (German for English) is not caught.
    The first 2,000 characters decide, so a long answer costs no more than a short one.
    """
    scripts: Counter[str] = Counter()
    for char, count in Counter(text[:2000]).items():  # distinct characters, counted in C
        if char.isalpha():
            scripts[_script(char)] += count
    if not scripts:
        return False
    dominant, count = scripts.most_common(1)[0]
    return 2 * count > sum(scripts.values()) and not any(c.isalpha() and _script(c) == dominant for c in set(reference))


def first_question(messages: Sequence[dict[str, str]]) -> str:
    """The text an instance is deduplicated and compared on: its opening user question."""
    return next((m["content"] for m in messages if m["role"] == "user"), "")
