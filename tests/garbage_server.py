"""An OpenAI-compatible chat server on 127.0.0.1 that answers like an unreliable model.

`POST /v1/chat/completions` with the real request and response shapes (`choices[0].message.content`,
`finish_reason` "stop"/"length", `usage`), a Bearer key check (401 otherwise) and `response_format`
JSON mode honoured. Each reply is a pure function of the request (prompt, seed, re-ask turn), like a
seeded sampler: identical requests get identical replies, whatever the concurrency. It recognises every
UNIFIT prompt (the default templates in `unifit.config`) and answers either well-formed or with one of
the garbage kinds below; some prompts get garbage on every attempt, others only on some, so both
"a retry succeeded" and "retries exhausted" happen. Every request is recorded for the test to account for.
`ScriptedModel` serves the same script in process (a model client: `complete`).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

GOOD = "good"
EMPTY, TRUNCATED, WRONG_FORMAT, OTHER_LANGUAGE, REPETITION = "empty", "truncated", "wrong_format", "other_language", "repetition"
GARBAGE_KINDS: tuple[str, ...] = (EMPTY, TRUNCATED, WRONG_FORMAT, OTHER_LANGUAGE, REPETITION)
# Prompt kinds answered by free text (no format to get wrong); the rest are parsed.
ANSWER_KINDS: tuple[str, ...] = ("answer:leaf", "answer:followup", "answer:self_instruct", "answer:other")
# Well-formed questions/tasks start like this, so an answer request tells which stage asked it.
LEAF_QUESTION, FOLLOWUP_QUESTION, SELF_INSTRUCT_TASK = "How does", "What happens next", "Explain how"

SYLLABLES = ["ka", "lo", "mi", "ra", "ve", "tu", "no", "si", "pe", "za", "qui", "dor", "mel", "vak", "tor", "sen"]
DIMENSIONS = ("scope", "complexity", "practicality", "depth", "clarity", "correlation")


def digest(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


def word(*parts: object) -> str:
    """A pseudo-word from a hash: distinct prompts get distinct vocabulary (so dedup and novelty filters pass)."""
    value = digest(*parts)
    return "".join(SYLLABLES[(value >> (4 * i)) % len(SYLLABLES)] for i in range(3)).capitalize()


@dataclass(frozen=True)
class Record:
    """One request as the server saw it."""

    prompt_kind: str
    key: str  # judge/diversity: the first prompt (a re-ask appends the bad reply and a reminder); else the whole conversation
    reasked: bool  # the conversation carries an earlier reply (a judge/diversity re-ask); every re-ask also has a new seed
    seed: int
    reply_kind: str  # good, or one of GARBAGE_KINDS
    finish_reason: str
    last_user: str
    max_tokens: int


def classify(messages: list[dict[str, str]]) -> tuple[str, dict[str, str]]:
    """The prompt kind of a conversation and the fields its template filled in."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    first, last = users[0], users[-1]
    if first.startswith("You are a fair judge."):
        return "judge", {"k": re.search(r"\(1 to (\d+)\)", first).group(1)}
    if re.match(r"Here are \d+ instructions sampled from", first):
        return "diversity", {}
    patterns = [
        ("concepts", r"Please generate (?P<n>\d+) sub-concepts for (?P<topic>.+?) in the domain of"),
        ("qa", r"Please generate (?P<n>\d+) questions for (?P<topic>.+?) \(.*?\) and provide answers"),
        ("question_list", r"Please generate (?P<n>\d+) questions about (?P<topic>.+?) \(.*?\) in .+?\. Reply with a numbered list"),
        ("followup_qa", r'Based on the question "(?P<topic>.+)", generate a new question .*and provide the answer'),
        ("followup_question", r'Based on the question "(?P<topic>.+)", generate a new question'),
        ("self_instruct", r"Here are some example tasks about (?P<topic>.+?):\n.*Come up with (?P<n>\d+) new tasks"),
        ("test_question", r"Write one new question that a user might ask about (?P<topic>.+?) \("),
    ]
    for kind, pattern in patterns:
        match = re.match(pattern, last, re.DOTALL)
        if match:
            return kind, match.groupdict()
    for prefix, kind in ((LEAF_QUESTION, "answer:leaf"), (FOLLOWUP_QUESTION, "answer:followup"), (SELF_INSTRUCT_TASK, "answer:self_instruct")):
        if last.startswith(prefix):
            return kind, {"topic": last}
    return "answer:other", {"topic": last}


