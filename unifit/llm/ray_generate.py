"""Run any backend over many conversations with Ray Data, in input order, through the completion cache.

On a local CPU cluster, calls no bigger than `cluster.driver_generation_max` run on a model in the driver:
a Ray Data job pays ~15 s of actor start-up (process, imports, model load), which dominates tree levels,
Self-Instruct rounds and retries of a few prompts each.

hf/openai: `map_batches` over an actor pool (one model per actor); every Ray Data item is one batch formed
here in the driver, so the same prompts meet the same batch and seed whatever the number of actors.
vllm: a `ray.data.llm` processor with one engine per `cluster.generation_actors`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from unifit.config import BackendConfig, ModelConfig, UnifitConfig
from unifit.llm.base import ChatModel, Completion, Conversation, GenerationParams
from unifit.llm.cache import CompletionCache, complete_through_cache
from unifit.stage import UserError

log = logging.getLogger(__name__)


def model_identity(backend: BackendConfig, model_cfg: ModelConfig) -> str:
    """What makes two completions interchangeable: the weights and how they are served (not batch size).

    A local model directory is identified by its weight files too (name, size, mtime), not its path alone: a
    fine-tuned variant retrained in place (say, with another learning rate) must not get the old model's answers.
    """
    local = Path(model_cfg.path) if model_cfg.path and Path(model_cfg.path).is_dir() else None
    weights = sorted((f.name, stat.st_size, stat.st_mtime_ns) for f in local.glob("*.safetensors") for stat in [f.stat()]) if local else []
    return json.dumps({"backend": backend.name, "api_model": backend.api_model, "url": backend.url if backend.name == "openai" else "",
                       "model": dataclasses.asdict(model_cfg), "weights": weights}, sort_keys=True)


def build_chat_model(backend: BackendConfig, model_cfg: ModelConfig, cache_dir: str | Path) -> ChatModel:
    """An in-process ChatModel (judge, scripted use); bulk generation goes through `generate_with_ray`."""
    if backend.name == "openai":
        from unifit.llm.openai import OpenAIChatModel

        return OpenAIChatModel(backend.url, backend.api_model or model_cfg.path or model_cfg.name, backend.api_key_env,
                               backend.max_retries, backend.timeout_s, concurrency=backend.batch_size,
                                guided_choice=backend.guided_choice)
    if backend.name == "vllm":
        raise UserError("backend=vllm serves bulk generation through Ray Data; for an interactive judge use "
                        "backend=openai against `vllm serve`")
    from unifit.llm.hf import HFChatModel

    return HFChatModel(model_cfg, cache_dir, batch_size=backend.batch_size)


@functools.lru_cache(maxsize=1)
def _model_from_plain(backend_json: str, model_json: str, cache_dir: str) -> ChatModel:
    """A ChatModel from serialized configs (what Ray actors receive); in the driver, kept while calls reuse it."""
    from unifit.config import from_container

    cfg = from_container({"backend": json.loads(backend_json), "model": json.loads(model_json)})
    return build_chat_model(cfg.backend, cfg.model, cache_dir)


def _run_in_driver(cfg: UnifitConfig, model_cfg: ModelConfig, conversations: Sequence[Conversation],
                   params: GenerationParams) -> list[Completion]:
    """The backend chunks by `backend.batch_size` exactly as the actor pool's items do, so results match."""
    from unifit.llm.base import complete

    model = _model_from_plain(json.dumps(dataclasses.asdict(cfg.backend), sort_keys=True),
                              json.dumps(dataclasses.asdict(model_cfg), sort_keys=True), cfg.cache_dir)
    return complete(model, list(conversations), params)


