"""OpenAI-compatible chat endpoint (GPT-4, or `vllm serve` of a local judge), stdlib HTTP only.

The API key is read from the environment variable named in config at call time; it never lives in the
config object, so config dumps, logs and W&B cannot contain it.

Requests go out `concurrency` at a time from threads that live as long as the model object, each over its own
keep-alive connection: a 500K-instance run sends millions of requests, and a new TCP connection (and thread)
per request would cost the driver more than the server spends on short replies.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from unifit.llm.base import Choice, Completion, Conversation, GenerationParams

log = logging.getLogger(__name__)
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """The endpoint kept failing after all retries, or refused the request outright."""


class _HTTPStatusError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class _Connections:
    """One keep-alive connection per thread to the endpoint's host, through the environment's proxy when one applies
    (`https_proxy`/`http_proxy`/`no_proxy`, read as urllib reads them)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"backend.url must be an http(s) URL, got {url!r}")
        self.https = parts.scheme == "https"
        self.timeout_s = timeout_s
        host, port = parts.hostname, parts.port or (443 if self.https else 80)
        self.address, self.tunnel = (host, port), None  # whom the socket connects to; the CONNECT target behind a proxy
        self.target = urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))  # what the request line asks for
        self.proxy_headers: dict[str, str] = {}
        proxy = None if urllib.request.proxy_bypass(host) else urllib.request.getproxies().get(parts.scheme)
        if proxy:
            proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            self.address = (proxy_parts.hostname or "", proxy_parts.port or 80)
            if proxy_parts.username:
                credentials = f"{urllib.parse.unquote(proxy_parts.username)}:{urllib.parse.unquote(proxy_parts.password or '')}"
                self.proxy_headers["Proxy-Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
            if self.https:  # CONNECT through the proxy, TLS with the endpoint itself
                self.tunnel = (host, port)
            else:  # a plain-HTTP proxy takes the absolute URL
                self.target = url
        self._local = threading.local()

    def _open(self) -> http.client.HTTPConnection:
        connection_class = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        connection = connection_class(*self.address, timeout=self.timeout_s)
        if self.tunnel:
            connection.set_tunnel(*self.tunnel, headers=self.proxy_headers)
        return connection

    def post(self, body: bytes, headers: dict[str, str]) -> bytes:
        """The response body of a 2xx answer; `_HTTPStatusError` otherwise. A kept-alive connection the server has
        closed meanwhile is reopened once at no retry's cost, as browsers do (a request is a pure function of its
        seed, so sending it twice is harmless)."""
        for reused in (True, False):
            connection = getattr(self._local, "connection", None)
            if connection is None:
                connection, reused = self._open(), False
                self._local.connection = connection
            try:
                connection.request("POST", self.target, body, headers if self.tunnel else {**headers, **self.proxy_headers})
                response = connection.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close_mine()
                if reused:
                    continue
                raise
            except BaseException:
                self.close_mine()
                raise
            if response.will_close:
                self.close_mine()
            if not 200 <= response.status < 300:
                raise _HTTPStatusError(response.status)
            return data
        raise AssertionError("unreachable")

    def close_mine(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None


class OpenAIChatModel:
    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_retries: int = 4,
                 timeout_s: float = 120.0, concurrency: int = 8, backoff_base_s: float = 0.5, guided_choice: bool = False) -> None:
        self.name = model
        self.url = url.rstrip("/") + "/chat/completions"
        self._connections = _Connections(self.url, timeout_s)
        self._executor: Optional[ThreadPoolExecutor] = None  # started on the first call, kept (with its connections)
        self._executor_lock = threading.Lock()
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
            try:
                data = json.loads(self._connections.post(body, self._headers()))
                choice = data["choices"][0]
                usage = data.get("usage") or {}
                return Completion(choice["message"].get("content") or "", choice.get("finish_reason") or "stop",
                                  int(usage.get("completion_tokens", 0))), choice
            except _HTTPStatusError as error:
                last_error = f"HTTP {error.status}"
                if error.status not in RETRYABLE_STATUS:
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

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai")
            return self._executor

    def close(self) -> None:
        """Stop the request threads (their connections close with them)."""
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def complete(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        return list(self._pool().map(lambda conv: self._post(self._payload(conv, params)), conversations))

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

        return list(self._pool().map(one, conversations))
