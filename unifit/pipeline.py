"""Runs the stages in order, each into `<run_dir>/<stage>/`, skipping those whose inputs have not changed.

A stage's fingerprint hashes the config sections it reads and the fingerprints of the stages it reads
from, so changing `select.ratio` reruns select → finetune → evaluate → report and nothing upstream.
A finished stage ends with `manifest.json`; an interrupted one keeps its partial outputs (shards) for
the stage to resume from, unless its fingerprint changed, in which case they are stale and removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from unifit.config import STAGES, UnifitConfig, to_container
from unifit.fingerprint import fingerprint
from unifit.stage import StageContext, UserError, read_json, write_json

log = logging.getLogger("unifit")


@dataclass(frozen=True)
class Output:
    """One named output of a stage: where it lies inside `<run_dir>/<stage>/` and what it is, for error messages."""

    path: str  # relative to the stage's folder; `{field}` placeholders are filled by the reader (the variant's name)
    what: str  # in words: "the instances"
    complete: str = ""  # for a folder: a file inside it that exists once the output is complete
    hint: str = ""  # another way to provide it, appended to the error that says it is missing


@dataclass(frozen=True)
class StageSpec:
    """What a stage reads and writes. Its fingerprint hashes `sections` and its `upstream` stages' fingerprints; it
    reads only the `outputs` of its upstream stages (`StageContext.input`) and only the config in `sections`,
    `inherited` and `runtime` (plus `RUNTIME_SECTIONS`)."""

    sections: tuple[str, ...]
    upstream: tuple[str, ...]
    function: str  # "module:function", imported when the stage runs
    outputs: Mapping[str, Output]
    inherited: tuple[str, ...] = ()  # read here, fingerprinted by an upstream stage (checked in `stage_fingerprints`)
    runtime: tuple[str, ...] = ()  # read here, never fingerprinted: they change how the stage runs, not what it writes


_INSTANCES_HINT = "or set data.path to import a file"
# Generation and scoring read the resolved `generation_model` / `scoring_model`, not `model`: runs that differ
# only in the base model share generate..select (one generation and one selection for a sweep).
STAGE_SPECS: dict[str, StageSpec] = {
    "generate": StageSpec(
        ("domain", "seed", "generation_model", "backend", "generate", "data"), (), "unifit.generation.stage:run",
        {"instances": Output("instances", "the instances", hint=_INSTANCES_HINT),
         "tree": Output("tree.json", "the concept tree"), "tree_figure": Output("tree.png", "the concept tree's picture"),
         "self_instruct": Output("self_instruct", "the Self-Instruct baseline's instances"),
         "generate_report": Output("report.json", "the generation counters")}),
    "sample": StageSpec(("sample",), ("generate",), "unifit.selection.stage:run_sample",
                        {"sample": Output("sample.parquet", "the scoring sample")}),
    "train_scorer": StageSpec(("scoring_model", "train", "deepspeed"), ("sample",), "unifit.training.stage:run_scorer",
                              {"scorer": Output("model", "the trained scoring model", complete="config.json",
                                                hint="or set select.train_scorer=false to score with the scorer as configured")}),
    "score": StageSpec(("scoring_model", "select.max_tokens_per_batch"), ("generate", "train_scorer"),
                       "unifit.selection.stage:run_score", {"scores": Output("scores", "the IFD scores")},
                       runtime=("select.score_shard_size",)),  # how the scores are split into files
    "select": StageSpec(
        ("select",), ("generate", "score"), "unifit.selection.stage:run_select",
        {"pithy": Output("pithy.parquet", "the Pithy subset"), "select_report": Output("report.json", "the selection counters"),
         "ifd_histogram": Output("ifd_hist.png", "the IFD histogram"), "agreement_figure": Output("agreement.png", "the scorer check's plot")},
        inherited=("data.path", "data.group_by", "scoring_model.name")),  # how the report names the groups and the scorer
    "finetune": StageSpec(("model", "train", "deepspeed", "variants"), ("generate", "select"), "unifit.training.stage:run_finetune",
                          {"finetuned_model": Output("{variant}/model", "the fine-tuned model", complete="config.json")}),
    "evaluate": StageSpec(
        ("model", "judge", "backend", "judge_backend", "evaluate", "variants", "seed"), ("generate", "finetune"),
        "unifit.evaluation.stage:run",
        {"judge": Output("judge.json", "the judge's win rates"), "diversity": Output("diversity.json", "the diversity scores"),
         "ifeval": Output("ifeval.json", "the IFEval accuracies"), "test_sets": Output("test_sets", "the user test sets' verdicts")},
        # test questions are about the domain, deduplicated against the training data as generation deduplicated them
        inherited=("domain", "generate.dedup_threshold", "generate.dedup_shingle_words")),
    "report": StageSpec((), ("generate", "select", "evaluate"), "unifit.report.stage:run", {"report": Output("report.html", "the report")},
                        inherited=("model.name", "select.ratio", "select.train_scorer", "variants")),
}
# Read by any stage and never fingerprinted: the run's name (W&B), the model cache, the cluster and W&B settings.
RUNTIME_SECTIONS = ("name", "cache_dir", "cluster", "wandb")
# Fields that do not change what a stage produces (how it is served, how it survives faults), per section.
_SERVING = frozenset({"batch_size", "cache", "max_retries", "timeout_s", "url", "api_key_env", "gpu_memory_utilization"})
NOT_FINGERPRINTED = {"backend": _SERVING, "judge_backend": _SERVING,
                     "train": frozenset({"checkpoint_every", "keep_checkpoints", "max_failures"})}
# Resolved model sections are hashed under the key `model`, as before `generator`/`scorer` existed: a run that
# sets neither keeps its fingerprints, so its finished stages (and a shared store) stay valid.
FINGERPRINT_KEY = {"generation_model": "model", "scoring_model": "model"}
MANIFEST = "manifest.json"
IN_PROGRESS = ".in_progress.json"


def _section(cfg: UnifitConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    value = to_container(value)
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in NOT_FINGERPRINTED.get(dotted, ())}
    return value


def _file_digest(path: str) -> str:
    """Content hash of an input file, so editing `data.path` in place reruns what depends on it."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise UserError(f"data.path: cannot read {path!r} ({error.strerror}); check the path") from None
    return digest.hexdigest()


