"""Ray Train + DeepSpeed SFT end to end on CPU (2 workers, gloo): ZeRO-2 and ZeRO-3, a worker killed
mid-run and resumed from its checkpoint, the exported HF directory, and the error when restarts run out."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config

from unifit.config import ClusterConfig, DeepSpeedConfig, TrainConfig, UnifitConfig, WandbConfig
from unifit.records import write_parquet
from unifit.training.sft import TrainingFailed, latest_checkpoint, run_sft

FACTS = [("Which port does DNS use?", "Port 53."), ("Which port does SMTP use?", "Port 25."),
         ("What signs DNS records?", "DNSSEC."), ("What does PKI issue?", "Certificates."),
         ("What routes between networks?", "BGP."), ("What caches web content?", "A CDN."),
         ("What encrypts email in transit?", "STARTTLS."), ("What revokes certificates?", "A CRL.")]
INSTANCES = [{"id": str(i), "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for i, (q, a) in enumerate(FACTS)]


@pytest.fixture
def instances(tmp_path: Path) -> Path:
    """INSTANCES as the parquet file training reads."""
    return write_parquet(INSTANCES, tmp_path / "instances.parquet")


@pytest.fixture(autouse=True, scope="module")
def _pickle_this_module_by_value(ray_local):
    """Ray workers cannot import test modules: ship the on_step callbacks below by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _config(cache_dir: Path, zero_stage: int, **train: object) -> UnifitConfig:
    settings = dict(global_batch_size=4, micro_batch_size=2, learning_rate=3e-2, warmup_ratio=0.1, max_steps=8,
                    checkpoint_every=3, keep_checkpoints=1, max_failures=1)
    settings.update(train)
    return UnifitConfig(model=tiny_model_config("llama"), cluster=ClusterConfig(train_workers=2),
                        deepspeed=DeepSpeedConfig(zero_stage=zero_stage), wandb=WandbConfig(mode="disabled"),
                        train=TrainConfig(**settings), cache_dir=str(cache_dir))


def _kill_once(step: int, rank: int, *, at: int, marker: str, log: str) -> None:
    """Record the step (rank 0); on the first attempt only, kill rank 1's process at step `at`."""
    if rank == 0:
        with open(log, "a") as handle:
            handle.write(f"{step}\n")
    if rank == 1 and step == at and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


def _kill_always(step: int, rank: int, *, at: int) -> None:
    if rank == 1 and step == at:
        os._exit(1)


def _answer_loss(model_dir, tokenizer) -> float:
    """Mean loss on the answer tokens of the training set, computed here from logits."""
    from transformers import AutoModelForCausalLM

    from unifit.training.data import IGNORE_INDEX, collate, encode_instances

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    examples, _ = encode_instances(tokenizer, INSTANCES, 512)
    batch = collate(examples, tokenizer.pad_token_id, packed=False)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX))


def test_zero2_packed_neftune_resumes_after_killed_worker_and_exports(tmp_path: Path, cache_dir: Path, instances: Path, tiny_tokenizer) -> None:
    import functools

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unifit.models import resolve_model_dir

    cfg = _config(cache_dir, zero_stage=2, packing=True)
    cfg.model.max_length = 128  # two conversations per packed row: 4 rows, one per micro-batch slot
    steps_log = tmp_path / "steps.log"
    on_step = functools.partial(_kill_once, at=5, marker=str(tmp_path / "killed"), log=str(steps_log))
    metrics = run_sft(cfg, instances, tmp_path / "out", neftune_alpha=5.0, on_step=on_step)

    assert (tmp_path / "killed").exists()
    steps = [int(line) for line in steps_log.read_text().split()]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] == 4, f"resumed at step {steps[restart]}, expected 4 (checkpoint at 3): {steps}"
    assert metrics["resumed_from_step"] == 3 and metrics["steps"] == 8 and steps[-1] == 8
    assert metrics["train_seconds"] > metrics["loop_seconds"] > 0 and metrics["tokens"] > 0 and metrics["packed"] == 1
    assert latest_checkpoint(tmp_path / "out" / "ray")[1] == 6  # every 3 steps; none at the final step (exported instead)

    base_dir = resolve_model_dir(cfg.model, cache_dir)
    model_dir = tmp_path / "out" / "model"
    before, after = load_file(Path(base_dir) / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # weights moved
    base_loss, tuned_loss = _answer_loss(base_dir, tiny_tokenizer), _answer_loss(model_dir, tiny_tokenizer)
    assert tuned_loss < 0.6 * base_loss, (base_loss, tuned_loss)  # memorised a good part of the answers

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template  # the template travels with the model
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": FACTS[0][0]}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4 or generated[0, -1] == tokenizer.eos_token_id


def test_zero3_gathers_partitioned_weights_on_export(tmp_path: Path, cache_dir: Path, instances: Path) -> None:
    from safetensors.torch import load_file

    from unifit.models import resolve_model_dir

    cfg = _config(cache_dir, zero_stage=3, max_steps=3, checkpoint_every=100)
    metrics = run_sft(cfg, instances, tmp_path / "out", neftune_alpha=5.0)
    assert metrics["steps"] == 3 and metrics["packed"] == 0
    assert metrics["positions"] > metrics["tokens"] > 0  # padded micro-batches of unequal conversations
    assert metrics["padding_efficiency"] == pytest.approx(metrics["tokens"] / metrics["positions"])
    before = load_file(Path(resolve_model_dir(cfg.model, cache_dir)) / "model.safetensors")
    after = load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}  # full tensors, not shards
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("q_proj.weight"))


def test_exhausted_restarts_name_the_last_checkpoint_and_a_rerun_resumes_there(tmp_path: Path, cache_dir: Path, instances: Path) -> None:
    import functools

    cfg = _config(cache_dir, zero_stage=2, max_steps=4, checkpoint_every=1, max_failures=0)
    with pytest.raises(TrainingFailed) as failure:
        run_sft(cfg, instances, tmp_path / "out", neftune_alpha=0.0, on_step=functools.partial(_kill_always, at=2))
    message = str(failure.value)
    assert "max_failures=0" in message and "(step 1)" in message
    assert str(tmp_path / "out" / "ray") in message
    assert not (tmp_path / "out" / "model").exists()

    # Rerunning the same call (what a rerun of the stage does) resumes from that checkpoint, not from step 0.
    metrics = run_sft(cfg, instances, tmp_path / "out", neftune_alpha=0.0)
    assert metrics["resumed_from_step"] == 1 and metrics["steps"] == 4
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()
