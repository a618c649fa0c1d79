"""User test sets (`evaluate.test_sets`): JSONL files in the layouts instruction-tuning papers publish.

Accepted per line, first match wins: Vicuna/FastChat (`text`), Koala (`prompt`), MT-Bench (`turns`, the
first turn is asked), Alpaca/Self-Instruct (`instruction`, with `input` appended when non-empty). The id
is `question_id`, `id` or `key`, else the line number. Each set is judged and reported on its own, named
after its file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unifit.fingerprint import fingerprint
from unifit.stage import UserError

LAYOUTS = "`text` (Vicuna), `prompt` (Koala), `turns` (MT-Bench) or `instruction` (+ optional `input`, Alpaca)"


def _question(obj: dict[str, Any]) -> Any:
    if "text" in obj:
        return obj["text"]
    if "prompt" in obj:
        return obj["prompt"]
    if "turns" in obj:
        turns = obj["turns"]
        return turns[0] if isinstance(turns, list) and turns else None
    if "instruction" in obj:
        extra = obj.get("input") or ""
        return f"{obj['instruction']}\n\n{extra}" if isinstance(extra, str) and extra.strip() else obj["instruction"]
    return None


def load_test_set(path: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """(set name, rows with question_id and question); a bad line raises a UserError naming `file:line`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"evaluate.test_sets: {path} does not exist; give JSONL files with one question per line")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{where}: not a JSON object ({error.msg}); a test set is JSONL, one object a line") from None
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object with {LAYOUTS}, got {type(obj).__name__}")
            question = _question(obj)
            if not isinstance(question, str) or not question.strip():
                raise UserError(f"{where}: no question: expected a non-empty string in {LAYOUTS}; keys here: {sorted(obj)}")
            raw_id = next((obj[k] for k in ("question_id", "id", "key") if k in obj), number)
            question_id = f"{path.stem}:{raw_id}"
            if question_id in seen:
                raise UserError(f"{where}: duplicate id {raw_id!r}; ids must be unique within a test set")
            seen.add(question_id)
            rows.append({"question_id": question_id, "question": question.strip(), "leaf_id": fingerprint(path.stem)[:16],
                         "concept_path": [path.stem]})
    if not rows:
        raise UserError(f"{path}: the test set is empty")
    return path.stem, rows
