"""Bring your own instruction data: Alpaca, ShareGPT, OpenAI `messages` (JSON/JSONL) or HF-datasets parquet.

Every row becomes an `Instance` (source="imported"). A malformed row stops the import with
"path:line: what is wrong; what to do" — or, with `lenient=True`, is skipped and counted by reason in
the report, so no row is ever lost silently and no user ever sees a traceback. Bytes that are not
UTF-8 are located to their line too: the file is decoded with `surrogateescape`, so the bad bytes
survive as markers in exactly the rows that contain them.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from unifit.fingerprint import fingerprint
from unifit.records import Instance
from unifit.stage import UserError
from unifit.templates import MessagesError, validate_messages

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "parquet")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}
_BAD_BYTES = re.compile("[\udc80-\udcff]")
MAX_REPORTED_ERRORS = 20


class RowError(ValueError):
    """One row is malformed; `reason` is the report bucket, the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _detect(row: dict[str, Any]) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    raise RowError("unknown_format", f"no 'instruction', 'conversations' or 'messages' field (found {sorted(row)[:8]}); "
                   "use one of the Alpaca, ShareGPT or OpenAI messages layouts")


def _text(row: dict[str, Any], name: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None and not required:
        return ""
    problem = f"field '{name}' must be a non-empty string"
    if value is None:
        raise RowError("missing_field", f"{problem}, but it is missing")
    if not isinstance(value, str):
        raise RowError("wrong_type", f"{problem}, got {type(value).__name__} {json.dumps(value, default=str)[:40]}; "
                       "give the text as a JSON string")
    if required and not value.strip():
        reason = "empty_answer" if name == "output" else "empty_field"
        raise RowError(reason, f"{problem}, got {'an empty string' if not value else 'only whitespace'}")
    return value


def _alpaca(row: dict[str, Any]) -> list[dict[str, str]]:
    instruction, extra, output = _text(row, "instruction"), _text(row, "input", required=False), _text(row, "output")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.insert(0, {"role": "system", "content": row["system"]})
    return messages


def _sharegpt(row: dict[str, Any]) -> list[dict[str, str]]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise RowError("bad_messages", f"'conversations' must be a list of {{from, value}} turns, got {type(turns).__name__}")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RowError("bad_messages", f"conversations[{index}] needs a string 'value'")
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise RowError("unknown_role", f"conversations[{index}]: unknown speaker {turn.get('from')!r}; "
                           f"use one of {sorted(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _openai(row: dict[str, Any]) -> list[dict[str, str]]:
    turns = row["messages"]
    if not isinstance(turns, list):
        raise RowError("bad_messages", f"'messages' must be a list of {{role, content}} messages, got {type(turns).__name__}")
    return [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in turns]


PARSERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _openai}
FORMAT_KEYS = {"alpaca": "instruction", "sharegpt": "conversations", "messages": "messages"}


def _group(row: dict[str, Any], group_by: str) -> str:
    """The row's value of the `data.group_by` column: a non-empty string, else a RowError saying what to fix."""
    if group_by not in row or row[group_by] is None:
        raise RowError("missing_group", f"data.group_by={group_by}: the row has no '{group_by}' field (found "
                       f"{sorted(row)[:8]}); give every row a '{group_by}' string, or choose another column for data.group_by")
    value = row[group_by]
    if not isinstance(value, str) or not value.strip():
        shown = json.dumps(value, default=str)[:40]
        raise RowError("bad_group", f"data.group_by={group_by}: '{group_by}' must be a non-empty string naming the row's "
                       f"group, got {type(value).__name__} {shown}; write it as a JSON string (e.g. \"code\")")
    return value


def _instance(row: Any, fmt: str, default_leaf: str, stem: str, group_by: str | None = None) -> Instance:
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {type(row).__name__}; each record must be an "
                       'object such as {"instruction": ..., "output": ...}')
    kind = _detect(row) if fmt == "auto" else fmt
    key = FORMAT_KEYS[kind]
    if key not in row:
        raise RowError("unknown_format", f"format={fmt} needs a '{key}' field")
    messages = PARSERS[kind](row)
    try:
        validate_messages(messages, "messages")
    except MessagesError as error:
        raise RowError(error.reason, str(error)) from None
    category = _group(row, group_by) if group_by else (row.get("leaf_id") or row.get("category"))
    concept_path = [stem, str(category)] if category else [stem]
    generator = row.get("generator") if isinstance(row.get("generator"), str) else "unknown"
    return Instance(messages=messages, leaf_id=str(category) if category else default_leaf, concept_path=concept_path,
                    source="imported", generator=generator)


def _json_rows(text: str, path: Path) -> Iterator[tuple[int, str, Any]]:
    """(line, raw text, parsed or exception) for each element of a top-level JSON array."""
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip()) + 1  # just past the opening '['
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise UserError(f"{path}:{len(newlines) + 1}: the JSON array is not closed with ']'; the file looks truncated, "
                            "check that it is complete")
        if text[pos] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            truncated = "" if text.rstrip().endswith("]") else "; the array has no closing ']', so the file looks truncated"
            raise UserError(f"{path}:{error.lineno}: invalid JSON ({error.msg}, column {error.colno}){truncated}; fix the "
                            "file (a syntax error inside a JSON array cannot be skipped, even with data.lenient)") from None
        yield bisect_right(newlines, pos) + 1, text[pos:end], value
        pos = end


