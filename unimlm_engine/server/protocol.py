"""OpenAI request bodies -> engine requests, and engine outputs -> OpenAI response objects.

Checked strictly: a parameter this server does not know, or knows but cannot honour (n > 1, logprobs,
tools, penalties...), is a 400 with the parameter named, never silently ignored. Extensions (not in the
OpenAI API): `routes` (force task routes, e.g. ["det", "seg"]: unimlm_engine/cli/forcing.py), `top_k`,
`ignore_eos`, `timeout` (seconds), `priority`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ..inputs.processor import IMAGE_TOKEN, VICUNA_SYSTEM, chat_prompt
from ..sampling import SamplingParams
from .errors import bad_request

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "stream_options", "n",
          "user", "logit_bias", "presence_penalty", "frequency_penalty", "logprobs", "routes", "ignore_eos",
          "timeout", "priority"}
CHAT = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
                 "parallel_tool_calls"}
COMPLETION = COMMON | {"prompt", "echo", "best_of", "suffix"}
_ZERO_ONLY = ("presence_penalty", "frequency_penalty")


@dataclass
class Parsed:
    """One validated request: a prompt (text, or token ids for /v1/completions) and its images' URLs."""

    model: str
    prompt: Optional[str] = None
    prompt_token_ids: Optional[list[int]] = None
    image_urls: list[str] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)
    routes: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    timeout_s: Optional[float] = None
    priority: int = 0


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return body


def _number(body: dict, key: str, lo: float, hi: float, integer: bool = False) -> Any:
    v = body.get(key)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool) or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise bad_request(f"{key} must be {kind} in [{lo}, {hi}], got {v!r}", param=key)
    return v


def _common(body: dict, allowed: set[str], max_tokens_default: int) -> Parsed:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request(f"unsupported parameter(s): {', '.join(unknown)}", param=unknown[0],
                          code="unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request("model is required (a string; see GET /v1/models)", param="model")
    if body.get("n", 1) != 1:
        raise bad_request("only n = 1 is supported", param="n", code="unsupported_parameter")
    for key in _ZERO_ONLY:
        if body.get(key, 0) not in (0, 0.0):
            raise bad_request(f"{key} is not supported (only 0)", param=key, code="unsupported_parameter")
    if body.get("logprobs") not in (None, False, 0):
        raise bad_request("logprobs are not supported", param="logprobs", code="unsupported_parameter")
    max_tokens = _number(body, "max_tokens", 1, 1 << 20, integer=True)
    if "max_completion_tokens" in body:
        max_tokens = _number(body, "max_completion_tokens", 1, 1 << 20, integer=True)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p <= 0:
        raise bad_request("top_p must be in (0, 1]", param="top_p")
    top_k = _number(body, "top_k", -1, 1 << 30, integer=True)
    seed = _number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop):
        stop = tuple(stop)
    else:
        raise bad_request("stop must be a non-empty string or a list of up to 4 of them", param="stop")
    if stop and any(not s for s in stop):
        raise bad_request("stop strings must be non-empty", param="stop")
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise bad_request("logit_bias must be an object {token id: bias}", param="logit_bias")
    try:
        bias = {int(k): float(v) for k, v in bias.items()}
    except (TypeError, ValueError):
        raise bad_request("logit_bias maps token ids (integers) to numbers", param="logit_bias") from None
    if any(not -100 <= v <= 100 for v in bias.values()):
        raise bad_request("logit_bias values must be in [-100, 100]", param="logit_bias")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad_request("ignore_eos must be a boolean", param="ignore_eos")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}:
        raise bad_request("stream_options supports only include_usage", param="stream_options")
    routes = body.get("routes") or []
    if isinstance(routes, str):
        routes = [r for r in routes.split(",") if r.strip()]
    if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
        raise bad_request("routes must be a list of route names, e.g. [\"det\", \"seg\"]", param="routes")
    sampling = {"max_tokens": max_tokens or max_tokens_default, "stop": stop, "logit_bias": bias,
                "ignore_eos": ignore_eos}
    for key, v in (("temperature", temperature), ("top_p", top_p), ("seed", seed)):
        if v is not None:
            sampling[key] = v
    if top_k is not None:
        sampling["top_k"] = max(top_k, 0)  # -1 (vLLM's "off") = 0 here
    return Parsed(model=model, sampling=sampling, routes=routes, stream=stream,
                  include_usage=bool(opts.get("include_usage")),
                  timeout_s=_number(body, "timeout", 1e-3, 1e6), priority=_number(body, "priority", -1 << 30,
                                                                                    1 << 30, integer=True) or 0)


