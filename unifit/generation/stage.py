"""Generate stage: concept tree -> leaf instances (sharded, resumable) -> global dedup -> Self-Instruct baseline.

Layout under <run_dir>/generate/:
  tree.json, tree.png      the tree, built once and reused by a resumed run
  raw/shard-XXXXX.*        per chunk of `shard_size` leaves: filtered instances (+ .json with the leaf ids
                           and counts); a shard whose .parquet exists is finished and never redone
  instances/               the final set: raw shards, in shard order, through MinHash-LSH question dedup
                           (a cheap deterministic pass, rerun in full, so resume cannot change its result)
  self_instruct/           the baseline (report.json there marks it finished)
  report.json              every count
With `data.path` set, the user's data is imported into instances/ instead.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from unifit.concept_tree import Tree
from unifit.config import UnifitConfig
from unifit.dedup import NearDuplicateIndex
from unifit.generation.instances import HEADLINE_COUNTS, generate_leaf_instances
from unifit.generation.self_instruct import run_self_instruct
from unifit.generation.tree import build_tree, draw_tree
from unifit.llm.base import ChatClient, FreeTextModel, GenerationParams, as_client
from unifit.records import InstanceShardWriter, remove_stale_shards, shard_path, write_instance_shards, write_instances, write_table
from unifit.stage import StageContext, read_json, write_json
from unifit.text import first_question

log = logging.getLogger(__name__)

STRUCTURED_OUTPUT_BACKENDS = ("openai", "vllm")
SHARDS_GENERATED, SHARDS_RESUMED = "shards_generated", "shards_resumed"
KEPT, NEAR_DUPLICATES = "kept", "near_duplicates"  # the dedup pass's counts


def load_or_build_tree(cfg: UnifitConfig, out_dir: Path, generator: ChatClient, params: GenerationParams) -> Tree:
    """The tree is written once; a resumed run must shard the same leaves, so it never regenerates it."""
    path = out_dir / "tree.json"
    if path.exists():
        return Tree.from_json(read_json(path))
    json_mode = cfg.generate.json_mode and cfg.backend.name in STRUCTURED_OUTPUT_BACKENDS
    tree = build_tree(cfg.domain, cfg.generate, generator, params, json_mode=json_mode)
    write_json(path, tree.to_json())
    return tree


def generate_raw_shards(cfg: UnifitConfig, out_dir: Path, tree: Tree, generator: ChatClient, params: GenerationParams) -> tuple[list[Path], Counter[str]]:
    """One shard per chunk of leaves, written as soon as its chunk is done; finished shards are skipped."""
    from tqdm import tqdm

    leaves = tree.leaves()
    size = cfg.generate.shard_size
    chunks = [leaves[s : s + size] for s in range(0, len(leaves), size)]
    raw = out_dir / "raw"
    counts: Counter[str] = Counter()
    shards: list[Path] = []
    for index, chunk in enumerate(tqdm(chunks, desc="leaf shards", unit="shard")):
        shard = shard_path(raw, index)
        meta = shard.with_suffix(".json")
        leaf_ids = [leaf.id for leaf in chunk]
        if shard.exists() and meta.exists() and read_json(meta)["leaf_ids"] == leaf_ids:
            counts.update(read_json(meta)["counts"])
            counts[SHARDS_RESUMED] += 1
        else:
            instances, chunk_counts = generate_leaf_instances(chunk, cfg.generate, generator, params, cfg.generation_model.name)
            write_json(meta, {"leaf_ids": leaf_ids, "counts": dict(chunk_counts)})  # before the parquet that marks the shard done
            write_instances(instances, shard)
            counts.update(chunk_counts)
            counts[SHARDS_GENERATED] += 1
        shards.append(shard)
    return shards, counts


def dedup_shards(cfg: UnifitConfig, raw_shards: list[Path], out: Path) -> Counter[str]:
    """Drop near-duplicate questions across the whole set, keeping the first in shard order; one output shard per raw shard."""
    from tqdm import tqdm

    index = NearDuplicateIndex(cfg.generate.dedup_threshold, cfg.generate.dedup_shingle_words)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_shards(out, keep={shard.name for shard in raw_shards})
    counts: Counter[str] = Counter()
    for shard in tqdm(raw_shards, desc="dedup", unit="shard"):
        table = pq.read_table(shard)  # filtered as Arrow: only ids and messages become Python objects, one shard at a time
        keep = [index.add(key, first_question(messages))
                for key, messages in zip(table.column("id").to_pylist(), table.column("messages").to_pylist())]
        counts[NEAR_DUPLICATES] += keep.count(False)
        counts[KEPT] += keep.count(True)
        write_table(table.filter(pa.array(keep, type=pa.bool_())), out / shard.name)
    return counts


def build_self_instruct(cfg: UnifitConfig, out_dir: Path, generator: ChatClient, params: GenerationParams, tree_count: int) -> dict[str, Any]:
    target = cfg.generate.self_instruct.target or tree_count
    folder = out_dir / "self_instruct"
    marker = folder / "report.json"
    if marker.exists() and read_json(marker).get("target") == target:
        return read_json(marker)
    remove_stale_shards(folder)
    writer = InstanceShardWriter(folder, cfg.generate.shard_size)
    counts = run_self_instruct(cfg.domain, cfg.generate, generator, params, target, cfg.generation_model.name,
                               keep=writer.extend, seed=cfg.seed)
    writer.close()
    report = {"target": target, **counts}
    write_json(marker, report)
    return report


def import_data(ctx: StageContext) -> dict[str, Any]:
    """Bring-your-own data: the imported instances replace generation (selection-only runs)."""
    from unifit.data_import import import_instances

    cfg = ctx.cfg
    instances, report = import_instances(cfg.data.path, cfg.data.format, cfg.data.lenient, cfg.data.group_by)
    out = ctx.out_dir / "instances"
    remove_stale_shards(out)
    write_instance_shards(instances, out, cfg.generate.shard_size)
    write_json(ctx.out_dir / "report.json", {"source": "import", "path": str(cfg.data.path), "instances": len(instances), "import": report})
    return {"instances": len(instances), "import_rows": report["rows"], "import_duplicates": report["duplicates"],
            "import_skipped": sum(report["skipped"].values())}


def run(ctx: StageContext, generator: Optional[ChatClient | FreeTextModel] = None) -> dict[str, Any]:
    """Build (or resume) the concept-tree data set and the Self-Instruct baseline; returns the headline counts.

    `generator` replaces the configured generator (tests, notebooks); by default one client serves every call of
    the stage (tree levels, leaf shards, retries, Self-Instruct rounds) from models loaded once per actor.
    """
    cfg = ctx.cfg
    if cfg.data.path:
        return import_data(ctx)
    generator = as_client(generator) if generator is not None else ctx.connect(cfg.generation_model, cfg.backend, "generate")
    params = GenerationParams.from_backend(cfg.backend, cfg.seed)
    out_dir = ctx.out_dir

    # A fixed Self-Instruct target does not wait for the tree's count: the baseline is built beside the tree, its
    # calls sharing the generator's actors with the tree's (a small call leaves actors idle that the other uses).
    self_instruct = cfg.generate.self_instruct
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="self-instruct") as beside:
        baseline = (beside.submit(build_self_instruct, cfg, out_dir, generator, params, self_instruct.target)
                    if self_instruct.enabled and self_instruct.target else None)
        tree = load_or_build_tree(cfg, out_dir, generator, params)
        if not (out_dir / "tree.png").exists():
            draw_tree(tree, out_dir / "tree.png")
        raw_shards, leaf_counts = generate_raw_shards(cfg, out_dir, tree, generator, params)
        dedup_counts = dedup_shards(cfg, raw_shards, out_dir / "instances")
        report: dict[str, Any] = {
            "tree": tree.counts,
            "leaf_counts_per_scope": tree.leaf_counts_per_scope(),
            "leaf_generation": dict(sorted(leaf_counts.items())),
            "dedup": dict(dedup_counts),
            "instances": dedup_counts[KEPT],
        }
        if self_instruct.enabled:
            report["self_instruct"] = baseline.result() if baseline else build_self_instruct(cfg, out_dir, generator, params, dedup_counts[KEPT])
    write_json(out_dir / "report.json", report)
    log.info("generate: %d instances from %d leaves (%d near-duplicates dropped)", dedup_counts[KEPT], tree.counts["leaves"],
             dedup_counts[NEAR_DUPLICATES])
    result: dict[str, Any] = {
        "instances": dedup_counts[KEPT],
        "leaves": tree.counts["leaves"],
        "nodes": tree.counts["nodes"],
        NEAR_DUPLICATES: dedup_counts[NEAR_DUPLICATES],
        "expansion_failed": tree.counts["expansion_failed"],
    }
    for key in (*HEADLINE_COUNTS, SHARDS_GENERATED, SHARDS_RESUMED):
        result[key] = leaf_counts.get(key, 0)
    if cfg.generate.self_instruct.enabled:
        result["self_instruct_instances"] = report["self_instruct"]["instances"]
    return result
