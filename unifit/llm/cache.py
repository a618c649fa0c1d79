"""Content-addressed completion cache: key = model identity + conversation + sampling params (incl. seed).

SQLite in the cache directory, so concurrent runs on one filesystem share it safely and a rerun never
pays twice for the same call. Only finished completions are stored. The model client (`unifit.llm.client`)
looks every call up here before it reaches a model.

Each thread keeps one connection with a large page cache: the keys are hashes, so every lookup and insert lands
on a random page of the B-tree, and a connection opened per call starts with an empty cache — at a million
completions that made a call's cache work 2.6 times what it was on an empty file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Sequence

from unifit.fingerprint import fingerprint
from unifit.llm.base import Completion, Conversation, GenerationParams


def completion_key(model_identity: str, conversation: Conversation, params: GenerationParams) -> str:
    return fingerprint({"model": model_identity, "messages": conversation, "params": params.as_dict()})


PAGE_CACHE_KIB = 256 * 1024  # per connection: the B-tree's inner pages and much of a large file stay in memory


class CompletionCache:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections belong to the thread that opened them)."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=60)
            connection.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")
            self._local.connection = connection
        return connection

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
