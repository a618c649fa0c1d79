"""The bad-input corpus in tests/data/bad/: every file gives one actionable error naming the file and line (or the
config field), or, with data.lenient=true, its bad rows are skipped and counted by reason: nothing is lost.

The table below is the contract; tests/data/bad/README.md is its human-readable copy (checked to list the same files).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from unifit.config import ConfigError
from unifit.data_import import import_instances
from unifit.stage import UserError

REPO = Path(__file__).resolve().parents[1]
BAD = REPO / "tests" / "data" / "bad"
ROW_HINT = "or set data.lenient=true to skip bad rows"


@dataclass(frozen=True)
class Case:
    file: str
    where: str  # what the error names besides the file: ":3:" (line), ":row 2:" (parquet row), ":" (the file)
    error: str  # fragment of the strict error: what is wrong
    action: str  # fragment of the strict error: what to do
    skipped: Optional[dict[str, int]] = None  # lenient: skipped rows by reason; None = the file fails in lenient mode too
    duplicates: int = 0


CASES = [
    Case("broken_line.jsonl", ":3:", "invalid JSON (Unterminated string", ROW_HINT, {"invalid_json": 1}),
    Case("truncated_array.json", ":3:", "invalid JSON", "the file looks truncated"),
    Case("unclosed_array.json", ":4:", "the JSON array is not closed with ']'", "check that it is complete"),
    Case("syntax_error.json", ":3:", "invalid JSON (Expecting ',' delimiter", "fix the file"),
    Case("object_not_list.json", ":1:", "one JSON object with keys ['data', 'version']", "put the records in a JSON array"),
    Case("empty.jsonl", ":", "holds no records", "point data.path at your data file"),
    Case("blank_lines.jsonl", ":", "holds no records", "point data.path at your data file"),
    Case("empty_array.json", ":", "holds no records", "point data.path at your data file"),
    Case("missing_output.jsonl", ":2:", "field 'output' must be a non-empty string, but it is missing", ROW_HINT,
         {"missing_field": 1}),
    Case("missing_output.parquet", ":row 2:", "field 'output' must be a non-empty string, but it is missing", ROW_HINT,
         {"missing_field": 1}),
    Case("not_parquet.parquet", ":", "not a readable parquet file", "check the file or set data.format"),
    Case("output_number.jsonl", ":2:", "field 'output' must be a non-empty string, got int 53", "give the text as a JSON string",
         {"wrong_type": 1}),
    Case("messages_not_list.jsonl", ":2:", "'messages' must be a list of {role, content} messages, got str", ROW_HINT,
         {"bad_messages": 1}),
    Case("not_an_object.jsonl", ":2:", "expected a JSON object, got list", "each record must be an object", {"not_an_object": 1}),
    Case("unknown_format.jsonl", ":1:", "no 'instruction', 'conversations' or 'messages' field (found ['completion', 'prompt'])",
         "use one of the Alpaca, ShareGPT or OpenAI messages layouts"),
    Case("whitespace_answer.jsonl", ":3:", "field 'output' must be a non-empty string, got only whitespace", ROW_HINT,
         {"empty_answer": 1}),
    Case("empty_answer.jsonl", ":2:", "messages[1]: empty assistant answer", "give every assistant turn its answer text",
         {"empty_answer": 1}),
    Case("latin1.jsonl", ":3:", "bytes that are not UTF-8 at column 88", "iconv -f latin1 -t utf-8", {"non_utf8": 1}),
    Case("ends_with_user.jsonl", ":2:", "got ['user', 'assistant', 'user']", "ending with an assistant answer",
         {"role_order": 1}),
    Case("assistant_first.jsonl", ":1:", "got ['assistant', 'user', 'assistant']", "starting with user", {"role_order": 1}),
    Case("two_assistants.jsonl", ":3:", "got ['user', 'assistant', 'assistant']", "roles must alternate user/assistant",
         {"role_order": 1}),
    Case("unknown_role.jsonl", ":2:", "messages[1]: unknown role 'bot'", "use one of ('system', 'user', 'assistant')",
         {"unknown_role": 2}),
    Case("sharegpt_narrator.jsonl", ":2:", "conversations[0]: unknown speaker 'narrator'", "use one of ['assistant'",
         {"unknown_role": 1}),
    Case("duplicate_ids.jsonl", ":3:", "id 'q1' is already used by a different conversation at line 1",
         "give every row its own id", {"duplicate_id": 1}, duplicates=1),
]
LENIENT_ALSO_FAILS = {  # file-level problems: lenient mode cannot skip a row, so the same error stands
    "unknown_format.jsonl": "no usable rows (2 read, skipped: {'unknown_format': 2}, first: ",
}
CONFIG_CASES = [  # tests/data/bad/experiment/*.yaml, composed as `--config-dir tests/data/bad +experiment=NAME`
    ("ratio_too_big", "config field `select.ratio`: got 1.5; a fraction in (0, 1]"),
    ("missing_model", "config field `model.path`: '/nonexistent/models/Llama-2-7b-hf' does not exist; give a local model"),
    ("unknown_data_format", "config field `data.format`: got 'csv'; use auto, alpaca, sharegpt, messages or parquet"),
]


def rows_in_file(path: Path) -> int:
    """Records in the file, counted independently of the importer."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return sum(1 for line in path.read_bytes().splitlines() if line.strip())


