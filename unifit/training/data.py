"""Training examples: chat template -> ids + assistant-only labels, truncation, packing, collation.

Labels come from `unifit.templates.tokenize_conversation(...).labels()` (the same spans IFD scores), so the
loss covers every assistant turn's content and end-of-turn token and nothing else. Packing concatenates
conversations into rows of at most `max_length` tokens; each segment restarts its position ids and attends
only within itself (per-segment causal SDPA, `unifit.training.attention`, or flash-attn varlen from position ids on GPU),
so a packed row gives the same per-token loss as its conversations run one by one.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from unifit.templates import tokenize_conversation, validate_messages

IGNORE_INDEX = -100


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
    """Best-fit-decreasing packing into rows of <= `max_length` tokens, rows shuffled with `seed` (`pack_plan`)."""
    return [packed_row([examples[index] for index in members])
            for members in pack_plan([len(example["input_ids"]) for example in examples], max_length, seed)]


def pack_plan(lengths: Sequence[int], max_length: int, seed: int = 0) -> list[list[int]]:
    """The example indices of each packed row: best fit decreasing into rows of <= `max_length` tokens, the rows in a
    seeded random order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (remaining capacity, row index), sorted
    for index in order:
        size = lengths[index]
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
    return rows


def packed_row(members: Sequence[dict[str, Sequence[int]]]) -> dict[str, list[int]]:
    """Examples laid end to end in one row, with `position_ids` that restart at 0 for every segment (this is how
    segments are found downstream). A segment's first label is set to IGNORE_INDEX: in a packed row it would
    otherwise be predicted from the previous conversation's last token."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in members:
        ids.extend(example["input_ids"])
        labels.append(IGNORE_INDEX)
        labels.extend(example["labels"][1:])
        positions.extend(range(len(example["input_ids"])))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


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
