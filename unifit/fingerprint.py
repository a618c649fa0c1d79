"""Stable content hashes: the basis of stage skip-if-done, instance ids and the completion cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def _default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (dict keys sorted), hex."""
    text = json.dumps(obj, sort_keys=True, default=_default, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