def good_reply(kind: str, fields: dict[str, str], salt: str, json_mode: bool) -> str:
    """A well-formed reply to a prompt of `kind`; `salt` (prompt + seed) varies the vocabulary."""
    n = int(fields.get("n", 2))
    topic = fields.get("topic", "")
    w = lambda i: word(salt, i)  # noqa: E731
    if kind == "concepts":
        items = [f"{w(i)} {w(i + 10)}" for i in range(n)]
        if json_mode:
            return json.dumps({"concepts": items})
        return f"Here are {n} sub-concepts for {topic}:\n" + "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))
    if kind == "question_list":
        return "Here are the questions:\n" + "\n".join(
            f"{i}. {LEAF_QUESTION} {topic} handle {w(i)} {w(i + 10)} during {w(i + 20)}?" for i in range(1, n + 1))
    if kind == "qa":
        return "\n".join(f"Question {i}: {LEAF_QUESTION} {topic} handle {w(i)} {w(i + 10)}?\n"
                         f"Answer {i}: {topic} checks {w(i)} against {w(i + 20)} and logs every result." for i in range(1, n + 1))
    if kind == "followup_question":
        return f"{FOLLOWUP_QUESTION} when {w(1)} {w(2)} meets {w(3)}?"
    if kind == "followup_qa":
        return (f"Question: {FOLLOWUP_QUESTION} when {w(1)} {w(2)} meets {w(3)}?\n"
                f"Answer: Next, {w(1)} is checked again and the outcome is recorded for {w(4)}.")
    if kind == "self_instruct":
        return "\n".join(f"{i}. {SELF_INSTRUCT_TASK} {w(i)} {w(i + 10)} affects {w(i + 20)} when {w(i + 30)} {w(i + 40)} is enabled."
                         for i in range(1, n + 1))
    if kind == "test_question":
        return f"Which {w(1)} {w(2)} setting of {topic} matters most for {w(3)}?"
    if kind == "judge":
        choice = 1 + digest(salt, "verdict") % int(fields["k"])
        return f"Answer {choice} is clearer and more complete. [[{choice}]]"
    if kind == "diversity":
        scores = {d: 1 + digest(salt, d) % 10 for d in DIMENSIONS}
        return json.dumps(scores) if json_mode else "\n".join(f"{d}: {s}" for d, s in scores.items())
    return f"{topic[:60]} works by checking {w(1)} and {w(2)} at every step, and it logs {w(3)} so operators can audit it."


