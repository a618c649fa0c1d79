"""Atomic writes: a failure mid-write leaves the old content (or nothing) under the final name, never a half write."""

from __future__ import annotations

from pathlib import Path

import pytest

from unifit.atomic import atomic_dir, atomic_path, write_text_atomic


class Killed(Exception):
    """Stands for a process killed in the middle of a write."""


def test_a_failed_file_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = write_text_atomic(tmp_path / "out" / "report.json", "old")
    with pytest.raises(Killed), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise Killed
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("v1")
        (tmp / "old-only.bin").write_text("x")
    with pytest.raises(Killed), atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("half")
        raise Killed
    assert (target / "config.json").read_text() == "v1"
    with atomic_dir(target) as tmp:  # a re-export: nothing of the previous directory survives
        (tmp / "config.json").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"] and (target / "config.json").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_keep_existing_keeps_the_copy_another_process_put_in_place_first(tmp_path: Path) -> None:
    target = tmp_path / "converted"
    with atomic_dir(target, keep_existing=True) as tmp:
        (tmp / "config.json").write_text("mine")
        target.mkdir()  # another worker finished the same conversion meanwhile
        (target / "config.json").write_text("theirs")
    assert (target / "config.json").read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["converted"]
