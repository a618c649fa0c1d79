"""IFD scoring of the whole dataset: Ray Data hands shards out to an actor pool that scores them.

The instances are cut into fixed shards (file order, `shard_size` rows). The driver reads only their ids and
the files' row counts: it finds which shards already exist with exactly the expected ids and queues one work
order per missing shard (its index; where its rows lie travels in the actors' constructor arguments). An actor
loads the scoring model once, then for each order reads that shard's rows from the instance files itself,
scores them and writes `shard-XXXXX.parquet`, atomically. So an interrupted scoring run resumes where it
stopped, no conversation passes through the driver or the object store, and no Ray Data task competes with
the actors for CPUs. Actors get everything through constructor arguments (no module globals inside workers).
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

import pyarrow as pa

from unifit.records import (count_rows, parquet_files, read_column, read_row_range, remove_stale_shards, shard_path,
                             write_parquet)
from unifit.selection.ifd import IFDCost

SCORE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("leaf_id", pa.string()),
    ("concept_path", pa.list_(pa.string())),
    ("cond_loss", pa.float64()),
    ("direct_loss", pa.float64()),
    ("ifd", pa.float64()),
    ("ifd_ppl", pa.float64()),
    ("n_answer_tokens", pa.int64()),
    ("truncated", pa.bool_()),
    ("context_truncated", pa.bool_()),
])


def _shard_done(path: Path, ids: list[str]) -> bool:
    import pyarrow.parquet as pq

    return path.exists() and pq.read_table(path, columns=["id"]).column("id").to_pylist() == ids

LOADS_DIR = ".loads"
SCORERS_START_TIMEOUT_S = 1800  # how long Ray Data waits for every scoring actor to load its model (a 7B from a slow disk: minutes)
INT_COST_FIELDS = ("real_tokens", "computed_positions", "answer_tokens")
COST_FIELDS = ("real_tokens", "computed_positions", "answer_tokens", "flops", "reference_flops", "forward_seconds")  # of unifit.selection.ifd.IFDCost


class ShardBoundaryError(RuntimeError):
    """The rows at a shard's place in the instance files are not the ones planned (the files changed under the run)."""


Slice = tuple[str, int, int]  # (parquet file, first row, rows)


def _plan_slices(row_counts: Sequence[int], files: Sequence[Path], shard_size: int) -> list[list[Slice]]:
    """Where each shard's rows lie: shard i is rows [i*shard_size, (i+1)*shard_size) of the files read in order."""
    slices: list[list[Slice]] = []
    current: list[Slice] = []
    room = shard_size
    for file, rows in zip(files, row_counts):
        row = 0
        while row < rows:
            take = min(room, rows - row)
            current.append((str(file), row, take))
            row, room = row + take, room - take
            if not room:
                slices.append(current)
                current, room = [], shard_size
    if current:
        slices.append(current)
    return slices


