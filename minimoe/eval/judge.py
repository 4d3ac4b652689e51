"""An LLM judge behind any OpenAI-compatible chat endpoint, with retries and an on-disk verdict cache.

LLM-judged benchmarks (PrefEval) ask a judge model one question per check. This module is the client:
it posts ``{"model", "messages", "temperature", "max_tokens"}`` to ``URL/chat/completions`` (OpenAI,
vLLM, SGLang, llama.cpp's server, LiteLLM, ... all speak it) with the standard library only
(``urllib``: no new dependency), and returns ``choices[0].message.content``.

* The API key is read from an environment variable named by the caller (``--judge-key-env``), at the
  first request; it is sent as ``Authorization: Bearer ...`` and never written to a file, a log, an
  error message or the cache. An empty variable name sends no key (a local server started without one).
* A 429, a 5xx, a timeout, a refused connection or a 200 whose body is not a chat completion is retried
  with exponential backoff (``backoff * 2**attempt`` seconds, at most ``max_backoff``; a numeric
  ``Retry-After`` is honoured up to the same cap), at most ``retries`` times; then :class:`JudgeError`
  names the URL and the last failure. Any other 4xx (a wrong key, model or URL) fails at once.
* Every answer is appended to a :class:`VerdictCache` before it is used, keyed by the judge model and a
  hash of the exact request: an interrupted evaluation asks again only what it had not been told.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import Message
from pathlib import Path

RETRY_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))


class JudgeError(ValueError):
    """The judge cannot be asked (no key, unreachable, refusing). A ValueError so ``minimoe eval`` reports it as
    one line and exits 2; the completions and graded problems kept in ``OUT.partial`` are not lost."""


def chat_url(url: str) -> str:
    """The chat-completions endpoint of ``url``: a base such as ``http://localhost:8000/v1`` gets
    ``/chat/completions`` appended; a URL already ending in it is kept."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise JudgeError(f"--judge-url {url!r} must start with http:// or https://")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class VerdictCache:
    """An append-only JSONL file of the judge's answers, ``{"key", "model", "content"}`` per line.

    A line is written with one ``write`` and fsynced before the answer is used, so a kill leaves at most one
    cut line at the end; it is skipped when read, and the next append starts on a new line (the file is
    never rewritten). Several processes (torchrun ranks) may append to the same file.

    Args:
        path: the file (created with its directory at the first answer).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.answers: dict[str, str] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.answers[entry["key"]] = entry["content"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill

    @staticmethod
    def key(request: dict) -> str:
        """The cache key of a request: sha256 of its canonical JSON (model, messages, sampling settings)."""
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self.answers.get(key)

    def add(self, key: str, model: str, content: str) -> None:
        """Append one answer, on disk before this returns."""
        line = (json.dumps({"key": key, "model": model, "content": content}, ensure_ascii=False) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                end = os.lseek(fd, 0, os.SEEK_END)
                if end and os.pread(fd, 1, end - 1) != b"\n":
                    line = b"\n" + line  # after a cut line: start a new one (the cut one stays unreadable)
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            from ..utils.files import Unwritable

            raise Unwritable(f"cannot write {self.path}: {e.strerror or e}") from None
        self.answers[key] = content


class ChatJudge:
    """A judge model behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        url: the endpoint or its base (``https://api.openai.com/v1``, ``http://localhost:8000/v1``).
        model: the judge model's name at that endpoint (``gpt-4o-mini``).
        key_env: the environment variable holding the API key; ``""`` sends none.
        cache: where answers are kept (None: not kept).
        temperature: sampling temperature of the judge (PrefEval: 0).
        max_tokens: answer length limit (PrefEval's evaluator: 100).
        timeout: seconds per request.
        retries: how many times a retryable failure is retried.
        backoff: the first retry's delay in seconds; doubled each time.
        max_backoff: the longest delay.
        sleep: how to wait (tests pass a recorder instead of ``time.sleep``).
    """

    def __init__(self, url: str, model: str, key_env: str = "OPENAI_API_KEY", cache: VerdictCache | None = None, *,
                 temperature: float = 0.0, max_tokens: int = 100, timeout: float = 60.0, retries: int = 6,
                 backoff: float = 1.0, max_backoff: float = 60.0, sleep: Callable[[float], None] = time.sleep):
        self.url, self.model, self.key_env, self.cache = chat_url(url), model, key_env, cache
        self.temperature, self.max_tokens, self.timeout = temperature, max_tokens, timeout
        self.retries, self.backoff, self.max_backoff, self.sleep = retries, backoff, max_backoff, sleep
        self.requests = 0  # HTTP requests sent (retries included)
        self.cached = 0  # answers taken from the cache

    def check_key(self) -> None:
        """Raise :class:`JudgeError` if the key's environment variable is named but not set."""
        if self.key_env and not os.environ.get(self.key_env):
            raise JudgeError(f"the judge's API key is read from ${self.key_env} (--judge-key-env), which is not set; "
                             "export it, or pass --judge-key-env '' for a server that needs no key")

    def info(self) -> dict:
        """How verdicts were obtained, for summary.json (no key)."""
        return {"url": self.url, "model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens}

    def ask(self, messages: list[dict]) -> str:
        """The judge's answer to ``messages`` (``[{"role", "content"}]``): from the cache, else asked and kept."""
        request = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "max_tokens": self.max_tokens}
        key = VerdictCache.key(request)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.cached += 1
            return hit
        content = self._post(request)
        if self.cache is not None:
            self.cache.add(key, self.model, content)
        return content

    def _post(self, request: dict) -> str:
        self.check_key()
        headers = {"Content-Type": "application/json"}
        if self.key_env:
            headers["Authorization"] = f"Bearer {os.environ[self.key_env]}"
        body = json.dumps(request).encode()
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                self.requests += 1
                with urllib.request.urlopen(urllib.request.Request(self.url, body, headers, method="POST"),
                                            timeout=self.timeout) as response:
                    raw = response.read()
                content = _content(raw)
                if content is not None:
                    return content
                failure = f"an answer that is not a chat completion: {raw[:200]!r}"
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                failure = f"HTTP {e.code} {e.reason}: {detail}".strip()
                if e.code not in RETRY_STATUS:
                    hint = f" (check ${self.key_env})" if e.code in (401, 403) and self.key_env else ""
                    raise JudgeError(f"judge at {self.url} refused the request: {failure}{hint}") from None
                retry_after = _retry_after(e.headers)
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
                failure = str(getattr(e, "reason", None) or e) or type(e).__name__
            if attempt == self.retries:
                break
            delay = self.backoff * 2 ** attempt if retry_after is None else retry_after
            self.sleep(min(self.max_backoff, delay))
        raise JudgeError(f"judge at {self.url} did not answer after {self.retries + 1} attempts; last: {failure}")


def _content(raw: bytes) -> str | None:
    """``choices[0].message.content`` of a chat-completion body (``""`` when the judge gave no text, e.g. a
    refusal), or None when the body is not a chat completion."""
    try:
        message = json.loads(raw)["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def _retry_after(headers: Message | None) -> float | None:
    """A numeric ``Retry-After`` header in seconds (an HTTP date is ignored: backoff applies)."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
