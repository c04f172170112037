"""The HTTP side of a served teacher: a vLLM OpenAI-compatible server, through the standard library.

`Client` knows the server's address (`http(s)://HOST:PORT/v1`, optionally `?model=NAME`
where it serves several), sends JSON, and tells apart

- a refusal (HTTP 4xx: a prompt too long, more log-probs than the server allows, a model it
  does not serve): `ServerError`, a ValueError whose message is the server's own;
- a transient fault (connection refused or reset, a timeout, HTTP 5xx or 429, a body cut
  short): retried after 0.5, 1, 2, ... s (at most 30 s apart), each retry said on stderr;
  when the retries are spent, `TeacherUnavailable`.

An API key, where the server wants one (`vllm serve --api-key`), is read from the
environment variable HPD_TEACHER_API_KEY.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

API_KEY_ENV = "HPD_TEACHER_API_KEY"
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


class ServerError(ValueError):
    """The teacher server refused a request, or is not the teacher the run needs."""


class TeacherUnavailable(RuntimeError):
    """The teacher server stopped answering (its retries are spent); str() says what happened."""


def is_url(source: str) -> bool:
    """Whether a teacher SOURCE names a server rather than a model folder or hub id."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    reason = getattr(error, "reason", None) or error
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, ConnectionResetError):
        return "connection reset"
    return f"{type(reason).__name__}: {reason}".rstrip(": ")


class Client:
    def __init__(self, url: str, *, timeout: float = 120.0, retries: int = 5,
                 say: Callable[[str], None] | None = None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ServerError(f"teacher {url!r}: a served teacher is http(s)://HOST:PORT/v1")
        path = parts.path.rstrip("/")
        if path and not path.endswith("/v1"):
            raise ServerError(f"teacher {url!r}: the server's OpenAI API ends in /v1 (http(s)://HOST:PORT/v1)")
        self.url = url
        self.api = f"{parts.scheme}://{parts.netloc}{path or '/v1'}"  # /v1/completions, /v1/models
        self.root = self.api[: -len("/v1")]  # /tokenize, /detokenize
        self.model = urllib.parse.parse_qs(parts.query).get("model", [""])[0]
        self.timeout, self.retries = float(timeout), int(retries)
        self.say = say or (lambda m: print(m, file=sys.stderr, flush=True))
        self.closed = threading.Event()  # set when the run ends: retries stop waiting
        self._lock = threading.Lock()
        self.retried = 0  # retries so far (a step reports how many it saw)

    def take_retries(self) -> int:
        with self._lock:
            n, self.retried = self.retried, 0
        return n

    def _request(self, url: str, body: dict | None):
        headers = {"Content-Type": "application/json"}
        if os.environ.get(API_KEY_ENV):
            headers["Authorization"] = f"Bearer {os.environ[API_KEY_ENV]}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def call(self, path: str, body: dict | None = None, *, retries: int | None = None, api: bool = True):
        """The JSON answer to GET (body None) or POST `path` under /v1 (`api`) or the server's
        root; a refusal raises ServerError at once, a transient fault is retried."""
        url = (self.api if api else self.root) + path
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return self._request(url, body)
            except urllib.error.HTTPError as e:
                if e.code not in TRANSIENT_STATUS:
                    raise ServerError(f"teacher server {self.url}: {path} refused (HTTP {e.code}): "
                                      f"{_error_message(e)}") from None
                error = e
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                    json.JSONDecodeError) as e:
                error = e
            if attempt == retries or self.closed.is_set():
                break
            delay = min(0.5 * 2 ** attempt, 30.0)
            with self._lock:
                self.retried += 1
            self.say(f"teacher server {self.url}: {path} failed ({_describe(error)}); "
                     f"retry {attempt + 1} of {retries} in {delay:g} s")
            if self.closed.wait(delay):
                break
        tries = f"{retries + 1} tries" if retries else "1 try"
        raise TeacherUnavailable(f"teacher server {self.url} is unreachable: {path} failed after {tries} "
                                 f"({_describe(error)})")

    def prompt_logprobs(self, model: str, prompts: list[list[int]], k: int, *, retries: int | None = None) -> list:
        """Each prompt's `prompt_logprobs` (top k per position and the prompt's own token), in order."""
        answer = self.call("/completions", {"model": model, "prompt": prompts, "max_tokens": 1, "temperature": 0,
                                            "prompt_logprobs": k}, retries=retries)
        choices = sorted(answer.get("choices") or [], key=lambda c: c["index"])
        if len(choices) != len(prompts) or any(len(c.get("prompt_logprobs") or []) != len(p)
                                               for c, p in zip(choices, prompts)):
            raise TeacherUnavailable(f"teacher server {self.url}: the answer to {len(prompts)} prompts does not "
                                     "hold one row of log-probs per prompt token")
        return [c["prompt_logprobs"] for c in choices]


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read() or b"null")
    except (json.JSONDecodeError, OSError):
        return str(error.reason)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if body.get("message"):
            return str(body["message"])
    return str(error.reason)


__all__ = ["Client", "ServerError", "TeacherUnavailable", "is_url", "API_KEY_ENV"]
