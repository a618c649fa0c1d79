"""OpenAI-compatible chat endpoint (GPT-4, or `vllm serve` of a local judge), stdlib HTTP only.

The API key is read from the environment variable named in config at call time; it never lives in the
config object, so config dumps, logs and W&B cannot contain it.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from unifit.llm.base import Choice, Completion, Conversation, GenerationParams

log = logging.getLogger(__name__)
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """The endpoint kept failing after all retries, or refused the request outright."""


class OpenAIChatModel:
    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_retries: int = 4,
                 timeout_s: float = 120.0, concurrency: int = 8, backoff_base_s: float = 0.5, guided_choice: bool = False) -> None:
        self.name = model
        self.url = url.rstrip("/") + "/chat/completions"
        self.api_key_env = api_key_env
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.backoff_base_s = backoff_base_s
        self.guided_choice = guided_choice  # vLLM's server constrains the reply to the options; OpenAI refuses the field
        self._logprobs_refused = False  # set once the endpoint answers 4xx to a logprobs request

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _payload(self, conversation: Conversation, params: GenerationParams) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.name, "messages": list(conversation), "max_tokens": params.max_new_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "seed": params.seed,
        }
        if params.repetition_penalty != 1.0:  # vLLM's server accepts it; OpenAI ignores unknown sampling extras
            payload["repetition_penalty"] = params.repetition_penalty
        if params.json_mode:
            payload["response_format"] = {"type": "json_object"}
        return payload

    def _post(self, payload: dict[str, Any]) -> Completion:
        return self._post_raw(payload)[0]

    def _post_raw(self, payload: dict[str, Any]) -> tuple[Completion, dict[str, Any]]:
        """The completion and the raw first choice (which carries `logprobs` when they were asked for)."""
        body = json.dumps(payload).encode()
        last_error = ""
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    data = json.loads(response.read())
                choice = data["choices"][0]
                usage = data.get("usage") or {}
                return Completion(choice["message"].get("content") or "", choice.get("finish_reason") or "stop",
                                  int(usage.get("completion_tokens", 0))), choice
            except urllib.error.HTTPError as error:
                last_error = f"HTTP {error.code}"
                if error.code not in RETRYABLE_STATUS:
                    raise EndpointError(f"{self.url} refused the request ({last_error}); check backend.url, "
                                        f"backend.api_model and ${self.api_key_env}") from None
            except (OSError, http.client.HTTPException, ValueError, LookupError, TypeError, AttributeError) as error:
                # connection/timeout failures and malformed bodies (not JSON, no choices): retried like a 5xx
                last_error = type(error).__name__
            if attempt < self.max_retries:
                delay = self.backoff_base_s * (2**attempt) * (1 + random.random() * 0.1)
                log.warning("%s failed (%s); retry %d/%d in %.1fs", self.url, last_error, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise EndpointError(f"{self.url} failed {self.max_retries + 1} times (last: {last_error})")

    def complete(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda conv: self._post(self._payload(conv, params)), conversations))

    def choose(self, conversations: Sequence[Conversation], options: Sequence[str],
               params: GenerationParams = GenerationParams(max_new_tokens=16)) -> list[Optional[Choice]]:
        """Greedy reply with `top_logprobs` (and vLLM's `guided_choice` where enabled); the option probabilities are
        read at the token where the reply commits to an option. An endpoint that refuses logprobs is asked for
        plain text instead, parsed for the one option it names (one-hot); None where the reply names none."""
        from unifit.llm.choice import choice_from_text, choice_from_token_logprobs

        def one(conversation: Conversation) -> Optional[Choice]:
            payload = self._payload(conversation, dataclasses.replace(params, temperature=0.0, json_mode=False))
            if self.guided_choice:
                payload["guided_choice"] = list(options)
            if not self._logprobs_refused:
                try:
                    completion, raw = self._post_raw({**payload, "logprobs": True, "top_logprobs": 20})
                except EndpointError as error:
                    if "refused the request" not in str(error):
                        raise
                    log.warning("%s refused logprobs (%s); judging from the reply text", self.url, error)
                    self._logprobs_refused = True
                else:
                    content = ((raw.get("logprobs") or {}).get("content")) or []
                    return choice_from_token_logprobs(content, options) or choice_from_text(completion.text, options)
            return choice_from_text(self._post(payload).text, options)

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, conversations))
