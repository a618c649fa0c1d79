"""Training rows built by Ray Data from parquet files: every encodable instance lands in exactly one row, token for
token as `encode_instances` makes it alone, in a seeded shuffled order; the rows are kept for a rerun (the order a
resumed run trains on) and rebuilt when the instances change; and training streams them from their files."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import tiny_model_config

from unifit.records import Instance, write_instances
from unifit.training.data import IGNORE_INDEX, encode_instances
from unifit.training.rows import build_rows, order_key, stream_rows


def _instances(count: int, start: int = 0) -> list[Instance]:
    return [Instance([{"role": "user", "content": f"question {k} " + "word " * (k % 23)},
                      {"role": "assistant", "content": f"answer {k} " + "token " * (k % 31 + 1)}], f"leaf{k % 5}",
                     ["cyber", f"leaf{k % 5}"], "concept_tree", "writer") for k in range(start, start + count)]


@pytest.fixture
def two_files(tmp_path: Path) -> list[Path]:
    """120 instances over two parquet files, plus one whose answer lies wholly past max_length (dropped, counted)."""
    long_prompt = Instance([{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "late"}],
                           "leaf0", ["cyber", "leaf0"], "concept_tree", "writer")
    return [write_instances(_instances(70), tmp_path / "in" / "a.parquet"),
            write_instances(_instances(50, start=70) + [long_prompt], tmp_path / "in" / "b.parquet")]


def _rows(directory: Path) -> list[dict]:
    return [row for file in sorted(directory.glob("*.parquet")) for row in pq.read_table(file).to_pylist()]


def test_packed_rows_hold_every_instance_once_as_encoded_alone(ray_local, tmp_path: Path, cache_dir: Path,
                                                               tiny_tokenizer, two_files: list[Path]) -> None:
    model = tiny_model_config("llama")
    model.max_length = 128
    summary = build_rows(two_files, tmp_path / "rows", model_cfg=model, cache_dir=str(cache_dir), packing=True, seed=3)
    rows = _rows(tmp_path / "rows")
    instances = [row for file in two_files for row in pq.read_table(file).to_pylist()]
    alone = {row["id"]: example for row in instances
             for example in encode_instances(tiny_tokenizer, [row], model.max_length)[0]}
    assert len(alone) == 120  # the long prompt has no answer token within 128
    assert (summary.instances, summary.examples, summary.dropped_no_answer, summary.rows) == (121, 120, 1, len(rows))
    assert len(summary.files) == 2  # the sort's two blocks (`sort_boundaries`), not Ray's default 200
    assert sorted(i for row in rows for i in row["ids"]) == sorted(alone)
    assert summary.rows < 120 and all(len(row["input_ids"]) <= 128 for row in rows)
    for row in rows:  # each segment is the conversation as encoded alone, its first label masked (packed boundary)
        start = 0
        for instance_id in row["ids"]:
            example = alone[instance_id]
            end = start + len(example["input_ids"])
            assert row["input_ids"][start:end] == example["input_ids"]
            assert row["labels"][start:end] == [IGNORE_INDEX] + example["labels"][1:]
            assert row["position_ids"][start:end] == list(range(end - start))
            start = end
        assert start == len(row["input_ids"])


def test_unpacked_rows_come_in_seeded_order_and_are_kept_until_the_instances_change(
        ray_local, tmp_path: Path, cache_dir: Path, two_files: list[Path]) -> None:
    model = tiny_model_config("llama")
    out = tmp_path / "rows"
    summary = build_rows(two_files, out, model_cfg=model, cache_dir=str(cache_dir), packing=False, seed=3)
    ids = [row["ids"][0] for row in _rows(out)]
    assert len(ids) == summary.rows == summary.examples == 121
    assert ids == sorted(ids, key=lambda i: order_key(i, 3)) != sorted(ids)  # a global shuffle, the same every run
    written = {Path(f).stat().st_mtime_ns for f in summary.files}

    assert build_rows(two_files, out, model_cfg=model, cache_dir=str(cache_dir), packing=False, seed=3) == summary
    assert {Path(f).stat().st_mtime_ns for f in summary.files} == written  # kept, not rebuilt: a resume trains on them

    write_instances(_instances(10, start=500), two_files[1])
    changed = build_rows(two_files, out, model_cfg=model, cache_dir=str(cache_dir), packing=False, seed=3)
    assert changed.examples == 80
    assert sorted(row["ids"][0] for row in _rows(out)) == sorted(i.id for i in _instances(70) + _instances(10, start=500))

    streamed = stream_rows(changed, packing=False)
    assert streamed.columns() == ["input_ids", "labels"]
    assert streamed.count() == 80


def test_rows_do_not_depend_on_how_the_encode_is_split_into_tasks(ray_local, tmp_path: Path, cache_dir: Path,
                                                                   two_files: list[Path], monkeypatch) -> None:
    model = tiny_model_config("llama")
    model.max_length = 128
    whole = build_rows(two_files, tmp_path / "whole", model_cfg=model, cache_dir=str(cache_dir), packing=True, seed=3)
    monkeypatch.setattr("unifit.training.rows.ENCODE_BLOCK_ROWS", 16)  # 8 encode tasks instead of 2
    split = build_rows(two_files, tmp_path / "split", model_cfg=model, cache_dir=str(cache_dir), packing=True, seed=3)
    assert (split.rows, split.examples) == (whole.rows, whole.examples)
    assert _rows(tmp_path / "split") == _rows(tmp_path / "whole")
