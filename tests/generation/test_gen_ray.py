"""The stage's default generator is a model client over Ray actors: 2 actors and 1 give identical trees, replies and
instances, and each actor loads the model once for all the calls of the stage."""

from __future__ import annotations

from pathlib import Path

from conftest import client_of, tiny_model_config

from unifit.config import from_container, to_container
from unifit.generation.stage import run
from unifit.records import read_parquet
from unifit.stage import StageContext, read_json


def test_two_actors_give_the_same_instances_as_one_and_load_once_each(tmp_path: Path, cache_dir: Path, ray_local: None) -> None:
    def stage(actors: int) -> tuple[list[str], Path, dict]:
        cfg = from_container({
            "domain": "cybersecurity", "run_dir": str(tmp_path / f"run{actors}"), "cache_dir": str(cache_dir), "seed": 3,
            "model": to_container(tiny_model_config("llama")),
            "backend": {"name": "hf", "batch_size": 2, "max_new_tokens": 12, "temperature": 0.9, "cache": False},
            "cluster": {"generation_actors": actors},
            "generate": {"scopes": ["Email", "DNS", "PKI", "CDN"], "n_subconcepts": 2, "depth": 1, "questions_per_leaf": 1,
                         "max_retries": 0, "shard_size": 4, "self_instruct": {"enabled": False}, "min_answer_chars": 1},
        })
        ctx = StageContext(cfg, Path(cfg.run_dir), "generate")
        generator = ctx.connect(cfg.generation_model, cfg.backend, "generate")  # the client the stage would connect itself
        replies: list[str] = []

        def recording(conversations, params):
            completions = generator.complete(conversations, params)
            replies.extend(c.text for c in completions)
            return completions

        run(ctx, client_of(recording))
        generator.pool.wait_ready()  # an actor still starting may have had no batch; its load counts all the same
        return replies, Path(cfg.run_dir) / "generate", ctx.release_models()

    one_replies, one, one_metrics = stage(1)
    two_replies, two, two_metrics = stage(2)
    assert len(one_replies) >= 4 and len(set(one_replies)) > 1  # real sampled text from the tiny model, several batches
    assert one_replies == two_replies
    assert read_json(one / "tree.json") == read_json(two / "tree.json")
    assert read_json(one / "report.json") == read_json(two / "report.json")
    assert read_parquet(one / "instances") == read_parquet(two / "instances")
    # every call of the stage (tree level, leaf questions, ...) is served by the same actors: one load per actor
    assert one_metrics["model_calls"] >= 2 and two_metrics["model_calls"] == one_metrics["model_calls"]
    assert one_metrics["model_loads"] == 1 and two_metrics["model_loads"] == 2
    assert one_metrics["engine_starts"] == two_metrics["engine_starts"] == 0
    assert one_metrics["completions_computed"] == len(one_replies) and one_metrics["model_load_seconds"] > 0
