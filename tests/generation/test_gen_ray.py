"""The stage's default generator is Ray Data: 2 actors and 1 actor give identical trees, replies and instances."""

from __future__ import annotations

from pathlib import Path

from conftest import tiny_model_config

from unifit.config import from_container, to_container
from unifit.generation.stage import ray_generate_fn, run
from unifit.records import read_parquet
from unifit.stage import StageContext, read_json


def test_two_actors_give_the_same_instances_as_one(tmp_path: Path, cache_dir: Path, ray_local: None) -> None:
    def stage(actors: int) -> tuple[list[str], Path]:
        cfg = from_container({
            "domain": "cybersecurity", "run_dir": str(tmp_path / f"run{actors}"), "cache_dir": str(cache_dir), "seed": 3,
            "model": to_container(tiny_model_config("llama")),
            "backend": {"name": "hf", "batch_size": 2, "max_new_tokens": 12, "temperature": 0.9, "cache": False},
            "cluster": {"generation_actors": actors},
            "generate": {"scopes": ["Email", "DNS"], "n_subconcepts": 2, "depth": 1, "questions_per_leaf": 1,
                         "max_retries": 0, "shard_size": 4, "self_instruct": False, "min_answer_chars": 1},
        })
        replies: list[str] = []
        generate = ray_generate_fn(cfg)

        def recording(conversations, params):
            completions = generate(conversations, params)
            replies.extend(c.text for c in completions)
            return completions

        run(StageContext(cfg, Path(cfg.run_dir), "generate"), recording)
        return replies, Path(cfg.run_dir) / "generate"

    one_replies, one = stage(1)
    two_replies, two = stage(2)
    assert len(one_replies) >= 4 and len(set(one_replies)) > 1  # real sampled text from the tiny model, several batches
    assert one_replies == two_replies
    assert read_json(one / "tree.json") == read_json(two / "tree.json")
    assert read_json(one / "report.json") == read_json(two / "report.json")
    assert read_parquet(one / "instances") == read_parquet(two / "instances")
