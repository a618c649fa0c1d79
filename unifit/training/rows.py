"""Training rows built by Ray Data from the instances' parquet files, written once beside the model, then streamed.

`build_rows`: `read_parquet` (id, messages) -> tokenise in the Ray workers (chat template, assistant-only labels,
`unifit.training.data.encode_instances`) -> sort by a seeded hash of the instance id (a global shuffle that comes
out the same on every run) -> with packing, best-fit-decreasing packs of `PACK_WINDOW` consecutive conversations ->
parquet files (by default `<out>/rows/`). `stream_rows` hands those files to Ray Train as a `read_parquet` dataset.

No conversation or token list passes through the driver, so its memory does not grow with the number of instances,
and an interrupted run resumes on the very rows, in the very order, that it trained on before: the files are
kept, and `plan_steps` counts their rows from the parquet footers.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa

from unifit.atomic import atomic_dir
from unifit.config import ModelConfig, to_container
from unifit.fingerprint import fingerprint
from unifit.records import count_rows, parquet_files, read_column

log = logging.getLogger(__name__)

ROWS_DIR = "rows"  # the default place of the rows, beside the model
PLAN_FILE = "rows.json"  # inside ROWS_DIR: what the rows were built from, and their counts
PACK_WINDOW = 4096  # conversations packed together: large enough to fill rows, small enough for one worker's batch
ENCODE_BATCH = 512  # conversations tokenised per Ray Data batch
ENCODE_BLOCK_ROWS = 4096  # conversations per encode task: a parquet shard is read as one block, which one task would encode
SORT_PARTITION_ROWS = 20_000  # conversations per sorted block (~100 MB of 7B-sized token lists): one task each
KEY_BITS = 60  # order keys are uniform in [0, 2**60): `order_key`
TRAIN_COLUMNS = ("input_ids", "labels", "position_ids")
TOKENS = pa.list_(pa.int32())


@dataclass(frozen=True)
class RowsSummary:
    """What the training rows hold, counted from their files (never from rows held in memory)."""

    files: tuple[str, ...]  # the row files, in the order every reader takes them
    rows: int  # training rows (packed rows, or one conversation each)
    examples: int  # conversations encoded
    instances: int  # conversations read
    truncated: int  # cut to max_length (labels past the cut are lost)

    @property
    def dropped_no_answer(self) -> int:
        """Conversations with no assistant token left within max_length: nothing to learn from."""
        return self.instances - self.examples


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(model_cfg: ModelConfig, cache_dir: str) -> Any:
    """One tokenizer per Ray worker process and model (a worker process runs many tasks)."""
    from unifit.models import load_tokenizer

    key = fingerprint([to_container(model_cfg), cache_dir])
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(model_cfg, cache_dir)
    return _TOKENIZERS[key]


def order_key(instance_id: str, seed: int) -> int:
    """Where an instance falls in the shuffled order: a seeded hash of its id (60 bits, so Arrow's int64 sorts it)."""
    return int(fingerprint([seed, instance_id])[: KEY_BITS // 4], 16)


def sort_boundaries(instances: int) -> list[int]:
    """Evenly spaced key boundaries for about `SORT_PARTITION_ROWS` conversations a block (at least two blocks: Ray
    samples the keys itself without boundaries, and then cuts a small data set into 200 blocks). The keys are
    uniform hashes, so the blocks come out even without that sampling pass."""
    blocks = max(2, -(-instances // SORT_PARTITION_ROWS))
    return [index * (1 << KEY_BITS) // blocks for index in range(1, blocks)]


def _encode(batch: pa.Table, *, model_cfg: ModelConfig, cache_dir: str, seed: int) -> pa.Table:
    """Tokenise one batch of instances; the conversations with no answer token left are left out (counted later)."""
    from unifit.training.data import encode_instances

    tokenizer = _tokenizer(model_cfg, cache_dir)
    kept: dict[str, list[Any]] = {"key": [], "ids": [], "input_ids": [], "labels": [], "truncated": []}
    for instance_id, messages in zip(batch.column("id").to_pylist(), batch.column("messages").to_pylist()):
        examples, report = encode_instances(tokenizer, [{"id": instance_id, "messages": messages}], model_cfg.max_length)
        if examples:
            kept["key"].append(order_key(instance_id, seed))
            kept["ids"].append([instance_id])
            kept["input_ids"].append(examples[0]["input_ids"])
            kept["labels"].append(examples[0]["labels"])
            kept["truncated"].append(report.truncated)
    return _table(kept)


def _pack(batch: pa.Table, *, max_length: int, seed: int) -> pa.Table:
    """Pack one window of conversations (already in shuffled order) into rows of at most `max_length` tokens."""
    from unifit.training.data import pack_plan, packed_row

    ids = batch.column("ids").to_pylist()
    truncated = batch.column("truncated").to_pylist()
    examples = [{"input_ids": i, "labels": l} for i, l in zip(batch.column("input_ids").to_pylist(), batch.column("labels").to_pylist())]
    first_key = batch.column("key")[0].as_py() if batch.num_rows else 0
    rows: dict[str, list[Any]] = {"ids": [], "truncated": [], **{column: [] for column in TRAIN_COLUMNS}}
    for members in pack_plan([len(example["input_ids"]) for example in examples], max_length, seed=seed ^ first_key):
        rows["ids"].append([ids[n][0] for n in members])
        rows["truncated"].append(sum(truncated[n] for n in members))
        for column, values in packed_row([examples[n] for n in members]).items():
            rows[column].append(values)
    return _table(rows)


def _table(columns: dict[str, list[Any]]) -> pa.Table:
    """The columns as Arrow, token lists as int32 (half the bytes of int64 on disk and in the object store)."""
    types = {"key": pa.int64(), "ids": pa.list_(pa.string()), "truncated": pa.int32()}
    return pa.table({name: pa.array(values, type=types.get(name, TOKENS)) for name, values in columns.items()})


def build_rows(instances: str | Path | Sequence[str | Path], rows_dir: Path, *, model_cfg: ModelConfig, cache_dir: str,
               packing: bool, seed: int) -> RowsSummary:
    """The training rows of `instances` in `rows_dir`, built now or kept from an earlier build of the same recipe
    (instances, model, packing, seed): the files are what a resumed run must train on, in the same order, and what
    variants trained on the same data share. Ray must be initialised."""
    import ray

    files = [Path(f) for f in (parquet_files(instances) if isinstance(instances, (str, Path)) else instances)]
    recipe = {"instances": fingerprint(read_column(files, "id")), "model": to_container(model_cfg), "packing": packing,
              "seed": seed, "pack_window": PACK_WINDOW}
    kept = _kept(rows_dir, fingerprint(recipe))
    if kept is not None:
        log.info("training rows: %d rows in %s kept from an earlier run", kept.rows, rows_dir)
        return kept
    instance_count = count_rows(files)
    # Ray Data reserves a share of the CPUs for every operator after the encode (sort, pack, write), all of them light;
    # on a 2-CPU node that left one encode task running at a time. Without the reservation every core tokenises.
    with _data_context(op_resource_reservation_enabled=False):
        dataset = ray.data.read_parquet([str(f) for f in files], columns=["id", "messages"])
        dataset = dataset.repartition(target_num_rows_per_block=ENCODE_BLOCK_ROWS)
        dataset = dataset.map_batches(_encode, batch_size=ENCODE_BATCH, batch_format="pyarrow",
                                      fn_kwargs=dict(model_cfg=model_cfg, cache_dir=str(cache_dir), seed=seed))
        dataset = dataset.sort("key", boundaries=sort_boundaries(instance_count))
        if packing:
            dataset = dataset.map_batches(_pack, batch_size=PACK_WINDOW, batch_format="pyarrow",
                                          fn_kwargs=dict(max_length=model_cfg.max_length, seed=seed))
        else:
            dataset = dataset.drop_columns(["key"])
        with atomic_dir(rows_dir) as tmp:
            dataset.write_parquet(str(tmp))
            written = sorted(tmp.glob("*.parquet"))
            summary = RowsSummary(files=tuple(str(rows_dir / f.name) for f in written), rows=count_rows(written),
                                  examples=sum(len(ids) for ids in read_column(written, "ids")),
                                  instances=instance_count, truncated=sum(read_column(written, "truncated")))
            (tmp / PLAN_FILE).write_text(json.dumps({"recipe": fingerprint(recipe), **summary.__dict__}, indent=1))
    log.info("training rows: %d instances -> %d examples (%d truncated, %d without an answer) -> %d rows in %s",
             summary.instances, summary.examples, summary.truncated, summary.dropped_no_answer, summary.rows, rows_dir)
    return summary


def _kept(rows_dir: Path, recipe: str) -> RowsSummary | None:
    """The rows of an earlier run built from the same recipe, if they are all there."""
    plan_file = rows_dir / PLAN_FILE
    if not plan_file.exists():
        return None
    plan = json.loads(plan_file.read_text())
    if plan.pop("recipe") != recipe or not all(Path(f).exists() for f in plan["files"]):
        return None
    plan["files"] = tuple(plan["files"])
    return RowsSummary(**plan)


def stream_rows(summary: RowsSummary, packing: bool) -> Any:
    """The rows as a Ray Data dataset read from their files, in file order, with only the columns training uses.

    The read tasks ask for no CPU: the Ray Train workers hold the cores (every core of a CPU node), and a read task
    that waits for a core they never free would stall training; reading parquet is light next to a training step.
    Ray Data's second file datasource (its default since Ray 2.5x) lists files in a task of its own that always asks
    for one CPU, so this read takes the first, whose tasks are all read tasks.
    """
    import ray

    columns = list(TRAIN_COLUMNS if packing else TRAIN_COLUMNS[:2])
    with _data_context(use_datasource_v2=False):
        return ray.data.read_parquet(list(summary.files), columns=columns, num_cpus=0)


@contextlib.contextmanager
def _data_context(**settings: Any) -> Iterator[None]:
    """Ray Data settings (`DataContext` fields) set while the block runs and restored after it, so that only the
    datasets made inside it see them."""
    import ray

    context = ray.data.DataContext.get_current()
    before = {name: getattr(context, name) for name in settings}
    for name, value in settings.items():
        setattr(context, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(context, name, value)
