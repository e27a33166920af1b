"""A minimal client of a running SGLang server's ``/generate`` (standard library only: the GPU host has no aiohttp).

Prompts go as token ids made by the caller's tokenizer, so the server's own tokenizer never matters, and answers
come back as token ids. Thread-safe: each call opens its own connection.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """One ``/generate`` answer: ``output_ids`` (greedy), and from ``meta_info`` the prompt length the server saw,
    the prompt tokens it served from its prefix cache, and why it stopped; ``error`` instead when it failed."""

    output_ids: tuple[int, ...]
    prompt_tokens: int | None
    cached_tokens: int | None
    finish: str | None
    latency_s: float
    error: str | None = None


class ServerError(RuntimeError):
    """The server could not be reached at all (as opposed to one request failing)."""


class SGLangClient:
    """``url``: the server's base address, e.g. ``http://127.0.0.1:30000``."""

    def __init__(self, url: str, timeout_s: float = 900.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def generate(self, input_ids: list[int], max_new_tokens: int, kv_evict: dict | None = None,
                 extra_key: str | None = None) -> Reply:
        """Greedy decoding of exactly ``max_new_tokens`` tokens (end-of-sequence ignored, so answers of two
        settings compare position by position). ``kv_evict``: the request's ``custom_params["kv_evict"]`` (None: send
        none, as to a server without sgl-evict). ``extra_key``: its radix-cache namespace."""
        params: dict = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
        if kv_evict is not None:
            params["custom_params"] = {"kv_evict": kv_evict}
        body: dict = {"input_ids": input_ids, "sampling_params": params}
        if extra_key is not None:
            body["extra_key"] = extra_key
        start = time.monotonic()
        try:
            reply = self._post("/generate", body)
        except urllib.error.HTTPError as err:  # SGLang answers a refused request with 400 and its message
            return Reply((), None, None, None, time.monotonic() - start, _http_error(err))
        latency = time.monotonic() - start
        meta = reply.get("meta_info") or {}
        finish = meta.get("finish_reason")
        kind = finish.get("type") if isinstance(finish, dict) else finish
        error = None
        if kind == "abort":
            error = f"aborted: {finish.get('message', '') if isinstance(finish, dict) else ''}".rstrip(": ")
        return Reply(tuple(reply.get("output_ids") or ()), meta.get("prompt_tokens"), meta.get("cached_tokens"),
                     kind, latency, error)

    def server_info(self) -> dict:
        """The server's arguments and state (``/get_server_info``), or ``{}`` when it does not answer that."""
        try:
            return self._get("/get_server_info")
        except (urllib.error.URLError, ValueError, ServerError):
            return {}

    def flush_cache(self) -> bool:
        """Empties the server's prefix cache (``/flush_cache``); False when it refused (requests running)."""
        try:
            return self._post("/flush_cache", None, raw=True) is not None
        except (urllib.error.URLError, ServerError):
            return False

    def _post(self, path: str, body: dict | None, raw: bool = False):
        data = b"" if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        return self._open(req, raw)

    def _get(self, path: str):
        return self._open(urllib.request.Request(self.url + path), False)

    def _open(self, req: urllib.request.Request, raw: bool):
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                text = resp.read()
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            raise ServerError(f"{self.url} does not answer: {getattr(err, 'reason', err)}") from None
        return text if raw else json.loads(text)


def _http_error(err: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(err.read())
        message = detail.get("error", {}).get("message") if isinstance(detail.get("error"), dict) else None
        message = message or detail.get("message") or detail.get("detail") or json.dumps(detail)
    except (ValueError, AttributeError):
        message = err.reason
    return f"HTTP {err.code}: {message}"