def garbage_reply(kind: str, garbage: str, fields: dict[str, str], salt: str, json_mode: bool, max_tokens: int) -> str:
    """What models send now and then: nothing; a reply cut inside its first item (finish "length"); prose, or JSON
    without the asked structure, or an answer where a question was asked; another language, keeping the list or
    label format where there is one; the same phrase repeated until the token budget runs out (finish "length")."""
    topic = fields.get("topic", "it")[:40].replace("?", "")
    if garbage == EMPTY:
        return ""
    if garbage == TRUNCATED:  # cut inside the first item (or sentence): nothing complete survives
        lines = good_reply(kind, fields, salt, json_mode).split("\n")
        first = next((i for i, line in enumerate(lines) if re.match(r"\d+\.|Question", line)), 0)
        return "\n".join(lines[:first] + [lines[first][: max(3, len(lines[first]) // 2)]])
    if garbage == WRONG_FORMAT:
        if kind == "test_question":  # an answer where a question was asked
            return f"Answer: {topic} is configured by the administrator and checked regularly."
        prose = (f"{topic} is a broad subject with many aspects, and it is hard to say more than that it matters a great deal "
                 f"to every organisation that depends on it")
        return json.dumps({"summary": prose}) if json_mode else prose + "."
    if garbage == OTHER_LANGUAGE:
        if kind == "concepts":
            items = ["电子邮件认证机制", "垃圾邮件过滤技术"][: int(fields.get("n", 2))]
            if json_mode:
                return json.dumps({"concepts": items}, ensure_ascii=False)
            return "\n".join(f"{i}. {c}" for i, c in enumerate(items, 1))
        if kind in ("question_list", "self_instruct"):
            return "\n".join(f"{i}. Как правильно настроить защиту {topic} от подделки отправителя номер {i}?"
                             for i in range(1, int(fields.get("n", 2)) + 1))
        if kind in ("qa", "followup_qa"):
            return ("Question: Что произойдёт дальше с настройками безопасности?\n"
                    "Answer: Система снова проверит все записи и сохранит журнал.")
        if kind in ("followup_question", "test_question"):
            return f"Что произойдёт дальше с настройками безопасности {topic} после проверки?"
        return "这是一个关于网络安全的详细回答，涵盖了主要的要点和注意事项，但没有给出所要求的格式。"
    phrase = f"and {topic} is important "  # REPETITION: the same phrase until the token budget runs out
    return (phrase * (max_tokens // max(1, len(phrase.split())) + 1)).strip()


def request_identity(kind: str, messages: list[dict[str, str]]) -> tuple[str, bool]:
    """(key, reasked): judge/diversity re-asks extend the conversation; the other stages re-ask it unchanged (new seed)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    if kind in ("judge", "diversity"):
        return hashlib.sha256(users[0].encode()).hexdigest()[:16], len(users) > 1
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16], False


class Script:
    """Decides and renders replies, and records every request; shared by the HTTP server and the in-process model.

    `garbage`: prompt kind -> garbage kind sent on every attempt (in-process tests of one stage and one
    kind); prompt kinds not in it get the mix below (every kind when `garbage` is None, else well-formed).
    """

    def __init__(self, *, always_garbage_percent: int = 20, garbage_percent: int = 40, answer_garbage_percent: int = 25,
                 salt: str = "", garbage: Optional[dict[str, str]] = None) -> None:
        self.always_garbage_percent = always_garbage_percent  # parsed prompts: share that never gets a well-formed reply
        self.garbage_percent = garbage_percent  # parsed prompts: share of the other attempts answered with garbage
        self.answer_garbage_percent = answer_garbage_percent  # free-text answers (asked once, no re-asks)
        self.salt = salt
        self.garbage = garbage
        self.records: list[Record] = []
        self._lock = threading.Lock()

    def reply_kind(self, prompt_kind: str, key: str, seed: int) -> str:
        """good or a garbage kind: some prompts always get garbage, the others on a share of their attempts."""
        if self.garbage is not None:
            return self.garbage.get(prompt_kind, GOOD)
        draw = digest(self.salt, key, seed)
        if prompt_kind in ANSWER_KINDS:
            kinds = [k for k in GARBAGE_KINDS if k != WRONG_FORMAT]
            good = draw % 100 >= self.answer_garbage_percent
        else:
            kinds = list(GARBAGE_KINDS)
            good = digest(self.salt, key) % 100 >= self.always_garbage_percent and draw % 100 >= self.garbage_percent
        return GOOD if good else kinds[(draw // 100) % len(kinds)]

    def good_reply(self, kind: str, fields: dict[str, str], salt: str, json_mode: bool) -> str:
        """The well-formed reply (a subclass may vary its wording; it must keep what the parsers read)."""
        return good_reply(kind, fields, salt, json_mode)

    def record(self, record: Record) -> None:
        with self._lock:
            self.records.append(record)

    def reply(self, messages: list[dict[str, str]], seed: int, max_tokens: int, json_mode: bool) -> tuple[str, str]:
        """(text, finish_reason) for one request, recorded."""
        kind, fields = classify(messages)
        key, reasked = request_identity(kind, messages)
        reply_kind = self.reply_kind(kind, key, seed)
        salt = f"{key}:{seed}"
        if reply_kind == GOOD:
            text = self.good_reply(kind, fields, salt, json_mode)
        else:
            text = garbage_reply(kind, reply_kind, fields, salt, json_mode, max_tokens)
        finish = "length" if reply_kind in (TRUNCATED, REPETITION) else "stop"
        last_user = [m["content"] for m in messages if m["role"] == "user"][-1]
        self.record(Record(kind, key, reasked, seed, reply_kind, finish, last_user, max_tokens))
        return text, finish


class ScriptedModel:
    """The script in process, as a model client (`complete`)."""

    name = "scripted-garbage"

    def __init__(self, script: Script) -> None:
        self.script = script

    def complete(self, conversations: Any, params: Any) -> list[Any]:
        from unifit.llm.base import Completion

        replies = [self.script.reply(list(c), params.seed, params.max_new_tokens, params.json_mode) for c in conversations]
        return [Completion(text, finish, params.max_new_tokens if finish == "length" else len(text.split())) for text, finish in replies]


def send_json(handler: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
    """Answer an HTTP request with a JSON body, as an OpenAI-compatible server does."""
    send_body(handler, status, json.dumps(payload).encode(), "application/json")


def send_body(handler: BaseHTTPRequestHandler, status: int, data: bytes, content_type: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """Tokens as a BPE tokenizer roughly sees them: words and punctuation marks (for `usage`)."""
    return len(TOKEN.findall(text))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 2048  # the listen backlog (uvicorn's default): a pipeline's client pool connects in bursts


class GarbageServer:
    """`with GarbageServer(key) as server:` serves `script` on `server.url`; `server.script.records` logs the requests.

    Shaped like `vllm serve`: `GET /v1/models` lists the served model, `POST /v1/chat/completions` answers.
    `broken`: "500" answers every authorised request with HTTP 500, "no_choices" with a 200 whose body has no choices.
    """

    def __init__(self, api_key: str, script: Optional[Script] = None, broken: Optional[str] = None,
                 model: str = "garbage-llm", max_model_len: int = 4096) -> None:
        self.api_key = api_key
        self.script = script or Script()
        self.broken = broken
        self.model = model
        self.max_model_len = max_model_len
        self.unauthorized = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._httpd: Optional[ThreadingHTTPServer] = None

    @property
    def records(self) -> list[Record]:
        return self.script.records

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "GarbageServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as vLLM's uvicorn server: a client reuses its connections

            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                send_json(self, *server.respond(self.path, self.headers.get("Authorization", ""), body))

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                status, payload = server.respond_get(self.path, self.headers.get("Authorization", ""))
                if isinstance(payload, str):  # a text endpoint such as Prometheus' /metrics
                    send_body(self, status, payload.encode(), "text/plain; version=0.0.4")
                else:
                    send_json(self, status, payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = _HTTPServer((host, port), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def _refused(self, authorization: str) -> Optional[tuple[int, dict[str, Any]]]:
        if authorization == f"Bearer {self.api_key}":
            return None
        with self._lock:
            self.unauthorized += 1
        return 401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error", "code": "invalid_api_key"}}

    def respond_get(self, path: str, authorization: str) -> tuple[int, Any]:
        refused = self._refused(authorization)
        if refused:
            return refused
        if path != "/v1/models":
            return 404, {"error": {"message": f"Unknown path {path}", "type": "invalid_request_error"}}
        return 200, {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "vllm",
                                                 "root": self.model, "parent": None, "max_model_len": self.max_model_len}]}

    def respond(self, path: str, authorization: str, body: bytes) -> tuple[int, dict[str, Any]]:
        refused = self._refused(authorization)
        if refused:
            return refused
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": f"Unknown path {path}", "type": "invalid_request_error"}}
        if self.broken == "500":
            return 500, {"error": {"message": "The server had an error while processing your request.", "type": "server_error"}}
        request = json.loads(body)
        if self.broken == "no_choices":
            return 200, {"id": "chatcmpl-x", "object": "chat.completion", "choices": []}
        messages = request["messages"]
        max_tokens = int(request.get("max_tokens") or 256)
        json_mode = (request.get("response_format") or {}).get("type") == "json_object"
        text, finish = self.script.reply(messages, int(request.get("seed") or 0), max_tokens, json_mode)
        prompt_tokens = sum(count_tokens(m["content"]) for m in messages)
        tokens = max_tokens if finish == "length" else count_tokens(text)
        self.served(prompt_tokens, tokens)
        with self._lock:
            self.requests += 1
            number = self.requests
        return 200, {
            "id": f"chatcmpl-{number}", "object": "chat.completion", "created": 0, "model": request.get("model", ""),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens},
        }

    def served(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Called once per answered request before the reply leaves (the stand-in spends its decode time here)."""
