"""Choosing by probability: the scoring math against a scripted model with known logits, the real hf backend
against an independent unbatched computation, and the logprob formats of OpenAI-compatible servers and vLLM."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from unifit.llm.base import Choice
from unifit.llm.choice import (choice_from_logprobs, choice_from_text, choice_from_token_logprobs, choice_from_vllm_logprobs,
                               needs_terminator, score_continuations)


class TokenCache:
    """Stands in for a transformers cache: the token ids each row has seen (`batch_repeat_interleave` as in transformers)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.ids = self.ids.repeat_interleave(repeats, dim=0)


class BigramModel(torch.nn.Module):
    """Known logits: the next-token logits are row `table[previous token]` (transformers' causal-LM call shape)."""

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table, dtype=torch.float32), requires_grad=False)
        self.calls = 0
        self.seen: list[torch.Tensor] = []  # per call: cached tokens + input tokens, per row

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                past_key_values: TokenCache | None = None, use_cache: bool = False) -> SimpleNamespace:
        self.calls += 1
        seen = input_ids if past_key_values is None else torch.cat([past_key_values.ids, input_ids], dim=1)
        assert attention_mask.shape == seen.shape  # the mask covers the cached positions too
        self.seen.append(seen)
        return SimpleNamespace(logits=self.table[input_ids][:, -logits_to_keep:],
                               past_key_values=TokenCache(seen) if use_cache else None)


def _expected(table: np.ndarray, prompt: list[int], option: list[int]) -> float:
    total, previous = 0.0, prompt[-1]
    for token in option:
        row = table[previous]
        total += row[token] - (np.log(np.exp(row - row.max()).sum()) + row.max())
        previous = token
    return total


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_scores_equal_the_known_log_probabilities_with_the_prompt_run_once(k: int) -> None:
    rng = np.random.default_rng(k)
    table = rng.normal(size=(12, 12)) * 3
    model = BigramModel(table)
    prompt = [1, 4, 7]
    options = [list(rng.integers(0, 12, size=rng.integers(1, 4))) for _ in range(k)]  # different lengths: padding matters
    scores = score_continuations(model, prompt, options, pad_id=0)
    assert model.calls == 2  # the prompt once, then all k options on copies of its cache
    assert model.seen[0].tolist() == [prompt[:-1]]
    assert [row[: len(prompt) + len(o)] for row, o in zip(model.seen[1].tolist(), options)] == [prompt + o for o in options]
    assert scores == pytest.approx([_expected(table, prompt, o) for o in options], abs=1e-4)
    choice = choice_from_logprobs(scores)
    probs = np.exp(np.array(scores) - max(scores))
    assert choice.probs == pytest.approx(tuple(probs / probs.sum()))
    assert choice.index == int(np.argmax(scores))


def test_choice_from_logprobs_normalises_and_breaks_ties_to_the_first() -> None:
    assert choice_from_logprobs([math.log(0.2), math.log(0.6), math.log(0.2)]) == Choice(1, pytest.approx((0.2, 0.6, 0.2)))
    assert choice_from_logprobs([-1.0, -1.0]).index == 0
    assert choice_from_logprobs([-math.inf, -3.0]).probs == (0.0, 1.0)
    with pytest.raises(ValueError):
        choice_from_logprobs([])


def test_needs_terminator_for_options_that_prefix_others() -> None:
    assert needs_terminator([str(i) for i in range(1, 11)])  # "1" is a prefix of "10"
    assert not needs_terminator(["[[1]]", "[[2]]", "[[3]]"])


