"""Training examples: chat template -> ids + assistant-only labels, truncation, packing, collation.

Streamed: `prepare_rows` has Ray Data read the instance shards, order them by a seeded hash of their ids,
tokenise and pack them in the workers, window by window, and write the training rows to parquet; the
driver only learns their counts. Labels come from `unifit.templates.tokenize_conversation(...).labels()` (the same spans IFD scores), so the
loss covers every assistant turn's content and end-of-turn token and nothing else. Packing concatenates
conversations into rows of at most `max_length` tokens; each segment restarts its position ids and attends
only within itself (per-segment causal SDPA, `unifit.training.attention`, or flash-attn varlen from position ids on GPU),
so a packed row gives the same per-token loss as its conversations run one by one.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from unifit.templates import tokenize_conversation, validate_messages

IGNORE_INDEX = -100
# Conversations tokenised and packed together (best-fit decreasing within a window). Packing efficiency is already
# near its bound at a few thousand conversations; the window bounds a worker's memory (token lists of Python ints
# are ~70 bytes a token) whatever the dataset size. A dataset up to this size is packed as one window.
PACK_WINDOW = 8192
ROWS_DONE = "rows.json"  # written last in a rows directory: its counts, and that the rows are complete


@dataclass
class EncodeReport:
    """What happened to the input conversations (nothing is dropped silently)."""

    encoded: int = 0
    truncated: int = 0  # cut to max_length (labels past the cut are lost)
    dropped_no_answer: int = 0  # no assistant token left within max_length: nothing to learn from


def encode_instances(tokenizer: Any, instances: Iterable[dict[str, Any]], max_length: int) -> tuple[list[dict[str, list[int]]], EncodeReport]:
    """`{"input_ids", "labels"}` per instance (right-truncated to `max_length`), plus counts."""
    examples: list[dict[str, list[int]]] = []
    report = EncodeReport()
    for index, instance in enumerate(instances):
        messages = validate_messages(list(instance["messages"]), where=f"instance {instance.get('id', index)} messages")
        tokenized = tokenize_conversation(tokenizer, messages)
        ids, labels = tokenized.input_ids, tokenized.labels(IGNORE_INDEX)
        if len(ids) > max_length:
            report.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):  # label 0 is never predicted
            report.dropped_no_answer += 1
            continue
        examples.append({"input_ids": list(ids), "labels": list(labels)})
        report.encoded += 1
    return examples, report


def pack_examples(examples: Sequence[dict[str, list[int]]], max_length: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Best-fit-decreasing packing into rows of <= `max_length` tokens, rows shuffled with `seed`.

    Each row carries `position_ids` that restart at 0 for every segment (this is how segments are found
    downstream). A segment's first label is set to IGNORE_INDEX: in a packed row it would otherwise be
    predicted from the previous conversation's last token.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (remaining capacity, row index), sorted
    for index in order:
        size = len(examples[index]["input_ids"])
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            remaining, row = free.pop(slot)
        else:
            remaining, row = max_length, len(rows)
            rows.append([])
        rows[row].append(index)
        if remaining - size > 0:
            bisect.insort(free, (remaining - size, row))
    random.Random(seed).shuffle(rows)
    packed: list[dict[str, list[int]]] = []
    for members in rows:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for index in members:
            example = examples[index]
            ids.extend(example["input_ids"])
            labels.append(IGNORE_INDEX)
            labels.extend(example["labels"][1:])
            positions.extend(range(len(example["input_ids"])))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


def collate(rows: Sequence[dict[str, Any]], pad_id: int, *, packed: bool, mask_mode: str = "segments") -> dict[str, Any]:
    """Model inputs for one micro-batch.

    Returns `input_ids`, `labels`, `attention_mask` (2D, 1 on real tokens: also what NEFTune needs) and
    `model_mask` (what the model gets as its attention mask). Unpacked rows are right-padded to the longest
    and the model gets the 2D mask. Packed rows are laid end to end in a single padding-free row (TRL's
    `padding_free`): padding them to a common width would cost compute for nothing, and transformers' flash-attn
    path reads packed segments from the position ids only when the batch has one row (with more, the segments
    of a row would attend to each other). Packed batches carry `position_ids` (restarting at every conversation),
    `segment_ids`, no mask, and with `mask_mode="segments"` `segment_spans` (the row's [start, end) segments,
    for `unifit.training.attention.segment_attention`); `mask_mode="position_ids"` leaves the segments to
    flash-attn varlen.
    """
    import torch

    if packed:
        def flat(key: str) -> Any:
            return torch.as_tensor([token for row in rows for token in row[key]], dtype=torch.long).unsqueeze(0)

        input_ids, labels, position_ids = flat("input_ids"), flat("labels"), flat("position_ids")
        segment_ids = torch.cumsum((position_ids == 0).long(), dim=1) - 1
        out: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids),
                               "position_ids": position_ids, "segment_ids": segment_ids, "model_mask": None}
        if mask_mode == "segments":
            out["segment_spans"] = [_spans(segment_ids[0].tolist())]
        return out
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(list(row["input_ids"]))
        labels[i, :n] = torch.as_tensor(list(row["labels"]))
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "model_mask": attention_mask}


def _spans(segment_ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of equal segment ids in one row."""
    starts = [i for i, segment in enumerate(segment_ids) if i == 0 or segment != segment_ids[i - 1]]
    return list(zip(starts, starts[1:] + [len(segment_ids)]))