SCORER_TRAINING_STAGES = ("sample", "train_scorer")


def active_stages(cfg: UnifitConfig) -> list[str]:
    """The requested stages that have work to do: with select.train_scorer=false the scorer is used as configured,
    so the sample and its SFT are skipped even when an experiment lists them."""
    return [s for s in cfg.stages if cfg.select.train_scorer or s not in SCORER_TRAINING_STAGES]


def stage_spec(cfg: UnifitConfig, stage: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(config sections, upstream stages) that `stage` depends on under this config.

    An untrained scorer makes score depend on the scorer's config alone (not on the sample or its training), so runs
    sharing one off-the-shelf scorer share one scoring. The scorer check makes select read `model` too.
    """
    spec = STAGE_SPECS[stage]
    sections, upstream = spec.sections, spec.upstream
    if stage == "score" and not cfg.select.train_scorer:
        return (*sections, "select.train_scorer"), tuple(u for u in upstream if u != "train_scorer")
    if stage == "select" and cfg.checks_scorer:
        return (*sections, "model"), upstream
    return sections, upstream


_PRODUCERS = {name: stage for stage, spec in STAGE_SPECS.items() for name in spec.outputs}


def output_path(run_dir: Path, name: str, **fields: str) -> Path:
    """Where the declared output `name` lies in a run directory, whether or not it exists (the report reads runs
    from outside a pipeline this way)."""
    stage = _PRODUCERS[name]
    return Path(run_dir) / stage / STAGE_SPECS[stage].outputs[name].path.format(**fields)


def stage_input(cfg: UnifitConfig, run_dir: Path, stage: str, name: str, *, required: bool, **fields: str) -> Optional[Path]:
    """The path of the upstream output `name` that `stage` reads; if it is missing, None or (`required`) a UserError
    saying which stage writes it. Reading an output of a stage outside `stage`'s upstream is a programming error:
    the fingerprint would not follow it."""
    if name not in _PRODUCERS:
        raise KeyError(f"no stage declares an output named {name!r} in STAGE_SPECS; declared: {sorted(_PRODUCERS)}")
    producer = _PRODUCERS[name]
    upstream = stage_spec(cfg, stage)[1]
    if producer not in upstream:
        raise ValueError(f"stage `{stage}` reads `{name}` of stage `{producer}`, which is not among its upstream stages "
                         f"{list(upstream)}: add it to STAGE_SPECS[{stage!r}] so its fingerprint follows that input")
    output = STAGE_SPECS[producer].outputs[name]
    path = output_path(run_dir, name, **fields)
    if (path / output.complete if output.complete else path).exists():
        return path
    if not required:
        return None
    hint = f"; {output.hint}" if output.hint else ""
    raise UserError(f"{path} is missing: stage `{stage}` reads {output.what} from stage `{producer}`; run the {producer} "
                    f"stage first (stages=[{producer},{stage}]){hint}")


def _data_section(cfg: UnifitConfig) -> Any:
    """`data` without an unset group_by: runs from before the field existed keep their generate fingerprint."""
    value = _section(cfg, "data")
    if value.get("group_by") is None:
        value.pop("group_by", None)
    return value


def _generate_section(cfg: UnifitConfig) -> Any:
    """`generate` with its `self_instruct` group spelled as the flat fields it replaced (`self_instruct` for `enabled`,
    `self_instruct_<name>` for the others): runs from before the grouping keep their generate fingerprint."""
    value = _section(cfg, "generate")
    group = value.pop("self_instruct")
    value["self_instruct"] = group.pop("enabled")
    value.update({f"self_instruct_{name}": setting for name, setting in group.items()})
    return value


SECTION_VIEWS: dict[str, Callable[[UnifitConfig], Any]] = {"data": _data_section, "generate": _generate_section}


def _check_inherited(cfg: UnifitConfig, stage: str) -> None:
    """Each `inherited` field of `stage` must be in the sections of a stage upstream of it (directly or further up),
    so that changing the field reruns `stage` through that stage's fingerprint."""
    above: set[str] = set()
    todo = list(stage_spec(cfg, stage)[1])
    while todo:
        upstream = todo.pop()
        if upstream not in above:
            above.add(upstream)
            todo += stage_spec(cfg, upstream)[1]
    for name in STAGE_SPECS[stage].inherited:
        holders = [u for u in above if any(name == s or name.startswith(f"{s}.") for s in stage_spec(cfg, u)[0])]
        if not holders or name.split(".")[-1] in NOT_FINGERPRINTED.get(name.split(".")[0], ()):
            raise ValueError(f"STAGE_SPECS[{stage!r}]: the inherited config field {name!r} is fingerprinted by no stage "
                             f"upstream of it ({sorted(above)}); move it to its sections")


def stage_fingerprints(cfg: UnifitConfig) -> dict[str, str]:
    """Fingerprint of every stage, in pipeline order (upstream fingerprints feed downstream ones)."""
    inputs = {"generate": {"data_file": _file_digest(cfg.data.path)}} if cfg.data.path else {}
    prints: dict[str, str] = {}
    for stage in STAGES:
        sections, upstream = stage_spec(cfg, stage)
        _check_inherited(cfg, stage)
        prints[stage] = fingerprint({
            "stage": stage,
            "config": {FINGERPRINT_KEY.get(s, s): SECTION_VIEWS[s](cfg) if s in SECTION_VIEWS else _section(cfg, s)
                       for s in sections},
            "upstream": {u: prints[u] for u in upstream}, "inputs": inputs.get(stage, {}),
        })
    return prints


def _stage_function(stage: str) -> Callable[[StageContext], dict[str, Any]]:
    module_name, function_name = STAGE_SPECS[stage].function.split(":")
    return getattr(importlib.import_module(module_name), function_name)


class Tracker:
    """W&B for the driver (offline by default). Secrets never enter: the config holds env var names only."""

    def __init__(self, cfg: UnifitConfig, run_dir: Path) -> None:
        self.run = None
        if cfg.wandb.mode == "disabled":
            return
        import wandb

        self.run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, mode=cfg.wandb.mode,
                              dir=str(run_dir), name=cfg.name, group=cfg.name, job_type="pipeline",
                              config=to_container(cfg), reinit="finish_previous")

    def log(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


@contextlib.contextmanager
def _stage_location(cfg: UnifitConfig, run_dir: Path, stage: str, stage_print: str) -> Iterator[Path]:
    """`<run_dir>/<stage>`; with `shared_dir`, a link to `<shared_dir>/<stage>/<fingerprint>` held under a lock,
    so sweep runs that agree on a stage's inputs compute it once (the others wait, then skip it)."""
    link = run_dir / stage
    if not cfg.shared_dir:
        yield link
        return
    target = Path(cfg.shared_dir).resolve() / stage / stage_print[:16]
    target.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    link.symlink_to(target, target_is_directory=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield link


def _setup_logging(run_dir: Path) -> None:
    handler = logging.FileHandler(run_dir / "unifit.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _check_upstream(cfg: UnifitConfig, run_dir: Path, prints: dict[str, str]) -> None:
    """Before any stage runs: a requested stage whose upstream stages are neither finished with their current
    fingerprint nor requested cannot run; say which to add. (Whether each input file is there, the stage learns from
    `StageContext.input` when it reads it.)"""
    stages = active_stages(cfg)
    for stage in stages:
        for upstream in stage_spec(cfg, stage)[1]:
            if upstream in stages:
                continue
            manifest = run_dir / upstream / MANIFEST
            if not manifest.exists() or read_json(manifest).get("fingerprint") != prints[upstream]:
                raise UserError(f"stage `{stage}` needs the output of `{upstream}`, which is missing or out of date in "
                                f"{run_dir}; add it: stages=[{upstream},{stage}]")


def _run_stage(cfg: UnifitConfig, run_dir: Path, stage: str, stage_dir: Path, stage_print: str,
               timings: dict[str, Any], tracker: Tracker) -> None:
    manifest_path = stage_dir / MANIFEST
    if manifest_path.exists() and read_json(manifest_path).get("fingerprint") == stage_print:
        manifest = read_json(manifest_path)
        log.info("[%s] up to date, skipped", stage)
        if stage not in timings["stages"]:  # computed by another run sharing the stage: its measured time still counts
            timings["stages"][stage] = {"seconds": manifest["seconds"], "metrics": manifest["metrics"], "shared": True}
            write_json(run_dir / "timings.json", timings)
        return
    progress_path = stage_dir / IN_PROGRESS
    if stage_dir.exists() and not (progress_path.exists() and read_json(progress_path).get("fingerprint") == stage_print):
        log.info("[%s] inputs changed: removing stale outputs", stage)
        for child in stage_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json(progress_path, {"fingerprint": stage_print})
    log.info("[%s] running", stage)
    started = time.time()
    context = StageContext(cfg, run_dir, stage, log_metrics=lambda m: tracker.log({f"{stage}/{k}": v for k, v in m.items()}))
    try:
        metrics = _stage_function(stage)(context) or {}
    finally:
        serving = context.release_models()  # the stage's actors go now, before the next stage needs the CPUs/GPUs
    metrics = {**metrics, **serving}
    seconds = time.time() - started
    timings["stages"][stage] = {"seconds": seconds, "metrics": metrics}
    write_json(run_dir / "timings.json", timings)
    write_json(manifest_path, {"stage": stage, "fingerprint": stage_print, "seconds": seconds,
                               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "metrics": metrics})
    progress_path.unlink()
    tracker.log({f"{stage}/seconds": seconds, **{f"{stage}/{k}": v for k, v in metrics.items()}})
    log.info("[%s] done in %.1fs: %s", stage, seconds, metrics)


def run(cfg: UnifitConfig) -> Path:
    """Run the configured stages; return the run directory."""
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(run_dir)
    write_json(run_dir / "config.json", to_container(cfg))
    prints = stage_fingerprints(cfg)
    _check_upstream(cfg, run_dir, prints)
    timings_path = run_dir / "timings.json"
    timings: dict[str, Any] = read_json(timings_path) if timings_path.exists() else {"stages": {}}
    tracker = Tracker(cfg, run_dir)
    try:
        stages = active_stages(cfg)
        for stage in STAGES:
            if stage not in stages:
                if stage in cfg.stages:
                    log.info("[%s] not needed: select.train_scorer=false scores with the scorer as configured", stage)
                continue
            with _stage_location(cfg, run_dir, stage, prints[stage]) as stage_dir:
                _run_stage(cfg, run_dir, stage, stage_dir, prints[stage], timings, tracker)
    finally:
        tracker.finish()
    return run_dir


def summarize(run_dir: Path) -> str:
    report = run_dir / "report" / "report.html"
    lines = [f"run directory: {run_dir}"]
    if report.exists():
        lines.append(f"report:        {report}")
    return "\n".join(lines)


def main_from_config(cfg: UnifitConfig) -> int:
    """Run and print where results are; user errors become one clear line and exit code 2."""
    try:
        run_dir = run(cfg)
    except UserError as error:
        print(f"unifit: error: {error}", file=sys.stderr)
        return 2
    print(summarize(run_dir))
    return 0

