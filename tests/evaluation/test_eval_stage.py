"""Test questions (parsing, dedup against training data) and the evaluate stage on a hand-built run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pytest
from conftest import assert_fingerprinted_reads, client_of, recording_context
from eval_scripted import picks_longest

from unifit.config import EvaluateConfig, ModelConfig, UnifitConfig, VariantConfig
from unifit.evaluation import stage as evaluation_stage
from unifit.evaluation.questions import generate_test_questions, parse_test_question, training_index
from unifit.concept_tree import Node, Tree, node_id
from unifit.llm.base import Completion, Conversation, GenerationParams
from unifit.records import Instance, read_parquet, write_instances

TRAINING = "How does SPF stop attackers from spoofing the envelope sender of an email message?"


@pytest.mark.parametrize("reply,expected", [
    ("Question: What is DMARC alignment?", "What is DMARC alignment?"),
    ("**Question 1:** How do MX records fail over?\nAnswer 1: They use priorities.", "How do MX records fail over?"),
    ("1. Why sign zones with DNSSEC?", "Why sign zones with DNSSEC?"),
    ("What is the role of DNSSEC? It is used for signing. For example, ...", "What is the role of DNSSEC?"),
    ("Describe how DKIM keys are rotated.", "Describe how DKIM keys are rotated."),
    ('"What does a CDN edge cache?"', "What does a CDN edge cache?"),
    ("", None),
    ("Question: ???", None),
])
def test_parse_test_question(reply: str, expected: str | None) -> None:
    assert parse_test_question(reply) == expected


def _tree(domain: str = "cybersecurity") -> Tree:
    nodes: dict[str, Node] = {}

    def add(path: list[str], children: list[str]) -> None:
        nodes[node_id(path)] = Node(path[-1], path, node_id(path[:-1]) if len(path) > 1 else None,
                                    [node_id(path + [c]) for c in children], "expanded" if children else "leaf")

    add([domain], ["Email", "DNS"])
    add([domain, "Email"], ["SPF", "DMARC"])
    add([domain, "DNS"], ["DNSSEC"])
    for path in ([domain, "Email", "SPF"], [domain, "Email", "DMARC"], [domain, "DNS", "DNSSEC"]):
        add(path, [])
    return Tree(domain, nodes, {"leaves": 3})


class ScriptedGenerator:
    """Answers the question prompt per leaf; the SPF leaf first proposes a near-copy of a training question."""

    name = "scripted-generator"

    def __init__(self) -> None:
        self.calls: list[GenerationParams] = []

    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[str]:
        self.calls.append(params)
        replies = []
        for conv in conversations:
            prompt = conv[0]["content"]
            if "Write one new question" in prompt:
                leaf = prompt.split("about ")[1].split(" (")[0]
                if leaf == "SPF" and params.seed == 0:
                    replies.append("Question: How does SPF stop attackers from spoofing the envelope sender of an email message?")
                elif leaf == "DMARC" and params.seed == 0:
                    replies.append("Sure!")
                else:
                    replies.append(f"Question: Which {leaf} misconfiguration number {params.seed} breaks delivery most often?")
            elif "[Answer 1]" in prompt:
                replies.append(picks_longest(conv))
            else:
                replies.append(json.dumps({"scope": 6, "complexity": 5, "practicality": 7, "depth": 4, "clarity": 8,
                                           "correlation": 9}))
        return replies


def test_test_questions_avoid_training_near_duplicates() -> None:
    tree = _tree()
    index = training_index([TRAINING, "What is DNSSEC?"], threshold=0.8, shingle_size=2)
    generator = ScriptedGenerator()
    rows, counts = generate_test_questions(generator, tree.leaves(), index, n=6, domain="cybersecurity",
                                           prompt=EvaluateConfig.question_prompt, params=GenerationParams(seed=0),
                                           seed=0, max_rounds=6)
    assert len(rows) == 6
    assert all(r["question"] != TRAINING for r in rows)
    assert counts["asked"] == 6 + counts["unparseable"] + counts["near_duplicates"]
    assert counts["near_duplicates"] >= 1 or counts["unparseable"] >= 1
    assert len({r["question_id"] for r in rows}) == 6
    leaf_ids = {leaf.id for leaf in tree.leaves()}
    assert all(r["leaf_id"] in leaf_ids and r["concept_path"][0] == "cybersecurity" for r in rows)
    assert len({p.seed for p in generator.calls}) == len(generator.calls)  # repeated leaves get fresh seeds


def _run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "generate").mkdir(parents=True)
    (run_dir / "generate" / "tree.json").write_text(json.dumps(_tree().to_json()))
    make = lambda q, a, src: Instance([{"role": "user", "content": q}, {"role": "assistant", "content": a}],  # noqa: E731
                                      leaf_id="x", concept_path=["cybersecurity", "Email", "SPF"], source=src, generator="t")
    write_instances([make(TRAINING, "It lists allowed senders.", "concept_tree"),
                     make("Explain DMARC reports.", "Aggregate and forensic.", "concept_tree")],
                    run_dir / "generate" / "instances" / "shard-00000.parquet")
    write_instances([make("Write a poem about routers.", "Packets flow.", "self_instruct")],
                    run_dir / "generate" / "self_instruct" / "shard-00000.parquet")
    (run_dir / "finetune" / "pithy_ne" / "model").mkdir(parents=True)
    (run_dir / "finetune" / "pithy_ne" / "model" / "config.json").write_text("{}")
    return run_dir


def test_evaluate_stage_end_to_end_and_resume(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    vicuna = tmp_path / "my_vicuna.jsonl"
    vicuna.write_text('{"question_id": 1, "text": "How do I rotate keys?"}\n{"question_id": 2, "text": "What is SPF?"}\n')
    cfg = UnifitConfig(run_dir=str(run_dir), variants=[VariantConfig("pithy_ne", "pithy", True), VariantConfig("all", "all", False)],
                       evaluate=EvaluateConfig(num_test_questions=5, bootstrap_samples=200, diversity_draws=2, diversity_sample_size=2,
                                               ifeval_prompts=3, ifeval_max_new_tokens=40, test_sets=[str(vicuna)],
                                               extra_models=[ModelConfig(name="other", source="hub", path="org/other")]))
    asked: list[tuple[str, GenerationParams]] = []

    def answerer(name: str, detail: int) -> Any:
        def complete(conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
            asked.append((name, params))
            return [Completion(f"{name} on {c[0]['content'][:20]}" + " detail" * detail, "stop", 5) for c in conversations]

        return client_of(complete, name)

    ctx = recording_context(cfg, run_dir, "evaluate")
    answerers = {"native": answerer("smollm2_135m", 1), "pithy_ne": answerer("pithy_ne", 9), "other": answerer("other", 4)}
    metrics = evaluation_stage.run(ctx, judge=ScriptedGenerator(), answerers=answerers)
    out = run_dir / "evaluate"

    from datasets import load_dataset

    questions = load_dataset("parquet", data_files=str(out / "test_questions.parquet"), split="train")
    assert len(questions) == 5 and set(questions.column_names) == {"question_id", "question", "leaf_id", "concept_path"}
    answers = read_parquet(out / "answers.parquet")
    assert len(answers) == 15 and {a["model"] for a in answers} == {"native", "pithy_ne", "other"}
    assert {a["question_id"] for a in answers} == set(questions["question_id"])
    models, missing = evaluation_stage.compared_models(ctx)
    assert models["pithy_ne"].path == str(run_dir / "finetune" / "pithy_ne" / "model") and models["pithy_ne"].source == "hub"
    assert missing == ["all"] and sorted({name for name, _ in asked}) == ["other", "pithy_ne", "smollm2_135m"]
    assert all(p.temperature == 0.0 and p.repetition_penalty == 1.2 for _, p in asked)
    assert len({p for _, p in asked if p.max_new_tokens != 40}) == 1  # identical settings for every model
    assert {p.max_new_tokens for _, p in asked} == {cfg.evaluate.answer_max_new_tokens, 40}  # 40: IFEval answers

    judged = json.loads((out / "judge.json").read_text())
    assert judged["win_rate"] == {"native": 0.0, "pithy_ne": 1.0, "other": 0.0}
    assert judged["missing_models"] == ["all"]
    assert judged["smoke_test_caveat"] and "smoke test" in judged["smoke_test_caveat"]
    assert len(judged["records"]) == 5 and judged["records"][0]["question_id"] == questions["question_id"][0]
    diversity = json.loads((out / "diversity.json").read_text())
    assert set(diversity["sources"]) == {"unifit", "self_instruct"}
    assert diversity["sources"]["self_instruct"]["mean"]["correlation"] == 9.0
    assert metrics["win_rate/pithy_ne"] == 1.0 and metrics["missing_models"] == 1 and metrics["test_questions"] == 5
    # the user's test set is answered and judged on its own
    set_judged = json.loads((out / "test_sets" / "my_vicuna" / "judge.json").read_text())
    assert set_judged["n_questions"] == 2 and set_judged["win_rate"]["pithy_ne"] == 1.0
    assert [r["question"] for r in set_judged["records"]] == ["How do I rotate keys?", "What is SPF?"]
    assert metrics["my_vicuna/win_rate/pithy_ne"] == 1.0
    # IFEval: every compared model answered the first 3 prompts and was scored by rules
    from unifit.evaluation.ifeval import load_prompts, score

    scored = json.loads((out / "ifeval.json").read_text())
    assert scored["n_prompts"] == 3 and set(scored["models"]) == {"native", "pithy_ne", "other"}
    ifeval_answers = [a for a in read_parquet(out / "ifeval_answers.parquet") if a["model"] == "other"]
    assert len(ifeval_answers) == 3
    expected = score(load_prompts(3), [a["answer"] for a in ifeval_answers])
    assert scored["models"]["other"]["inst_level_loose"] == expected["inst_level_loose"]
    assert metrics["ifeval/other/inst_level_strict"] == expected["inst_level_strict"]

    def must_not_run(*args: object) -> list[Completion]:
        raise AssertionError("answers were already complete: the resumed stage must not ask again")

    again = evaluation_stage.run(ctx, judge=ScriptedGenerator(), answerers={name: client_of(must_not_run) for name in answerers})
    assert again["win_rate/pithy_ne"] == 1.0
    assert_fingerprinted_reads(ctx)


def test_judge_setup_flags_self_judging_as_smoke_test() -> None:
    cfg = UnifitConfig()
    assert "smoke test" in evaluation_stage.judge_setup(cfg)[2]
    real = UnifitConfig(judge=ModelConfig(name="gpt-4", source="hub", path="gpt-4"))
    assert evaluation_stage.judge_setup(real)[2] is None


def test_evaluate_stage_with_real_models(tmp_path: Path, ray_local: None, cache_dir: Path) -> None:
    """No scripted parts: tiny random models answer and judge through the stage's own clients (Ray actors); each
    model is loaded at most once per actor for all of its calls (questions, answers, 3 orderings, diversity, IFEval),
    though three models of two actors each do not fit on the 2 CPUs at a full CPU per actor, and every call of
    three or more conversations wants both actors of its model (batches of two)."""
    import shutil

    from conftest import tiny_model_config

    from unifit.config import BackendConfig, ClusterConfig
    from unifit.models import resolve_model_dir

    run_dir = _run_dir(tmp_path)
    tiny = tiny_model_config("llama")
    shutil.rmtree(run_dir / "finetune" / "pithy_ne" / "model")
    shutil.copytree(resolve_model_dir(tiny_model_config("qwen2"), cache_dir), run_dir / "finetune" / "pithy_ne" / "model")
    shutil.copytree(resolve_model_dir(tiny_model_config("qwen2"), cache_dir), run_dir / "finetune" / "all" / "model")
    cfg = UnifitConfig(run_dir=str(run_dir), model=tiny, cache_dir=str(cache_dir),
                       backend=BackendConfig(max_new_tokens=12, batch_size=2, cache=False, temperature=0.7),
                       cluster=ClusterConfig(generation_actors=2),
                       variants=[VariantConfig("pithy_ne", "pithy", True), VariantConfig("all", "all", False)],
                       evaluate=EvaluateConfig(num_test_questions=2, bootstrap_samples=50, diversity_draws=1,
                                               diversity_sample_size=2, answer_max_new_tokens=8, judge_max_new_tokens=8,
                                               judge_max_retries=1, question_max_rounds=3, ifeval_prompts=3, ifeval_max_new_tokens=8))
    ctx = recording_context(cfg, run_dir, "evaluate")
    metrics = evaluation_stage.run(ctx)
    for pool in ctx.clients.pools.values():
        pool.wait_ready()  # an actor still starting may have had no batch; its load counts all the same
    serving = ctx.release_models()
    assert_fingerprinted_reads(ctx)
    judged = json.loads((run_dir / "evaluate" / "judge.json").read_text())
    n = metrics["test_questions"]
    assert 1 <= n <= 2 and judged["models"] == ["native", "pithy_ne", "all"]
    # a random model never writes [[i]], but it chooses by probability: every ordering gets a verdict
    assert judged["method"] == "probability" and judged["parse_failures"] == 0 and judged["retries"] == 0
    assert all(v in (1, 2, 3) for r in judged["records"] for v in r["verdicts"]) and 1 / 3 <= judged["decisiveness"] <= 1.0
    assert all((r["winner"] is None) == (len(set(r["votes"])) == len(r["votes"])) for r in judged["records"])  # 3 orderings: a tie needs 3 distinct
    assert "smoke test" in judged["smoke_test_caveat"]
    answers = read_parquet(run_dir / "evaluate" / "answers.parquet")
    assert len(answers) == 3 * n and all(a["finish_reason"] in ("stop", "length") for a in answers)
    assert all(a["answer"] for a in answers)
    diversity = json.loads((run_dir / "evaluate" / "diversity.json").read_text())
    assert diversity["method"] == "probability"
    assert diversity["sources"]["unifit"]["failures"] == 0 and diversity["sources"]["self_instruct"]["failures"] == 0
    assert all(1 <= v <= 10 for source in diversity["sources"].values() for v in source["mean"].values())
    assert set(json.loads((run_dir / "evaluate" / "ifeval.json").read_text())["models"]) == {"native", "pithy_ne", "all"}
    # three models (the judge is the native model: one shared pool), at most 2 actors each, whatever the calls:
    # the judge's pool, first used for the questions and last for the verdicts, was never released in between
    assert serving["models_served"] == 3 and serving["model_calls"] >= 9
    assert [pool.stats.loads for pool in ctx.clients.pools.values()] == [2, 2, 2]
    assert serving["model_loads"] == 2 * 3 and serving["engine_starts"] == 0


def test_training_index_holds_near_duplicate_training_texts_too() -> None:
    """A test question close only to a training text that near-duplicates an earlier one is still caught."""
    words = [f"w{i}" for i in range(140)]
    # Jaccard: first-second 0.67 and second-question 0.67, above the 0.5 threshold; first-question 0.43, below it
    first, second, question = (" ".join(words[shift : shift + 100]) for shift in (0, 20, 40))
    index = training_index([first, second], threshold=0.5, shingle_size=1)
    assert index.similar(index.signature(question), 0.5) == ["train:1"]
