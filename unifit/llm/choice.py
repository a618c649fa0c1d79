"""Choosing among fixed options by the model's own probabilities, so a local judge always returns a verdict.

Three sources of probabilities, one normalisation (`choice_from_logprobs`):
- local weights (hf): the total log-probability of each option's tokens after the prompt, the prompt run
  once and the options batched on copies of its cache (`score_continuations`);
- OpenAI-compatible servers (OpenAI, `vllm serve`): the `top_logprobs` of the token where the reply
  commits to an option (`choice_from_token_logprobs`);
- vLLM engines: the same, from vLLM's per-token logprob dicts (`choice_from_vllm_logprobs`).
Free text is the last resort (`choice_from_text`), for endpoints that return no logprobs.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Mapping, Optional, Sequence

from unifit.llm.base import Choice


def choice_from_logprobs(logprobs: Sequence[float]) -> Choice:
    """Softmax over the options' total log-probabilities; the most probable option wins (the first one on a tie)."""
    if not logprobs:
        raise ValueError("no options to choose from")
    top = max(logprobs)
    if top == -math.inf:
        raise ValueError("every option has probability 0")
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    probs = tuple(w / total for w in weights)
    return Choice(index=max(range(len(probs)), key=lambda i: (probs[i], -i)), probs=probs)


def needs_terminator(options: Sequence[str]) -> bool:
    """True when an option is a prefix of another ("1" and "10"): only "option, then end of reply" tells them apart."""
    return any(a != b and b.startswith(a) for a in options for b in options)


def score_continuations(model: Any, prompt_ids: Sequence[int], options_ids: Sequence[Sequence[int]], pad_id: int) -> list[float]:
    """Total log-probability of each option's tokens after the prompt: the prompt runs once, the k options then run
    together as right-padded rows on k copies of its key/value cache.

    A judge prompt is hundreds of tokens and an option a few, so this costs one prompt instead of k (a 10-way
    score: a tenth of the compute). `model(input_ids=, attention_mask=, cache=, use_cache=, logits_to_keep=)` is
    the transformers causal-LM contract: `.logits` for the last `logits_to_keep` positions and `.cache` a cache
    with `batch_repeat_interleave`.
    """
    import torch

    if not prompt_ids:
        raise ValueError("the prompt needs at least one token")
    if not options_ids or any(len(ids) == 0 for ids in options_ids):
        raise ValueError("every option needs at least one token")
    k, width = len(options_ids), max(len(ids) for ids in options_ids)
    device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
    # the rows start with the prompt's last token, whose logits predict each option's first token
    head, last = list(prompt_ids[:-1]), prompt_ids[-1]
    rows = [[last] + list(ids) + [pad_id] * (width - len(ids)) for ids in options_ids]
    mask = [[1] * (len(head) + 1 + len(ids)) + [0] * (width - len(ids)) for ids in options_ids]
    # transformers 5.24 renamed `past_key_values` to `cache` (argument and output); earlier releases take the old name
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        cached: dict[str, Any] = {}
        if head:
            head_mask = torch.ones(1, len(head), dtype=torch.long, device=device)
            output = model(input_ids=torch.tensor([head], device=device), attention_mask=head_mask, use_cache=True, logits_to_keep=1)
            cache = getattr(output, cache_name)
            cache.batch_repeat_interleave(k)
            cached = {cache_name: cache, "use_cache": True}
        logits = model(input_ids=torch.tensor(rows, device=device), attention_mask=torch.tensor(mask, device=device),
                       logits_to_keep=width + 1, **cached).logits
    # logits[:, j] predicts the token at position len(prompt) + j
    logprobs = torch.log_softmax(logits[:, :width].float(), dim=-1)
    totals = []
    for row, ids in enumerate(options_ids):
        picked = logprobs[row, torch.arange(len(ids), device=device), torch.tensor(list(ids), device=device)]
        totals.append(float(picked.sum()))
    return totals


def _token_option(prefix: str, token: str, options: Sequence[str]) -> Optional[int]:
    """The option that `prefix + token` commits to: an exact match, else the only option it starts; None otherwise."""
    text = (prefix + token).strip()
    if not token.strip():
        return None
    exact = [i for i, option in enumerate(options) if option == text]
    if exact:
        return exact[0]
    started = [i for i, option in enumerate(options) if option.startswith(text) and len(text) > len(prefix.strip())]
    return started[0] if len(started) == 1 else None


def _common_prefix(options: Sequence[str]) -> str:
    first, last = min(options), max(options)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def choice_from_token_logprobs(content: Sequence[Mapping[str, Any]], options: Sequence[str]) -> Optional[Choice]:
    """Choice from an OpenAI-style `logprobs.content` list (`token`, `logprob`, `top_logprobs`), or None if the
    reply never reaches a token that commits to an option.

    The decision point is the first generated token that, after the options' common prefix (e.g. "[["),
    names an option; the probability mass of each option is summed over the `top_logprobs` there.
    Options missing from the top list get probability 0 (they were less likely than every listed token).
    """
    common = _common_prefix(options)
    text = ""
    for entry in content:
        token = str(entry.get("token", ""))
        if text.rstrip().endswith(common) and _token_option(common, token, options) is not None:
            mass = [0.0] * len(options)
            tops = entry.get("top_logprobs") or [{"token": token, "logprob": entry.get("logprob", 0.0)}]
            for top in tops:
                index = _token_option(common, str(top.get("token", "")), options)
                if index is not None:
                    mass[index] += math.exp(float(top["logprob"]))
            return choice_from_logprobs([math.log(m) if m > 0 else -math.inf for m in mass])
        text += token
    return None


def choice_from_vllm_logprobs(token_ids: Sequence[int], logprobs: Sequence[Mapping[int, Any]], options: Sequence[str]) -> Optional[Choice]:
    """The same for vLLM's `CompletionOutput`: `logprobs[p]` maps token id -> Logprob(logprob, rank, decoded_token)."""
    content = []
    for token_id, candidates in zip(token_ids, logprobs):
        sampled = candidates.get(token_id)
        content.append({
            "token": getattr(sampled, "decoded_token", "") or "",
            "logprob": getattr(sampled, "logprob", 0.0),
            "top_logprobs": [{"token": c.decoded_token or "", "logprob": c.logprob} for c in candidates.values()],
        })
    return choice_from_token_logprobs(content, options)


def choice_from_text(text: str, options: Sequence[str]) -> Optional[Choice]:
    """Free-text fallback: the one option the reply states (all of it, or as the only option named in it); else None.

    Probabilities are one-hot: a text reply says nothing about how sure the model was.
    """
    stripped = text.strip()
    hits = [i for i, option in enumerate(options) if stripped == option]
    if not hits:
        named = {i for i, option in enumerate(options) if re.search(r"(?<!\w)" + re.escape(option) + r"(?!\w)", text)}
        hits = sorted(named) if len(named) == 1 else []
    if not hits:
        return None
    return Choice(index=hits[0], probs=tuple(1.0 if i == hits[0] else 0.0 for i in range(len(options))))