def _jsonl_rows(text: str) -> Iterator[tuple[int, str, Any]]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield line_no, line, json.loads(line)
        except json.JSONDecodeError as error:
            yield line_no, line, RowError("invalid_json", f"invalid JSON ({error.msg}, column {error.colno}); "
                                          "each line must be one JSON object")


def _text_rows(text: str, path: Path) -> Iterator[tuple[int, str, Any]]:
    """Rows of a JSON array, of one pretty-printed JSON object, or of JSONL (one object per line)."""
    body = text.strip()
    if body.startswith("["):
        return _json_rows(text, path)
    if body.startswith("{") and "\n" in body:  # one multi-line object would otherwise fail line by line as JSONL
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return _jsonl_rows(text)
        if not set(FORMAT_KEYS.values()) & set(value):
            raise UserError(f"{path}:1: the file is one JSON object with keys {sorted(value)[:8]}, not a list of records; "
                            "put the records in a JSON array [...] or write one object per line (.jsonl)")
        return iter([(text[: len(text) - len(text.lstrip())].count("\n") + 1, text, value)])
    return _jsonl_rows(text)


def _parquet_rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path}: not a readable parquet file ({error}); check the file or set data.format") from None
    for index, row in enumerate(table.to_pylist(), start=1):
        yield index, "", row


def import_instances(path: str | Path, fmt: str = "auto", lenient: bool = False,
                     group_by: str | None = None) -> tuple[list[Instance], dict[str, Any]]:
    """Instances from a user file, and a report {path, format, rows, imported, skipped{reason: n}, duplicates, errors}.

    fmt: auto (by extension and per-row keys) | alpaca | sharegpt | messages | parquet. `group_by` names the column
    whose (string) value is each row's group, i.e. its leaf for select.min_per_leaf and its scope in the coverage
    report; a row without it is a row error. Without `group_by`, rows without a `leaf_id`/`category` column share one
    leaf named after the file (a hash of its name); duplicates
    (same conversation, hence same id) are kept once and counted. A user `id` field that names two different
    conversations is a row error (`duplicate_id`, the later row): one of them was mislabelled.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise UserError(f"data.format: got {fmt!r}; use one of {FORMATS}")
    if not path.is_file():
        raise UserError(f"{path}: no such file; set data.path to an Alpaca/ShareGPT/messages JSON(L) or parquet file")
    is_parquet = fmt == "parquet" or (fmt == "auto" and path.suffix == ".parquet")
    if is_parquet:
        rows: Iterator[tuple[int, str, Any]] = _parquet_rows(path)
    else:
        text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
        rows = _text_rows(text, path)
    row_fmt = "auto" if fmt == "parquet" else fmt
    default_leaf = fingerprint(path.name)[:16]
    instances: list[Instance] = []
    seen: set[str] = set()
    id_lines: dict[str, int] = {}  # the user's own `id` field -> first line that used it
    skipped: Counter[str] = Counter()
    errors: list[str] = []
    total = duplicates = 0
    where = "row " if is_parquet else ""
    for line, raw, value in rows:
        total += 1
        try:
            bad = _BAD_BYTES.search(raw)
            if bad:
                raise RowError("non_utf8", f"bytes that are not UTF-8 at column {bad.start() + 1}; re-encode the file as UTF-8 "
                               "(e.g. `iconv -f latin1 -t utf-8`)")
            if isinstance(value, RowError):
                raise value
            instance = _instance(value, row_fmt, default_leaf, path.stem, group_by)
            if instance.id in seen:  # the same conversation again: kept once, counted
                duplicates += 1
                continue
            if value.get("id") is not None:
                first = id_lines.setdefault(str(value["id"]), line)
                if first != line:
                    raise RowError("duplicate_id", f"id {value['id']!r} is already used by a different conversation at "
                                   f"{where or 'line '}{first}; give every row its own id (or drop the id field)")
        except RowError as error:
            message = f"{path}:{where}{line}: {error}"
            if not lenient:
                raise UserError(f"{message}; or set data.lenient=true to skip bad rows (they are counted)") from None
            skipped[error.reason] += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(message)
            continue
        seen.add(instance.id)
        instances.append(instance)
    if not total:
        raise UserError(f"{path}: the file holds no records (it is empty or blank); point data.path at your data file")
    if not instances:
        raise UserError(f"{path}: no usable rows ({total} read, skipped: {dict(skipped)}, first: {errors[0]}); "
                        "check the format (Alpaca instruction/output, ShareGPT conversations, or messages)")
    report = {"path": str(path), "format": fmt, "group_by": group_by, "rows": total, "imported": len(instances), "skipped": dict(skipped),
              "duplicates": duplicates, "errors": errors}
    return instances, report
