"""Garbage model output through every stage that parses it, and the API key kept out of everything a run writes.

The slow tests run the whole pipeline the way a user does — `python -m unifit.launch +experiment=smoke
model=tiny_random backend=openai backend.url=...` — against tests/garbage_server.py, an OpenAI-compatible
server on 127.0.0.1 that answers every UNIFIT prompt with a deterministic mix of well-formed replies and
garbage (empty, truncated, wrong format, other language, endless repetition). Training and IFD scoring run
the tiny random model for real; the compared models answer locally (hf). Every counter the run reports is
checked against what the server actually sent. The fast tests send one garbage kind to one stage in
process, for every stage and every kind.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import client_of
from garbage_server import (EMPTY, GARBAGE_KINDS, GOOD, OTHER_LANGUAGE, REPETITION, TRUNCATED, WRONG_FORMAT, GarbageServer, Record,
                            Script, ScriptedModel)

from unifit.config import STAGES, EvaluateConfig, GenerateConfig, SelfInstructConfig
from unifit.text import foreign_script
from unifit.llm.base import GenerationParams
from unifit.llm.openai import EndpointError, OpenAIChatModel

REPO = Path(__file__).resolve().parents[1]
MAX_RETRIES = 2  # generate.max_retries and evaluate.judge_max_retries in the run
NUM_TEST_QUESTIONS, QUESTION_MAX_ROUNDS = 4, 5
KEY_ENV = "UNIFIT_TEST_API_KEY"


# ---------------------------------------------------------------- the whole pipeline against the garbage server


@dataclass
class GarbageRun:
    run_dir: Path
    searched: list[Path]  # every directory the run wrote to: run dir, completion cache, Ray's temp dir
    result: subprocess.CompletedProcess[str]
    records: list[Record]
    unauthorized: int
    key: str
    started: float


@pytest.fixture(scope="module")
def garbage_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GarbageRun]:
    tmp = tmp_path_factory.mktemp("garbage")
    key = f"sk-plant-{uuid.uuid4().hex}"
    cache = tmp / "cache"
    cache.mkdir()
    shared_models = Path.home() / ".cache" / "unifit" / "models"  # the converted/built models are reused, never written
    shared_models.mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(shared_models, target_is_directory=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="ugr", dir="/tmp"))  # short: Ray's socket paths must stay under 108 bytes
    run_dir = tmp / "run"
    started = time.time()
    with GarbageServer(key) as server:
        env = {**os.environ, KEY_ENV: key, "UNIFIT_CACHE": str(cache), "RAY_TMPDIR": str(ray_tmp), "WANDB_MODE": "offline",
               "RAY_AUTH_MODE": "disabled"}
        command = [sys.executable, "-m", "unifit.launch", "+experiment=smoke", "model=tiny_random", "backend=openai",
                   f"backend.url={server.url}", "backend.api_model=garbage-llm", f"backend.api_key_env={KEY_ENV}",
                   "backend.logprobs=false",  # the server emulates an API without logprobs: the judge's free-text path
                   "generate.n_subconcepts=3", "generate.questions_per_leaf=4", "generate.turns=2",
                   "generate.self_instruct.enabled=true", "generate.self_instruct.target=2", "generate.self_instruct.max_rounds=2",
                   "generate.self_instruct.prompts_per_round=1",
                   f"generate.max_retries={MAX_RETRIES}", f"evaluate.judge_max_retries={MAX_RETRIES}",
                   f"evaluate.num_test_questions={NUM_TEST_QUESTIONS}", f"evaluate.question_max_rounds={QUESTION_MAX_ROUNDS}",
                   "select.max_ifd=2",  # a random model's IFD is 1 ± 0.002: the paper's IFD < 1 cut could keep nothing
                   "wandb.mode=offline", f"run_dir={run_dir}"]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    yield GarbageRun(run_dir, [run_dir, cache, ray_tmp], result, list(server.records), server.unauthorized, key, started)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def reask_outcomes(records: list[Record], kind: str) -> tuple[int, int, int]:
    """(asks, asks whose every attempt was garbage, asks that parsed after a retry) of one parsing stage.

    Asserts that retries are bounded and only follow garbage. Every re-ask uses the next seed (generation
    re-sends the conversation, the judge and diversity scoring extend it; the server keys both by prompt).
    Identical prompts asked together (e.g. a judge ordering equal to another) are counted once per copy.
    """
    groups: dict[str, dict[int, list[Record]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record.prompt_kind == kind:
            groups[record.key][record.seed].append(record)
    asks = exhausted = recovered = 0
    for key, tries in groups.items():
        steps = sorted(tries)
        assert len(steps) <= MAX_RETRIES + 1, f"{kind} prompt {key} asked {len(steps)} times"
        assert steps == list(range(steps[0], steps[0] + len(steps))), f"{kind} prompt {key}: attempts {steps}"
        copies = len(tries[steps[0]])
        assert all(len(tries[s]) == copies for s in steps)
        kinds = [tries[s][0].reply_kind for s in steps]
        assert GOOD not in kinds[:-1], f"{kind} prompt {key} re-asked after a well-formed reply: {kinds}"
        asks += copies
        if kinds[-1] != GOOD:
            assert len(steps) == MAX_RETRIES + 1, f"{kind} prompt {key} given up after {len(steps)} garbage replies"
            exhausted += copies
        elif len(steps) > 1:
            recovered += copies
    return asks, exhausted, recovered


def sent(records: list[Record], kind: str) -> Counter[str]:
    return Counter(r.reply_kind for r in records if r.prompt_kind == kind)


@pytest.mark.slow
def test_pipeline_finishes_on_garbage_and_the_key_was_used(garbage_run: GarbageRun) -> None:
    result = garbage_run.result
    assert result.returncode == 0, result.stderr[-4000:]
    for stage in STAGES:
        assert json.loads((garbage_run.run_dir / stage / "manifest.json").read_text())["stage"] == stage
    assert garbage_run.records and garbage_run.unauthorized == 0  # every request carried `Bearer <planted key>`
    kinds = Counter(r.prompt_kind for r in garbage_run.records)
    assert set(kinds) >= {"concepts", "question_list", "answer:leaf", "followup_question", "answer:followup", "self_instruct",
                          "answer:self_instruct", "test_question", "judge", "diversity"}, kinds
    assert "answer:other" not in kinds  # the base and fine-tuned models answered locally, not the endpoint's model
    assert set(GARBAGE_KINDS) <= {r.reply_kind for r in garbage_run.records}
    parsed = ("concepts", "question_list", "followup_question", "self_instruct")
    outcomes = [reask_outcomes(garbage_run.records, kind) for kind in parsed]
    outcomes += [reask_outcomes(garbage_run.records, kind) for kind in ("judge", "diversity")]
    assert sum(o[1] for o in outcomes) > 0 and sum(o[2] for o in outcomes) > 0  # both "given up" and "a retry parsed"
    judged = json.loads((garbage_run.run_dir / "evaluate" / "judge.json").read_text())
    assert judged["judge"] == "garbage-llm" and judged["smoke_test_caveat"] is None
    print(f"garbage run: {len(garbage_run.records)} requests, {time.time() - garbage_run.started:.0f}s")


@pytest.mark.slow
def test_generation_counts_match_what_the_server_sent(garbage_run: GarbageRun) -> None:
    assert garbage_run.result.returncode == 0, garbage_run.result.stderr[-4000:]
    records = garbage_run.records
    report = json.loads((garbage_run.run_dir / "generate" / "report.json").read_text())
    tree, leaves, si = report["tree"], report["leaf_generation"], report["self_instruct"]

    calls = sum(sent(records, "concepts").values())
    asks, exhausted, _ = reask_outcomes(records, "concepts")
    assert (tree["expansion_calls"], tree["expansion_retries"], tree["expansion_failed"]) == (calls, calls - asks, exhausted)

    calls = sum(sent(records, "question_list").values())
    asks, exhausted, _ = reask_outcomes(records, "question_list")
    assert asks == tree["leaves"]
    assert (leaves["leaf_calls"], leaves["leaf_retries"], leaves["unparsable_leaf_replies"]) == (calls, calls - asks, exhausted)
    answers = sent(records, "answer:leaf")
    assert sum(answers.values()) == leaves["answer_calls"] == 4 * (asks - exhausted)  # every question of every parsed list
    assert leaves["pairs_kept"] == answers[GOOD]
    assert leaves.get("empty", 0) == answers[EMPTY] and leaves.get("wrong_language", 0) == answers[OTHER_LANGUAGE]
    assert leaves.get("truncated", 0) == answers[TRUNCATED] + answers[REPETITION]

    calls = sum(sent(records, "followup_question").values())
    asks, exhausted, _ = reask_outcomes(records, "followup_question")
    assert asks == leaves["pairs_kept"]  # every kept pair was asked for a follow-up
    assert (leaves["followup_calls"], leaves["followup_retries"], leaves.get("followup_unparsable", 0)) == (calls, calls - asks, exhausted)
    answers = sent(records, "answer:followup")
    assert sum(answers.values()) == leaves["followup_answer_calls"] == asks - exhausted
    assert leaves.get("followups_kept", 0) == answers[GOOD]
    assert leaves.get("followup_empty", 0) == answers[EMPTY] and leaves.get("followup_wrong_language", 0) == answers[OTHER_LANGUAGE]
    assert leaves.get("followup_truncated", 0) == answers[TRUNCATED] + answers[REPETITION]

    calls = sum(sent(records, "self_instruct").values())
    asks, exhausted, _ = reask_outcomes(records, "self_instruct")
    assert si["instruction_calls"] == calls and si.get("unparsable_instruction_replies", 0) == exhausted
    answers = sent(records, "answer:self_instruct")
    assert si["answer_calls"] == sum(answers.values()) and si["instances"] == answers[GOOD]
    assert si.get("answer_empty", 0) == answers[EMPTY] and si.get("answer_wrong_language", 0) == answers[OTHER_LANGUAGE]
    assert si.get("answer_truncated", 0) == answers[TRUNCATED] + answers[REPETITION]

    metrics = json.loads((garbage_run.run_dir / "timings.json").read_text())["stages"]["generate"]["metrics"]
    for name in ("expansion_failed", "unparsable_leaf_replies", "followup_unparsable", "empty", "truncated", "wrong_language"):
        assert metrics[name] == tree.get(name, leaves.get(name, 0)), name
    assert metrics["unparsable_leaf_replies"] + metrics["followup_unparsable"] + metrics["empty"] + metrics["truncated"] > 0


@pytest.mark.slow
def test_evaluation_counts_match_what_the_server_sent_and_are_reported(garbage_run: GarbageRun) -> None:
    assert garbage_run.result.returncode == 0, garbage_run.result.stderr[-4000:]
    records, out = garbage_run.records, garbage_run.run_dir / "evaluate"
    metrics = json.loads((garbage_run.run_dir / "timings.json").read_text())["stages"]["evaluate"]["metrics"]

    questions = sent(records, "test_question")
    assert 0 < metrics["questions_rounds"] <= QUESTION_MAX_ROUNDS
    assert metrics["questions_asked"] == sum(questions.values()) <= QUESTION_MAX_ROUNDS * NUM_TEST_QUESTIONS
    assert metrics["test_questions"] == questions[GOOD] and metrics["questions_near_duplicates"] == 0
    assert metrics["questions_unparseable"] == questions[EMPTY] + questions[WRONG_FORMAT]
    assert metrics["questions_truncated"] == questions[TRUNCATED] + questions[REPETITION]
    assert metrics["questions_wrong_language"] == questions[OTHER_LANGUAGE]

    judged = json.loads((out / "judge.json").read_text())
    asks, exhausted, _ = reask_outcomes(records, "judge")
    assert asks == 3 * judged["n_questions"] == 3 * metrics["test_questions"]
    assert judged["parse_failures"] == metrics["judge_parse_failures"] == exhausted
    assert judged["retries"] == sum(1 for r in records if r.prompt_kind == "judge" and r.reasked)
    assert sum(v is None for rec in judged["records"] for v in rec["verdicts"]) == exhausted

    scored = json.loads((out / "diversity.json").read_text())
    asks, exhausted, _ = reask_outcomes(records, "diversity")
    failures = [entry["failures"] for entry in scored["sources"].values()]
    assert asks == sum(scored["draws"] for e in scored["sources"].values() if e["n_instructions"]) and sum(failures) == exhausted
    assert scored["retries"] == sum(1 for r in records if r.prompt_kind == "diversity" and r.reasked)
    assert [metrics[f"diversity_failures/{name}"] for name in scored["sources"]] == failures

    html = (garbage_run.run_dir / "report" / "report.html").read_text()
    assert f"free-text verdicts; unparseable: {judged['parse_failures']} (after {judged['retries']} re-asks)" in html
    assert "failed draws" in html
    generated = json.loads((garbage_run.run_dir / "generate" / "report.json").read_text())
    for section in ("tree", "leaf_generation", "self_instruct"):  # every generation counter is in the report
        for name, value in generated[section].items():
            assert f"<td>{section}.{name}</td><td>{value}</td>" in html, (section, name)


def _files(root: Path) -> Iterator[Path]:
    for folder, _dirs, names in os.walk(root):  # symlinks (the shared model cache) are not followed
        for name in names:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                yield path


def _contents(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".parquet":  # compressed pages: search the decoded rows too
        import pyarrow.parquet as pq

        data += json.dumps(pq.read_table(path).to_pylist(), default=str, ensure_ascii=False).encode()
    return data


@pytest.mark.slow
def test_planted_key_appears_in_no_file_log_config_or_wandb_run(garbage_run: GarbageRun) -> None:
    assert garbage_run.result.returncode == 0, garbage_run.result.stderr[-4000:]
    needles = [garbage_run.key.encode(), garbage_run.key.split("-")[-1].encode()]  # the key, and its random part alone
    wandb_home = [Path.home() / ".cache" / "wandb", Path.home() / ".config" / "wandb"]
    files = [f for root in garbage_run.searched for f in _files(root)]
    files += [f for root in wandb_home if root.exists() for f in _files(root) if f.stat().st_mtime >= garbage_run.started]
    names = {f.name for f in files}
    assert {"unifit.log", "config.yaml", "overrides.yaml", "config.json", "timings.json", "report.html", "completions.sqlite"} <= names
    assert any(f.suffix == ".wandb" for f in files) and any("ray" in str(f) and f.suffix in (".log", ".out", ".err") for f in files)
    leaked = [str(f) for f in files if any(n in _contents(f) for n in needles)]
    assert not leaked, f"the API key was written to {leaked}"
    output = (garbage_run.result.stdout + garbage_run.result.stderr).encode()
    assert not any(n in output for n in needles), "the API key was printed"
    assert KEY_ENV.encode() in (garbage_run.run_dir / "config.json").read_bytes()  # the config names the variable, never its value


def test_compared_models_answer_locally_when_generation_uses_an_endpoint() -> None:
    from conftest import compose_config

    from unifit.config import ConfigError
    from unifit.evaluation.stage import answer_backend, judge_setup

    remote = compose_config(["backend=openai", "backend.api_model=gpt-4"])
    assert answer_backend(remote).name == "hf" and judge_setup(remote)[2] is None  # GPT-4 judges: no smoke-test caveat
    assert answer_backend(compose_config(["+backend@evaluate.answer_backend=vllm", "backend=openai"])).name == "vllm"
    assert answer_backend(compose_config(["backend=hf"])).name == "hf"
    assert "smoke test" in judge_setup(compose_config(["backend=openai", "backend.api_model=smollm2_135m"]))[2]
    with pytest.raises(ConfigError, match="evaluate.answer_backend"):
        compose_config(["+backend@evaluate.answer_backend=openai"])


# ---------------------------------------------------------------- the key in error messages


def _error(model: OpenAIChatModel) -> EndpointError:
    with pytest.raises(EndpointError) as caught:
        model.complete([[{"role": "user", "content": "What is DNS?"}]], GenerationParams(max_new_tokens=8))
    return caught.value


def test_endpoint_errors_and_logs_never_contain_the_key(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    key = f"sk-plant-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, key)
    make = lambda url: OpenAIChatModel(url, "m", api_key_env=KEY_ENV, max_retries=1, backoff_base_s=0.01, concurrency=1)  # noqa: E731
    errors = []
    with GarbageServer("sk-another-key") as wrong_key:
        errors.append(_error(make(wrong_key.url)))
        assert "refused the request (HTTP 401)" in str(errors[-1]) and KEY_ENV in str(errors[-1]) and wrong_key.unauthorized == 1
    with GarbageServer(key, broken="500") as failing:
        errors.append(_error(make(failing.url)))
        assert "failed 2 times (last: HTTP 500)" in str(errors[-1]) and failing.unauthorized == 0
    with GarbageServer(key, broken="no_choices") as malformed:
        errors.append(_error(make(malformed.url)))
        assert "failed 2 times (last: IndexError)" in str(errors[-1])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    errors.append(_error(make(closed)))
    assert "failed 2 times" in str(errors[-1])
    for error in errors:
        text = "".join(traceback.format_exception(error)) + repr(error) + repr(error.__context__) + repr(error.__cause__)
        assert key not in text and key.split("-")[-1] not in text
    assert "retry 1/1" in caplog.text and key not in caplog.text


# ---------------------------------------------------------------- one garbage kind at one stage, in process


def _generate_cfg(**overrides: Any) -> GenerateConfig:
    return GenerateConfig(**{"scopes": ["Email", "DNS"], "n_subconcepts": 2, "depth": 0, "questions_per_leaf": 2, "turns": 1,
                             "max_retries": MAX_RETRIES, "self_instruct": SelfInstructConfig(target=2), **overrides})


def _leaves(gen: GenerateConfig):
    from unifit.generation.tree import build_tree

    return build_tree("cybersecurity", gen, ScriptedModel(Script(garbage={})), GenerationParams()).leaves()


def _attempts(script: Script, kind: str) -> set[int]:
    """How many times each prompt of `kind` was asked (identical prompts asked together count once)."""
    tries: dict[str, set[int]] = defaultdict(set)
    for r in script.records:
        if r.prompt_kind == kind:
            tries[r.key].add(r.seed)
    return {len(t) for t in tries.values()}


PARSED_STAGES = ["concepts", "concepts_json", "question_list", "qa", "followup_question", "followup_qa", "self_instruct",
                 "test_question", "judge", "diversity"]
TEST_QUESTION_COUNTER = {EMPTY: "unparseable", WRONG_FORMAT: "unparseable", TRUNCATED: "truncated", REPETITION: "truncated",
                         OTHER_LANGUAGE: "wrong_language"}


@pytest.mark.parametrize("garbage", GARBAGE_KINDS)
@pytest.mark.parametrize("stage", PARSED_STAGES)
def test_garbage_at_each_parsing_stage_is_retried_boundedly_then_counted(stage: str, garbage: str) -> None:
    from unifit.generation.instances import generate_leaf_instances
    from unifit.generation.self_instruct import STALL_ROUNDS, run_self_instruct
    from unifit.concept_tree import FAILED
    from unifit.generation.tree import build_tree

    kind = stage.removesuffix("_json")
    script = Script(garbage={kind: garbage})
    model = ScriptedModel(script)
    params = GenerationParams(max_new_tokens=64)
    if kind == "concepts":
        gen = _generate_cfg(depth=1)
        tree = build_tree("cybersecurity", gen, model, params, json_mode=stage.endswith("_json"))
        assert tree.counts["expansion_failed"] == 2 and all(tree.nodes[s].status == FAILED for s in tree.root.children)
    elif kind in ("question_list", "qa", "followup_question", "followup_qa"):
        gen = _generate_cfg(leaf_mode="two_step" if kind in ("question_list", "followup_question") else "joint", turns=2)
        leaves = _leaves(gen)
        instances, counts = generate_leaf_instances(leaves, gen, model, params, "m")
        if kind.startswith("followup"):
            assert counts["followup_unparsable"] == counts["pairs_kept"] == len(instances) == 2 * len(leaves)
            assert all(len(i.messages) == 2 for i in instances) and counts["short_conversations"] == len(instances)
        else:
            assert counts["unparsable_leaf_replies"] == len(leaves) and not instances
    elif kind == "self_instruct":
        instances: list = []
        counts = run_self_instruct("cybersecurity", _generate_cfg(), model, params, target=2, generator="m", keep=instances.extend)
        assert not instances and counts["rounds"] == STALL_ROUNDS and counts["stopped_below_target"] == 1
        assert counts["unparsable_instruction_replies"] * (MAX_RETRIES + 1) == counts["instruction_calls"] > 0
    elif kind == "test_question":
        from unifit.evaluation.questions import generate_test_questions, training_index

        rows, counts = generate_test_questions(model, _leaves(_generate_cfg()), training_index([], 0.8, 2), n=2, domain="cybersecurity",
                                               prompt=EvaluateConfig.question_prompt, params=params, seed=0, max_rounds=3)
        assert not rows and counts["asked"] == counts[TEST_QUESTION_COUNTER[garbage]] == 6 and counts["rounds"] == 3
        return  # one ask per round: a leaf drawn again in a later round is a new question, not a retry
    elif kind == "judge":
        from unifit.evaluation.judge import win_rates

        result = win_rates(["What is DNS?", "What is SPF?"], {"a": ["One.", "Two."], "b": ["Uno.", "Dos."]}, model, seed=0,
                           max_retries=MAX_RETRIES, bootstrap_samples=10)
        assert result.parse_failures == 6 and result.retries == 6 * MAX_RETRIES and result.no_majority_rate == 1.0
    else:
        from unifit.evaluation.diversity import diversity

        scored = diversity(model, {"unifit": ["What is DNS?", "What is SPF?"], "self_instruct": ["Explain BGP."]},
                           domain="cybersecurity", draws=2, sample_size=2, seed=0, max_retries=MAX_RETRIES,
                           params=GenerationParams(max_new_tokens=64, json_mode=True))
        assert [e["failures"] for e in scored["sources"].values()] == [2, 2] and scored["retries"] == 4 * MAX_RETRIES
    if kind != "self_instruct":  # its prompts may recur across rounds; instruction_calls above pins its bound
        assert _attempts(script, kind) == {MAX_RETRIES + 1}
    assert {r.reply_kind for r in script.records if r.prompt_kind == kind} == {garbage}


ANSWER_COUNTER = {EMPTY: "empty", TRUNCATED: "truncated", REPETITION: "truncated", OTHER_LANGUAGE: "wrong_language"}


@pytest.mark.parametrize("garbage", sorted(ANSWER_COUNTER))
@pytest.mark.parametrize("kind", ["answer:leaf", "answer:followup", "answer:self_instruct"])
def test_garbage_answers_are_asked_once_and_counted_by_reason(kind: str, garbage: str) -> None:
    from unifit.generation.instances import generate_leaf_instances
    from unifit.generation.self_instruct import run_self_instruct

    script = Script(garbage={kind: garbage})
    model = ScriptedModel(script)
    params = GenerationParams(max_new_tokens=64)
    gen = _generate_cfg(leaf_mode="two_step", turns=2)
    if kind == "answer:self_instruct":
        instances = []
        counts = run_self_instruct("cybersecurity", gen, model, params, target=2, generator="m", keep=instances.extend)
        assert not instances and counts[f"answer_{ANSWER_COUNTER[garbage]}"] == counts["answer_calls"] > 0
    else:
        instances, counts = generate_leaf_instances(_leaves(gen), gen, model, params, "m")
        prefix = "followup_" if kind == "answer:followup" else ""
        assert counts[prefix + ANSWER_COUNTER[garbage]] == counts[f"{prefix}answer_calls"] > 0
        assert counts["followups_kept" if prefix else "pairs_kept"] == 0
    assert _attempts(script, kind) == {1}


def test_a_degenerate_thousand_item_list_is_bounded_and_fast() -> None:
    from unifit.generation.instances import generate_leaf_instances
    from unifit.generation.self_instruct import run_self_instruct
    from unifit.generation.tree import build_tree
    from unifit.llm.base import Completion

    looping = client_of(lambda conversations, params: [
        Completion("\n".join(["1. Explain how Email security works in practice?"] * 1000), "length", 8000) for _ in conversations])

    started = time.time()
    gen = _generate_cfg(depth=1, leaf_mode="two_step")
    tree = build_tree("cybersecurity", gen, looping, GenerationParams())
    assert all(len(tree.nodes[s].children) == 1 for s in tree.root.children)  # 999 copies of one name: one child
    instances, counts = generate_leaf_instances(tree.leaves(), gen, looping, GenerationParams(), "m")
    assert counts["dropped_over_q"] == len(tree.leaves()) * (999 - gen.questions_per_leaf)
    si_counts = run_self_instruct("cybersecurity", gen, looping, GenerationParams(), target=2, generator="m", keep=lambda instances: None)
    assert si_counts["instructions_kept"] <= si_counts["rounds"] and si_counts["instruction_not_novel"] > 0
    assert time.time() - started < 60


def test_foreign_script_catches_another_writing_system_only() -> None:
    prompt = "Please generate 2 questions about DNSSEC (cybersecurity > DNS) in cybersecurity."
    assert foreign_script("Как работает DNSSEC при проверке подписи?", prompt)
    assert foreign_script("这是一个关于网络安全的详细回答。", prompt)
    assert not foreign_script("Wie funktioniert DNSSEC bei der Signaturprüfung?", prompt)  # same script: not caught
    assert not foreign_script("DNSSEC signs zones with keys (α, β rotate).", prompt)
    chinese_scope = "Please generate 2 sub-concepts for 电子邮件 in the domain of 网络安全."  # the user's scopes set the script
    assert not foreign_script("1. 电子邮件认证\n2. 垃圾邮件过滤", chinese_scope)
    assert not foreign_script("[[2]]", prompt) and not foreign_script("", prompt)
