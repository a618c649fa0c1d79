"""Bring-your-own-data importers: formats, leaf ids, and malformed rows (file:line errors or counted skips)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unifit.data_import import import_instances
from unifit.fingerprint import fingerprint
from unifit.records import write_parquet
from unifit.stage import UserError

DATA = Path(__file__).resolve().parents[1] / "data" / "import"


def test_alpaca_json_array() -> None:
    instances, report = import_instances(DATA / "alpaca.json")
    assert report["rows"] == report["imported"] == 3 and report["skipped"] == {}
    first, second, third = instances
    assert first.messages == [{"role": "user", "content": "What does SPF check?"},
                              {"role": "assistant", "content": "SPF checks whether the sending server is authorised by the domain's DNS record."}]
    assert second.messages[0]["content"] == "Summarise the text.\n\nDKIM signs outgoing mail with a domain key."
    assert first.source == "imported" and first.concept_path == ["alpaca"]
    assert first.leaf_id == third.leaf_id == fingerprint("alpaca.json")[:16]
    assert second.leaf_id == "email" and second.concept_path == ["alpaca", "email"]


def test_alpaca_jsonl_errors_name_file_and_line() -> None:
    with pytest.raises(UserError, match=r"alpaca_bad\.jsonl:3: field 'output' must be a non-empty string"):
        import_instances(DATA / "alpaca_bad.jsonl")


def test_alpaca_jsonl_lenient_counts_every_skipped_row() -> None:
    instances, report = import_instances(DATA / "alpaca_bad.jsonl", lenient=True)
    assert report["rows"] == 6  # the blank line is not a row
    assert report["skipped"] == {"missing_field": 1, "invalid_json": 1}
    assert report["duplicates"] == 1  # line 5 repeats line 1
    assert report["imported"] == len(instances) == 3
    assert report["rows"] == report["imported"] + sum(report["skipped"].values()) + report["duplicates"]
    assert any(":4: invalid JSON" in error for error in report["errors"])
    assert [i.messages[0]["content"] for i in instances] == ["What is DMARC?", "Explain TTL.", "What is a CNAME?"]


def test_json_array_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(UserError, match=r"broken\.json:3: invalid JSON"):
        import_instances(path, lenient=True)


def test_sharegpt_multi_turn_and_system() -> None:
    with pytest.raises(UserError, match=r"sharegpt\.jsonl:3: messages: roles must alternate"):
        import_instances(DATA / "sharegpt.jsonl")
    instances, report = import_instances(DATA / "sharegpt.jsonl", fmt="sharegpt", lenient=True)
    assert report["skipped"] == {"role_order": 1, "unknown_role": 1} and report["imported"] == 2
    assert "sharegpt.jsonl:4: conversations[0]: unknown speaker 'robot'" in report["errors"][1]
    assert [m["role"] for m in instances[1].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert instances[1].messages[4]["content"].startswith("Deployment is growing")


def test_openai_messages_with_category_and_format_mismatch() -> None:
    instances, _ = import_instances(DATA / "messages.jsonl")
    assert [i.leaf_id for i in instances] == ["cdn", "pki"]
    with pytest.raises(UserError, match=r"messages\.jsonl:1: format=alpaca needs a 'instruction' field"):
        import_instances(DATA / "messages.jsonl", fmt="alpaca")


def test_non_utf8_bytes_give_a_line_numbered_error() -> None:
    with pytest.raises(UserError, match=r"latin1\.jsonl:2: bytes that are not UTF-8 at column 21"):
        import_instances(DATA / "latin1.jsonl")
    instances, report = import_instances(DATA / "latin1.jsonl", lenient=True)
    assert report["skipped"] == {"non_utf8": 1} and len(instances) == 2


def test_parquet_messages_and_instruction_columns(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (DATA / "messages.jsonl").read_text().splitlines()]
    write_parquet(rows, tmp_path / "chat.parquet")
    instances, report = import_instances(tmp_path / "chat.parquet")
    assert report["imported"] == 2 and instances[0].messages == rows[0]["messages"]
    write_parquet([{"instruction": "Define MX.", "output": "Mail exchanger record."},
                   {"instruction": "Define A.", "output": ""}], tmp_path / "alpaca.parquet")
    with pytest.raises(UserError, match=r"alpaca\.parquet:row 2: field 'output'"):
        import_instances(tmp_path / "alpaca.parquet")


def test_missing_file_and_empty_result(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        import_instances(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no records"):
        import_instances(tmp_path / "empty.jsonl")
