"""The generate stage end to end with a scripted generator: outputs, report, global dedup, resume, Self-Instruct."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from conftest import assert_fingerprinted_reads, recording_context
from gen_scripted import Scripted, make_cfg

from unifit.generation.self_instruct import run_self_instruct, seed_tasks
from unifit.generation.stage import run
from unifit.llm.base import Completion, GenerationParams
from unifit.records import Instance, read_parquet
from unifit.stage import StageContext, read_json


def context(cfg) -> StageContext:
    return StageContext(cfg, Path(cfg.run_dir), "generate")


def test_stage_writes_instances_tree_report(tmp_path) -> None:
    cfg = make_cfg(tmp_path, n_subconcepts=2, depth=2, turns=2, shard_size=3)
    ctx = recording_context(cfg, Path(cfg.run_dir), "generate")
    counts = run(ctx, Scripted())
    assert_fingerprinted_reads(ctx)
    out = ctx.out_dir
    rows = read_parquet(out / "instances")
    assert counts["leaves"] == 8 and counts["instances"] == len(rows) == 16 and counts["shards_generated"] == 3
    assert sorted(p.name for p in (out / "instances").glob("*.parquet")) == [f"shard-0000{i}.parquet" for i in range(3)]
    assert all(len(r["messages"]) == 4 and r["source"] == "concept_tree" and len(r["concept_path"]) == 4 for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    tree = read_json(out / "tree.json")
    assert tree["leaf_counts_per_scope"] == {"Email": 4, "DNS": 4} and (out / "tree.png").stat().st_size > 0
    report = read_json(out / "report.json")
    assert report["instances"] == 16 and report["dedup"]["near_duplicates"] == 0
    assert report["leaf_generation"]["followups_kept"] == 16 and "self_instruct" not in report
    assert not (out / "self_instruct").exists()


def test_near_duplicate_questions_across_leaves_dropped_first_kept(tmp_path) -> None:
    cfg = make_cfg(tmp_path, scopes=["Email", "DNS", "PKI"], depth=0, questions_per_leaf=1, shard_size=1)
    answer = "It checks the records published by the domain owner before accepting."
    replies = {"Email": "Question 1: How does a mail server verify the sender domain of an incoming message?",
               "PKI": "Question 1: how does a mail server verify the sender domain of an incoming message"}
    model = Scripted(override=lambda prompt, seed: next((Completion(f"{r}\nAnswer 1: {answer}", "stop")
                                                         for k, r in replies.items() if f"questions for {k} (" in prompt), None))
    counts = run(context(cfg), model)
    rows = read_parquet(context(cfg).out_dir / "instances")
    assert counts["near_duplicates"] == 1 and counts["instances"] == 2
    assert [r["concept_path"][1] for r in rows] == ["Email", "DNS"]
    assert len(read_parquet(context(cfg).out_dir / "raw" / "shard-00002.parquet")) == 1  # raw keeps it; only the final set drops it


def test_interrupted_run_resumes_from_finished_shards(tmp_path) -> None:
    settings = dict(n_subconcepts=2, depth=1, turns=2, shard_size=2)
    reference = Scripted()
    run(context(make_cfg(tmp_path / "reference", **settings)), reference)

    cfg = make_cfg(tmp_path / "interrupted", **settings)
    crashing = Scripted(fail_after_calls=2 + 2 + 4)  # tree (2) + first shard (2 leaves, 4 follow-ups), then crash
    with pytest.raises(RuntimeError, match="simulated worker crash"):
        run(context(cfg), crashing)
    assert (context(cfg).out_dir / "raw" / "shard-00000.parquet").exists()
    assert not (context(cfg).out_dir / "raw" / "shard-00001.parquet").exists()

    resumed = Scripted()
    counts = run(context(cfg), resumed)
    assert counts["shards_resumed"] == 1 and counts["shards_generated"] == 1
    assert not any("sub-concepts" in p for p in resumed.calls)  # tree.json reused
    assert len(resumed.calls) == 2 + 4  # only the second shard's leaves and follow-ups
    assert len(crashing.calls) + len(resumed.calls) == len(reference.calls)  # nothing finished was asked again
    ids = [r["id"] for r in read_parquet(context(cfg).out_dir / "instances")]
    assert ids == [r["id"] for r in read_parquet(context(make_cfg(tmp_path / "reference", **settings)).out_dir / "instances")]

    again = Scripted()
    assert run(context(cfg), again)["shards_resumed"] == 2 and again.calls == []


def test_self_instruct_loop_produces_novel_instructions_at_target(tmp_path) -> None:
    cfg = make_cfg(tmp_path, self_instruct={"target": 10, "new_per_prompt": 3})
    gen = cfg.generate
    seeds = seed_tasks(cfg.domain, gen.scopes, gen.self_instruct.seeds)
    copies = itertools.count()

    def override(prompt: str, seed: int):
        if prompt.startswith("Here are some example tasks") and next(copies) % 2 == 0:  # every other reply repeats a seed + junk
            return Completion(f"1. {seeds[0]}\n2. Draw a diagram of the mail flow.\n3. Hi\n4. Explain how resolvers cache negative answers.", "stop")
        return None

    model = Scripted(override=override)
    instances: list[Instance] = []
    counts = run_self_instruct(cfg.domain, gen, model, GenerationParams(), 10, "m", keep=instances.extend, seed=0)
    assert len(instances) == 10 == counts["instances"] and counts["stopped_below_target"] == 0
    assert counts["instruction_not_novel"] >= 1 and counts["instruction_unsuitable_keyword"] >= 1 and counts["instruction_too_short"] >= 1
    assert all(i.source == "self_instruct" and i.concept_path == [cfg.domain] for i in instances)
    instructions = [i.messages[0]["content"] for i in instances]
    assert not set(instructions) & set(seeds)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = list(itertools.combinations(instructions, 2)) + list(itertools.product(seeds, instructions))
    assert max(scorer.score(a, b)["rougeL"].fmeasure for a, b in pairs) <= gen.self_instruct.rouge
    later_prompts = [p for p in model.calls if p.startswith("Here are some example tasks")][-1]
    assert any(instr in later_prompts for instr in instructions)  # bootstrapping: machine tasks become in-context examples
    assert sum(seed in later_prompts for seed in seeds) == min(len(seeds), gen.self_instruct.examples - 2)



def test_self_instruct_answers_a_large_round_in_chunks_with_the_same_instances(tmp_path, monkeypatch) -> None:
    """A round's tasks are answered ANSWER_CHUNK at a time and handed on per chunk; the instances do not change."""
    import unifit.generation.self_instruct as self_instruct

    cfg = make_cfg(tmp_path, self_instruct={"target": 10, "new_per_prompt": 4})
    whole: list[Instance] = []
    run_self_instruct(cfg.domain, cfg.generate, Scripted(), GenerationParams(), 10, "m", keep=whole.extend)
    monkeypatch.setattr(self_instruct, "ANSWER_CHUNK", 3)
    handed: list[list[Instance]] = []
    chunked = Scripted()
    run_self_instruct(cfg.domain, cfg.generate, chunked, GenerationParams(), 10, "m", keep=handed.append)
    assert [i.messages for chunk in handed for i in chunk] == [i.messages for i in whole] and len(whole) == 10
    assert max(len(chunk) for chunk in handed) == 3 and len(handed) >= 4

