"""Turn free-form model replies into concept lists and question/answer pairs, and re-ask when they don't parse.

Small models answer the same request as a numbered list, a bullet list, a JSON array, a JSON object or
"Q:/A:" blocks, often with Markdown and a chatty preamble; every format is accepted so that a format
slip costs nothing, and a reply that matches none returns None (the caller re-asks, then counts it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import unicodedata
from collections import Counter
from typing import Any, Callable, Optional, Sequence, TypeVar

from unifit.llm.base import ChatClient, Completion, Conversation, GenerationParams

T = TypeVar("T")

_NUMBERED = re.compile(r"^\s*(?:\(?\d{1,3}[.):]|\(?[a-zA-Z][.)])\s+")
_BULLET = re.compile(r"^\s*[-*+•·]\s+")
_MARKER = re.compile(_NUMBERED.pattern + "|" + _BULLET.pattern)
_MARKUP = re.compile(r"[*_`#]+")
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_LABEL = re.compile(r"^(?:sub-?concepts?|concepts?|topics?|tasks?|instructions?)\s*\d*\s*[:.-]\s*", re.IGNORECASE)
_QA_MARKER = re.compile(
    r"^[ \t>*_#-]*(?:\d{1,3}[.)]\s*)?[*_]*\s*(question|answer|q|a)\s*\d{0,3}\s*[*_]*\s*:\s*[*_]*[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)
REFUSAL_PATTERNS = (
    "i'm sorry", "i am sorry", "as an ai", "as a language model", "i cannot", "i can't", "i can not",
    "i'm unable to", "i am unable to", "i won't be able", "i do not have the ability", "i'm not able to",
)


def normalise_concept(text: str) -> str:
    """One concept as a clean phrase: no list marker, Markdown, quotes, description tail or end punctuation."""
    text = _MARKER.sub("", text.strip())
    bold = re.match(r"^\s*(\*\*|__)(.+?)\1", text)  # "**Phishing**: long description" -> "Phishing"
    if bold:
        text = bold.group(2)
    text = _MARKUP.sub("", text).strip().strip("\"'“”‘’")
    text = _LABEL.sub("", text.strip())
    head, sep, tail = text.partition(": ")
    if sep and len(head.split()) <= 6 and len(tail.split()) >= 3:  # "Phishing: attacks that ..." -> "Phishing"
        text = head
    head, sep, tail = text.partition(" - ")
    if sep and len(head.split()) <= 6 and len(tail.split()) >= 3:
        text = head
    text = re.sub(r"\s+", " ", text).strip().strip("\"'“”‘’")
    return text.rstrip(" .,;:!?").strip()


def name_survives_cut(text: str) -> bool:
    """For a reply cut off by the token limit: is its last list item's name whole?

    True when the last line has a description separator ("Name: ...", "**Name** ...", "Name - ...") after
    the name, so the cut fell inside the description and the name before it is complete.
    """
    lines = text.rstrip().splitlines()
    last = _MARKER.sub("", lines[-1].strip()) if lines else ""
    return bool(re.match(r"^(\*\*|__)(.+?)\1\s*\S|^[^:]{1,80}:\s+\S|^.{1,80}?\s-\s+\S", last))


def concept_key(text: str) -> str:
    """Case-insensitive comparison key for sibling/ancestor dedup."""
    return normalise_concept(text).casefold()


def _json_candidates(text: str) -> list[Any]:
    """JSON values found in the reply: fenced blocks first, then the outermost [...] or {...} span."""
    found: list[Any] = []
    blocks = _FENCE.findall(text) + [text]
    for block in blocks:
        for open_char, close_char in (("[", "]"), ("{", "}")):
            start, end = block.find(open_char), block.rfind(close_char)
            if 0 <= start < end:
                try:
                    found.append(json.loads(block[start : end + 1]))
                except json.JSONDecodeError:
                    continue
    return found


def _strings_from_json(value: Any) -> Optional[list[str]]:
    """A list of strings from ["a", "b"], {"concepts": [...]}, or [{"name": "a"}, ...]."""
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) == 1:
            return _strings_from_json(lists[0])
        if value and all(isinstance(v, str) and re.search(r"\d", str(k)) for k, v in value.items()):  # {"1": "a", "2": "b"}
            return list(value.values())
        return None  # e.g. {"summary": "prose"}: one string under a name is not a list
    if not isinstance(value, list):
        return None
    items: list[str] = []
    for item in value:
        if isinstance(item, str):
            items.append(item)
        elif isinstance(item, dict):
            named = next((item[k] for k in ("name", "concept", "title", "topic", "instruction", "task") if isinstance(item.get(k), str)), None)
            if named is None:
                return None
            items.append(named)
        else:
            return None
    return items


def clean_item(text: str) -> str:
    """A list item as a sentence: marker and Markdown gone, whitespace collapsed, punctuation kept (for instructions)."""
    text = re.sub(r"\*\*|`", "", _MARKER.sub("", text.strip()))
    return re.sub(r"\s+", " ", _LABEL.sub("", text.strip())).strip().strip("\"'“”")


def parse_list(text: str, clean: Callable[[str], str] = normalise_concept) -> Optional[list[str]]:
    """Items of a list reply (JSON, numbered, bulleted, or plain short lines), normalised; None if none found.

    An empty JSON list is a valid answer ("this concept is atomic") and returns []. Prose without list
    structure returns None, so a refusal or an essay is never mistaken for a list of concepts.
    """
    for value in _json_candidates(text):
        items = _strings_from_json(value)
        if items is not None:
            return [c for c in (clean(i) for i in items) if c]
    lines = [line for line in text.splitlines() if line.strip()]
    numbered = [line for line in lines if _NUMBERED.match(line)]  # numbered items win over nested bullets
    bullets = [line for line in lines if _BULLET.match(line)]
    if numbered or bullets:
        chosen = numbered or bullets
    elif len(lines) >= 2 and all(len(line.split()) <= 8 and not line.rstrip().endswith(":") for line in lines):
        chosen = lines
    else:
        return None
    items = [clean(line) for line in chosen]
    return [c for c in items if c] or None


def parse_qa(text: str) -> Optional[list[tuple[str, str]]]:
    """Question/answer pairs from JSON [{question, answer}], "Question 1:/Answer 1:" or "Q:/A:" blocks.

    Text before the first marker (a preamble) is ignored; a question without an answer is dropped.
    Returns None when no complete pair is found.
    """
    for value in _json_candidates(text):
        pairs = _pairs_from_json(value)
        if pairs:
            return pairs
    markers = list(_QA_MARKER.finditer(text))
    pairs: list[tuple[str, str]] = []
    question: Optional[str] = None
    for i, match in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
        body = _clean_block(text[match.end() : end])
        if match.group(1).lower().startswith("q"):
            question = body
        elif question:
            pairs.append((question, body))
            question = None
    pairs = [(q, a) for q, a in pairs if q and a]
    return pairs or None


def _pairs_from_json(value: Any) -> Optional[list[tuple[str, str]]]:
    if isinstance(value, dict):
        if isinstance(value.get("question"), str) and isinstance(value.get("answer"), str):
            value = [value]
        else:
            lists = [v for v in value.values() if isinstance(v, list)]
            if len(lists) != 1:
                return None
            value = lists[0]
    if not isinstance(value, list):
        return None
    pairs = []
    for item in value:
        if not isinstance(item, dict):
            return None
        lowered = {str(k).lower(): v for k, v in item.items()}
        question = lowered.get("question", lowered.get("q", lowered.get("instruction")))
        answer = lowered.get("answer", lowered.get("a", lowered.get("response", lowered.get("output"))))
        if isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip():
            pairs.append((question.strip(), answer.strip()))
    return pairs or None


def _clean_block(text: str) -> str:
    """Trim Markdown residue around a question or answer body, keeping inner formatting (code, lists)."""
    text = text.strip()
    text = re.sub(r"^[*_]+\s*|\s*[*_]+$", "", text)
    text = re.sub(r"\n\s*(?:---+|\*\*\*+)\s*$", "", text)
    return text.strip()


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
    for char, count in Counter(text[:2000]).items():  # distinct characters in order of first appearance, counted in C
        if char.isalpha():
            scripts[_script(char)] += count
    if not scripts:
        return False
    dominant, count = scripts.most_common(1)[0]
    return 2 * count > sum(scripts.values()) and not any(c.isalpha() and _script(c) == dominant for c in set(reference))


def drop_last(items: list[T], text: str) -> list[T]:
    """What survives a reply cut off by the token limit: every item but the last, where the cut fell."""
    return items[:-1]


def drop_cut_name(items: list[T], text: str) -> list[T]:
    """What survives a cut-off concept list: the last name too when the cut fell in its description."""
    return items if name_survives_cut(text) else items[:-1]


@dataclasses.dataclass
class Asked:
    """Outcome of one request after retries: the parsed value (None = failed), the last completion, items lost to a cut."""

    value: Any
    completion: Completion
    attempts: int
    cut_items: int = 0


def _parse_reply(completion: Completion, conversation: Conversation, parse: Callable[[str], Optional[Any]],
                 cut: Optional[Callable[[Any, str], Any]]) -> tuple[Any, int]:
    """The parsed value (None = unusable) and how many items the cut took."""
    if foreign_script(completion.text, " ".join(m["content"] for m in conversation)):
        return None, 0
    value = parse(completion.text)
    if value is None or cut is None or completion.finish_reason != "length":
        return value, 0
    kept = cut(value, completion.text)
    return (kept or None), len(value) - len(kept)


def ask_parsed(
    model: ChatClient,
    conversations: Sequence[Conversation],
    params: GenerationParams,
    parse: Callable[[str], Optional[T]],
    max_retries: int,
    cut: Optional[Callable[[T, str], T]] = None,
) -> list[Asked]:
    """Ask every conversation in one batched call; re-ask only the unusable replies, at most `max_retries` times.

    Unusable: `parse` returns None, or the reply is in another writing system than the prompt, or (with
    `cut`, for list-valued parses) it was cut off by the token limit and `cut(items, text)` leaves nothing
    whole, so a reply truncated inside its first item is re-asked rather than read as an empty list.
    Each retry uses a different seed: with a completion cache, re-asking with the same seed would
    return the same bad reply. The seed offset is the attempt number, so a rerun hits the cache.
    """
    results: list[Optional[Asked]] = [None] * len(conversations)
    pending = list(range(len(conversations)))
    for attempt in range(max_retries + 1):
        if not pending:
            break
        attempt_params = dataclasses.replace(params, seed=params.seed + attempt)
        completions = model.complete([list(conversations[i]) for i in pending], attempt_params)
        if len(completions) != len(pending):
            raise RuntimeError(f"{model.name} returned {len(completions)} completions for {len(pending)} conversations")
        still: list[int] = []
        for index, completion in zip(pending, completions):
            value, cut_items = _parse_reply(completion, conversations[index], parse, cut)
            results[index] = Asked(value, completion, attempt + 1, cut_items)
            if value is None:
                still.append(index)
        pending = still
    return [r for r in results if r is not None]
