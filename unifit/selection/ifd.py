"""Instruction-Following Difficulty (Li et al. 2023), batched and exact.

IFD = cond_loss / direct_loss: the answer's mean token loss given the conversation, over its loss given
only the assistant header. Both passes are plain "prefix + answer" sequences, so they share one pool:
sorted by length, cut into batches by a token budget (little padding, big matmuls), right-padded so
positions need no adjustment. Only the answer positions ever reach the vocabulary projection — the
decoder body runs on the whole batch, then the hidden states of the positions that carry loss are
gathered and projected — so the model never materialises full-vocabulary logits for prompt tokens.
Consecutive turns of one conversation share their conditioned pass: turn k's context + answer is the
start of turn k+1's context, so one causal forward over the last turn scores every turn's answer.

`compute_ifd` is the contract (ids in, one result per example out, input order); `score_conversations`
turns chat instances into those examples with the model's own template (unifit.templates).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from unifit.config import DEFAULT_TOKENS_PER_BATCH
from unifit.templates import Message, assistant_header_ids, tokenize_conversation

LM_HEAD_ROWS = 4096  # answer positions projected onto the vocabulary at once (bounds the float32 logits buffer)


@dataclass(frozen=True)
class IFDResult:
    """Scores of one example (one assistant turn)."""

    cond_loss: float
    direct_loss: float
    ifd: float
    ifd_ppl: float
    n_answer_tokens: int


def ifd_ratio(cond_loss: float, direct_loss: float) -> float:
    return cond_loss / direct_loss if direct_loss > 0 else math.inf


def ppl_ratio(cond_loss: float, direct_loss: float) -> float:
    """exp(cond) / exp(direct), computed as exp(cond - direct) so long random answers cannot overflow."""
    return math.exp(cond_loss - direct_loss)


def plan_batches(lengths: Sequence[int], max_tokens_per_batch: int) -> list[list[int]]:
    """Indices grouped so that (longest length in batch) x (rows) stays within the budget.

    Sorting by length first means each batch pads only to its own longest row; a sequence longer than
    the budget gets a batch of its own rather than being refused.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and lengths[index] * (len(current) + 1) > max_tokens_per_batch:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


@dataclass
class LossPasses:
    """The forwards IFD needs: sequences, the answer spans scored in each, and where each example's sums are."""

    sequences: list[list[int]] = field(default_factory=list)
    spans: list[list[tuple[int, int]]] = field(default_factory=list)  # per sequence: [start, end) of each answer
    cond: list[tuple[int, int]] = field(default_factory=list)  # per example: (sequence, span) of its conditioned pass
    direct: list[tuple[int, int]] = field(default_factory=list)  # per example: (sequence, span) of its direct pass

    def add(self, ids: list[int], start: int) -> tuple[int, int]:
        self.sequences.append(ids)
        self.spans.append([(start, len(ids))])
        return len(self.sequences) - 1, 0


def plan_passes(examples: Sequence[Mapping[str, Sequence[int]]]) -> LossPasses:
    """One direct pass per example; conditioned passes merged along conversations.

    When an example's context begins with the previous example's whole conditioned sequence (the next turn
    of the same conversation, context not truncated), that sequence is extended to this example's instead of
    run again: causal attention makes the earlier answer's losses identical inside the longer sequence.
    """
    passes = LossPasses()
    for index, example in enumerate(examples):
        context, header, answer = list(example["context_ids"]), list(example["header_ids"]), list(example["answer_ids"])
        if not answer or not header or not context:
            raise ValueError(f"IFD example {index}: context_ids, header_ids and answer_ids must all be non-empty")
        previous = passes.sequences[passes.cond[-1][0]] if passes.cond else []
        if previous and context[: len(previous)] == previous:
            sequence = passes.cond[-1][0]
            passes.sequences[sequence] = context + answer
            passes.spans[sequence].append((len(context), len(context) + len(answer)))
            passes.cond.append((sequence, len(passes.spans[sequence]) - 1))
        else:
            passes.cond.append(passes.add(context + answer, len(context)))
        passes.direct.append(passes.add(header + answer, len(header)))
    return passes


def _vocab_logits(model: Any, hidden: Any) -> Any:
    """lm_head on the gathered rows, float32, with the final-logit transforms some families apply."""
    logits = model.get_output_embeddings()(hidden).float()
    scale = getattr(model.config, "logit_scale", None)  # Cohere
    if scale:
        logits = logits * scale
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        logits = (logits / cap).tanh() * cap
    return logits


