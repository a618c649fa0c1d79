"""IFD scoring of the whole dataset: Ray Data `map_batches` over an actor pool, one scoring model per actor.

The instances are cut into fixed shards (input order, `shard_size` rows); each shard is one Ray Data row,
and the actor that scores it writes `shard-XXXXX.parquet` itself, atomically. A rerun checks which shards
already exist with exactly the expected ids and sends only the others to Ray, so an interrupted scoring
run resumes where it stopped. Actors get everything through constructor arguments (no module globals
inside workers) and the pool is fed by `from_items` (a CPU task stage such as `range` upstream of a pool
that takes every CPU can deadlock; see FIELD-NOTES).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import pyarrow as pa

from unifit.records import write_parquet
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


COST_FIELDS = ("real_tokens", "computed_positions", "answer_tokens", "flops", "reference_flops")  # of unifit.selection.ifd.IFDCost


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"shard-{index:05d}.parquet"


def _shard_done(path: Path, ids: list[str]) -> bool:
    import pyarrow.parquet as pq

    return path.exists() and pq.read_table(path, columns=["id"]).column("id").to_pylist() == ids


class ShardScorer:
    """Ray Data actor: loads the scoring model once, then scores and writes whole shards."""

    def __init__(self, model_dir: str, out_dir: str, device: str, dtype: str, max_length: int,
                 max_tokens_per_batch: int, chat_template: Optional[str] = None, trust_remote_code: bool = False) -> None:
        import ray
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from unifit.models import torch_dtype

        self.node = ray.get_runtime_context().get_node_id()  # reported per shard: the stage counts the nodes that scored
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        if chat_template:
            self.tokenizer.chat_template = chat_template
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype), use_safetensors=True,
                                                          trust_remote_code=trust_remote_code).to(device).eval()
        self.out_dir = Path(out_dir)
        self.max_length = max_length
        self.max_tokens_per_batch = max_tokens_per_batch

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from unifit.selection.ifd import IFDCost, score_conversations

        done: dict[str, list[Any]] = {"shard": [], "rows": [], "truncated": [], "seconds": [], "node": [],
                                      **{name: [] for name in COST_FIELDS}}
        for shard, payload in zip(batch["shard"], batch["payload"]):
            start = time.perf_counter()
            rows = json.loads(payload)
            cost = IFDCost()
            scores = score_conversations(self.model, self.tokenizer, [row["messages"] for row in rows],
                                         max_length=self.max_length, max_tokens_per_batch=self.max_tokens_per_batch,
                                         cost=cost)
            for name in COST_FIELDS:
                done[name].append(getattr(cost, name))
            out = [{"id": row["id"], "leaf_id": row["leaf_id"], "concept_path": list(row["concept_path"]), **score}
                   for row, score in zip(rows, scores)]
            write_parquet(out, shard_path(self.out_dir, int(shard)), SCORE_SCHEMA)
            done["shard"].append(int(shard))
            done["rows"].append(len(out))
            done["truncated"].append(sum(score["truncated"] for score in scores))
            done["seconds"].append(time.perf_counter() - start)
            done["node"].append(self.node)
        return {key: np.asarray(value) for key, value in done.items()}


def score_sharded(rows: Sequence[dict[str, Any]], out_dir: str | Path, *, model_dir: str | Path, actors: int,
                  cpus_per_actor: float, gpus_per_actor: float, dtype: str, max_length: int,
                  max_tokens_per_batch: int, shard_size: int, chat_template: Optional[str] = None,
                  trust_remote_code: bool = False) -> dict[str, Any]:
    """Score `rows` (instances) into `out_dir/shard-*.parquet`; shards already complete are kept, not recomputed.

    Returns shard counts, `nodes` (how many Ray nodes' actors scored this call's shards, 0 if none were left) and,
    for this call's shards, the machine-independent cost of `IFDCost.summary` (padding efficiency, FLOPs per scored
    answer token against the per-example reference).

    Ray must already be initialised. GPU actors (gpus_per_actor > 0) run the model in `dtype`; CPU actors
    always use float32 (bf16 matmuls on CPU are slow and lose the precision IFD ratios need).
    `trust_remote_code` is the model config's: the exported scoring model of Baichuan2/Qwen-7B keeps their code.
    """
    import ray

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = [list(rows[i : i + shard_size]) for i in range(0, len(rows), shard_size)]
    expected = {shard_path(out_dir, index) for index in range(len(shards))}
    for stale in out_dir.glob("shard-*.parquet"):  # from a larger earlier run: would be read as scores
        if stale not in expected:
            stale.unlink()
    todo = [index for index, shard in enumerate(shards)
            if not _shard_done(shard_path(out_dir, index), [row["id"] for row in shard])]
    nodes = 0
    cost = IFDCost()
    if todo:
        items = [{"shard": index, "payload": json.dumps([
            {"id": r["id"], "leaf_id": r["leaf_id"], "concept_path": list(r["concept_path"]), "messages": list(r["messages"])}
            for r in shards[index]])} for index in todo]
        on_gpu = gpus_per_actor > 0
        constructor = dict(model_dir=str(model_dir), out_dir=str(out_dir), device="cuda" if on_gpu else "cpu",
                           dtype=dtype if on_gpu else "float32", max_length=max_length,
                           max_tokens_per_batch=max_tokens_per_batch, chat_template=chat_template,
                           trust_remote_code=trust_remote_code)
        pool = ray.data.ActorPoolStrategy(size=min(actors, len(todo)))
        scored = ray.data.from_items(items).map_batches(
            ShardScorer, batch_size=1, compute=pool, fn_constructor_kwargs=constructor, num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor,
        ).take_all()
        nodes = len({row["node"] for row in scored})
        for row in scored:
            cost.add(IFDCost(**{name: (float if name.endswith("flops") else int)(row[name]) for name in COST_FIELDS}))
    return {"shards": len(shards), "shards_computed": len(todo), "shards_reused": len(shards) - len(todo), "nodes": nodes,
            **{key: value for key, value in cost.summary().items() if value is not None}}
