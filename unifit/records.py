"""Typed records that pass between stages, and their parquet I/O (readable by HF `datasets`).

An instance is one chat conversation with its place in the concept tree. Writes are atomic
(temp file + rename) so a killed stage never leaves a half shard that a rerun would trust.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from unifit.atomic import atomic_path
from unifit.fingerprint import fingerprint

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
INSTANCE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("leaf_id", pa.string()),
    ("concept_path", pa.list_(pa.string())),
    ("messages", MESSAGE_TYPE),
    ("source", pa.string()),
    ("generator", pa.string()),
])


@dataclass
class Instance:
    """One instruction conversation. `id` is a content hash, so the same conversation always has the same id."""

    messages: list[dict[str, str]]
    leaf_id: str
    concept_path: list[str]
    source: str  # concept_tree | self_instruct | imported
    generator: str  # model name that wrote it
    id: str = field(default="")

    def __post_init__(self) -> None:
        if not self.id:
            self.id = instance_id(self.messages)

    def to_row(self) -> dict[str, Any]:
        """The parquet row; shares the message dicts (no deep copy: pyarrow only reads them)."""
        return {"messages": self.messages, "leaf_id": self.leaf_id, "concept_path": self.concept_path, "source": self.source,
                "generator": self.generator, "id": self.id}


def instance_id(messages: list[dict[str, str]]) -> str:
    return fingerprint([[m["role"], m["content"]] for m in messages])[:16]


def write_parquet(rows: list[dict[str, Any]], path: str | Path, schema: pa.Schema | None = None) -> Path:
    """Write rows atomically; an empty list still writes a file with the schema (so loaders see 0 rows)."""
    path = Path(path)
    if rows:
        table = pa.Table.from_pylist(rows, schema=schema) if schema is not None else pa.Table.from_pylist(rows)
    elif schema is not None:
        table = schema.empty_table()
    else:
        raise ValueError(f"{path}: cannot write an empty table without a schema")
    return write_table(table, path)


def write_table(table: pa.Table, path: str | Path) -> Path:
    """Write an Arrow table atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def parquet_files(path: str | Path) -> list[Path]:
    """One parquet file, or every `*.parquet` in a directory, sorted: the row order every reader agrees on."""
    path = Path(path)
    return sorted(path.glob("*.parquet")) if path.is_dir() else [path]


def read_parquet(path: str | Path) -> list[dict[str, Any]]:
    """Rows of one parquet file or of every `*.parquet` in a directory (sorted, so order is stable)."""
    rows: list[dict[str, Any]] = []
    for file in parquet_files(path):
        rows.extend(pq.read_table(file).to_pylist())
    return rows


def read_column(files: Iterable[str | Path], column: str) -> list[Any]:
    """One column of the files, in order, without reading the others (ids and scores, never whole conversations)."""
    values: list[Any] = []
    for file in files:
        values.extend(pq.read_table(file, columns=[column]).column(column).to_pylist())
    return values


def write_rows_by_id(files: Iterable[str | Path], ids: Sequence[str], path: str | Path) -> Path:
    """Write the rows of `files` whose id is in `ids`, in the order of `ids`: filtered as Arrow file by file, so only
    the taken rows are ever held (never the whole data set, nor any of it as Python objects)."""
    import pyarrow.compute as pc

    wanted = pa.array(ids, type=pa.string())
    parts, schema = [], None
    for file in files:
        table = pq.read_table(file)
        schema = schema or table.schema
        parts.append(table.filter(pc.is_in(table.column("id"), value_set=wanted)))
    if schema is None:
        raise ValueError(f"{path}: no files to take rows from")
    taken = pa.concat_tables(parts) if parts else schema.empty_table()
    if taken.num_rows != len(ids) or len(set(ids)) != len(ids):
        raise ValueError(f"{path}: {len(ids)} ids asked for, {taken.num_rows} rows found: ids must be unique and present "
                         f"in the files")
    return write_table(taken.take(pc.sort_indices(pc.index_in(taken.column("id"), value_set=wanted))), path)


def user_turns(files: Iterable[str | Path]) -> Iterator[tuple[int, str]]:
    """(row number, text) of every user turn of the instances in `files`, in order, one file at a time: only the
    user turns become Python strings, never the answers."""
    import pyarrow.compute as pc

    first_row = 0
    for file in files:
        messages = pq.read_table(file, columns=["messages"]).column("messages").combine_chunks()
        turns = messages.flatten()
        is_user = pc.equal(turns.field("role"), "user")
        rows = pc.filter(pc.list_parent_indices(messages), is_user).to_pylist()
        texts = pc.filter(turns.field("content"), is_user).to_pylist()
        yield from ((first_row + row, text) for row, text in zip(rows, texts))
        first_row += len(messages)


def count_rows(files: Iterable[str | Path]) -> int:
    """Rows in the files, from their footers."""
    return sum(pq.ParquetFile(file).metadata.num_rows for file in files)


def read_row_range(file: str | Path, start: int, length: int, columns: list[str]) -> pa.Table:
    """Rows [start, start + length) of a parquet file, reading only the row groups that hold them."""
    parquet = pq.ParquetFile(file)
    groups, first_row, row = [], 0, 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if row < start + length and row + rows > start:
            first_row = row if not groups else first_row
            groups.append(group)
        row += rows
    return parquet.read_row_groups(groups, columns=columns).slice(start - first_row, length)


def write_instances(instances: Iterable[Instance | dict[str, Any]], path: str | Path) -> Path:
    rows = [i.to_row() if isinstance(i, Instance) else i for i in instances]
    return write_parquet(rows, path, INSTANCE_SCHEMA)


def shard_path(folder: str | Path, index: int) -> Path:
    """The name of shard `index` in `folder` (shard-00000.parquet, ...): file order is shard order."""
    return Path(folder) / f"shard-{index:05d}.parquet"


def remove_stale_shards(folder: str | Path, keep: Collection[str] = (), pattern: str = "*.parquet") -> None:
    """Delete the files matching `pattern` in `folder` whose names are not in `keep`: shards of an earlier, larger
    run would otherwise be read as this run's."""
    for stale in Path(folder).glob(pattern):
        if stale.name not in keep:
            stale.unlink()


class InstanceShardWriter:
    """Writes instances into shards of `size` rows as they arrive, in order, so a producer holds at most one shard."""

    def __init__(self, folder: str | Path, size: int) -> None:
        self.folder = Path(folder)
        self.size = size
        self.shards = 0
        self._pending: list[Instance | dict[str, Any]] = []

    def extend(self, instances: Iterable[Instance | dict[str, Any]]) -> None:
        self._pending.extend(instances)
        while len(self._pending) >= self.size:
            self._write(self._pending[: self.size])
            del self._pending[: self.size]

    def close(self) -> int:
        """Write what is left (no instance at all still writes one empty shard: readers see 0 rows); the shard count."""
        if self._pending or not self.shards:
            self._write(self._pending)
            self._pending = []
        return self.shards

    def _write(self, instances: list[Instance | dict[str, Any]]) -> None:
        write_instances(instances, shard_path(self.folder, self.shards))
        self.shards += 1


def write_instance_shards(instances: Iterable[Instance | dict[str, Any]], folder: str | Path, size: int) -> int:
    """`instances` in shards of `size` rows, in order (see InstanceShardWriter). Returns the number of shards."""
    writer = InstanceShardWriter(folder, size)
    writer.extend(instances)
    return writer.close()