class ShardScorer:
    """Ray Data actor: loads the scoring model once, then reads, scores and writes whole shards, one per call.

    `shards`: shard index -> (its slices of the instance files, first id, last id, rows). Each call gets one
    shard index and reads that shard's rows from the files itself, so no conversation passes through the
    driver or the object store. Each actor leaves one empty file in `out_dir/.loads/` once its model is
    loaded: the stage counts its model loads there, whichever node the actor ran on and whether or not it
    was handed a shard.
    """

    def __init__(self, model_dir: str, out_dir: str, device: str, dtype: str, max_length: int,
                 max_tokens_per_batch: int, shards: dict[int, tuple[list[Slice], str, str, int]],
                 chat_template: Optional[str] = None, trust_remote_code: bool = False,
                 pad_token: Optional[str] = None) -> None:
        import ray

        from unifit.config import ModelConfig
        from unifit.models import load_model, load_tokenizer

        self.node = ray.get_runtime_context().get_node_id()  # reported per shard: the stage counts the nodes that scored
        served = ModelConfig(name=Path(model_dir).name, source="hub", path=model_dir, dtype=dtype, chat_template=chat_template,
                             trust_remote_code=trust_remote_code, pad_token=pad_token, max_length=max_length)
        self.tokenizer = load_tokenizer(served, cache_dir=None)
        self.model = load_model(served, cache_dir=None, device=device).eval()
        self.out_dir = Path(out_dir)
        (self.out_dir / LOADS_DIR).mkdir(exist_ok=True)
        (self.out_dir / LOADS_DIR / uuid.uuid4().hex).touch()
        self.max_length = max_length
        self.max_tokens_per_batch = max_tokens_per_batch
        self.shards = shards

    def _rows(self, shard: int) -> list[dict[str, Any]]:
        slices, first, last, count = self.shards[shard]
        rows = pa.concat_tables([read_row_range(file, start, length, ["id", "leaf_id", "concept_path", "messages"])
                                 for file, start, length in slices]).to_pylist()
        if len(rows) != count or rows[0]["id"] != first or rows[-1]["id"] != last:
            raise ShardBoundaryError(f"shard {shard}: expected {count} rows {first}..{last} at "
                                     f"{[f'{Path(f).name}[{s}:{s + n}]' for f, s, n in slices]}, found {len(rows)} rows "
                                     f"{rows[0]['id'] if rows else ''}..{rows[-1]['id'] if rows else ''}: the instance "
                                     "files changed during scoring; run the score stage again")
        return rows

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from unifit.selection.ifd import IFDCost, score_conversations

        start = time.perf_counter()
        (shard,) = (int(value) for value in batch["shard"])
        rows = self._rows(shard)
        cost = IFDCost()
        scores = score_conversations(self.model, self.tokenizer, [row["messages"] for row in rows],
                                     max_length=self.max_length, max_tokens_per_batch=self.max_tokens_per_batch,
                                     cost=cost)
        out = [{"id": row["id"], "leaf_id": row["leaf_id"], "concept_path": list(row["concept_path"]), **score}
               for row, score in zip(rows, scores)]
        write_parquet(out, shard_path(self.out_dir, shard), SCORE_SCHEMA)
        done = {"shard": [shard], "rows": [len(out)], "truncated": [sum(score["truncated"] for score in scores)],
                "seconds": [time.perf_counter() - start], "node": [self.node],
                **{name: [getattr(cost, name)] for name in COST_FIELDS}}
        return {key: np.asarray(value) for key, value in done.items()}


