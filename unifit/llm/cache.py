"""Content-addressed completion cache: key = model identity + conversation + sampling params (incl. seed).

SQLite in the cache directory, so concurrent runs on one filesystem share it safely and a rerun never
pays twice for the same call. Only finished completions are stored.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Callable, Sequence

from unifit.fingerprint import fingerprint
from unifit.llm.base import ChatModel, Completion, Conversation, GenerationParams, complete


def completion_key(model_identity: str, conversation: Conversation, params: GenerationParams) -> str:
    return fingerprint({"model": model_identity, "messages": conversation, "params": params.as_dict()})


class CompletionCache:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def get_many(self, keys: Sequence[str]) -> dict[str, Completion]:
        found: dict[str, Completion] = {}
        with self._connect() as db:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                query = f"SELECT key, value FROM completions WHERE key IN ({','.join('?' * len(chunk))})"
                for key, value in db.execute(query, chunk):
                    found[key] = Completion(**json.loads(value))
        return found

    def put_many(self, items: dict[str, Completion]) -> None:
        rows = [(key, json.dumps(c.__dict__)) for key, c in items.items()]
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO completions (key, value) VALUES (?, ?)", rows)


def complete_through_cache(cache: CompletionCache | None, model_identity: str, conversations: Sequence[Conversation],
                           params: GenerationParams,
                           produce: Callable[[list[Conversation]], list[Completion]]) -> list[Completion]:
    """Answer cached conversations from disk and `produce` only the misses, in one call; errors are not cached."""
    keys = [completion_key(model_identity, list(c), params) for c in conversations]
    found = cache.get_many(keys) if cache else {}
    missing = [i for i, key in enumerate(keys) if key not in found]
    if missing:
        new = {keys[i]: c for i, c in zip(missing, produce([list(conversations[i]) for i in missing]))}
        if cache:
            cache.put_many({key: c for key, c in new.items() if c.finish_reason != "error"})
        found.update(new)
    return [found[key] for key in keys]


class CachedChatModel:
    """Wraps any ChatModel: answers cached calls from disk, forwards only the misses (in one batch)."""

    def __init__(self, model: ChatModel, cache: CompletionCache, model_identity: str) -> None:
        self.inner = model
        self.name = model.name
        self.cache = cache
        self.model_identity = model_identity

    def complete(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        return complete_through_cache(self.cache, self.model_identity, conversations, params,
                                      lambda todo: complete(self.inner, todo, params))

    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[str]:
        return [c.text for c in self.complete(conversations, params)]
