"""One client per model role (generator, each answering model, judge), connected once per stage.

`ModelClients(cfg)` belongs to a stage: `connect(model, backend)` hands out a `ModelClient` whose
`complete(conversations, params)` answers from the completion cache first and sends only the misses to the
model, in batches of `backend.batch_size` formed here, so the same prompts meet the same batch (and seed)
whatever the number of actors. Behind the client:

- hf: a pool of up to `cluster.generation_actors` Ray actors, one model each;
- vllm: a pool of `cluster.generation_actors` Ray actors, one `vllm.LLM` engine each (one GPU, or a
  tensor-parallel group of `backend.tensor_parallel_size` GPUs);
- openai: the HTTP client in this process (`backend.batch_size` concurrent requests, over keep-alive connections;
  the next batch's requests start while the last replies of a batch are still coming).

Roles that use the same model and serving settings share one pool. Actors start on first use, serve every
later call of the stage and are released when the stage ends (`close`). The stage's pools share the cluster
(`ModelClients.make_room`) instead of evicting one another, so each model loads at most once per actor per
stage whatever the number of calls. Loads, start-up and time in model calls are counted for the stage's metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from unifit.config import BackendConfig, ClusterConfig, ModelConfig
from unifit.llm.actors import IN_FLIGHT_PER_ACTOR, ActorPool, InProcessPool
from unifit.llm.base import Choice, Completion, Conversation, GenerationParams
from unifit.llm.cache import CompletionCache, completion_key

log = logging.getLogger(__name__)
Pool = ActorPool | InProcessPool


def model_identity(backend: BackendConfig, model_cfg: ModelConfig) -> str:
    """What makes two completions interchangeable: the weights and how they are served (not batch size).

    A local model directory is identified by its weight files too (name, size, mtime), not its path alone: a
    fine-tuned variant retrained in place (say, with another learning rate) must not get the old model's answers.
    """
    local = Path(model_cfg.path) if model_cfg.path and Path(model_cfg.path).is_dir() else None
    weights = sorted((f.name, stat.st_size, stat.st_mtime_ns) for f in local.glob("*.safetensors") for stat in [f.stat()]) if local else []
    return json.dumps({"backend": backend.name, "api_model": backend.api_model, "url": backend.url if backend.name == "openai" else "",
                       "model": dataclasses.asdict(model_cfg), "weights": weights}, sort_keys=True)


def served_name(model_cfg: ModelConfig, backend: BackendConfig) -> str:
    """The name of the model that actually answers: an OpenAI-compatible endpoint serves `backend.api_model`."""
    return backend.api_model if backend.name == "openai" and backend.api_model else model_cfg.name


def build_backend(backend: BackendConfig, model_cfg: ModelConfig, cache_dir: str, model_dir: str = "", cpu_threads: int = 0) -> Any:
    """The backend object that answers calls, built where it runs (a Ray actor, or this process for openai);
    `cpu_threads`: the torch threads of an hf model on CPU (its actor's cores)."""
    if backend.name == "openai":
        from unifit.llm.openai import OpenAIChatModel

        return OpenAIChatModel(backend.url, backend.api_model or model_cfg.path or model_cfg.name, backend.api_key_env,
                               backend.max_retries, backend.timeout_s, concurrency=backend.batch_size,
                               guided_choice=backend.guided_choice)
    if backend.name == "vllm":
        from unifit.llm.vllm import VLLMChatModel

        return VLLMChatModel(model_dir, backend, model_cfg.max_length, model_cfg.trust_remote_code, model_cfg.name)
    from unifit.llm.hf import HFChatModel

    return HFChatModel(model_cfg, cache_dir, batch_size=backend.batch_size, cpu_threads=cpu_threads)


def offers_choice(backend: BackendConfig) -> bool:
    """Whether the backend can choose among options by probability: local weights (hf, vLLM engines) always; an
    OpenAI-compatible endpoint when it returns logprobs or takes vLLM's guided_choice."""
    return backend.name in ("hf", "vllm") or (backend.name == "openai" and (backend.logprobs or backend.guided_choice))


def backend_class(name: str) -> type:
    if name == "openai":
        from unifit.llm.openai import OpenAIChatModel

        return OpenAIChatModel
    if name == "vllm":
        from unifit.llm.vllm import VLLMChatModel

        return VLLMChatModel
    from unifit.llm.hf import HFChatModel

    return HFChatModel


@dataclasses.dataclass
class ClientStats:
    calls: int = 0  # complete/choose calls that reached the model (not answered from the cache alone)
    computed: int = 0  # conversations the model answered
    cached: int = 0  # conversations answered from the completion cache


class ModelClient:
    """A model role's client: `complete` through the completion cache, misses fanned out over the pool in input order."""

    def __init__(self, name: str, identity: str, pool: Pool, batch_size: int, cache: Optional[CompletionCache] = None,
                 desc: str = "generate", offers_choice: bool = False) -> None:
        self.name = name
        self.offers_choice = offers_choice  # `choose` reads the model's probabilities (a judge then never needs free text)
        self.identity = identity
        self.pool = pool
        self.batch_size = batch_size
        self.cache = cache
        self.desc = desc
        self.stats = ClientStats()
        self._count = threading.Lock()  # stats, for callers in several threads (a stage running independent steps at once)

    def _run(self, method: str, conversations: list[Conversation], argument: Any) -> list[Any]:
        """Batches of `batch_size` in input order, spread over the pool, results put back in input order."""
        from tqdm import tqdm

        batches = [conversations[s : s + self.batch_size] for s in range(0, len(conversations), self.batch_size)]
        results: list[list[Any]] = [[] for _ in batches]
        with self._count:
            self.stats.calls += 1
        with tqdm(total=len(conversations), desc=self.desc, unit="conv", leave=False) as progress:
            for index, result in self.pool.map(method, batches, argument):
                if len(result) != len(batches[index]):
                    raise RuntimeError(f"{self.name}: {len(result)} replies for a batch of {len(batches[index])} conversations")
                results[index] = result
                progress.update(len(result))
        return [item for batch in results for item in batch]

    def complete(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        """One completion per conversation, in order; cached ones never reach the model, errors are never cached."""
        conversations = [list(c) for c in conversations]
        keys = [completion_key(self.identity, c, params) for c in conversations]
        found = self.cache.get_many(keys) if self.cache else {}
        missing = [i for i, key in enumerate(keys) if key not in found]
        with self._count:
            self.stats.cached += len(conversations) - len(missing)
        if missing:
            log.info("%s: %d of %d conversations not cached", self.desc, len(missing), len(conversations))
            new = dict(zip((keys[i] for i in missing), self._run("complete", [conversations[i] for i in missing], params)))
            with self._count:
                self.stats.computed += len(missing)
            if self.cache:
                self.cache.put_many({key: c for key, c in new.items() if c.finish_reason != "error"})
            found.update(new)
        return [found[key] for key in keys]

    def choose(self, conversations: Sequence[Conversation], options: Sequence[str]) -> list[Choice]:
        """For each conversation, which of `options` the model finds most likely as the reply (with every option's probability).

        Every backend (hf, vllm, openai) has `choose`; a scripted backend object without one is refused here, in the
        driver, rather than failing inside an actor. Callers read `offers_choice` first and use free-text verdicts
        when it is false."""
        if not hasattr(self.pool.backend_class, "choose"):
            raise TypeError(f"{self.name}: the {self.pool.backend_class.__name__} backend cannot score options "
                            f"(it has no `choose`); judge with free-text verdicts instead")
        log.info("%s: choosing among %d options for %d conversations", self.desc, len(options), len(conversations))
        choices = self._run("choose", [list(c) for c in conversations], list(options))
        with self._count:
            self.stats.computed += len(conversations)
        return choices


class ModelClients:
    """The model clients of one stage: one pool per distinct (model, serving settings), all released by `close`."""

    def __init__(self, cluster: ClusterConfig, cache_dir: str) -> None:
        self.cluster = cluster
        self.cache_dir = cache_dir
        self.pools: dict[str, Pool] = {}
        self.kinds: dict[str, str] = {}  # pool key -> "model" | "engine" | "endpoint"
        self.clients: list[ModelClient] = []
        self._room = threading.Lock()  # pools that start actors from concurrent calls size themselves one at a time

    def connect(self, model_cfg: ModelConfig, backend: BackendConfig, desc: str = "generate") -> ModelClient:
        """A client for `model_cfg` served by `backend`; nothing loads until the first call that misses the cache."""
        identity = model_identity(backend, model_cfg)
        key = json.dumps({"identity": identity, "backend": dataclasses.asdict(backend)}, sort_keys=True)
        if key not in self.pools:
            self.pools[key] = self._pool(model_cfg, backend)
            self.kinds[key] = {"hf": "model", "vllm": "engine"}.get(backend.name, "endpoint")
        cache = CompletionCache(Path(self.cache_dir) / "completions.sqlite") if backend.cache else None
        client = ModelClient(served_name(model_cfg, backend), identity, self.pools[key], backend.batch_size, cache, desc,
                             offers_choice=offers_choice(backend))
        self.clients.append(client)
        return client

    def _pool(self, model_cfg: ModelConfig, backend: BackendConfig) -> Pool:
        if backend.name == "openai":
            return InProcessPool(functools.partial(build_backend, backend, model_cfg, self.cache_dir), backend_class("openai"),
                                 counts_as_load=False, in_flight=IN_FLIGHT_PER_ACTOR)
        return _LazyActorPool(self, model_cfg, backend)

    def make_room(self, pool: ActorPool, wanted: int) -> int:
        """How many of `wanted` new actors `pool` may start now.

        The stage's pools share the cluster rather than evict one another: an evicted pool loads its model again
        on its next call, so a stage that alternates models (answers, judge, answers) would load each model many
        times. On a pool's first start its share is fixed from the pools connected so far:
        - CPU-only actors: every pool keeps up to `max_actors`; when they do not all fit, each actor's CPU request
          is scaled down so that together they do. The stage calls one model at a time, so the actors of idle
          pools hold memory, not cores, and a call still spreads over all the cores.
        - GPU actors (hf on GPU, vLLM engines): an equal share of the GPU slots, at least one per pool.
        Only a pool that still does not fit (more GPU models than GPUs, or a pool connected after the others
        started) releases idle pools, least recently used first; such reloads show in `model_loads`.
        """
        with self._room:
            return self._make_room(pool, wanted)

    def _make_room(self, pool: ActorPool, wanted: int) -> int:
        import ray

        total = ray.cluster_resources()
        if not pool.live_actors:
            self._fix_share(pool, total)
        wanted = min(wanted, pool.max_actors - pool.live_actors)
        if wanted <= 0:
            return 0
        need = pool.per_actor()

        def fitting() -> float:
            free = {key: total.get(key, 0.0) - sum(p.held().get(key, 0.0) for p in self.pools.values()) for key in need}
            return min((free[key] // value for key, value in need.items() if value > 0), default=float("inf"))

        others = sorted((p for p in self.pools.values() if isinstance(p, ActorPool) and p is not pool and p.live_actors
                         and not p.active_calls), key=lambda p: p.last_used)
        while fitting() < 1 and others:
            released = others.pop(0)
            log.warning("releasing %d idle %s actor(s) to make room: its model will load again if it is called again",
                        released.live_actors, released.backend_class.__name__)
            released.close()
        return int(max(1, min(wanted, fitting())))

    def _fix_share(self, pool: ActorPool, total: dict[str, float]) -> None:
        """Size `pool` (actors, CPU request per actor) so that it and the stage's other actor pools fit together."""
        pools = [p for p in self.pools.values() if isinstance(p, ActorPool)]
        need = pool.per_actor()
        if need["GPU"] > 0:
            slots = total.get("GPU", 0.0) // need["GPU"]
            gpu_pools = sum(1 for p in pools if p.per_actor()["GPU"] > 0)
            pool.max_actors = min(pool.max_actors, max(1, int(slots // max(1, gpu_pools))))
            return
        if need["CPU"] <= 0:
            return
        cpu_pools = [p for p in pools if p.per_actor()["GPU"] == 0]
        wanted_cpus = sum(p.configured["CPU"] * p.max_actors for p in cpu_pools)
        if wanted_cpus > total.get("CPU", 0.0) > 0:
            pool.resources = {**pool.resources, "num_cpus": pool.configured["CPU"] * total["CPU"] / wanted_cpus}
            log.info("%d model pools share %g CPUs: each %s actor requests %.2f CPU", len(cpu_pools), total["CPU"],
                     pool.backend_class.__name__, pool.resources["num_cpus"])

    def metrics(self) -> dict[str, Any]:
        """The stage's serving counts: models loaded / engines started (each actor counts), seconds, calls, cache hits."""
        def total(kind: str, field: str) -> float:
            return sum(getattr(p.stats, field) for key, p in self.pools.items() if self.kinds[key] == kind)

        seconds = lambda field: round(sum(getattr(p.stats, field) for p in self.pools.values()), 2)  # noqa: E731
        return {
            "model_loads": int(total("model", "loads")),
            "engine_starts": int(total("engine", "loads")),
            "models_served": sum(1 for key, p in self.pools.items() if p.stats.batches),
            "model_load_seconds": seconds("load_seconds"),
            "model_startup_seconds": seconds("startup_seconds"),
            "model_call_seconds": seconds("call_seconds"),
            "model_calls": sum(c.stats.calls for c in self.clients),
            "completions_computed": sum(c.stats.computed for c in self.clients),
            "completions_cached": sum(c.stats.cached for c in self.clients),
        }

    def close(self) -> None:
        """Release every pool (actors killed, GPUs and memory freed); a later call would start them again."""
        for pool in self.pools.values():
            pool.close()


class _LazyActorPool(ActorPool):
    """An `ActorPool` for hf or vllm that joins Ray and resolves the model directory only when it first starts actors."""

    def __init__(self, owner: ModelClients, model_cfg: ModelConfig, backend: BackendConfig) -> None:
        resources: dict[str, float] = {"num_cpus": owner.cluster.cpus_per_actor, "num_gpus": owner.cluster.gpus_per_actor}
        bundles: list[dict[str, float]] = []
        if backend.name == "vllm":
            from unifit.llm.vllm import engine_resources

            resources, bundles = engine_resources(backend, owner.cluster)
        threads = max(1, int(owner.cluster.cpus_per_actor))
        super().__init__(functools.partial(build_backend, backend, model_cfg, owner.cache_dir, cpu_threads=threads),
                         backend_class(backend.name),
                         owner.cluster.generation_actors, resources, bundles, owner.make_room)
        self.owner = owner
        self.model_cfg = model_cfg
        self.backend = backend

    def _start(self, count: int) -> None:
        if not self.actors:
            self._prepare()
        super()._start(count)

    def _grow(self, wanted: int) -> None:
        from unifit.raycluster import ensure_ray

        ensure_ray(self.owner.cluster)
        if self.backend.name == "vllm":
            from unifit.raycluster import cluster_gpus

            from unifit.stage import UserError

            if cluster_gpus() == 0:
                raise UserError("backend=vllm needs GPUs but this Ray cluster has none; use backend=hf on CPU")
        super()._grow(wanted)

    def _prepare(self) -> None:
        """vLLM reads a model directory: resolve (convert, build) it once here, not in every engine."""
        if self.backend.name == "vllm":
            from unifit.models import resolve_model_dir

            model_dir = str(resolve_model_dir(self.model_cfg, self.owner.cache_dir))
            self.build = functools.partial(build_backend, self.backend, self.model_cfg, self.owner.cache_dir, model_dir)