def test_stage_self_instruct_matches_tree_count_and_is_reused(tmp_path) -> None:
    cfg = make_cfg(tmp_path, self_instruct={"enabled": True})
    counts = run(context(cfg), Scripted())
    rows = read_parquet(context(cfg).out_dir / "self_instruct")
    assert counts["self_instruct_instances"] == counts["instances"] == len(rows) == 8
    assert len(list((context(cfg).out_dir / "self_instruct").glob("shard-*.parquet"))) == 8 // cfg.generate.shard_size
    assert read_json(context(cfg).out_dir / "report.json")["self_instruct"]["target"] == 8
    rerun = Scripted()
    run(context(cfg), rerun)
    assert rerun.calls == []


def test_a_fixed_self_instruct_target_is_built_beside_the_tree_with_the_same_result(tmp_path) -> None:
    """target > 0 does not wait for the tree's count: the baseline runs in its own thread, on the same generator."""
    cfg = make_cfg(tmp_path, self_instruct={"enabled": True, "target": 5})
    model = Scripted()
    counts = run(context(cfg), model)
    rows = read_parquet(context(cfg).out_dir / "self_instruct")
    alone: list[Instance] = []
    run_self_instruct(cfg.domain, cfg.generate, Scripted(), GenerationParams.from_backend(cfg.backend, cfg.seed), 5,
                      cfg.generation_model.name, keep=alone.extend, seed=cfg.seed)
    assert counts["self_instruct_instances"] == 5 and [r["messages"] for r in rows] == [i.messages for i in alone]
    assert any("sub-concepts for" in p for p in model.calls) and any(p.startswith("Here are some example tasks") for p in model.calls)


