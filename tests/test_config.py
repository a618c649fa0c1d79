"""Every shipped experiment composes and validates; bad values fail with a message naming the field."""

from __future__ import annotations

import pytest

from conftest import CONF, compose_config

from unifit.config import ConfigError, UnifitConfig

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_default_is_the_cpu_demo() -> None:
    cfg = compose_config([])
    assert (cfg.model.name, cfg.backend.name, cfg.cluster.name) == ("smollm2_135m", "hf", "local")
    assert cfg.model.source == "embedded"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str) -> None:
    cfg = compose_config([f"+experiment={experiment}"])
    assert isinstance(cfg, UnifitConfig)
    assert cfg.name.split("-")[0] in cfg.run_dir


def test_expected_experiments_ship() -> None:
    assert {"smoke", "demo", "cyber_500k", "select_only"} <= set(EXPERIMENTS)


def test_cyber_500k_is_the_papers_setting() -> None:
    cfg = compose_config(["+experiment=cyber_500k"])
    g = cfg.generate
    leaves = len(g.scopes) * g.n_subconcepts**g.depth
    assert g.scopes == ["Email", "Routing", "CDN", "DNS", "PKI"]
    assert 400_000 <= leaves * g.questions_per_leaf <= 600_000
    assert cfg.select.ratio == 0.06
    assert {v.name for v in cfg.variants} == {"pithy", "all", "pithy_ne", "all_ne"}


@pytest.mark.parametrize("model", ["llama2_7b", "mistral_7b", "baichuan2_7b", "qwen_7b", "tiny_random"])
def test_model_configs(model: str) -> None:
    cfg = compose_config([f"model={model}"])
    assert cfg.model.name == model
    assert cfg.model.trust_remote_code == (model in ("baichuan2_7b", "qwen_7b"))


def test_demo_experiment_spells_out_the_default() -> None:
    default, demo = compose_config([]), compose_config(["+experiment=demo"])
    assert default == demo


@pytest.mark.parametrize("override, field", [
    ("select.ratio=1.5", "select.ratio"),
    ("train.learning_rate=-1", "train.learning_rate"),
    ("generate.depth=-1", "generate.depth"),
    ("backend.api_key_env=sk-live-123", "backend.api_key_env"),
    ("stages=[generate,bogus]", "stages"),
])
def test_bad_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        compose_config([override])


def test_unknown_key_fails_at_composition() -> None:
    with pytest.raises(Exception, match="ratoi"):
        compose_config(["select.ratoi=0.1"])


def test_generator_and_scorer_are_model_configs_chosen_on_the_command_line() -> None:
    default = compose_config([])
    assert (default.generator, default.scorer) == (None, None)
    assert default.generation_model is default.scoring_model is default.model
    cfg = compose_config(["+model@scorer=tiny_random"])
    assert cfg.scoring_model.name == "tiny_random" and cfg.scoring_model.source == "random"
    assert cfg.model.name == cfg.generation_model.name == "smollm2_135m"
    sweep = compose_config(["+experiment=cyber_500k", "model=qwen_7b", "+model@generator=llama2_7b", "+model@scorer=mistral_7b"])
    assert (sweep.model.name, sweep.generation_model.name, sweep.scoring_model.name) == ("qwen_7b", "llama2_7b", "mistral_7b")
    assert sweep.name == "cyber_500k-qwen_7b"


def test_self_instruct_settings_are_one_group_and_the_old_flat_names_say_where_they_went() -> None:
    from unifit.config import check_overrides, from_container, to_container

    cfg = compose_config(["+experiment=demo", "generate.self_instruct.target=9"])
    assert (cfg.generate.self_instruct.enabled, cfg.generate.self_instruct.target, cfg.generate.self_instruct.max_rounds) == (True, 9, 3)
    assert compose_config(["+experiment=smoke"]).generate.self_instruct.enabled is False
    saved = to_container(cfg)  # a run's config.json from before the grouping
    saved["generate"].pop("self_instruct")
    for old, value, new in (("self_instruct_target", 6, "generate.self_instruct.target"),
                            ("self_instruct", False, "generate.self_instruct.enabled")):
        with pytest.raises(ConfigError, match=rf"`generate\.{old}` is now `{new.replace('.', '[.]')}`"):
            from_container({**saved, "generate": {**saved["generate"], old: value}})
    with pytest.raises(ConfigError, match=r"`generate\.self_instruct_max_rounds` is now `generate\.self_instruct\.max_rounds`"):
        check_overrides(["+experiment=demo", "++generate.self_instruct_max_rounds=2"])
    check_overrides(["generate.self_instruct.enabled=false", "generate.self_instruct.target=3"])  # the new names pass


def test_generation_params_from_a_backend_take_its_sampling_and_the_overrides() -> None:
    from unifit.config import BackendConfig
    from unifit.llm.base import GenerationParams

    backend = BackendConfig(max_new_tokens=77, temperature=0.4, top_p=0.9, repetition_penalty=1.3)
    assert GenerationParams.from_backend(backend, 5) == GenerationParams(77, 0.4, 0.9, 1.3, 5, False)
    assert GenerationParams.from_backend(backend, 5, max_new_tokens=12, temperature=0.0, top_p=1.0, json_mode=True) == \
        GenerationParams(12, 0.0, 1.0, 1.3, 5, True)


def test_training_batch_split_is_checked_before_a_run_that_trains() -> None:
    from unifit.config import ClusterConfig, TrainConfig, accumulation_steps

    assert accumulation_steps(TrainConfig(global_batch_size=16, micro_batch_size=2), 4) == 2
    uneven = UnifitConfig(train=TrainConfig(global_batch_size=6, micro_batch_size=4), cluster=ClusterConfig(train_workers=1))
    with pytest.raises(ConfigError, match="6 is not a multiple.*use e.g. train.global_batch_size=8"):
        uneven.check_before_run()
    UnifitConfig(train=uneven.train, cluster=uneven.cluster, stages=["generate", "sample"]).check_before_run()  # no training: fine


def test_cyber_500k_does_not_inherit_the_cpu_demo_settings() -> None:
    """conf/config.yaml tunes generation, Self-Instruct and IFEval for a 135M model on 2 cores; the paper's run
    must not generate 7B answers under a 192-token cap or stop its baseline at 6 instances."""
    demo, paper = compose_config([]), compose_config(["+experiment=cyber_500k"])
    assert (demo.backend.max_new_tokens, demo.generate.self_instruct.target, demo.evaluate.ifeval_prompts) == (192, 6, 8)
    assert paper.backend.max_new_tokens == 1024 and paper.backend.temperature == 0.7 and paper.backend.repetition_penalty == 1.1
    assert paper.generate.leaf_mode == "joint" and paper.generate.answer_system_prompt == ""
    assert paper.generate.self_instruct.target == 0 and paper.generate.self_instruct.max_rounds == 50
    assert paper.evaluate.ifeval_prompts == 541 and paper.evaluate.ifeval_max_new_tokens == 512