class _GenerationActor:
    """One model per Ray actor; each call answers one pre-formed batch."""

    def __init__(self, backend: dict[str, Any], model: dict[str, Any], cache_dir: str, params: dict[str, Any]) -> None:
        self.params = GenerationParams(**params)
        self.model = _model_from_plain(json.dumps(backend, sort_keys=True), json.dumps(model, sort_keys=True), cache_dir)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from unifit.llm.base import complete

        outputs = []
        for payload in batch["payload"]:
            item = json.loads(payload)
            completions = complete(self.model, item["conversations"], self.params)
            outputs.append(json.dumps({"indices": item["indices"], "completions": [c.__dict__ for c in completions]}))
        return {"payload": outputs}


def _run_actor_pool(cfg: UnifitConfig, model_cfg: ModelConfig, conversations: Sequence[Conversation],
                    params: GenerationParams, desc: str) -> list[Completion]:
    import ray
    from tqdm import tqdm

    size = cfg.backend.batch_size
    items = [{"payload": json.dumps({"indices": list(range(s, min(s + size, len(conversations)))),
                                     "conversations": list(conversations[s : s + size])})}
             for s in range(0, len(conversations), size)]
    actors = max(1, min(cfg.cluster.generation_actors, len(items)))
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _GenerationActor,
        fn_constructor_kwargs={"backend": dataclasses.asdict(cfg.backend), "model": dataclasses.asdict(model_cfg),
                               "cache_dir": cfg.cache_dir, "params": params.as_dict()},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=cfg.cluster.cpus_per_actor,
        num_gpus=cfg.cluster.gpus_per_actor,
    )
    results: list[Completion | None] = [None] * len(conversations)
    with tqdm(total=len(conversations), desc=desc, unit="conv") as progress:
        for row in dataset.iter_rows():
            item = json.loads(row["payload"])
            for index, completion in zip(item["indices"], item["completions"]):
                results[index] = Completion(**completion)
            progress.update(len(item["indices"]))
    return [c for c in results if c is not None]


def _run_vllm(cfg: UnifitConfig, model_cfg: ModelConfig, conversations: Sequence[Conversation],
              params: GenerationParams) -> list[Completion]:
    import ray

    from unifit.llm import vllm as vllm_backend
    from unifit.models import resolve_model_dir
    from unifit.raycluster import cluster_gpus

    if cluster_gpus() == 0:
        raise UserError("backend=vllm needs GPUs but this Ray cluster has none; use backend=hf on CPU")
    processor = vllm_backend.build_vllm_processor(
        str(resolve_model_dir(model_cfg, cfg.cache_dir)), cfg.backend, params, cfg.cluster.generation_actors,
        model_cfg.max_length, model_cfg.trust_remote_code)
    rows = [{"index": i, "messages": list(c)} for i, c in enumerate(conversations)]
    output = processor(ray.data.from_items(rows)).take_all()
    return vllm_backend.completions_from_rows(output, len(conversations))


def generate_with_ray(cfg: UnifitConfig, conversations: Sequence[Conversation], params: GenerationParams,
                      model_cfg: ModelConfig | None = None, *, desc: str = "generate") -> list[Completion]:
    """One completion per conversation, in order; cached calls are answered without touching Ray.
    `model_cfg` defaults to the data generator (bulk generation); the judge and answering models are passed."""
    from unifit.raycluster import ensure_ray

    model_cfg = model_cfg or cfg.generation_model
    cache = CompletionCache(Path(cfg.cache_dir) / "completions.sqlite") if cfg.backend.cache else None

    def produce(todo: list[Conversation]) -> list[Completion]:
        log.info("%s: %d of %d conversations not cached", desc, len(todo), len(conversations))
        if cfg.backend.name != "vllm" and len(todo) <= cfg.cluster.driver_generation_max:
            return _run_in_driver(cfg, model_cfg, todo, params)
        ensure_ray(cfg.cluster)
        if cfg.backend.name == "vllm":
            return _run_vllm(cfg, model_cfg, todo, params)
        return _run_actor_pool(cfg, model_cfg, todo, params, desc)

    return complete_through_cache(cache, model_identity(cfg.backend, model_cfg), conversations, params, produce)
