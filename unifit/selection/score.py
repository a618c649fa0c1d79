"""IFD scoring of the whole dataset, streamed: Ray Data reads the instance shards, an actor pool scores them.

The instances are cut into fixed shards (file order, `shard_size` rows). The driver reads only their ids:
it finds which shards already exist with exactly the expected ids, and Ray Data streams the others from
parquet (`read_parquet` → drop the rows of finished shards → blocks of exactly `shard_size` rows, in order)
to actors that load the scoring model once and write `shard-XXXXX.parquet` themselves, atomically. So an
interrupted scoring run resumes where it stopped, and no conversation passes through the driver. Actors get
everything through constructor arguments (no module globals inside workers). CPU actors never all start
at once when they would hold every CPU: a pool that takes every CPU downstream of Ray Data's read tasks
starves them and hangs (see `_pool_sizes`).
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

import pyarrow as pa

from unifit.records import parquet_files, read_column, remove_stale_shards, shard_path, stream_parquet, write_parquet
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
COST_FIELDS = ("real_tokens", "computed_positions", "answer_tokens", "flops", "reference_flops")  # of unifit.selection.ifd.IFDCost


class ShardBoundaryError(RuntimeError):
    """A block handed to a scorer is not exactly one shard (Ray Data re-cut or reordered the stream)."""


class ShardScorer:
    """Ray Data actor: loads the scoring model once, then scores and writes whole shards (one block each).

    `shards`: first id -> (shard index, last id, rows) of every shard to score; a block is written only if
    it matches one exactly, so a stream cut differently can never write rows under the wrong shard. Each actor
    leaves one empty file in `out_dir/.loads/` once its model is loaded: the stage counts its model loads there,
    whichever node the actor ran on and whether or not it was handed a block.
    """

    def __init__(self, model_dir: str, out_dir: str, device: str, dtype: str, max_length: int,
                 max_tokens_per_batch: int, shards: dict[str, tuple[int, str, int]], chat_template: Optional[str] = None,
                 trust_remote_code: bool = False, pad_token: Optional[str] = None) -> None:
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

    def __call__(self, block: pa.Table) -> dict[str, Any]:
        import numpy as np

        from unifit.selection.ifd import IFDCost, score_conversations

        start = time.perf_counter()
        rows = block.to_pylist()
        first, last = rows[0]["id"], rows[-1]["id"]
        if first not in self.shards or self.shards[first][1:] != (last, len(rows)):
            raise ShardBoundaryError(f"a block of {len(rows)} rows ({first}..{last}) is not one IFD score shard")
        shard = self.shards[first][0]
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


def _drop_ids(ids: frozenset[str]) -> Any:
    """A Ray Data batch function that removes the rows whose id is in `ids` (the finished shards' rows)."""
    import pyarrow.compute as pc

    excluded = pa.array(sorted(ids), type=pa.string())

    def drop(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.invert(pc.is_in(batch["id"], value_set=excluded)))

    return drop


def _pool_sizes(wanted: int, cpus_per_actor: float, gpus_per_actor: float) -> tuple[int, int]:
    """(min, max) actors of the scoring pool.

    GPU actors leave the CPUs to Ray Data's read and re-cut tasks, so all of them start before the first shard is
    handed out (else the first one ready may score every shard). CPU actors start only as many as leave one CPU of
    the cluster to those tasks; the pool grows from there while they are fed.
    """
    import ray

    if gpus_per_actor > 0 or cpus_per_actor <= 0:
        return wanted, wanted
    spare = ray.cluster_resources().get("CPU", 0.0) - 1
    return max(1, min(wanted, int(spare // cpus_per_actor))), wanted


def score_sharded(instances: str | Path | Sequence[str | Path], out_dir: str | Path, *, model_dir: str | Path, actors: int,
                  cpus_per_actor: float, gpus_per_actor: float, dtype: str, max_length: int,
                  max_tokens_per_batch: int, shard_size: int, chat_template: Optional[str] = None,
                  trust_remote_code: bool = False, pad_token: Optional[str] = None) -> dict[str, Any]:
    """Score the instances (a parquet file, a directory of them, or a list of files, in that order) into
    `out_dir/shard-*.parquet`; shards already complete are kept, not recomputed.

    Returns shard counts, `nodes` (how many Ray nodes' actors scored this call's shards, 0 if none were left),
    `scorer_loads` (scoring models this call loaded: one per actor Ray Data started) and,
    for this call's shards, the machine-independent cost of `IFDCost.summary` (padding efficiency, FLOPs per scored
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
        todo_set = set(todo)
        finished = frozenset(i for index, shard in enumerate(shards) if index not in todo_set for i in shard)
        bounds = {shards[index][0]: (index, shards[index][-1], len(shards[index])) for index in todo}
        del ids, shards
        on_gpu = gpus_per_actor > 0
        constructor = dict(model_dir=str(model_dir), out_dir=str(out_dir), device="cuda" if on_gpu else "cpu",
                           dtype=dtype if on_gpu else "float32", max_length=max_length,
                           max_tokens_per_batch=max_tokens_per_batch, shards=bounds, chat_template=chat_template,
                           trust_remote_code=trust_remote_code, pad_token=pad_token)
        dataset = stream_parquet(files, ["id", "leaf_id", "concept_path", "messages"])
        if finished:
            dataset = dataset.map_batches(_drop_ids(finished), batch_format="pyarrow", batch_size=None)
        least, most = _pool_sizes(min(actors, len(todo)), cpus_per_actor, gpus_per_actor)
        # One shard in flight per actor: Ray Data would otherwise queue several shards on the first actor ready,
        # leaving the others idle (a shard is minutes of work; there is nothing to pipeline).
        pool = ray.data.ActorPoolStrategy(min_size=least, max_size=most, max_tasks_in_flight_per_actor=1)
        scored = dataset.repartition(target_num_rows_per_block=shard_size, strict=True).map_batches(
            ShardScorer, batch_size=None, batch_format="pyarrow", compute=pool, fn_constructor_kwargs=constructor,
            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
        ).take_all()
        if sorted(row["shard"] for row in scored) != todo:
            raise ShardBoundaryError(f"{out_dir}: scored shards {sorted(row['shard'] for row in scored)}, expected {todo}")
        nodes = len({row["node"] for row in scored})
        for row in scored:
            cost.add(IFDCost(**{name: (float if name.endswith("flops") else int)(row[name]) for name in COST_FIELDS}))
    loads = out_dir / LOADS_DIR
    scorer_loads = len(list(loads.iterdir())) if loads.exists() else 0
    shutil.rmtree(loads, ignore_errors=True)
    return {"shards": n_shards, "shards_computed": len(todo), "shards_reused": n_shards - len(todo), "nodes": nodes,
            "scorer_loads": scorer_loads,
            **{key: value for key, value in cost.summary().items() if value is not None}}
