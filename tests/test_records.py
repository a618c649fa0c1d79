"""Column-wise reads of the instance shards: rows taken by id across files, user turns without the answers, row ranges."""

from __future__ import annotations

from pathlib import Path

import pytest

from unifit.records import Instance, read_parquet, read_row_range, user_turns, write_instances, write_rows_by_id
from unifit.selection.score import _plan_slices


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


def test_a_row_range_reads_only_its_row_groups_and_shards_cross_file_boundaries(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    rows = [conversation(i, 1) for i in range(23)]
    big = tmp_path / "big.parquet"
    pq.write_table(pq.read_table(write_instances(rows[:20], big)), big, row_group_size=6)  # groups 0-5, 6-11, 12-17, 18-19
    assert pq.ParquetFile(big).num_row_groups == 4
    assert read_row_range(big, 7, 9, ["id"]).column("id").to_pylist() == [row["id"] for row in rows[7:16]]
    assert read_row_range(big, 18, 2, ["id"]).column("id").to_pylist() == [row["id"] for row in rows[18:20]]

    files = [big, write_instances(rows[20:], tmp_path / "small.parquet")]
    plan = _plan_slices([20, 3], files, 8)
    assert plan == [[(str(big), 0, 8)], [(str(big), 8, 8)], [(str(big), 16, 4), (str(files[1]), 0, 3)]]
    read = [[row_id for file, start, length in shard for row_id in read_row_range(file, start, length, ["id"]).column("id").to_pylist()]
            for shard in plan]
    assert read == [[row["id"] for row in rows[i : i + 8]] for i in range(0, 23, 8)]
