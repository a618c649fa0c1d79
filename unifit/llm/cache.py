"""Content-addressed completion cache: key = model identity + conversation + sampling params (incl. seed).

SQLite in the cache directory, so concurrent runs on one filesystem share it safely and a rerun never
pays twice for the same call. Only finished completions are stored. The model client (`unifit.llm.client`)
looks every call up here before it reaches a model.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Sequence

from unifit.fingerprint import fingerprint
from unifit.llm.base import Completion, Conversation, GenerationParams


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