@pytest.mark.parametrize("case", CASES, ids=[case.file for case in CASES])
def test_strict_error_names_file_line_and_fix(case: Case) -> None:
    with pytest.raises(UserError) as caught:
        import_instances(BAD / case.file)
    message = str(caught.value)
    assert f"{BAD / case.file}{case.where}" in message
    assert case.error in message and case.action in message
    assert "\n" not in message


@pytest.mark.parametrize("case", CASES, ids=[case.file for case in CASES])
def test_lenient_keeps_good_rows_and_counts_every_bad_one(case: Case) -> None:
    if case.skipped is None:
        with pytest.raises(UserError) as caught:
            import_instances(BAD / case.file, lenient=True)
        assert LENIENT_ALSO_FAILS.get(case.file, case.error) in str(caught.value)
        return
    instances, report = import_instances(BAD / case.file, lenient=True)
    assert report["skipped"] == case.skipped and report["duplicates"] == case.duplicates
    assert len(instances) == report["imported"] >= 1
    assert report["rows"] == rows_in_file(BAD / case.file)
    assert report["imported"] + sum(report["skipped"].values()) + report["duplicates"] == report["rows"]
    assert len(report["errors"]) == sum(case.skipped.values())
    assert all(case.file in error for error in report["errors"])


def test_over_length_conversation_is_imported_then_counted_not_dropped(tiny_model_cfg, tiny_tokenizer) -> None:
    """Length is a property of the model, not of the file: import keeps the row; scoring marks it `truncated` (never
    selected, counted in the score/select reports) and training counts it in `truncated`."""
    from unifit.selection.ifd import conversation_examples
    from unifit.training.data import encode_instances

    instances, report = import_instances(BAD / "too_long.jsonl")
    assert report["imported"] == report["rows"] == 2 and report["skipped"] == {}
    max_length = tiny_model_cfg.max_length
    flags = [conversation_examples(tiny_tokenizer, i.messages, max_length).truncated for i in instances]
    assert flags == [False, True]
    examples, encoded = encode_instances(tiny_tokenizer, [i.to_row() for i in instances], max_length)
    assert (encoded.encoded, encoded.truncated, encoded.dropped_no_answer) == (2, 1, 0)
    assert max(len(e["input_ids"]) for e in examples) == max_length