def _pool_size(wanted: int, cpus_per_actor: float) -> int:
    """Scoring actors to start: `wanted`, or as many as the cluster's CPUs hold when each actor needs CPUs."""
    import ray

    if cpus_per_actor <= 0:
        return wanted
    return max(1, min(wanted, int(ray.cluster_resources().get("CPU", 0.0) // cpus_per_actor)))


def _cpus_per_scorer(actors: int, cpus_per_actor: float) -> float:
    """CPUs each CPU-only scoring actor asks for: `cpus_per_actor`, or an even share of the CPUs free now when
    fewer actors than that fill them (fewer shards than actors, a small data set), since Ray gives an actor as many
    torch threads as CPUs and the rest would sit idle. Never more than the largest node has."""
    import ray

    from unifit.raycluster import largest_node_cpus

    share = int(ray.available_resources().get("CPU", 0.0) // max(1, actors))
    return max(cpus_per_actor, float(min(share, int(largest_node_cpus()))))


def score_sharded(instances: str | Path | Sequence[str | Path], out_dir: str | Path, *, model_dir: str | Path, actors: int,
                  cpus_per_actor: float, gpus_per_actor: float, dtype: str, max_length: int,
                  max_tokens_per_batch: int, shard_size: int, chat_template: Optional[str] = None,
                  trust_remote_code: bool = False, pad_token: Optional[str] = None) -> dict[str, Any]:
    """Score the instances (a parquet file, a directory of them, or a list of files, in that order) into
    `out_dir/shard-*.parquet`; shards already complete are kept, not recomputed.

    Returns shard counts, `nodes` (how many Ray nodes' actors scored this call's shards, 0 if none were left),
    `scorer_loads` (scoring models this call loaded: one per actor Ray Data started), `model_seconds` (the actors'
    time in forwards, summed over actors) and, for this call's shards, the machine-independent cost of `IFDCost.summary` (padding efficiency, FLOPs per scored
    answer token against the per-example reference).

    Ray must already be initialised. GPU actors (gpus_per_actor > 0) run the model in `dtype`; CPU actors
    always use float32 (bf16 matmuls on CPU are slow and lose the precision IFD ratios need).
    `trust_remote_code` and `pad_token` are the model config's: the exported scoring model of Baichuan2/Qwen-7B keeps
    their code, and the actors load it through `unifit.models` like every other model.
    """
    import ray

    files = parquet_files(instances) if isinstance(instances, (str, Path)) else [Path(f) for f in instances]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = read_column(files, "id")
    shards = [ids[i : i + shard_size] for i in range(0, len(ids), shard_size)]
    remove_stale_shards(out_dir, keep={shard_path(out_dir, index).name for index in range(len(shards))}, pattern="shard-*.parquet")
    todo = [index for index, shard in enumerate(shards) if not _shard_done(shard_path(out_dir, index), shard)]
    shutil.rmtree(out_dir / LOADS_DIR, ignore_errors=True)  # this call's loads only
    n_shards, nodes = len(shards), 0
    cost = IFDCost()
    if todo:
        slices = _plan_slices([count_rows([file]) for file in files], files, shard_size)
        plan = {index: (slices[index], shards[index][0], shards[index][-1], len(shards[index])) for index in todo}
        del ids, shards
        on_gpu = gpus_per_actor > 0
        constructor = dict(model_dir=str(model_dir), out_dir=str(out_dir), device="cuda" if on_gpu else "cpu",
                           dtype=dtype if on_gpu else "float32", max_length=max_length,
                           max_tokens_per_batch=max_tokens_per_batch, shards=plan, chat_template=chat_template,
                           trust_remote_code=trust_remote_code, pad_token=pad_token)
        # The work orders are all queued before any actor is ready, and Ray Data starts the whole pool before handing
        # the first one out, so every actor gets a shard while shards remain; one shard in flight per actor keeps the
        # rest queued for whichever actor finishes first.
        orders = ray.data.from_items([{"shard": index} for index in todo], override_num_blocks=len(todo))
        orders.context.wait_for_min_actors_s = SCORERS_START_TIMEOUT_S
        size = _pool_size(min(actors, len(todo)), cpus_per_actor)
        pool = ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1)
        scored = orders.map_batches(ShardScorer, batch_size=1, batch_format="numpy", compute=pool,
                                    fn_constructor_kwargs=constructor, num_gpus=gpus_per_actor,
                                    num_cpus=cpus_per_actor if on_gpu else _cpus_per_scorer(size, cpus_per_actor)).take_all()
        if sorted(row["shard"] for row in scored) != todo:
            raise ShardBoundaryError(f"{out_dir}: scored shards {sorted(row['shard'] for row in scored)}, expected {todo}")
        nodes = len({row["node"] for row in scored})
        for row in scored:
            cost.add(IFDCost(**{name: (int if name in INT_COST_FIELDS else float)(row[name]) for name in COST_FIELDS}))
    loads = out_dir / LOADS_DIR
    scorer_loads = len(list(loads.iterdir())) if loads.exists() else 0
    shutil.rmtree(loads, ignore_errors=True)
    return {"shards": n_shards, "shards_computed": len(todo), "shards_reused": n_shards - len(todo), "nodes": nodes,
            "scorer_loads": scorer_loads, "model_seconds": round(cost.forward_seconds, 2),
            **{key: value for key, value in cost.summary().items() if value is not None}}
