"""IFD scorer against an independent full-logits computation; invariances; multi-turn; over-length."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from unifit.selection.ifd import compute_ifd, conversation_examples, plan_batches, plan_passes, score_conversations
from unifit.templates import assistant_header_ids, tokenize_conversation

SINGLE = [{"role": "user", "content": "How does DNSSEC protect a zone?"},
          {"role": "assistant", "content": "It signs every record set so resolvers can verify the answers."}]
MULTI = [{"role": "system", "content": "You are a network security tutor."},
         {"role": "user", "content": "What is SPF?"},
         {"role": "assistant", "content": "A DNS TXT record listing the servers allowed to send mail for a domain."},
         {"role": "user", "content": "And what happens when it fails?"},
         {"role": "assistant", "content": "The receiver applies the domain's policy: it may reject, quarantine or accept the message."}]


def answer_nll(model: torch.nn.Module, prefix: list[int], answer: list[int]) -> float:
    """Independent: one full forward, full-vocabulary logits, mean cross-entropy over the answer tokens."""
    ids = torch.tensor([prefix + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    start = len(prefix)
    return F.cross_entropy(logits[start - 1 : start - 1 + len(answer)], ids[0, start:]).item()


def random_examples(n: int, seed: int, vocab: int = 49152) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    return [{"context_ids": [rng.randrange(vocab) for _ in range(rng.randint(1, 60))],
             "header_ids": [rng.randrange(vocab) for _ in range(rng.randint(1, 4))],
             "answer_ids": [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]} for _ in range(n)]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_matches_independent_full_logits_computation(model_type: str, cache_dir) -> None:
    from conftest import tiny_model_config

    from unifit.models import load_model, load_tokenizer

    cfg = tiny_model_config(model_type)
    model, tokenizer = load_model(cfg, cache_dir).eval(), load_tokenizer(cfg, cache_dir)
    examples = conversation_examples(tokenizer, SINGLE, max_length=512).examples + random_examples(6, seed=1)
    results = compute_ifd(model, examples, max_tokens_per_batch=256)
    assert len(results) == len(examples)
    for example, result in zip(examples, results):
        cond = answer_nll(model, example["context_ids"], example["answer_ids"])
        direct = answer_nll(model, example["header_ids"], example["answer_ids"])
        assert result.cond_loss == pytest.approx(cond, abs=1e-5)
        assert result.direct_loss == pytest.approx(direct, abs=1e-5)
        assert result.ifd == pytest.approx(cond / direct, rel=1e-5)
        assert result.ifd_ppl == pytest.approx(math.exp(cond) / math.exp(direct), rel=1e-5)
        assert result.n_answer_tokens == len(example["answer_ids"])


def test_examples_come_from_the_chat_template(tiny_tokenizer) -> None:
    tokenized = tokenize_conversation(tiny_tokenizer, MULTI)
    examples = conversation_examples(tiny_tokenizer, MULTI, max_length=512).examples
    assert len(examples) == 2
    for turn, example in enumerate(examples):
        assert example["context_ids"] + example["answer_ids"] == tokenized.input_ids[: tokenized.spans[turn].end]
        assert example["header_ids"] == assistant_header_ids(tiny_tokenizer)
        assert tiny_tokenizer.decode(example["answer_ids"]) == MULTI[2 + 2 * turn]["content"] + "<|im_end|>"
        assert tiny_tokenizer.decode(example["context_ids"]).endswith("<|im_start|>assistant\n")


def test_batch_size_invariance(tiny_model) -> None:
    examples = random_examples(24, seed=2)
    one_by_one = compute_ifd(tiny_model, examples, max_tokens_per_batch=64)  # every sequence alone
    budgets = [plan_batches([len(e["context_ids"]) + len(e["answer_ids"]) for e in examples], b) for b in (64, 100_000)]
    assert len(budgets[0]) > 20 and len(budgets[1]) == 1  # the two runs really batch differently
    all_at_once = compute_ifd(tiny_model, examples, max_tokens_per_batch=100_000)
    medium = compute_ifd(tiny_model, examples, max_tokens_per_batch=300)
    for a, b, c in zip(one_by_one, all_at_once, medium):
        for name in ("cond_loss", "direct_loss", "ifd", "ifd_ppl"):
            assert abs(getattr(a, name) - getattr(b, name)) < 1e-4
            assert abs(getattr(a, name) - getattr(c, name)) < 1e-4


def test_order_invariance(tiny_model) -> None:
    examples = random_examples(16, seed=3)
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    straight = compute_ifd(tiny_model, examples, max_tokens_per_batch=400)
    shuffled = compute_ifd(tiny_model, [examples[i] for i in order], max_tokens_per_batch=400)
    for position, index in enumerate(order):
        assert abs(shuffled[position].ifd - straight[index].ifd) < 1e-4
        assert shuffled[position].n_answer_tokens == straight[index].n_answer_tokens


def test_multi_turn_is_answer_token_weighted_mean(tiny_model, tiny_tokenizer) -> None:
    [score] = score_conversations(tiny_model, tiny_tokenizer, [MULTI], max_length=512)
    tokenized = tokenize_conversation(tiny_tokenizer, MULTI)
    header = assistant_header_ids(tiny_tokenizer)
    turns = []
    for turn in range(2):
        answer = tokenized.answer_ids(turn)
        cond = answer_nll(tiny_model, tokenized.context_ids(turn), answer)
        direct = answer_nll(tiny_model, header, answer)
        turns.append((len(answer), cond, direct))
    n = sum(t[0] for t in turns)
    assert turns[0][0] != turns[1][0]  # unequal turns, so weighting matters
    assert score["n_answer_tokens"] == n
    assert score["ifd"] == pytest.approx(sum(k * c / d for k, c, d in turns) / n, rel=1e-5)
    assert score["cond_loss"] == pytest.approx(sum(k * c for k, c, _ in turns) / n, rel=1e-5)
    assert score["direct_loss"] == pytest.approx(sum(k * d for k, _, d in turns) / n, rel=1e-5)
    assert score["ifd"] != pytest.approx(sum(c / d for _, c, d in turns) / 2, rel=1e-6)  # not the plain mean
    assert not score["truncated"] and not score["context_truncated"]


def test_over_length_truncates_context_from_the_left_never_the_answer(tiny_model, tiny_tokenizer) -> None:
    tokenized = tokenize_conversation(tiny_tokenizer, MULTI)
    header = assistant_header_ids(tiny_tokenizer)
    answers = [tokenized.answer_ids(t) for t in range(2)]
    max_length = len(answers[1]) + 10  # second turn's context (~60 tokens) must be cut to 10
    result = conversation_examples(tiny_tokenizer, MULTI, max_length)
    assert result.context_truncated and not result.truncated
    for turn, example in enumerate(result.examples):
        assert example["answer_ids"] == answers[turn]
        assert len(example["context_ids"]) + len(example["answer_ids"]) <= max_length
        assert tokenized.context_ids(turn)[-len(example["context_ids"]):] == example["context_ids"]  # a suffix
    assert len(result.examples[1]["context_ids"]) == 10

    too_short = len(header) + len(answers[1]) - 1  # the second answer cannot fit even alone with its header
    assert conversation_examples(tiny_tokenizer, MULTI, too_short).truncated
    scores = score_conversations(tiny_model, tiny_tokenizer, [MULTI, SINGLE], max_length=too_short)
    assert scores[0]["truncated"] and math.isnan(scores[0]["ifd"])
    assert not scores[1]["truncated"] and math.isfinite(scores[1]["ifd"])


def test_a_conversation_is_conditioned_in_one_pass_with_the_same_scores(tiny_model, tiny_tokenizer) -> None:
    multi = conversation_examples(tiny_tokenizer, MULTI, max_length=512).examples
    cut = conversation_examples(tiny_tokenizer, MULTI, max_length=len(multi[1]["answer_ids"]) + 10)
    examples = multi + conversation_examples(tiny_tokenizer, SINGLE, max_length=512).examples + cut.examples + multi
    passes = plan_passes(examples)
    # MULTI's two turns share one conditioned sequence (twice); SINGLE and the context-cut copy cannot chain
    cond_sequences = [row for row, _ in passes.cond]
    assert cond_sequences[0] == cond_sequences[1] and cond_sequences[5] == cond_sequences[6]
    assert len(set(cond_sequences)) == 5 and len(passes.sequences) == 5 + len(examples)
    assert passes.sequences[cond_sequences[0]] == multi[1]["context_ids"] + multi[1]["answer_ids"]
    assert cut.context_truncated
    together = compute_ifd(tiny_model, examples, max_tokens_per_batch=200)
    alone = [compute_ifd(tiny_model, [example])[0] for example in examples]
    for a, b in zip(together, alone):
        assert a.cond_loss == pytest.approx(b.cond_loss, abs=1e-5)
        assert a.direct_loss == pytest.approx(b.direct_loss, abs=1e-5)
        assert a.n_answer_tokens == b.n_answer_tokens


def test_rejects_examples_without_header(tiny_model) -> None:
    with pytest.raises(ValueError, match="example 0"):
        compute_ifd(tiny_model, [{"context_ids": [1, 2], "header_ids": [], "answer_ids": [3]}])


def test_cost_counts_by_hand(tiny_model) -> None:
    """Padding efficiency and FLOPs per answer token, from the model's sizes and the batch plan, computed by hand."""
    from unifit.selection.ifd import IFDCost, ModelShape, planned_cost

    config = tiny_model.config  # llama: hidden 64, intermediate 128, 2 layers, 4 heads, 2 kv heads
    d, i, layers, heads, kv = (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                               config.num_attention_heads, config.num_key_value_heads)
    head_dim = d // heads
    per_layer = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d + 3 * d * i + 2 * d
    shape = ModelShape.of(tiny_model)
    vocab = tiny_model.config.vocab_size
    assert shape == ModelShape(layers * per_layer + d, layers, heads * head_dim, d, vocab)

    def flops(length: int, projected: int) -> float:  # one sequence
        return 2 * shape.body_params * length + 4 * layers * heads * head_dim * length * (length + 1) / 2 + 2 * d * vocab * projected

    examples = [{"context_ids": [5] * 6, "header_ids": [7, 8], "answer_ids": [9] * 4},
                {"context_ids": [5] * 10, "header_ids": [7, 8], "answer_ids": [9] * 2}]
    cost = IFDCost()
    compute_ifd(tiny_model, examples, max_tokens_per_batch=10_000, cost=cost)  # one batch of 4 rows, padded to 12
    assert (cost.real_tokens, cost.computed_positions, cost.answer_tokens) == (10 + 6 + 12 + 4, 4 * 12, 6)
    rows = [(10, 4), (6, 4), (12, 2), (4, 2)]  # (length, answer tokens projected)
    expected = (2 * shape.body_params * 4 * 12 + 4 * layers * heads * head_dim * 4 * 12 * 13 / 2
                + 2 * d * vocab * sum(p for _, p in rows))
    assert cost.flops == pytest.approx(expected)
    assert cost.reference_flops == pytest.approx(sum(flops(n, n) for n, _ in rows))
    assert planned_cost(shape, examples, 10_000) == cost  # the same numbers without running the model
    assert cost.forward_seconds > 0 == planned_cost(shape, examples, 10_000).forward_seconds  # timed only when run
    summary = cost.summary()
    assert summary["padding_efficiency"] == pytest.approx(32 / 48)
    assert summary["flops_per_answer_token"] == pytest.approx(expected / 6)
    assert summary["reference_flops_ratio"] == pytest.approx(cost.reference_flops / expected)