def test_instances_name_the_generator_not_the_base_model(tmp_path) -> None:
    import dataclasses

    from unifit.config import ModelConfig

    cfg = dataclasses.replace(make_cfg(tmp_path, self_instruct={"enabled": True}), generator=ModelConfig(name="writer"))
    run(context(cfg), Scripted())
    out = context(cfg).out_dir
    assert {r["generator"] for r in read_parquet(out / "instances") + read_parquet(out / "self_instruct")} == {"writer"}


def test_self_instruct_gives_up_when_model_stops_producing(tmp_path) -> None:
    cfg = make_cfg(tmp_path, self_instruct={"enabled": False, "prompts_per_round": 1})
    model = Scripted(override=lambda prompt, seed: Completion("I'm sorry, I cannot come up with more tasks.", "stop"))
    instances: list[Instance] = []
    counts = run_self_instruct(cfg.domain, cfg.generate, model, GenerationParams(), 5, "m", keep=instances.extend)
    assert instances == [] and counts["stopped_below_target"] == 1 and counts["rounds"] == 3
    assert counts["unparsable_instruction_replies"] == 3 * 2  # 2 prompts per round (5 needed / 4 per prompt)
    assert model.batches[0] == 2
    batched = Scripted(override=model.override)
    run_self_instruct(cfg.domain, make_cfg(tmp_path, self_instruct={"enabled": False, "prompts_per_round": 6}).generate, batched, GenerationParams(), 5, "m",
                      keep=lambda instances: None)
    assert batched.batches[0] == 6  # a round asks at least self_instruct.prompts_per_round prompts in one batch


def test_data_path_imports_user_data_instead_of_generating(tmp_path) -> None:
    import json

    data = tmp_path / "mine.jsonl"
    rows = [{"instruction": f"Explain topic {i} of routing security.", "input": "", "output": f"Topic {i} is about route filtering."}
            for i in range(5)]
    data.write_text("\n".join(json.dumps(r) for r in rows + rows[:1]) + "\n")
    cfg = make_cfg(tmp_path, shard_size=2, self_instruct={"enabled": True})
    cfg.data.path = str(data)
    model = Scripted()
    counts = run(context(cfg), model)
    out = context(cfg).out_dir
    assert model.calls == [] and counts["instances"] == 5 and counts["import_duplicates"] == 1
    assert len(list((out / "instances").glob("*.parquet"))) == 3 and len(read_parquet(out / "instances")) == 5
    assert read_json(out / "report.json")["source"] == "import" and not (out / "tree.json").exists()
