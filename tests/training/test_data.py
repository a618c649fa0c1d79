"""Training data: assistant-only labels from the chat template (every turn), truncation, packing that is
numerically equivalent to unpacked sequences, and the chat templates of the four 7B families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model_config
from transformers.modeling_flash_attention_utils import _is_packed_sequence

from unifit.training.attention import register_segment_attention
from unifit.training.data import IGNORE_INDEX, collate, encode_instances, model_inputs, pack_examples

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


def _conversation(k: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {k} " + "word " * k},
                         {"role": "assistant", "content": f"answer {k} " + "token " * (k + 1)}]}


MULTI_TURN = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is DNS?"},
    {"role": "assistant", "content": "The Domain Name System."},
    {"role": "user", "content": "And DNSSEC?"},
    {"role": "assistant", "content": "Signed DNS records."},
]}


def test_labels_cover_every_assistant_turn_and_nothing_else(tiny_tokenizer) -> None:
    (example,), report = encode_instances(tiny_tokenizer, [MULTI_TURN], max_length=512)
    labels = example["labels"]
    runs, current = [], []
    for token, label in zip(example["input_ids"], labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    eot = tiny_tokenizer.eos_token  # ChatML <|im_end|> ends each turn and is learned
    assert [tiny_tokenizer.decode(run) for run in runs] == [f"The Domain Name System.{eot}", f"Signed DNS records.{eot}"]
    assert report.encoded == 1 and report.truncated == 0


def test_truncation_and_answerless_rows_are_counted(tiny_tokenizer) -> None:
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "long answer " * 100}]}
    no_answer_left = {"messages": [{"role": "user", "content": "question " * 200}, {"role": "assistant", "content": "yes"}]}
    examples, report = encode_instances(tiny_tokenizer, [long, no_answer_left], max_length=64)
    assert len(examples) == 1 and len(examples[0]["input_ids"]) == 64
    assert (report.encoded, report.truncated, report.dropped_no_answer) == (1, 2, 1)


def test_packing_places_every_example_once_within_max_length(tiny_tokenizer) -> None:
    examples, _ = encode_instances(tiny_tokenizer, [_conversation(k) for k in range(1, 30)], max_length=512)
    rows = pack_examples(examples, max_length=200, seed=0)
    assert all(len(row["input_ids"]) <= 200 for row in rows)
    assert sum(len(row["input_ids"]) for row in rows) == sum(len(e["input_ids"]) for e in examples)
    assert sum(row["position_ids"].count(0) for row in rows) == len(examples)
    assert len(rows) < len(examples) / 2  # it actually packs


def _per_token_losses(model, batch: dict) -> list[torch.Tensor]:
    """Cross-entropy of every labelled token, per row, computed here (not by the model's loss)."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none", ignore_index=IGNORE_INDEX)
    return [ce[i][labels[i] != IGNORE_INDEX] for i in range(len(labels))]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_packed_batch_matches_unpacked_per_token_loss(arch: str, cache_dir) -> None:
    from unifit.models import load_model, load_tokenizer

    cfg = tiny_model_config(arch)
    tokenizer, model = load_tokenizer(cfg, cache_dir), load_model(cfg, cache_dir).eval()
    examples, _ = encode_instances(tokenizer, [_conversation(k) for k in (2, 9, 4, 13, 1)] + [MULTI_TURN], max_length=512)
    reference = {tuple(e["input_ids"]): _per_token_losses(model, collate([e], tokenizer.pad_token_id, packed=False))[0]
                 for e in examples}
    rows = pack_examples(examples, max_length=180, seed=0)
    assert len(rows) >= 2 and any(row["position_ids"].count(0) >= 2 for row in rows)  # a real packed batch
    batch = collate(rows, tokenizer.pad_token_id, packed=True)
    # one padding-free row: what transformers' flash-attn path needs to read the segments from the position ids
    assert batch["input_ids"].shape == (1, sum(len(row["input_ids"]) for row in rows))
    assert _is_packed_sequence(batch["position_ids"], batch_size=1)
    assert batch["model_mask"] is None and batch["segment_spans"][0][-1][1] == batch["input_ids"].shape[1]
    model.set_attn_implementation(register_segment_attention())
    (packed_losses,) = _per_token_losses(model, batch)
    positions = [p for row in rows for p in row["position_ids"]]
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    flat_ids = batch["input_ids"][0].tolist()
    offset, compared = 0, 0
    for start, end in zip(starts, starts[1:]):
        expected = reference[tuple(flat_ids[start:end])]
        torch.testing.assert_close(packed_losses[offset:offset + len(expected)], expected, atol=1e-5, rtol=1e-5)
        offset += len(expected)
        compared += 1
    assert offset == len(packed_losses)
    assert compared == len(examples)
    # per-segment attention is what makes this hold: plain causal attention over the whole row differs
    model.set_attn_implementation("sdpa")
    leaky = {key: value for key, value in batch.items() if key != "segment_spans"}
    leaky.update(model_mask=batch["attention_mask"])
    assert not torch.allclose(torch.cat(_per_token_losses(model, leaky)), packed_losses, atol=1e-3)


@pytest.mark.parametrize("arch,family", [("llama", "llama2_7b"), ("mistral", "mistral_7b"), ("qwen2", "qwen_7b")])
def test_family_templates_train_on_their_architecture(arch: str, family: str, cache_dir) -> None:
    """Each 7B family's chat template (from conf/model) on a tiny model of its architecture: labels are the
    answers plus the end-of-turn token, and a packed, NEFTune-noised step lowers the loss."""
    from unifit.models import load_model, load_tokenizer
    from unifit.training.neftune import NEFTuneHook

    family_cfg = yaml.safe_load((CONF / f"{family}.yaml").read_text())
    cfg = tiny_model_config(arch)
    cfg.chat_template = family_cfg["chat_template"]
    tokenizer, model = load_tokenizer(cfg, cache_dir), load_model(cfg, cache_dir)
    examples, _ = encode_instances(tokenizer, [MULTI_TURN, _conversation(3)], max_length=512)
    labelled = tokenizer.decode([t for t in examples[0]["labels"] if t != IGNORE_INDEX])
    assert labelled.replace(" ", "") == f"The Domain Name System.{tokenizer.eos_token}Signed DNS records.{tokenizer.eos_token}".replace(" ", "")

    batch = collate(pack_examples(examples, max_length=512), tokenizer.pad_token_id, packed=True)
    model.set_attn_implementation(register_segment_attention())
    hook = NEFTuneHook(alpha=5.0, generator=torch.Generator().manual_seed(0))
    hook.attach(model)
    hook.attention_mask, hook.segment_ids = batch["attention_mask"], batch["segment_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(**model_inputs(batch)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_segment_attention_refuses_a_batch_without_spans(cache_dir) -> None:
    """Without spans it cannot know the segments: an error, never attention across packed conversations."""
    from unifit.models import load_model

    model = load_model(tiny_model_config("llama"), cache_dir)
    model.set_attn_implementation(register_segment_attention())
    with pytest.raises(ValueError, match="segment_spans"):
        model(input_ids=torch.ones(1, 8, dtype=torch.long))