def model_inputs(batch: dict[str, Any], device: Optional[Any] = None) -> dict[str, Any]:
    """The kwargs for `model(**...)` from a collated batch (labels included: HF shifts them itself)."""
    kwargs = {"input_ids": batch["input_ids"], "labels": batch["labels"], "attention_mask": batch["model_mask"]}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    if device is not None:
        kwargs = {k: (v.to(device) if v is not None else None) for k, v in kwargs.items()}
    if "segment_spans" in batch:
        kwargs["segment_spans"] = batch["segment_spans"]
    return kwargs


def shuffle_key(seed: int, ids: Sequence[str]) -> list[int]:
    """A seeded pseudo-random rank per instance id: the training order, independent of file layout and workers."""
    return [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big") >> 1 for i in ids]


def _with_order(batch: Any, seed: int) -> Any:
    import pyarrow as pa

    return batch.append_column("order", pa.array(shuffle_key(seed, batch["id"].to_pylist()), type=pa.int64()))


def _encode_window(batch: Any, model_cfg: dict[str, Any], cache_dir: str, max_length: int, packing: bool, seed: int) -> Any:
    """One window of instances -> training rows (packed or not), with the window's encode counts on its first row."""
    import pyarrow as pa

    from unifit.config import ModelConfig
    from unifit.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(**model_cfg), cache_dir)
    examples, report = encode_instances(tokenizer, batch.select(["id", "messages"]).to_pylist(), max_length)
    rows = pack_examples(examples, max_length, seed=seed) if packing else examples
    columns: dict[str, Any] = {key: pa.array([row[key] for row in rows], type=pa.list_(pa.int32()))
                               for key in (("input_ids", "labels", "position_ids") if packing else ("input_ids", "labels"))}
    counts = {"encoded": report.encoded, "truncated": report.truncated, "dropped_no_answer": report.dropped_no_answer}
    for key, value in counts.items():
        columns[key] = pa.array([value] + [0] * (len(rows) - 1), type=pa.int64())
    return pa.table(columns)


def prepare_rows(files: Sequence[str | Path], out_dir: Path, *, model_cfg: dict[str, Any], cache_dir: str,
                 max_length: int, packing: bool, seed: int, window: int = PACK_WINDOW) -> dict[str, int]:
    """Training rows of the instances in `files`, written to `out_dir` by Ray Data workers; returns their counts.

    Order: instances sorted by `shuffle_key(seed, id)` (a global shuffle that any rerun reproduces), cut into
    windows of `window` instances, each tokenised and (with `packing`) packed by `pack_examples(seed)`. A rows
    directory with its `rows.json` is complete and reused as is, so a resumed training run sees the same batches.
    Returns rows, examples (encoded), truncated, dropped_no_answer.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from unifit.records import parquet_files, stream_parquet

    done = out_dir / ROWS_DONE
    if done.exists():
        return json.loads(done.read_text())
    staging = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    dataset = (stream_parquet(files, ["id", "messages"])
               .map_batches(_with_order, batch_format="pyarrow", fn_kwargs={"seed": seed})
               .sort(["order", "id"])
               .repartition(target_num_rows_per_block=window, strict=True)
               .map_batches(_encode_window, batch_size=None, batch_format="pyarrow",
                            fn_kwargs=dict(model_cfg=model_cfg, cache_dir=cache_dir, max_length=max_length, packing=packing,
                                           seed=seed)))
    dataset.write_parquet(str(staging))
    counts = {"rows": 0, "encoded": 0, "truncated": 0, "dropped_no_answer": 0}
    for file in parquet_files(staging):
        table = pq.read_table(file, columns=["encoded", "truncated", "dropped_no_answer"])
        counts["rows"] += table.num_rows
        for key in ("encoded", "truncated", "dropped_no_answer"):
            counts[key] += int(pc.sum(table[key]).as_py() or 0)
    staging.rename(out_dir)
    (out_dir / ROWS_DONE).write_text(json.dumps(counts))
    return counts
