"""Transformers backend: batched, left-padded chat generation on CPU or GPU."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

from unifit.config import ModelConfig
from unifit.llm.base import Choice, Completion, Conversation, GenerationParams

log = logging.getLogger(__name__)


class HFChatModel:
    """One model in this process (a Ray actor behind a model client). Batches are left-padded so every prompt ends where generation starts."""

    def __init__(self, model_cfg: ModelConfig, cache_dir: str | Path, batch_size: int = 8, device: str | None = None,
                 cpu_threads: int = 0) -> None:
        """`cpu_threads`: torch threads on CPU (the actor's cores), so actors sharing a machine do not oversubscribe
        it whatever OMP_NUM_THREADS the environment carries; 0 leaves torch's default."""
        import torch

        from unifit.models import cpu_has_fast_bf16, load_model, load_tokenizer

        self.name = model_cfg.name
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cpu" and cpu_threads > 0:
            torch.set_num_threads(cpu_threads)
        if self.device == "cpu" and model_cfg.dtype == "bfloat16" and not cpu_has_fast_bf16():
            log.warning("model.dtype=bfloat16, but this CPU has no native bf16 arithmetic (avx512_bf16, amx_bf16 or Arm bf16): "
                        "%s generates in float32, which is faster here", model_cfg.name)
            model_cfg = dataclasses.replace(model_cfg, dtype="float32")
        self.tokenizer = load_tokenizer(model_cfg, cache_dir)
        self.tokenizer.padding_side = "left"
        self.model = load_model(model_cfg, cache_dir, device=self.device).eval()
        self._stop_ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id} - {None}

    def complete(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        results: list[Completion] = []
        for start in range(0, len(conversations), self.batch_size):
            results.extend(self._complete_batch(conversations[start : start + self.batch_size], params))
        return results


    def choose(self, conversations: Sequence[Conversation], options: Sequence[str]) -> list[Choice]:
        """Pick one option per conversation by the probability of the reply being that option (never a parse failure).

        Each option is scored as the start of the assistant turn; when one option is a prefix of another
        ("1" and "10"), every option is scored with the end-of-turn token after it, so it means "exactly this".
        """
        from unifit.llm.choice import choice_from_logprobs, needs_terminator, score_continuations

        terminator = [self.tokenizer.eos_token_id] if needs_terminator(options) and self.tokenizer.eos_token_id is not None else []
        options_ids = [self.tokenizer(option, add_special_tokens=False)["input_ids"] + terminator for option in options]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        choices = []
        for conversation in conversations:
            prompt = self.tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            choices.append(choice_from_logprobs(score_continuations(self.model, prompt_ids, options_ids, pad_id)))
        return choices

    def _complete_batch(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        import torch

        prompts = [self.tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True) for c in conversations]
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling = params.temperature > 0
        torch.manual_seed(params.seed)
        with torch.inference_mode():
            output = self.model.generate(
                **encoded,
                max_new_tokens=params.max_new_tokens,
                do_sample=sampling,
                temperature=params.temperature if sampling else None,
                top_p=params.top_p if sampling else None,
                top_k=None,
                repetition_penalty=params.repetition_penalty,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=sorted(self._stop_ids),
            )
        new_tokens = output[:, encoded["input_ids"].shape[1] :].tolist()
        completions = []
        for tokens in new_tokens:
            stop_at = next((i for i, token in enumerate(tokens) if token in self._stop_ids), None)
            kept = tokens if stop_at is None else tokens[:stop_at]
            text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
            completions.append(Completion(text, "length" if stop_at is None else "stop", len(kept)))
        return completions
