"""Column-wise reads of the instance shards: rows taken by id across files, user turns without the answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from unifit.records import Instance, read_parquet, user_turns, write_instances, write_rows_by_id


def conversation(index: int, turns: int, system: bool = False) -> dict:
    messages = [{"role": "system", "content": "be brief"}] if system else []
    for turn in range(turns):
        messages += [{"role": "user", "content": f"q{index}.{turn}"}, {"role": "assistant", "content": f"a{index}.{turn}"}]
    return Instance(messages, leaf_id=f"leaf{index % 3}", concept_path=["d", "s"], source="concept_tree", generator="t").to_row()


def shards(tmp_path: Path, rows: list[dict], size: int) -> list[Path]:
    return [write_instances(rows[start : start + size], tmp_path / f"shard-{n:05d}.parquet")
            for n, start in enumerate(range(0, len(rows), size))]


def test_rows_by_id_come_whole_in_the_asked_order_across_files(tmp_path: Path) -> None:
    rows = [conversation(i, 1 + i % 2) for i in range(10)]
    files = shards(tmp_path, rows, 4)  # 4 + 4 + 2
    wanted = [rows[9]["id"], rows[0]["id"], rows[5]["id"], rows[4]["id"]]
    out = write_rows_by_id(files, wanted, tmp_path / "out" / "taken.parquet")
    assert read_parquet(out) == [rows[9], rows[0], rows[5], rows[4]]
    with pytest.raises(ValueError, match="3 ids asked for, 2 rows found"):
        write_rows_by_id(files, [rows[1]["id"], "no-such-id", rows[2]["id"]], tmp_path / "out" / "bad.parquet")


def test_user_turns_in_order_with_global_row_numbers(tmp_path: Path) -> None:
    rows = [conversation(i, 1 + i % 3, system=i == 2) for i in range(7)]
    files = shards(tmp_path, rows, 3)
    expected = [(n, m["content"]) for n, row in enumerate(rows) for m in row["messages"] if m["role"] == "user"]
    assert list(user_turns(files)) == expected
    assert ("be brief" not in {text for _, text in expected}) and len(expected) == sum(1 + i % 3 for i in range(7))
