"""Shared fixtures: tiny random models built from configs (no downloads), a local Ray, tmp run dirs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from tests (the network is closed)

from unifit.config import ModelConfig, UnifitConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# the project's real data sits in `shared/data` beside the checkout (CI) or beside a parent folder of it (worktrees)
SHARED_DATA = next((p / "shared" / "data" for p in REPO.parents if (p / "shared" / "data").is_dir()), REPO.parent / "shared" / "data")

TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, seed=0)


def tiny_model_config(model_type: str = "llama", **overrides: object) -> ModelConfig:
    """A tiny random model of `model_type` (llama, mistral, qwen2) with the embedded SmolLM2 tokenizer."""
    random_init = {"model_type": model_type, **TINY_SIZES, **overrides}
    return ModelConfig(name=f"tiny_{model_type}", source="random", random_init=random_init, max_length=512)


def client_of(complete: Callable[..., list[Any]], name: str = "scripted") -> Any:
    """A model client from a plain `complete(conversations, params)` function (recording or scripted replies)."""
    return SimpleNamespace(name=name, complete=complete)


# Properties `stage_spec` branches on (with `select.train_scorer`): their value is part of the shape of the fingerprint.
SPEC_SWITCHES = frozenset({"checks_scorer", "scorer_is_tuned_model", "select.train_scorer"})


class RecordingConfig:
    """A stage's config that records the dotted name of every field the stage reads: a section it reads whole (or
    passes on) records the section's name; a section its fingerprint covers only in part (`select.max_tokens_per_batch`)
    records each field read from it. Everything else is the real config, values and properties alike."""

    def __init__(self, cfg: Any, partial: frozenset[str], prefix: str = "", reads: set[str] | None = None) -> None:
        self._cfg, self._partial, self._prefix = cfg, partial, prefix
        self.reads: set[str] = set() if reads is None else reads

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._cfg, name)
        if not self._prefix and name in self._partial:
            return RecordingConfig(value, frozenset(), f"{name}.", self.reads)
        self.reads.add(self._prefix + name)
        return value


def fingerprinted_reads(cfg: UnifitConfig, stage: str) -> tuple[str, ...]:
    """What `stage` may read of `cfg`: its fingerprinted and inherited sections, the runtime ones and the spec's switches."""
    from unifit.pipeline import RUNTIME_SECTIONS, STAGE_SPECS, stage_spec

    spec = STAGE_SPECS[stage]
    return (*stage_spec(cfg, stage)[0], *spec.inherited, *RUNTIME_SECTIONS, *spec.runtime, *SPEC_SWITCHES)


def recording_context(cfg: UnifitConfig, run_dir: Path, stage: str, **kwargs: Any) -> Any:
    """A StageContext whose `cfg` records what the stage reads; `assert_fingerprinted_reads` checks it after the run."""
    from unifit.stage import StageContext

    allowed = fingerprinted_reads(cfg, stage)
    partial = frozenset(a.split(".")[0] for a in allowed if "." in a) - set(allowed)
    return StageContext(RecordingConfig(cfg, partial), run_dir, stage, **kwargs)  # type: ignore[arg-type]


def assert_fingerprinted_reads(ctx: Any) -> None:
    """Fail when the stage read a config field its fingerprint does not cover: a change to it would not rerun the stage."""
    allowed = fingerprinted_reads(ctx.cfg._cfg, ctx.name)
    outside = sorted(r for r in ctx.cfg.reads if not any(r == a or r.startswith(f"{a}.") for a in allowed))
    assert not outside, (f"stage `{ctx.name}` reads {outside}, outside its fingerprinted sections {allowed}: "
                         f"declare them in unifit.pipeline.STAGE_SPECS")
    assert ctx.cfg.reads, "nothing was recorded: the stage did not run with the recording config"


def compose_config(overrides: list[str]) -> UnifitConfig:
    """Compose conf/ the way `python -m unifit.launch` does, and validate it into dataclasses."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from unifit.config import from_container, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        raw = compose(config_name="config", overrides=overrides)
    return from_container(OmegaConf.to_container(raw, resolve=True))


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line contains `text` (to prove a cluster was torn down)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{proc.name}: {cmdline[:200]}")
    return found


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Model cache shared across the session (and across runs: the GGUF conversion happens once)."""
    path = Path(os.environ.get("UNIFIT_CACHE", Path.home() / ".cache" / "unifit"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def fresh_completion_cache(directory: Path, models_from: Path) -> Path:
    """An empty completion cache that shares the converted models of `models_from` (no second GGUF conversion)."""
    directory.mkdir(parents=True, exist_ok=True)
    (models_from / "models").mkdir(parents=True, exist_ok=True)
    (directory / "models").symlink_to(models_from / "models")
    return directory


def smoke_command(run_dir: Path, *overrides: str) -> list[str]:
    """The user's command: `python -m unifit.launch +experiment=smoke run_dir=... [overrides]`."""
    return [sys.executable, "-m", "unifit.launch", "+experiment=smoke", f"run_dir={run_dir}", *overrides]


def smoke_env(completion_cache: Path) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "RAY_AUTH_MODE": "disabled", "UNIFIT_CACHE": str(completion_cache)}


@dataclass
class SmokeRun:
    run_dir: Path
    completion_cache: Path
    result: subprocess.CompletedProcess[str]
    seconds: float


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> SmokeRun:
    """One uninterrupted smoke run with a cold completion cache: the end-to-end test and the kill harness's reference."""
    root = tmp_path_factory.mktemp("smoke")
    completion_cache = fresh_completion_cache(root / "cache", cache_dir)
    run_dir = root / "run"
    started = time.time()
    result = subprocess.run(smoke_command(run_dir), cwd=REPO, env=smoke_env(completion_cache), capture_output=True,
                            text=True, timeout=900)
    return SmokeRun(run_dir, completion_cache, result, time.time() - started)


@pytest.fixture(scope="session")
def tiny_model_cfg() -> ModelConfig:
    return tiny_model_config("llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_cfg: ModelConfig, cache_dir: Path):
    from unifit.models import load_tokenizer

    return load_tokenizer(tiny_model_cfg, cache_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_cfg: ModelConfig, cache_dir: Path):
    from unifit.models import load_model

    return load_model(tiny_model_cfg, cache_dir).eval()


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One local Ray for the whole session (2 CPUs, small object store), isolated from any other cluster."""
    import ray

    tmp = tmp_path_factory.mktemp("ray")
    (tmp / "ray").mkdir(exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(tmp)
    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=1 << 30, include_dashboard=False, _temp_dir=str(tmp / "ray"),
                 log_to_driver=False)
    yield
    ray.shutdown()
