"""vLLM cannot run here (CUDA-only): the engine actor is tested against a fake shaped like vLLM's offline API
(tests/fake_vllm.py), in real Ray actors; the resources an engine asks for and the GPU guard are tested apart."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import fake_vllm
import pytest

from unifit.config import BackendConfig, ClusterConfig, ModelConfig, UnifitConfig
from unifit.llm.actors import ActorPool
from unifit.llm.base import GenerationParams
from unifit.llm.client import ModelClient, ModelClients, build_backend
from unifit.llm.vllm import VLLMChatModel, engine_kwargs, engine_resources, finish_reason, sampling_kwargs
from unifit.stage import UserError

CONVERSATIONS = [[{"role": "user", "content": f"Explain DNS record type number {i}."}] for i in range(5)]


def _fake_engine(log_dir: str, backend: BackendConfig, model_cfg: ModelConfig, model_dir: str) -> Any:
    """What an engine actor builds, with the fake installed as `vllm` in the actor's process first."""
    os.environ["UNIFIT_FAKE_VLLM_LOG"] = log_dir
    fake_vllm.install()
    return build_backend(backend, model_cfg, "/unused-cache", model_dir)


@pytest.fixture()
def engines(tmp_path: Path, ray_local: None) -> Any:
    """A factory of engine pools (what the client holds for backend=vllm), CPU slots standing in for GPUs."""
    import sys

    from ray import cloudpickle

    for module in (fake_vllm, sys.modules[__name__]):  # actors are other processes: ship these modules by value
        cloudpickle.register_pickle_by_value(module)
    log_dir = tmp_path / "engines"
    log_dir.mkdir()
    backend = BackendConfig(name="vllm", batch_size=2, tensor_parallel_size=1)
    build = functools.partial(_fake_engine, str(log_dir), backend, ModelConfig(name="m7b", max_length=4096), "/models/m7b")
    pools: list[ActorPool] = []

    def make(actors: int) -> ModelClient:
        pools.append(ActorPool(build, VLLMChatModel, max_actors=actors, resources={"num_cpus": 1}))
        return ModelClient("m7b", "m7b-vllm", pools[-1], backend.batch_size)

    make.constructions = lambda: len(list(log_dir.iterdir()))  # type: ignore[attr-defined]
    yield make
    for pool in pools:
        pool.close()
    for module in (fake_vllm, sys.modules[__name__]):
        cloudpickle.unregister_pickle_by_value(module)


def test_one_engine_per_actor_per_stage_whatever_the_number_of_calls(engines: Any) -> None:
    replies: dict[int, list[list[str]]] = {}
    for actors in (1, 2):  # one stage after the other, as the pipeline runs them
        client = engines(actors)
        replies[actors] = [[c.text for c in client.complete(CONVERSATIONS, GenerationParams(max_new_tokens=4, temperature=0.7, seed=call))]
                           for call in range(3)]  # three calls of the stage (tree level, leaf shard, retry...): no new engine
        client.pool.wait_ready()  # an engine still starting may have been given no batch yet; it must count all the same
        assert client.pool.stats.loads == actors and client.pool.stats.batches == 3 * 3
        if actors == 1:
            [structured] = client.complete(CONVERSATIONS[:1], GenerationParams(max_new_tokens=50, json_mode=True))
            assert structured.text.startswith('{"w":') and structured.finish_reason == "stop" and structured.num_output_tokens == 2
            [cut] = client.complete(CONVERSATIONS[:1], GenerationParams(max_new_tokens=4, seed=9))
            assert cut.finish_reason == "length" and cut.num_output_tokens == 4
            [verdict] = client.choose(CONVERSATIONS[:1], ["[[1]]", "[[2]]"])  # the judge's call, through the engine actor
            assert verdict.probs == pytest.approx(tuple(fake_vllm.option_probs(CONVERSATIONS[0], ["[[1]]", "[[2]]"])))
        client.pool.close()  # the stage ends: its engines go
    assert engines.constructions() == 1 + 2  # one vllm.LLM per actor per stage, whatever the number of calls
    assert replies[1] == replies[2]  # 1 or 2 engines: the same replies, in input order
    assert len({text for call in replies[1] for text in call}) == 3 * len(CONVERSATIONS)  # seeds and prompts reach the engine