def test_unknown_format_setting_and_missing_file() -> None:
    with pytest.raises(UserError, match=r"data\.format: got 'xml'; use one of"):
        import_instances(BAD / "broken_line.jsonl", fmt="xml")
    with pytest.raises(UserError, match=r"nope\.jsonl: no such file; set data\.path"):
        import_instances(BAD / "nope.jsonl")


@pytest.mark.parametrize(("experiment", "message"), CONFIG_CASES, ids=[name for name, _ in CONFIG_CASES])
def test_impossible_config_names_the_field(experiment: str, message: str) -> None:
    from conftest import compose_config

    with pytest.raises(ConfigError) as caught:
        compose_config([f"hydra.searchpath=[file://{BAD}]", f"+experiment={experiment}"])
    assert message in str(caught.value)


def test_readme_lists_every_bad_file() -> None:
    readme = (BAD / "README.md").read_text()
    files = {p.relative_to(BAD).as_posix() for p in BAD.rglob("*") if p.is_file() and p.name != "README.md"}
    assert len(files) >= 20
    listed = {name for name in files if f"`{name}`" in readme}
    assert listed == files
    tested = {case.file for case in CASES} | {"too_long.jsonl"} | {f"experiment/{name}.yaml" for name, _ in CONFIG_CASES}
    assert tested | {"experiment/batch_not_divisible.yaml"} == files


# --- the CLI, the way a user meets these errors (each run ~1-3 s: no model is loaded) ---

def launch(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "unifit.launch", *overrides, f"run_dir={run_dir}", "wandb.mode=disabled"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("unifit: error: ")]
    assert len(errors) == 1, result.stderr
    assert all(fragment in errors[0] for fragment in fragments), errors[0]


def test_cli_bad_row_is_one_line_with_file_and_line(tmp_path: Path) -> None:
    result = launch(tmp_path, "+experiment=select_only", "data.path=tests/data/bad/latin1.jsonl", "stages=[generate]")
    assert_one_line_error(result, "tests/data/bad/latin1.jsonl:3: bytes that are not UTF-8", "iconv", "data.lenient=true")


def test_cli_lenient_run_reports_skipped_rows(tmp_path: Path) -> None:
    result = launch(tmp_path, "+experiment=select_only", "data.path=tests/data/bad/duplicate_ids.jsonl",
                    "data.lenient=true", "stages=[generate]")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "timings.json").read_text())["stages"]["generate"]["metrics"]
    assert (metrics["import_rows"], metrics["instances"], metrics["import_skipped"], metrics["import_duplicates"]) == (4, 2, 1, 1)
    report = json.loads((tmp_path / "generate" / "report.json").read_text())["import"]
    assert report["skipped"] == {"duplicate_id": 1} and report["duplicates"] == 1
    assert report["errors"] == ["tests/data/bad/duplicate_ids.jsonl:3: id 'q1' is already used by a different "
                                "conversation at line 1; give every row its own id (or drop the id field)"]


def test_cli_missing_model_path_names_the_field(tmp_path: Path) -> None:
    result = launch(tmp_path, f"--config-dir={BAD}", "+experiment=missing_model", "data.path=tests/data/import/alpaca.json")
    assert_one_line_error(result, "model.path", "/nonexistent/models/Llama-2-7b-hf", "does not exist")


def test_cli_moved_config_field_names_its_new_place(tmp_path: Path) -> None:
    result = launch(tmp_path, "generate.self_instruct_target=2")
    assert_one_line_error(result, "`generate.self_instruct_target` is now `generate.self_instruct.target`", "rename it")


def test_cli_impossible_batch_split_fails_before_any_stage(tmp_path: Path) -> None:
    result = launch(tmp_path, f"--config-dir={BAD}", "+experiment=batch_not_divisible",
                    "data.path=tests/data/import/alpaca.json")
    assert_one_line_error(result, "train.global_batch_size", "6 is not a multiple", "use e.g. train.global_batch_size=8")
    assert not (tmp_path / "generate").exists()

