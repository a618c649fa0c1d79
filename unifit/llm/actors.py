"""Where a model runs behind a client: long-lived Ray actors holding one model each, or this process.

An `ActorPool` starts its actors on first use and keeps them for every later call, so a stage that asks a model
a hundred times loads it once per actor. Calls are batches formed by the caller; each batch goes to whichever
actor is free and comes back under its batch index, so the result does not depend on the number of actors.
Calls from several threads at once share the actors: every batch goes to the least busy started actor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

log = logging.getLogger(__name__)
IN_FLIGHT_PER_ACTOR = 2  # one batch running, one queued behind it: no idle gap between batches
POLL_S = 0.05  # how often a call whose batches wait for a slot held by a concurrent call looks again


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
        self._lock = threading.Lock()  # the build and the stats; with in_flight 1, also each batch (concurrent callers)

    def map(self, method: str, batches: Sequence[list[Any]], argument: Any) -> Iterator[tuple[int, list[Any]]]:
        """(batch index, result) as batches finish; `call_seconds` counts the wall time with a batch in flight."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        with self._lock:
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
                with self._lock:
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
                    with self._lock:
                        self.stats.batches += 1
                    yield index, list(future.result())
            with self._lock:
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
    outstanding: int = 0  # batches sent to it and not yet collected, from every concurrent call


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
        self.active_calls = 0  # `map` calls under way (from concurrent callers): such a pool is never released to make room
        self.unfinished = 0  # batches of those calls not yet collected: the actors the pool wants
        self.configured = self.per_actor()  # before an owner scales the CPU request down to share the cluster
        self._lock = threading.Lock()  # the actor list, their outstanding batches and the stats, for concurrent calls
        self._growing = threading.Lock()  # one call at a time decides how many actors to add

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
            with self._lock:
                self.actors.append(_Actor(handle, handle.ready.remote(), created, group))
        log.info("%s: starting %d actor(s), %d in the pool", self.backend_class.__name__, count, len(self.actors))

    def _grow(self, wanted: int) -> None:
        """Start actors until `wanted` batches (those of every call under way) have one each, up to `max_actors`."""
        with self._growing:
            missing = min(wanted, self.max_actors) - len(self.actors)
            count = self.make_room(self, missing) if missing > 0 and self.make_room else missing
            if count > 0:
                self._start(count)

    def _record_ready(self, actor: _Actor) -> None:
        import ray

        if actor.ready_recorded:
            return
        load_seconds, ready_at = ray.get(actor.ready_ref)
        with self._lock:  # another call may have recorded it while this one waited
            if not actor.ready_recorded:
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
        with self._lock:
            self.active_calls += 1
        try:
            yield from self._map(method, batches, argument)
        finally:
            with self._lock:
                self.active_calls -= 1

    def _map(self, method: str, batches: Sequence[list[Any]], argument: Any) -> Iterator[tuple[int, list[Any]]]:
        import ray

        self.last_used = time.time()
        with self._lock:
            self.unfinished += len(batches)
        self._grow(self.unfinished)
        queue = deque(enumerate(batches))
        in_flight: dict[Any, tuple[_Actor, int]] = {}  # result ref -> (actor, batch index)

        def fill() -> None:
            """Send waiting batches to the least busy started actors, up to IN_FLIGHT_PER_ACTOR each."""
            with self._lock:
                while queue:
                    free = [actor for actor in self.actors if actor.ready_recorded and actor.outstanding < IN_FLIGHT_PER_ACTOR]
                    if not free:
                        return
                    actor = min(free, key=lambda a: a.outstanding)
                    index, batch = queue.popleft()
                    actor.outstanding += 1
                    in_flight[actor.handle.call.remote(method, batch, argument)] = (actor, index)

        try:
            fill()
            while in_flight or queue:
                starting = {actor.ready_ref: actor for actor in self.actors if not actor.ready_recorded} if queue else {}
                if not in_flight and not starting:  # every slot is held by concurrent calls: look again shortly
                    time.sleep(POLL_S)
                    fill()
                    continue
                # while batches wait, look again every POLL_S: a concurrent call's batch may free a slot meanwhile
                done, _ = ray.wait([*in_flight, *starting], num_returns=1, timeout=POLL_S if queue else None)
                if not done:
                    fill()
                    continue
                if done[0] in starting:
                    self._record_ready(starting[done[0]])
                    fill()
                    continue
                actor, index = in_flight.pop(done[0])
                try:
                    result, seconds = ray.get(done[0])
                finally:
                    with self._lock:
                        actor.outstanding -= 1
                        self.unfinished -= 1
                with self._lock:
                    self.stats.call_seconds += seconds
                    self.stats.batches += 1
                fill()
                yield index, result
        finally:  # a call left early (an error, or its consumer stopped) frees the slots its batches held
            with self._lock:
                for actor, _ in in_flight.values():
                    actor.outstanding -= 1
                self.unfinished -= len(in_flight) + len(queue)

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