@pytest.mark.parametrize("options", [["[[1]]", "[[2]]", "[[3]]"], [str(i) for i in range(1, 11)]])
def test_engine_chooses_by_the_models_probabilities_of_the_options(options: list[str], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A judge on a vLLM engine: a greedy reply constrained to the options, with vLLM's top logprobs per token; the
    choice carries the model's probabilities of the options (the fake's known distribution), so it always decides."""
    import sys

    monkeypatch.setenv("UNIFIT_FAKE_VLLM_LOG", str(tmp_path))
    for name in ("vllm", "vllm.sampling_params"):
        monkeypatch.setitem(sys.modules, name, None)  # restored (removed) after the test
    fake_vllm.install()
    model = VLLMChatModel("/models/m7b", BackendConfig(name="vllm"), 4096, False, "m7b")
    choices = model.choose(CONVERSATIONS, options)
    for conversation, choice in zip(CONVERSATIONS, choices):
        expected = fake_vllm.option_probs(conversation, options)
        assert choice.probs == pytest.approx(tuple(expected), abs=1e-9)
        assert choice.index == max(range(len(options)), key=lambda i: expected[i])
    assert len({choice.index for choice in choices}) > 1  # the five conversations do not all get the same verdict
    sampling = model.llm.last_sampling
    assert sampling.temperature == 0.0 and sampling.logprobs == 20 and sampling.structured_outputs.choice == options


def test_engine_and_sampling_settings_match_vllm() -> None:
    kwargs = engine_kwargs(BackendConfig(name="vllm", tensor_parallel_size=2), max_model_len=4096, trust_remote_code=False)
    assert kwargs["load_format"] == "safetensors" and kwargs["trust_remote_code"] is False
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["max_model_len"] == 4096 and kwargs["distributed_executor_backend"] == "ray"
    assert "distributed_executor_backend" not in engine_kwargs(BackendConfig(name="vllm"), 4096, False)
    params = GenerationParams(max_new_tokens=32, temperature=0.5, top_p=0.9, repetition_penalty=1.1, seed=4)
    fake_vllm.SamplingParams(**sampling_kwargs(params))  # the keyword names vLLM's SamplingParams takes
    assert sampling_kwargs(params) == {"max_tokens": 32, "temperature": 0.5, "top_p": 0.9, "repetition_penalty": 1.1, "seed": 4}
    assert [finish_reason(r) for r in ("stop", "length", "abort", None)] == ["stop", "length", "error", "error"]


def test_engines_take_a_gpu_each_or_a_packed_placement_group_for_tensor_parallel() -> None:
    cluster = ClusterConfig(cpus_per_actor=4, gpus_per_actor=1)
    assert engine_resources(BackendConfig(name="vllm"), cluster) == ({"num_cpus": 4, "num_gpus": 1}, [])
    resources, bundles = engine_resources(BackendConfig(name="vllm", tensor_parallel_size=4), cluster)
    assert resources == {"num_cpus": 0, "num_gpus": 0} and bundles == [{"GPU": 1, "CPU": 4}] * 4


def test_vllm_refused_up_front_without_gpus(ray_local: None, tiny_model_cfg, cache_dir: Path) -> None:
    cfg = UnifitConfig(model=tiny_model_cfg, backend=BackendConfig(name="vllm", cache=False), cache_dir=str(cache_dir))
    client = ModelClients(cfg.cluster, cfg.cache_dir).connect(cfg.model, cfg.backend)
    with pytest.raises(UserError, match="needs GPUs"):
        client.complete([[{"role": "user", "content": "x"}]], GenerationParams())
