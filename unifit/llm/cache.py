"""Content-addressed completion cache: key = model identity + conversation + sampling params (incl. seed).

SQLite in the cache directory, so concurrent runs on one filesystem share it safely and a rerun never
pays twice for the same call. Only finished completions are stored.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Sequence

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


class CachedChatModel:
    """Wraps any ChatModel: answers cached calls from disk, forwards only the misses (in one batch)."""

    def __init__(self, model: ChatModel, cache: CompletionCache, model_identity: str) -> None:
        self.inner = model
        self.name = model.name
        self.cache = cache
        self.model_identity = model_identity

    def complete(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        keys = [completion_key(self.model_identity, list(c), params) for c in conversations]
        found = self.cache.get_many(keys)
        missing = [i for i, key in enumerate(keys) if key not in found]
        if missing:
            fresh = complete(self.inner, [conversations[i] for i in missing], params)
            new = {keys[i]: c for i, c in zip(missing, fresh)}
            self.cache.put_many(new)
            found.update(new)
        return [found[key] for key in keys]

    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[str]:
        return [c.text for c in self.complete(conversations, params)]
