"""Where a model runs behind a client: long-lived Ray actors holding one model each, or this process.

An `ActorPool` starts its actors on first use and keeps them for every later call, so a stage that asks a model
a hundred times loads it once per actor. Calls are batches formed by the caller; each batch goes to whichever
actor is free and comes back under its batch index, so the result does not depend on the number of actors.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

log = logging.getLogger(__name__)
IN_FLIGHT_PER_ACTOR = 2  # one batch running, one queued behind it: no idle gap between batches


@dataclass
class PoolStats:
    """What serving cost: model loads (actors started), their start-up, and time spent inside model calls."""

    loads: int = 0  # backend objects built (an actor killed before its model finished loading does not count)
    load_seconds: float = 0.0  # inside the actors: building the backend object (imports, weights, engine start)
    startup_seconds: float = 0.0  # per actor, from the request to start it until it was ready (adds process start and queueing)
    call_seconds: float = 0.0  # inside backend calls, summed over actors
    batches: int = 0


class ModelActor:
    """One backend object (HF model, vLLM engine) in a Ray actor process, built once from `build`."""

    def __init__(self, build: Callable[[], Any]) -> None:
        started = time.perf_counter()
        self.model = build()
        self.load_seconds = time.perf_counter() - started
        self.ready_at = time.time()

    def ready(self) -> tuple[float, float]:
        return self.load_seconds, self.ready_at

    def call(self, method: str, conversations: list[Any], argument: Any) -> tuple[list[Any], float]:
        started = time.perf_counter()
        result = getattr(self.model, method)(conversations, argument)
        return list(result), time.perf_counter() - started


class InProcessPool:
    """The backend object in this process: an HTTP client (openai) or a model built here; built once, on first use.

    `in_flight` batches are handed to the backend at once: an HTTP client whose requests share one pool of
    connections then starts the next batch's requests while the last replies of a batch are still coming
    (with 1, every batch would wait for its slowest reply). Leave it at 1 for a backend that is not thread-safe.
    """

    def __init__(self, build: Callable[[], Any], backend_class: type, counts_as_load: bool, in_flight: int = 1) -> None:
        self.build = build
        self.backend_class = backend_class
        self.counts_as_load = counts_as_load
        self.in_flight = in_flight
        self.stats = PoolStats()
        self._model: Any = None

    def map(self, method: str, batches: Sequence[list[Any]], argument: Any) -> Iterator[tuple[int, list[Any]]]:
        """(batch index, result) as batches finish; `call_seconds` counts the wall time with a batch in flight."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        if self._model is None:
            started = time.perf_counter()
            self._model = self.build()
            if self.counts_as_load:
                self.stats.loads += 1
                self.stats.load_seconds += time.perf_counter() - started
                self.stats.startup_seconds += time.perf_counter() - started
        call = getattr(self._model, method)
        if self.in_flight == 1:
            for index, batch in enumerate(batches):
                started = time.perf_counter()
                result = list(call(batch, argument))
                self.stats.call_seconds += time.perf_counter() - started
                self.stats.batches += 1
                yield index, result
            return
        queue = deque(enumerate(batches))
        with ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix="batch") as executor:
            started = time.perf_counter()
            running = {}
            while queue or running:
                while queue and len(running) < self.in_flight:
                    index, batch = queue.popleft()
                    running[executor.submit(call, batch, argument)] = index
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    index = running.pop(future)
                    self.stats.batches += 1
                    yield index, list(future.result())
            self.stats.call_seconds += time.perf_counter() - started

    @property
    def live_actors(self) -> int:
        return 0

    def held(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        model, self._model = self._model, None
        if callable(getattr(model, "close", None)):
            model.close()


@dataclass
class _Actor:
    handle: Any
    ready_ref: Any
    created_at: float
    placement_group: Any = None
    ready_recorded: bool = False


class ActorPool:
    """Up to `max_actors` Ray actors, each holding one backend object; started on demand and kept until `close`.

    `resources` are each actor's Ray options (num_cpus, num_gpus); `bundles`, when given, a placement group each
    actor reserves (a tensor-parallel vLLM engine). `make_room(pool, wanted)` is asked before actors start and
    returns how many may start now (the owner may shrink `max_actors` or the CPU request to share the cluster).
    """

    def __init__(self, build: Callable[[], Any], backend_class: type, max_actors: int, resources: dict[str, float],
                 bundles: Optional[list[dict[str, float]]] = None,
                 make_room: Optional[Callable[["ActorPool", int], int]] = None) -> None:
        self.build = build
        self.backend_class = backend_class
        self.max_actors = max_actors
        self.resources = resources
        self.bundles = bundles or []
        self.make_room = make_room
        self.stats = PoolStats()
        self.actors: list[_Actor] = []
        self.last_used = 0.0  # time.time() of the last call: the least recently used idle pool is released first
        self.configured = self.per_actor()  # before an owner scales the CPU request down to share the cluster

    def per_actor(self) -> dict[str, float]:
        """Cluster resources one actor takes (its own, or its placement group's)."""
        if self.bundles:
            return {key: sum(b.get(key, 0.0) for b in self.bundles) for key in ("CPU", "GPU")}
        return {"CPU": float(self.resources.get("num_cpus", 1)), "GPU": float(self.resources.get("num_gpus", 0))}

    @property
    def live_actors(self) -> int:
        return len(self.actors)

    def held(self) -> dict[str, float]:
        return {key: value * len(self.actors) for key, value in self.per_actor().items()}

    def _start(self, count: int) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        remote_class = ray.remote(ModelActor)
        for _ in range(count):
            options: dict[str, Any] = dict(self.resources)
            group = None
            if self.bundles:
                group = placement_group(self.bundles, strategy="STRICT_PACK")
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
            created = time.time()
            handle = remote_class.options(**options).remote(self.build)
            self.actors.append(_Actor(handle, handle.ready.remote(), created, group))
        log.info("%s: starting %d actor(s), %d in the pool", self.backend_class.__name__, count, len(self.actors))

    def _grow(self, wanted: int) -> None:
        missing = min(wanted, self.max_actors) - len(self.actors)
        count = self.make_room(self, missing) if missing > 0 and self.make_room else missing
        if count > 0:
            self._start(count)

    def _record_ready(self, actor: _Actor) -> None:
        import ray

        if not actor.ready_recorded:
            load_seconds, ready_at = ray.get(actor.ready_ref)
            self.stats.loads += 1
            self.stats.load_seconds += load_seconds
            self.stats.startup_seconds += max(0.0, ready_at - actor.created_at)
            actor.ready_recorded = True

    def wait_ready(self) -> None:
        """Block until every actor has its model loaded (to time start-up apart from serving)."""
        for actor in self.actors:
            self._record_ready(actor)

    def map(self, method: str, batches: Sequence[list[Any]], argument: Any) -> Iterator[tuple[int, list[Any]]]:
        """(batch index, result) as batches finish, each on whichever actor is free.

        Batches go only to actors that have finished starting: one slow to start (or waiting for a free CPU/GPU)
        holds no batch the others could serve.
        """
        import ray

        self.last_used = time.time()
        self._grow(len(batches))
        queue = deque(enumerate(batches))
        in_flight: dict[Any, tuple[int, int]] = {}  # result ref -> (actor position, batch index)
        starting = {actor.ready_ref: position for position, actor in enumerate(self.actors) if not actor.ready_recorded}

        def submit(position: int) -> None:
            index, batch = queue.popleft()
            in_flight[self.actors[position].handle.call.remote(method, batch, argument)] = (position, index)

        for _ in range(IN_FLIGHT_PER_ACTOR):
            for position, actor in enumerate(self.actors):
                if queue and actor.ready_recorded:
                    submit(position)
        while in_flight or (queue and starting):
            [done], _ = ray.wait([*in_flight, *(starting if queue else [])], num_returns=1)
            if done in starting:
                position = starting.pop(done)
                self._record_ready(self.actors[position])
                for _ in range(IN_FLIGHT_PER_ACTOR):
                    if queue:
                        submit(position)
                continue
            position, index = in_flight.pop(done)
            result, seconds = ray.get(done)
            self.stats.call_seconds += seconds
            self.stats.batches += 1
            if queue:
                submit(position)
            yield index, result

    def close(self) -> None:
        """Kill the actors (their models leave memory now, not when Ray collects the handles) and their placement groups."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            if not actor.ready_recorded and ray.wait([actor.ready_ref], timeout=0)[0]:
                self._record_ready(actor)  # loaded, though it got no batch: it counts
            ray.kill(actor.handle)
            if actor.placement_group is not None:
                remove_placement_group(actor.placement_group)
        self.actors = []
