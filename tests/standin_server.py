"""A stand-in for the GPU model server (`vllm serve`), for runs at scale where no GPU is lent.

It is `garbage_server.GarbageServer` with every reply well-formed: the same prompt recognition
(`garbage_server.classify`, every UNIFIT prompt kind) and the same reply formats the pipeline's parsers read,
but with the free-text parts — questions, answers, tasks — drawn from a seeded generator over a 4,096-word
pseudo-vocabulary, of varied length and wording, so near-duplicate removal keeps almost every instance.
Each reply is a pure function of (conversation, seed). `GET /v1/models` and `GET /metrics` (vLLM's Prometheus
counter names) answer like vLLM's server; `seconds_per_token` holds each request for its completion tokens
times that delay, as a GPU decoding one sequence at 1/seconds_per_token tokens per second would.

Run alone: `python tests/standin_server.py --port 8000 --api-key-env KEY_ENV [--seconds-per-token 0.0]`
(prints its URL, serves until killed). `bench/scale_bench.py` and `tests/test_scale_pipeline.py` use it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from typing import Any, Optional

from garbage_server import (FOLLOWUP_QUESTION, LEAF_QUESTION, SELF_INSTRUCT_TASK, SYLLABLES, TOKEN, GarbageServer, Record,
                            Script, digest, good_reply)

VOCABULARY = [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES]  # 4,096 pseudo-words
LINKS = ("the", "a", "each", "every", "its", "their", "of", "to", "for", "with", "before", "after", "when", "while",
         "because", "unless", "and", "or", "then", "so")
VERBS = ("checks", "records", "rotates", "validates", "blocks", "signs", "caches", "forwards", "rejects", "logs",
         "compares", "renews", "filters", "limits", "encrypts", "audits")
# Parsed kinds whose wording the stand-in varies; the rest (concept names, verdicts, scores) keep the garbage server's.
VARIED_KINDS = ("qa", "question_list", "followup_question", "followup_qa", "self_instruct", "test_question")


class StandinScript(Script):
    """Always well-formed; free text varied per (conversation, seed); counts requests instead of keeping them all.

    `answer_words`: mean answer length in words (answers run from half to one and a half times that).
    `keep_records`: also keep one `Record` per request (tests account for them; a 500K run would not fit them).
    """

    def __init__(self, *, answer_words: int = 120, keep_records: bool = False) -> None:
        super().__init__(garbage={})
        self.answer_words = answer_words
        self.keep_records = keep_records
        self.kinds: Counter[str] = Counter()

    def record(self, record: Record) -> None:
        with self._lock:
            self.kinds[record.prompt_kind] += 1
            if self.keep_records:
                self.records.append(record)

    def reply(self, messages: list[dict[str, str]], seed: int, max_tokens: int, json_mode: bool) -> tuple[str, str]:
        """As a server does: a reply longer than `max_tokens` is cut there and finishes with "length"."""
        text, finish = super().reply(messages, seed, max_tokens, json_mode)
        tokens = list(TOKEN.finditer(text))
        if len(tokens) > max_tokens:
            return text[: tokens[max_tokens - 1].end()], "length"
        return text, finish

    def good_reply(self, kind: str, fields: dict[str, str], salt: str, json_mode: bool) -> str:
        rng = random.Random(digest(salt, "standin"))
        topic = fields.get("topic", "")
        n = int(fields.get("n", 2))
        if kind == "qa":
            return "\n".join(f"Question {i}: {self.question(rng, LEAF_QUESTION, topic)}\nAnswer {i}: {self.prose(rng, topic)}"
                             for i in range(1, n + 1))
        if kind == "question_list":
            return "Here are the questions:\n" + "\n".join(f"{i}. {self.question(rng, LEAF_QUESTION, topic)}" for i in range(1, n + 1))
        if kind == "followup_question":
            return self.question(rng, FOLLOWUP_QUESTION, "")
        if kind == "followup_qa":
            return f"Question: {self.question(rng, FOLLOWUP_QUESTION, '')}\nAnswer: {self.prose(rng, '')}"
        if kind == "self_instruct":
            return "\n".join(f"{i}. {self.task(rng)}" for i in range(1, n + 1))
        if kind == "test_question":
            return f"Which {self.phrase(rng, 3)} setting of {topic} matters most for {self.phrase(rng, 3)}?"
        if kind.startswith("answer:"):
            return self.prose(rng, topic[:60])
        return good_reply(kind, fields, salt, json_mode)

    @staticmethod
    def phrase(rng: random.Random, words: int) -> str:
        return " ".join(rng.choice(VOCABULARY) if rng.random() < 0.6 else rng.choice(LINKS) for _ in range(words))

    def task(self, rng: random.Random) -> str:
        """A Self-Instruct task, as alike to the others as real instructions are (tests/test_standin_server.py): the
        opening answer requests are told apart by, then 7 to 13 words of its own."""
        return self.question(rng, SELF_INSTRUCT_TASK, "")

    def question(self, rng: random.Random, opening: str, topic: str) -> str:
        """`opening` kept (answer requests are told apart by it), then words of its own: no two questions alike."""
        about = f" {topic}" if topic else ""
        return f"{opening}{about} {rng.choice(VERBS)} {self.phrase(rng, rng.randint(6, 12))}?"

    def prose(self, rng: random.Random, topic: str) -> str:
        """An answer of `answer_words` ± 50 % words in sentences of 8 to 20 words."""
        target = rng.randint(max(4, self.answer_words // 2), max(4, self.answer_words * 3 // 2))
        sentences, words = [], 0
        if topic:
            sentences.append(f"{topic} {rng.choice(VERBS)} {self.phrase(rng, 6)}.")
            words += len(sentences[0].split())
        while words < target:
            length = rng.randint(8, 20)
            sentence = f"{rng.choice(VOCABULARY).capitalize()} {rng.choice(VERBS)} {self.phrase(rng, length - 2)}."
            sentences.append(sentence)
            words += length
        return " ".join(sentences)


class StandinServer(GarbageServer):
    """The stand-in's HTTP side: decode delay, and the busy time a run spends waiting on it (for `/metrics`)."""

    def __init__(self, api_key: str, *, model: str = "standin-llm", seconds_per_token: float = 0.0,
                 answer_words: int = 120, keep_records: bool = False) -> None:
        super().__init__(api_key, StandinScript(answer_words=answer_words, keep_records=keep_records), model=model)
        self.seconds_per_token = seconds_per_token
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reasons: Counter[str] = Counter()
        self.busy_seconds = 0.0  # time with at least one request in flight: the run's time inside model calls
        self._in_flight = 0
        self._busy_since = 0.0

    def respond(self, path: str, authorization: str, body: bytes) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if self._in_flight == 0:
                self._busy_since = time.perf_counter()
            self._in_flight += 1
        try:
            status, payload = super().respond(path, authorization, body)
        finally:
            with self._lock:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self.busy_seconds += time.perf_counter() - self._busy_since
        if status == 200 and payload.get("choices"):
            with self._lock:
                self.finish_reasons[payload["choices"][0]["finish_reason"]] += 1
        return status, payload

    def served(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
        if self.seconds_per_token > 0:
            time.sleep(completion_tokens * self.seconds_per_token)

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            busy = self.busy_seconds + (time.perf_counter() - self._busy_since if self._in_flight else 0.0)
            return {"requests": self.requests, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                    "busy_seconds": busy, "finish_reasons": dict(self.finish_reasons), "kinds": dict(self.script.kinds)}

    def prometheus(self) -> str:
        """The counters in Prometheus text format, under vLLM's metric names where vLLM has one."""
        m = self.metrics()
        label = f'model_name="{self.model}"'
        lines = [f"vllm:prompt_tokens_total{{{label}}} {m['prompt_tokens']}",
                 f"vllm:generation_tokens_total{{{label}}} {m['completion_tokens']}",
                 *(f'vllm:request_success_total{{{label},finished_reason="{reason}"}} {count}'
                   for reason, count in sorted(m["finish_reasons"].items())),
                 f"standin:busy_seconds_total{{{label}}} {m['busy_seconds']:.6f}",
                 *(f'standin:requests_total{{{label},prompt_kind="{kind}"}} {count}' for kind, count in sorted(m["kinds"].items()))]
        return "\n".join(lines) + "\n"

    def respond_get(self, path: str, authorization: str) -> tuple[int, Any]:
        if path == "/metrics":  # vLLM serves its Prometheus metrics without a key
            return 200, self.prometheus()
        return super().respond_get(path, authorization)


def parse_prometheus(text: str) -> dict[str, float]:
    """`/metrics` as {name{labels}: value}, for a bench that reads the server's counters."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key-env", required=True, help="environment variable holding the key clients must send")
    parser.add_argument("--model", default="standin-llm")
    parser.add_argument("--seconds-per-token", type=float, default=0.0)
    parser.add_argument("--answer-words", type=int, default=120)
    args = parser.parse_args(argv)
    key = os.environ.get(args.api_key_env)
    if not key:
        parser.error(f"${args.api_key_env} is empty: export the key the pipeline will send")
    server = StandinServer(key, model=args.model, seconds_per_token=args.seconds_per_token, answer_words=args.answer_words)
    server.start(args.host, args.port)
    print(json.dumps({"url": server.url.replace("127.0.0.1", args.host)}), flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
