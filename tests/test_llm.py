"""Backends: hf on a tiny random model, openai against a real HTTP server on 127.0.0.1, the cache."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
from garbage_server import send_json

from unifit.llm.base import ChatModel, Completion, GenerationParams
from unifit.llm.cache import CachedChatModel, CompletionCache
from unifit.llm.openai import EndpointError, OpenAIChatModel

CONVERSATIONS = [[{"role": "user", "content": "What is DNS?"}], [{"role": "user", "content": "Explain PKI in detail please."}]]


def test_hf_backend_batched_matches_one_by_one(tiny_model_cfg, cache_dir: Path) -> None:
    from unifit.llm.hf import HFChatModel

    model = HFChatModel(tiny_model_cfg, cache_dir, batch_size=2)
    assert isinstance(model, ChatModel)
    params = GenerationParams(max_new_tokens=6, temperature=0.0)
    batched = model.complete(CONVERSATIONS, params)
    single = [model.complete([c], params)[0] for c in CONVERSATIONS]
    assert [c.text for c in batched] == [c.text for c in single]  # left padding does not change greedy output
    assert all(c.finish_reason == "length" and c.num_output_tokens == 6 for c in batched)  # random model never stops


@pytest.mark.parametrize("fast", [True, False])
def test_hf_backend_generates_in_bf16_on_cpu_only_where_the_cpu_has_it(fast: bool, tiny_model_cfg, cache_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses

    import torch

    import unifit.models
    from unifit.llm.hf import HFChatModel

    monkeypatch.setattr(unifit.models, "cpu_has_fast_bf16", lambda: fast)
    model = HFChatModel(dataclasses.replace(tiny_model_cfg, dtype="bfloat16"), cache_dir, device="cpu")
    assert model.model.dtype == (torch.bfloat16 if fast else torch.float32)
    assert ("generates in float32" in caplog.text) == (not fast)
    [completion] = model.complete(CONVERSATIONS[:1], GenerationParams(max_new_tokens=4, temperature=0.0))
    assert completion.num_output_tokens == 4


class _Handler(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible /v1/chat/completions: fails the first `fail_first` calls with 503."""

    calls: list[dict[str, Any]] = []
    headers_seen: list[str] = []
    fail_first = 0

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(body)
        type(self).headers_seen.append(self.headers.get("Authorization", ""))
        if len(type(self).calls) <= type(self).fail_first:
            self.send_response(503)
            self.end_headers()
            return
        if self.path != "/v1/chat/completions":
            self.send_response(404)
            self.end_headers()
            return
        question = body["messages"][-1]["content"]
        send_json(self, 200, {"choices": [{"message": {"role": "assistant", "content": f"echo: {question}"}, "finish_reason": "stop"}],
                              "usage": {"completion_tokens": 3}})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def server() -> Iterator[str]:
    _Handler.calls, _Handler.headers_seen, _Handler.fail_first = [], [], 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_openai_backend_against_local_server(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIFIT_TEST_KEY", "sk-test-secret")
    model = OpenAIChatModel(server, "judge-model", api_key_env="UNIFIT_TEST_KEY", backoff_base_s=0.01)
    out = model.complete(CONVERSATIONS, GenerationParams(max_new_tokens=7, temperature=0.0, seed=3))
    assert [c.text for c in out] == ["echo: What is DNS?", "echo: Explain PKI in detail please."]
    assert {call["model"] for call in _Handler.calls} == {"judge-model"}
    assert all(call["max_tokens"] == 7 and call["seed"] == 3 for call in _Handler.calls)
    assert set(_Handler.headers_seen) == {"Bearer sk-test-secret"}


def test_openai_backend_retries_then_succeeds(server: str) -> None:
    _Handler.fail_first = 2
    model = OpenAIChatModel(server, "m", max_retries=3, backoff_base_s=0.01, concurrency=1)
    assert model.generate(CONVERSATIONS[:1], GenerationParams()) == ["echo: What is DNS?"]
    assert len(_Handler.calls) == 3


def test_openai_backend_gives_up_with_clear_error(server: str) -> None:
    _Handler.fail_first = 100
    model = OpenAIChatModel(server, "m", max_retries=2, backoff_base_s=0.01, concurrency=1)
    with pytest.raises(EndpointError, match="failed 3 times"):
        model.generate(CONVERSATIONS[:1], GenerationParams())
    bad_path = OpenAIChatModel(server.replace("/v1", "/nope"), "m", max_retries=2, backoff_base_s=0.01)
    _Handler.fail_first = 0
    with pytest.raises(EndpointError, match="refused"):
        bad_path.generate(CONVERSATIONS[:1], GenerationParams())


class CountingModel:
    """Deterministic ChatModel that records how many conversations reach it."""

    name = "counting"

    def __init__(self) -> None:
        self.seen = 0

    def generate(self, conversations: Any, params: GenerationParams) -> list[str]:
        self.seen += len(conversations)
        return [f"{c[-1]['content']}|{params.seed}" for c in conversations]


def test_cache_answers_repeats_and_keys_on_params(tmp_path: Path) -> None:
    inner = CountingModel()
    cached = CachedChatModel(inner, CompletionCache(tmp_path / "c.sqlite"), model_identity="counting-v1")
    first = cached.generate(CONVERSATIONS, GenerationParams(seed=1))
    assert inner.seen == 2
    assert cached.generate(CONVERSATIONS, GenerationParams(seed=1)) == first and inner.seen == 2
    assert cached.generate(CONVERSATIONS[:1], GenerationParams(seed=2)) == ["What is DNS?|2"] and inner.seen == 3
    reopened = CachedChatModel(inner, CompletionCache(tmp_path / "c.sqlite"), model_identity="counting-v1")
    assert reopened.generate(CONVERSATIONS, GenerationParams(seed=1)) == first and inner.seen == 3
    other_model = CachedChatModel(inner, CompletionCache(tmp_path / "c.sqlite"), model_identity="counting-v2")
    other_model.generate(CONVERSATIONS, GenerationParams(seed=1))
    assert inner.seen == 5


def test_generate_with_ray_is_ordered_cached_and_actor_count_independent(
        tiny_model_cfg, cache_dir: Path, tmp_path: Path, ray_local: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from unifit.config import BackendConfig, ClusterConfig, UnifitConfig
    from unifit.llm.ray_generate import generate_with_ray

    conversations = [[{"role": "user", "content": f"Question number {i} about routing?"}] for i in range(5)]
    params = GenerationParams(max_new_tokens=5, temperature=0.8, seed=7)

    def run(actors: int, cache: Path) -> list[Completion]:
        cfg = UnifitConfig(model=tiny_model_cfg, backend=BackendConfig(batch_size=2), cache_dir=str(cache),
                           cluster=ClusterConfig(generation_actors=actors))
        # the model itself lives in the shared cache; completions go to a per-run cache dir
        (cache / "models").mkdir(parents=True, exist_ok=True)
        for entry in (cache_dir / "models").iterdir():
            if not (cache / "models" / entry.name).exists():
                (cache / "models" / entry.name).symlink_to(entry)
        return generate_with_ray(cfg, conversations, params)

    one, two = run(1, tmp_path / "a"), run(2, tmp_path / "b")
    assert [c.text for c in one] == [c.text for c in two]
    assert len(one) == 5 and all(c.num_output_tokens == 5 for c in one)
    from unifit.llm import ray_generate

    def no_dispatch(*args: Any, **kwargs: Any) -> list[Completion]:
        raise AssertionError("a fully cached call must not reach Ray")

    monkeypatch.setattr(ray_generate, "_run_actor_pool", no_dispatch)
    again = run(1, tmp_path / "a")
    assert [c.text for c in again] == [c.text for c in one]


def test_small_calls_in_driver_match_the_actor_pool(tiny_model_cfg, cache_dir: Path, ray_local: None) -> None:
    from unifit.config import BackendConfig, ClusterConfig, UnifitConfig
    from unifit.llm.ray_generate import generate_with_ray

    conversations = [[{"role": "user", "content": f"Name threat number {i}."}] for i in range(3)]
    params = GenerationParams(max_new_tokens=4, temperature=0.0)

    def run(driver_max: int) -> list[str]:
        cfg = UnifitConfig(model=tiny_model_cfg, backend=BackendConfig(batch_size=2, cache=False), cache_dir=str(cache_dir),
                           cluster=ClusterConfig(generation_actors=2, driver_generation_max=driver_max))
        return [c.text for c in generate_with_ray(cfg, conversations, params)]

    assert run(driver_max=8) == run(driver_max=0)


def test_a_local_model_retrained_in_place_gets_a_new_cache_identity(tmp_path: Path) -> None:
    """A fine-tuned variant retrained at the same path must not be served the old weights' cached answers."""
    from unifit.config import BackendConfig, ModelConfig
    from unifit.llm.ray_generate import model_identity

    model_dir = tmp_path / "finetune" / "pithy_ne" / "model"
    model_dir.mkdir(parents=True)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"weights of the first training run")
    cfg = ModelConfig(name="pithy_ne", source="hub", path=str(model_dir))
    first = model_identity(BackendConfig(), cfg)
    assert model_identity(BackendConfig(), cfg) == first  # stable while the weights stay
    weights.write_bytes(b"weights of the retrained model")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    assert model_identity(BackendConfig(), cfg) != first