def parse_chat(body: dict, max_tokens_default: int) -> Parsed:
    p = _common(body, CHAT, max_tokens_default)
    if body.get("tools") or body.get("tool_choice") not in (None, "none"):
        raise bad_request("tools are not supported", param="tools", code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad_request("response_format supports only {\"type\": \"text\"}", param="response_format",
                          code="unsupported_parameter")
    if body.get("top_logprobs") is not None:
        raise bad_request("logprobs are not supported", param="top_logprobs", code="unsupported_parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", param="messages")
    system, turns = VICUNA_SYSTEM, []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a role", param=f"messages[{i}]")
        role = m["role"]
        text, urls = _content(m.get("content"), i)
        if role in ("system", "developer"):
            if i != 0 or urls:
                raise bad_request("a system message must come first and hold only text", param=f"messages[{i}]")
            system = text
            continue
        if role not in ("user", "assistant"):
            raise bad_request(f"messages[{i}]: role {role!r} is not supported (system, user, assistant)",
                              param=f"messages[{i}].role")
        if urls and role != "user":
            raise bad_request("only user messages may hold images", param=f"messages[{i}]")
        if IMAGE_TOKEN in text:
            raise bad_request(f"{IMAGE_TOKEN} is reserved; send images as image_url parts", param=f"messages[{i}]")
        p.image_urls += urls
        turns.append((role, (IMAGE_TOKEN + "\n") * len(urls) + text))  # images first, as the model was trained
    try:
        p.prompt = chat_prompt(turns, system)
    except ValueError as e:
        raise bad_request(str(e), param="messages") from None
    return p


def _content(content: Any, i: int) -> tuple[str, list[str]]:
    """A message's content -> (its text parts joined by newlines, its image URLs in order)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad_request(f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}]")
    texts, urls = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise bad_request("an image_url part needs image_url.url", param=f"messages[{i}].content")
            urls.append(url)
        else:
            raise bad_request(f"messages[{i}]: unsupported content part {kind!r} (text and image_url only)",
                              param=f"messages[{i}].content", code="unsupported_parameter")
    return "\n".join(texts), urls


def parse_completion(body: dict, max_tokens_default: int) -> Parsed:
    p = _common(body, COMPLETION, max_tokens_default)
    for key, ok in (("echo", (None, False)), ("best_of", (None, 1)), ("suffix", (None, ""))):
        if body.get(key) not in ok:
            raise bad_request(f"{key} is not supported", param=key, code="unsupported_parameter")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        p.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        p.prompt_token_ids = prompt
    else:
        raise bad_request("prompt must be a non-empty string or a list of token ids (one prompt per request)",
                          param="prompt")
    return p


def finish_sampling(p: Parsed, forced: tuple[int, ...]) -> SamplingParams:
    """The request's SamplingParams; forced route tokens count in max_tokens (raised to fit them)."""
    s = dict(p.sampling)
    s["max_tokens"] = max(s["max_tokens"], len(forced) + 1) if forced else s["max_tokens"]
    try:
        return SamplingParams(**s, forced_prefix=forced)
    except ValueError as e:
        raise bad_request(str(e)) from None


# ---- responses ----------------------------------------------------------------------------------------
def usage(out) -> dict:
    n = len(out.token_ids)
    return {"prompt_tokens": out.prompt_len, "completion_tokens": n, "total_tokens": out.prompt_len + n,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


def chat_response(rid: str, model: str, out, tasks: list[dict]) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": out.text}
    if tasks:
        message["tasks"] = tasks
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": out.finish_reason, "logprobs": None}],
            "usage": usage(out)}


def completion_response(rid: str, model: str, out, tasks: list[dict]) -> dict:
    choice: dict[str, Any] = {"index": 0, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None}
    if tasks:
        choice["tasks"] = tasks
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage(out)}


def chunk(rid: str, model: str, chat: bool, delta: Optional[dict] = None, text: Optional[str] = None,
          finish_reason: Optional[str] = None, usage_: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
    """One streamed chunk (chat.completion.chunk, or text_completion for /v1/completions)."""
    if usage_ is not None and delta is None and text is None:
        choices = []
    elif chat:
        choices = [{"index": 0, "delta": {**(delta or {}), **(extra or {})}, "finish_reason": finish_reason,
                    "logprobs": None}]
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None,
                    **(extra or {})}]
    d = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
         "model": model, "choices": choices}
    if usage_ is not None:
        d["usage"] = usage_
    return d