def test_hf_choose_matches_unbatched_full_forward(tiny_model_cfg, cache_dir) -> None:
    from unifit.llm.hf import HFChatModel

    model = HFChatModel(tiny_model_cfg, cache_dir, device="cpu")
    tok = model.tokenizer
    conversations = [[{"role": "user", "content": "Which answer is best? [Answer 1] yes [Answer 2] no"}],
                     [{"role": "user", "content": "Rate it."}]]
    for options in (["[[1]]", "[[2]]", "[[3]]"], [str(i) for i in range(1, 11)]):
        choices = model.choose(conversations, options)
        for conversation, choice in zip(conversations, choices):
            prompt = tok(tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            terminator = [tok.eos_token_id] if needs_terminator(options) else []
            totals = []
            for option in options:
                ids = tok(option, add_special_tokens=False)["input_ids"] + terminator
                with torch.inference_mode():
                    logits = model.model(torch.tensor([prompt + ids])).logits[0].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                totals.append(sum(float(logprobs[len(prompt) - 1 + j, t]) for j, t in enumerate(ids)))
            expected = np.exp(np.array(totals) - max(totals))
            assert choice.probs == pytest.approx(tuple(expected / expected.sum()), abs=1e-4)
            assert choice.index == int(np.argmax(totals))


def _content(tokens: list[tuple[str, dict[str, float]]]) -> list[dict]:
    return [{"token": t, "logprob": tops.get(t, -9.0), "top_logprobs": [{"token": k, "logprob": v} for k, v in tops.items()]}
            for t, tops in tokens]


def test_openai_logprobs_read_at_the_token_that_commits_to_an_option() -> None:
    options = ["[[1]]", "[[2]]", "[[3]]"]
    content = _content([("[[", {"[[": -0.01}), ("2", {"2": math.log(0.6), "1": math.log(0.3), "3": math.log(0.05), "x": math.log(0.05)}),
                        ("]]", {"]]": -0.01})])
    choice = choice_from_token_logprobs(content, options)
    assert choice.index == 1 and choice.probs == pytest.approx((0.3 / 0.95, 0.6 / 0.95, 0.05 / 0.95))
    # explanation first, verdict later; and options absent from the top list get probability 0
    content = _content([("Answer", {"Answer": -0.1}), (" one", {" one": -0.1}), (" [[", {" [[": -0.1}),
                        ("1", {"1": math.log(0.9), "2": math.log(0.1)}), ("]]", {"]]": 0.0})])
    assert choice_from_token_logprobs(content, options).probs == pytest.approx((0.9, 0.1, 0.0))
    scores = [str(i) for i in range(1, 11)]
    content = _content([("10", {"10": math.log(0.5), "9": math.log(0.3), "1": math.log(0.2)})])
    assert choice_from_token_logprobs(content, scores).probs[9] == pytest.approx(0.5)
    assert choice_from_token_logprobs(_content([("no", {"no": 0.0})]), options) is None


def test_vllm_logprob_dicts_give_the_same_choice() -> None:
    lp = lambda value, token: SimpleNamespace(logprob=value, rank=1, decoded_token=token)  # noqa: E731  vllm.sequence.Logprob
    choice = choice_from_vllm_logprobs([5, 7], [{5: lp(-0.01, "[[")}, {7: lp(math.log(0.7), "1"), 8: lp(math.log(0.3), "2")}], ["[[1]]", "[[2]]"])
    assert choice.index == 0 and choice.probs == pytest.approx((0.7, 0.3))


@pytest.mark.parametrize("text,index", [("[[2]]", 1), ("I choose [[3]] because it is detailed.", 2), ("7", None), ("[[1]] or [[2]]", None)])
def test_text_fallback_takes_the_one_option_named(text: str, index: int | None) -> None:
    choice = choice_from_text(text, ["[[1]]", "[[2]]", "[[3]]"])
    assert (choice.index if choice else None) == index
    if choice:
        assert sum(choice.probs) == 1.0 and choice.probs[index] == 1.0


class _Endpoint:
    """An OpenAI-compatible /chat/completions on 127.0.0.1 that returns `logprobs.content` in OpenAI's shape
    (or refuses `logprobs` with HTTP 400, like an API without them); every request body is recorded."""

    def __init__(self, refuse_logprobs: bool) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[dict] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append(body)
                if refuse_logprobs and body.get("logprobs"):
                    self.send_response(400)
                    self.end_headers()
                    return
                tops = {"1": math.log(0.25), "2": math.log(0.7), "x": math.log(0.05)}
                content = [{"token": "[[", "logprob": -0.01, "top_logprobs": [{"token": "[[", "logprob": -0.01}]},
                           {"token": "2", "logprob": tops["2"], "top_logprobs": [{"token": t, "logprob": v} for t, v in tops.items()]},
                           {"token": "]]", "logprob": 0.0, "top_logprobs": [{"token": "]]", "logprob": 0.0}]}]
                choice = {"message": {"role": "assistant", "content": "[[2]] It is more complete."}, "finish_reason": "stop"}
                if body.get("logprobs"):
                    choice["logprobs"] = {"content": content}
                payload = json.dumps({"choices": [choice], "usage": {"completion_tokens": 3}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.mark.parametrize("refuse", [False, True])
def test_openai_choose_over_http(refuse: bool) -> None:
    from unifit.llm.openai import OpenAIChatModel

    endpoint = _Endpoint(refuse_logprobs=refuse)
    try:
        model = OpenAIChatModel(endpoint.url, "judge", max_retries=0, concurrency=1, guided_choice=True)
        choices = model.choose([[{"role": "user", "content": "pick"}]] * 2, ["[[1]]", "[[2]]"])
    finally:
        endpoint.server.shutdown()
    if refuse:  # refused once, then plain text for the rest: one-hot on the option the reply names
        assert [c.probs for c in choices] == [(0.0, 1.0)] * 2
        assert [bool(r.get("logprobs")) for r in endpoint.requests] == [True, False, False]
    else:
        assert all(c.index == 1 and c.probs == pytest.approx((0.25 / 0.95, 0.7 / 0.95)) for c in choices)
        assert all(r["logprobs"] and r["top_logprobs"] == 20 and r["temperature"] == 0.0 for r in endpoint.requests)
    assert all(r["guided_choice"] == ["[[1]]", "[[2]]"] for r in endpoint.requests)
