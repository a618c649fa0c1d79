"""Backends: hf on a tiny random model, openai against a real HTTP server on 127.0.0.1; the model client: cache, order, actors."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
from garbage_server import send_json

from unifit.llm.actors import InProcessPool
from unifit.llm.base import ChatClient, Choice, Completion, GenerationParams
from unifit.llm.cache import CompletionCache
from unifit.llm.client import ModelClient
from unifit.llm.openai import EndpointError, OpenAIChatModel

CONVERSATIONS = [[{"role": "user", "content": "What is DNS?"}], [{"role": "user", "content": "Explain PKI in detail please."}]]


def test_hf_backend_batched_matches_one_by_one(tiny_model_cfg, cache_dir: Path) -> None:
    from unifit.llm.hf import HFChatModel

    model = HFChatModel(tiny_model_cfg, cache_dir, batch_size=2)
    assert isinstance(model, ChatClient)
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


@pytest.mark.parametrize("cpuinfo,native", [
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n", False),  # AVX-512 without BF16: emulated, slower
    ("flags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n", True),
    ("flags\t\t: fpu avx512f amx_bf16 amx_tile\n", True),
    ("Features\t: fp asimd bf16 i8mm\n", True),  # Arm
    ("", False),
])
def test_cpu_has_fast_bf16_only_with_native_bf16(cpuinfo: str, native: bool) -> None:
    from unifit.models import cpu_has_fast_bf16

    assert cpu_has_fast_bf16(cpuinfo) == native


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
    assert [c.text for c in model.complete(CONVERSATIONS[:1], GenerationParams())] == ["echo: What is DNS?"]
    assert len(_Handler.calls) == 3


def test_openai_backend_gives_up_with_clear_error(server: str) -> None:
    _Handler.fail_first = 100
    model = OpenAIChatModel(server, "m", max_retries=2, backoff_base_s=0.01, concurrency=1)
    with pytest.raises(EndpointError, match="failed 3 times"):
        model.complete(CONVERSATIONS[:1], GenerationParams())
    bad_path = OpenAIChatModel(server.replace("/v1", "/nope"), "m", max_retries=2, backoff_base_s=0.01)
    _Handler.fail_first = 0
    with pytest.raises(EndpointError, match="refused"):
        bad_path.complete(CONVERSATIONS[:1], GenerationParams())


class CountingModel:
    """Deterministic backend object that records how many conversations reach it."""

    name = "counting"

    def __init__(self) -> None:
        self.seen = 0

    def complete(self, conversations: Any, params: GenerationParams) -> list[Completion]:
        self.seen += len(conversations)
        return [Completion(f"{c[-1]['content']}|{params.seed}", "stop", 1) for c in conversations]


def _client(inner: CountingModel, cache: CompletionCache | None, identity: str = "counting-v1", batch_size: int = 8) -> ModelClient:
    return ModelClient("counting", identity, InProcessPool(lambda: inner, CountingModel, counts_as_load=True), batch_size, cache)


def test_client_cache_answers_repeats_and_keys_on_params(tmp_path: Path) -> None:
    inner = CountingModel()
    texts = lambda client, convs, seed: [c.text for c in client.complete(convs, GenerationParams(seed=seed))]  # noqa: E731
    cached = _client(inner, CompletionCache(tmp_path / "c.sqlite"))
    first = texts(cached, CONVERSATIONS, 1)
    assert inner.seen == 2
    assert texts(cached, CONVERSATIONS, 1) == first and inner.seen == 2
    assert texts(cached, CONVERSATIONS[:1], 2) == ["What is DNS?|2"] and inner.seen == 3
    reopened = _client(inner, CompletionCache(tmp_path / "c.sqlite"))
    assert texts(reopened, CONVERSATIONS, 1) == first and inner.seen == 3
    texts(_client(inner, CompletionCache(tmp_path / "c.sqlite"), identity="counting-v2"), CONVERSATIONS, 1)
    assert inner.seen == 5
    assert cached.stats.computed == 3 and cached.stats.cached == 2 and cached.pool.stats.loads == 1


def test_client_batches_in_input_order_and_refuses_choose_without_backend_support() -> None:
    conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    client = _client(CountingModel(), None, batch_size=2)
    assert [c.text for c in client.complete(conversations, GenerationParams(seed=4))] == [f"q{i}|4" for i in range(5)]
    assert client.pool.stats.batches == 3 and client.pool.stats.loads == 1
    with pytest.raises(TypeError, match="CountingModel backend cannot score options"):
        client.choose(conversations, ["yes", "no"])


class ChoosingModel(CountingModel):
    """A backend object with `choose`: picks the option named in the prompt, probability 0.9."""

    def choose(self, conversations: Any, options: list[str]) -> list[Choice]:
        picks = [options.index(c[-1]["content"]) for c in conversations]
        return [Choice(i, tuple(0.9 if j == i else 0.1 / (len(options) - 1) for j in range(len(options)))) for i in picks]


def test_client_forwards_choose_in_input_order(tiny_model_cfg, cache_dir: Path, ray_local: None) -> None:
    """Through real Ray actors (2, batches of 2): the options reach the backend's `choose`, replies come back in order."""
    import sys

    from ray import cloudpickle

    from unifit.llm.actors import ActorPool

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors are other processes: ship ChoosingModel by value
    pool = ActorPool(ChoosingModel, ChoosingModel, max_actors=2, resources={"num_cpus": 1})
    client = ModelClient("choosing", "choosing-v1", pool, batch_size=2)
    picks = ["b", "a", "c", "c", "a"]
    try:
        choices = client.choose([[{"role": "user", "content": p}] for p in picks], ["a", "b", "c"])
        pool.wait_ready()
    finally:
        pool.close()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert [c.index for c in choices] == [1, 0, 2, 2, 0]
    assert choices[0].probs == pytest.approx((0.05, 0.9, 0.05)) and pool.stats.loads == 2


