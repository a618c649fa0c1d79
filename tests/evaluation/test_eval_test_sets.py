"""User test sets: every published layout imports, the real Vicuna and Koala files load, bad files name file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from unifit.evaluation.test_sets import load_test_set
from unifit.stage import UserError


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("row,question,qid", [
    ({"question_id": 7, "text": "How do I plan?", "category": "generic"}, "How do I plan?", "7"),  # Vicuna
    ({"id": "koala_3", "prompt": "List five films."}, "List five films.", "koala_3"),  # Koala
    ({"question_id": 81, "category": "writing", "turns": ["Write a blog post.", "Rewrite it."]}, "Write a blog post.", "81"),  # MT-Bench
    ({"instruction": "Translate this.", "input": "Bonjour", "output": "Hello"}, "Translate this.\n\nBonjour", "1"),  # Alpaca
    ({"instruction": "Name a colour.", "input": ""}, "Name a colour.", "1"),
])
def test_each_layout_imports(tmp_path: Path, row: dict, question: str, qid: str) -> None:
    name, rows = load_test_set(_jsonl(tmp_path / "mine.jsonl", [row]))
    assert name == "mine" and rows[0]["question"] == question and rows[0]["question_id"] == f"mine:{qid}"


@pytest.mark.skipif(not SHARED_DATA.exists(), reason=f"{SHARED_DATA} (the shared real data) is not beside this checkout")
def test_the_real_vicuna_and_koala_sets_load() -> None:
    name, vicuna = load_test_set(SHARED_DATA / "vicuna_test_set.jsonl")
    assert name == "vicuna_test_set" and len(vicuna) == 80 and vicuna[0]["question"] == "How can I improve my time management skills?"
    _, koala = load_test_set(SHARED_DATA / "koala_test_set.jsonl")
    assert len(koala) == 180 and koala[0]["question_id"] == "koala_test_set:koala_0"


@pytest.mark.parametrize("lines,line,message", [
    (['{"text": "ok"}', '{"text": "broken"'], 2, "not a JSON object"),
    (['["a list"]'], 1, "expected a JSON object"),
    (['{"text": "ok"}', "", '{"answer": "no question"}'], 3, "no question"),
    (['{"text": "   "}'], 1, "no question"),
    (['{"id": 1, "text": "a"}', '{"id": 1, "text": "b"}'], 2, "duplicate id"),
])
def test_bad_files_name_file_and_line(tmp_path: Path, lines: list, line: int, message: str) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(UserError, match=rf"{path}:{line}: .*{message}"):
        load_test_set(path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_test_set(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        load_test_set(tmp_path / "empty.jsonl")