def span_loss_sums(model: Any, sequences: Sequence[Sequence[int]],
                   spans: Sequence[Sequence[tuple[int, int]]]) -> list[list[float]]:
    """Summed -log p of the tokens in each [start, end) span (start >= 1) of each sequence, one padded forward."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    span_rows = torch.tensor([row for row, row_spans in enumerate(spans) for _ in row_spans])
    starts = torch.tensor([start for row_spans in spans for start, _ in row_spans])
    counts = torch.tensor([end - start for row_spans in spans for start, end in row_spans])
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(list(s)) for s in sequences], batch_first=True)
    # token t of a span is predicted by the hidden state at t - 1
    span_of_token = torch.repeat_interleave(torch.arange(len(counts)), counts)
    rows = span_rows[span_of_token]
    within = torch.arange(int(counts.sum())) - (counts.cumsum(0) - counts)[span_of_token]
    positions = starts[span_of_token] - 1 + within
    targets = ids[rows, positions + 1].to(device)
    # No padding mask: the pads sit after each sequence, so causal attention already keeps every scored position
    # from seeing them, and without a mask SDPA may take its causal kernels (CUDA's flash backend accepts no mask).
    hidden = model.base_model(input_ids=ids.to(device), use_cache=False).last_hidden_state
    hidden = hidden[rows.to(device), positions.to(device)]
    nll = torch.cat([
        F.cross_entropy(_vocab_logits(model, hidden[i : i + LM_HEAD_ROWS]), targets[i : i + LM_HEAD_ROWS], reduction="none")
        for i in range(0, hidden.shape[0], LM_HEAD_ROWS)
    ])
    sums = torch.zeros(len(counts), dtype=torch.float64, device=device).index_add_(0, span_of_token.to(device), nll.double())
    flat = iter(sums.tolist())
    return [[next(flat) for _ in row_spans] for row_spans in spans]


@dataclass(frozen=True)
class ModelShape:
    """The sizes a forward's matmul FLOPs depend on."""

    body_params: int  # decoder weights a token passes through (the input embedding is a lookup, not a matmul)
    layers: int
    attention_width: int  # heads x head_dim: the width of QK^T and attention x V
    hidden: int
    vocab: int

    @classmethod
    def of(cls, model: Any) -> "ModelShape":
        config = model.config
        embedding = model.get_input_embeddings().weight.numel()
        body = sum(p.numel() for p in model.base_model.parameters()) - embedding
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        vocab, hidden = model.get_output_embeddings().weight.shape
        return cls(body, config.num_hidden_layers, heads * head_dim, int(hidden), int(vocab))

    def forward_flops(self, rows: int, length: int, projected: int) -> float:
        """Matmul FLOPs of `rows` causal sequences of `length` positions with `projected` rows through lm_head."""
        body = 2 * self.body_params * rows * length
        attention = 4 * self.layers * self.attention_width * rows * length * (length + 1) / 2
        return body + attention + 2 * self.hidden * self.vocab * projected