class SlowModel(CountingModel):
    """A backend object that takes `DELAY_S` per batch and names the process (the actor) that answered."""

    DELAY_S = 1.0

    def complete(self, conversations: Any, params: GenerationParams) -> list[Completion]:
        import time

        time.sleep(self.DELAY_S)
        return [Completion(f"{c[-1]['content']}|{os.getpid()}", "stop", 1) for c in conversations]


def test_concurrent_calls_share_the_pool_each_batch_on_the_least_busy_actor(ray_local: None) -> None:
    """Two stage steps calling one client at once (a batch each) run on the two actors, not queued on one."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from ray import cloudpickle

    from unifit.llm.actors import ActorPool

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    pool = ActorPool(SlowModel, SlowModel, max_actors=2, resources={"num_cpus": 1})
    client = ModelClient("slow", "slow-v1", pool, batch_size=1)
    try:
        client.complete([[{"role": "user", "content": "warm-up 1"}], [{"role": "user", "content": "warm-up 2"}]], GenerationParams())
        pool.wait_ready()
        with ThreadPoolExecutor(max_workers=2) as threads:
            calls = [threads.submit(client.complete, [[{"role": "user", "content": f"step {i}"}]], GenerationParams()) for i in range(2)]
            replies = [call.result()[0].text for call in calls]
    finally:
        pool.close()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert [r.split("|")[0] for r in replies] == ["step 0", "step 1"]
    assert len({r.split("|")[1] for r in replies}) == 2, "both batches went to one actor while the other was idle"
    assert pool.stats.loads == 2 and pool.stats.batches == 4 and client.stats.calls == 3 and pool.unfinished == 0


def _run_config(tiny_model_cfg, cache: Path, cache_dir: Path, actors: int, use_cache: bool = True):
    from unifit.config import BackendConfig, ClusterConfig, UnifitConfig

    # the model itself lives in the shared cache; completions go to a per-run cache dir
    (cache / "models").mkdir(parents=True, exist_ok=True)
    for entry in (cache_dir / "models").iterdir():
        if not (cache / "models" / entry.name).exists():
            (cache / "models" / entry.name).symlink_to(entry)
    return UnifitConfig(model=tiny_model_cfg, backend=BackendConfig(batch_size=2, cache=use_cache), cache_dir=str(cache),
                        cluster=ClusterConfig(generation_actors=actors))


def test_client_is_ordered_cached_actor_count_independent_and_loads_once(
        tiny_model_cfg, cache_dir: Path, tmp_path: Path, ray_local: None) -> None:
    from unifit.llm.client import ModelClients

    conversations = [[{"role": "user", "content": f"Question number {i} about routing?"}] for i in range(5)]
    params = GenerationParams(max_new_tokens=5, temperature=0.8, seed=7)

    def run(actors: int, cache: Path, calls: int = 1) -> tuple[list[Completion], dict[str, Any]]:
        cfg = _run_config(tiny_model_cfg, cache, cache_dir, actors)
        clients = ModelClients(cfg.cluster, cfg.cache_dir)
        client = clients.connect(cfg.model, cfg.backend, "generate")
        try:
            out = client.complete(conversations, params)
            for call in range(1, calls):  # more calls of the stage, each one new (another seed): the same actors serve them
                client.complete(conversations, GenerationParams(max_new_tokens=2, temperature=0.8, seed=100 + call))
            client.pool.wait_ready()  # an actor still starting may have had no batch; its load counts all the same
        finally:
            clients.close()
        return out, clients.metrics()

    (one, one_metrics), (two, two_metrics) = run(1, tmp_path / "a", calls=4), run(2, tmp_path / "b")
    assert [c.text for c in one] == [c.text for c in two]
    assert len(one) == 5 and all(c.num_output_tokens == 5 for c in one)
    assert one_metrics["model_loads"] == 1 and one_metrics["model_calls"] == 4  # 4 calls, one model load
    assert two_metrics["model_loads"] == 2 and two_metrics["completions_computed"] == 5
    again, again_metrics = run(2, tmp_path / "a")
    assert [c.text for c in again] == [c.text for c in one]
    assert again_metrics["model_loads"] == 0 and again_metrics["completions_cached"] == 5  # fully cached: no actor started


def test_a_local_model_retrained_in_place_gets_a_new_cache_identity(tmp_path: Path) -> None:
    """A fine-tuned variant retrained at the same path must not be served the old weights' cached answers."""
    from unifit.config import BackendConfig, ModelConfig
    from unifit.llm.client import model_identity

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