@dataclass
class IFDCost:
    """What scoring computed, in numbers that do not depend on the machine's speed or load (and the time it took).

    `reference_flops` is the per-example procedure on the same examples (Cherry_LLM's): two unpadded forwards per
    example, direct and conditioned, each projecting every position onto the full vocabulary.
    """

    real_tokens: int = 0  # tokens of the sequences the batched forwards ran
    computed_positions: int = 0  # rows x padded length, summed over forwards
    answer_tokens: int = 0  # scored answer tokens, each example's answer counted once
    flops: float = 0.0
    reference_flops: float = 0.0
    forward_seconds: float = field(default=0.0, compare=False)  # wall time of the forwards: machine-dependent, so not compared

    def add(self, other: "IFDCost") -> None:
        for name in ("real_tokens", "computed_positions", "answer_tokens", "flops", "reference_flops", "forward_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> dict[str, float | None]:
        """padding efficiency (real tokens / computed positions) and FLOPs per scored answer token, both ways."""
        per_answer = lambda flops: flops / self.answer_tokens if self.answer_tokens else None  # noqa: E731
        return {
            "padding_efficiency": self.real_tokens / self.computed_positions if self.computed_positions else None,
            "flops_per_answer_token": per_answer(self.flops),
            "reference_flops_per_answer_token": per_answer(self.reference_flops),
            "reference_flops_ratio": self.reference_flops / self.flops if self.flops else None,
        }


def compute_ifd(model: Any, examples: Sequence[Mapping[str, Sequence[int]]], *,
                max_tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH, progress: bool = False,
                cost: IFDCost | None = None) -> list[IFDResult]:
    """One `IFDResult` per example, in input order: the contract every scorer (the score stage, the benches) relies on.

    Each example needs non-empty `answer_ids` and `header_ids` (the direct pass must condition the first
    answer token on something). Results do not depend on batch size or order beyond float rounding.
    `cost`, if given, is incremented with what these forwards computed and what the per-example reference would.
    """
    import torch
    from tqdm import tqdm

    passes = plan_passes(examples)
    sums: list[list[float]] = [[] for _ in passes.sequences]
    batches = plan_batches([len(s) for s in passes.sequences], max_tokens_per_batch)
    if cost is not None:
        cost.add(_cost(ModelShape.of(model), examples, passes, batches))
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in tqdm(batches, desc="IFD", unit="batch", disable=not progress):
            batch_sums = span_loss_sums(model, [passes.sequences[i] for i in batch], [passes.spans[i] for i in batch])
            for index, values in zip(batch, batch_sums):
                sums[index] = values
    if cost is not None:
        cost.forward_seconds += time.perf_counter() - start
    results = []
    for example, (cond_row, cond_span), (direct_row, direct_span) in zip(examples, passes.cond, passes.direct):
        n = len(example["answer_ids"])
        cond, direct = sums[cond_row][cond_span] / n, sums[direct_row][direct_span] / n
        results.append(IFDResult(cond, direct, ifd_ratio(cond, direct), ppl_ratio(cond, direct), n))
    return results


def planned_cost(shape: ModelShape, examples: Sequence[Mapping[str, Sequence[int]]], max_tokens_per_batch: int) -> IFDCost:
    """What `compute_ifd` would compute for `examples` (and the per-example reference), without running the model."""
    passes = plan_passes(examples)
    return _cost(shape, examples, passes, plan_batches([len(s) for s in passes.sequences], max_tokens_per_batch))


def _cost(shape: ModelShape, examples: Sequence[Mapping[str, Sequence[int]]], passes: LossPasses,
          batches: Sequence[Sequence[int]]) -> IFDCost:
    cost = IFDCost(answer_tokens=sum(len(e["answer_ids"]) for e in examples))
    for batch in batches:
        length = max(len(passes.sequences[i]) for i in batch)
        projected = sum(end - start for i in batch for start, end in passes.spans[i])
        cost.real_tokens += sum(len(passes.sequences[i]) for i in batch)
        cost.computed_positions += len(batch) * length
        cost.flops += shape.forward_flops(len(batch), length, projected)
    for example in examples:
        for prefix in (example["header_ids"], example["context_ids"]):
            length = len(prefix) + len(example["answer_ids"])
            cost.reference_flops += shape.forward_flops(1, length, length)
    return cost


@dataclass(frozen=True)
class ConversationExamples:
    """IFD examples of one conversation (one per assistant turn) and what over-length handling did."""

    examples: list[dict[str, list[int]]]
    truncated: bool  # some answer cannot fit in max_length even with the context cut away: not scored
    context_truncated: bool  # some context was cut from the left to make its answer fit


def conversation_examples(tokenizer: Any, messages: Sequence[Message], max_length: int,
                          header_ids: Sequence[int] | None = None) -> ConversationExamples:
    """Per assistant turn: context (left-truncated to fit), header and answer ids from the chat template.

    An answer is never cut: if header + answer exceed `max_length` the conversation is marked
    `truncated` and yields no examples (selection excludes and counts it).
    """
    header = list(header_ids) if header_ids is not None else assistant_header_ids(tokenizer)
    tokenized = tokenize_conversation(tokenizer, messages)
    examples: list[dict[str, list[int]]] = []
    context_truncated = False
    for turn in range(len(tokenized.spans)):
        answer = tokenized.answer_ids(turn)
        if len(header) + len(answer) > max_length:
            return ConversationExamples([], truncated=True, context_truncated=False)
        context = tokenized.context_ids(turn)
        room = max_length - len(answer)
        if len(context) > room:
            context, context_truncated = context[len(context) - room :], True
        examples.append({"context_ids": context, "header_ids": header, "answer_ids": answer})
    return ConversationExamples(examples, truncated=False, context_truncated=context_truncated)


def score_conversations(model: Any, tokenizer: Any, conversations: Sequence[Sequence[Message]], *, max_length: int,
                        max_tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH, progress: bool = False,
                        cost: IFDCost | None = None) -> list[dict[str, Any]]:
    """Instance-level scores, in input order: losses and IFD are answer-token-weighted means over turns.

    Truncated conversations get NaN scores and `truncated=True`, so they are kept in the table (and
    counted) but can never be selected.
    """
    header = assistant_header_ids(tokenizer)
    prepared = [conversation_examples(tokenizer, messages, max_length, header) for messages in conversations]
    flat = [example for item in prepared for example in item.examples]
    results = iter(compute_ifd(model, flat, max_tokens_per_batch=max_tokens_per_batch, progress=progress, cost=cost))
    scores: list[dict[str, Any]] = []
    for item in prepared:
        turns = [next(results) for _ in item.examples]
        if item.truncated:
            nan = math.nan
            scores.append(dict(cond_loss=nan, direct_loss=nan, ifd=nan, ifd_ppl=nan, n_answer_tokens=0,
                               truncated=True, context_truncated=False))
            continue
        n = sum(t.n_answer_tokens for t in turns)
        scores.append(dict(
            cond_loss=sum(t.cond_loss * t.n_answer_tokens for t in turns) / n,
            direct_loss=sum(t.direct_loss * t.n_answer_tokens for t in turns) / n,
            ifd=sum(t.ifd * t.n_answer_tokens for t in turns) / n,
            ifd_ppl=sum(t.ifd_ppl * t.n_answer_tokens for t in turns) / n,
            n_answer_tokens=n, truncated=False, context_truncated=item.context_truncated,
        ))
    return scores
