"""The OpenAI-compatible HTTP API (FastAPI) over one Engine.

Nothing here blocks the event loop: image decoding runs on the server's media threads, tiling and
tokenizing on the engine's intake threads (`Engine.submit_async`), results are awaited
(`RequestHandle.aresult` / `astream`), task-result JSON (RLE masks, PNG images) is built on a thread.
A client that goes away cancels its request (the engine frees its KV blocks).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import itertools
import json
import os
from dataclasses import dataclass
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..cli.forcing import forced_route_tokens, parse_routes
from ..engine.types import Request as EngineRequest
from . import protocol as proto
from .errors import APIError, bad_request, from_engine
from .media import load_image_url
from .metrics import ServerMetrics


@dataclass
class ServerConfig:
    model_name: str = "tiny"
    api_key: Optional[str] = None  # required as "Authorization: Bearer KEY" on /v1/* when set
    allowed_local_media_path: Optional[str] = None  # file:// images only from inside this folder
    max_body_bytes: int = 32 << 20
    max_image_pixels: int = 32_000_000  # checked on the image header, before decoding
    max_images: int = 8  # per request
    request_timeout_s: Optional[float] = 600.0  # per request (a request's own `timeout` may only lower it)
    default_max_tokens: int = 256
    cors_origins: tuple[str, ...] = ()  # CORS is off unless origins are given
    drain_timeout_s: float = 30.0  # on SIGTERM: wait this long for requests in flight, then cancel the rest
    retry_after_s: int = 1  # Retry-After of a 429


class ClientGone(Exception):
    pass


class ServerState:
    def __init__(self, engine, cfg: ServerConfig):
        self.engine, self.cfg = engine, cfg
        self.metrics = ServerMetrics(engine)
        self.media_pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                                                thread_name_prefix="unimlm-media")
        self.handles: set = set()  # handles of requests in flight (drained / cancelled on shutdown)
        self.active = 0  # generation requests being handled (a response not yet fully sent)
        self.draining = False
        self.ids = itertools.count(1)

    def cancel_all(self) -> int:
        handles = list(self.handles)
        for h in handles:
            h.cancel()
        return len(handles)


def build_app(engine, cfg: Optional[ServerConfig] = None) -> FastAPI:
    cfg = cfg or ServerConfig()
    app = FastAPI(title="unimlm-engine", docs_url=None, redoc_url=None, openapi_url=None)
    state = app.state.unimlm = ServerState(engine, cfg)
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not engine.accepting():  # closed, or a tensor-parallel worker died: send traffic elsewhere
            return JSONResponse({"status": "closed"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            _check_key(request, cfg)
        except APIError as e:
            return _error(e)
        return JSONResponse({"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                                         "owned_by": "unimlm-engine",
                                                         "max_model_len": engine.max_model_len}]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _endpoint(request, state, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _endpoint(request, state, chat=False)

    return app


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _check_key(request: Request, cfg: ServerConfig) -> None:
    if cfg.api_key is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), cfg.api_key.encode()):
        raise APIError(401, "missing or invalid API key (Authorization: Bearer KEY)", type="authentication_error",
                       code="invalid_api_key")


async def _endpoint(request: Request, state: ServerState, chat: bool) -> Response:
    name = "chat" if chat else "completions"
    state.active += 1
    try:
        resp = await _serve(request, state, chat)
    except APIError as e:
        resp = _error(e)
    except ClientGone:
        resp = Response(status_code=499)  # nobody reads it: the client closed the connection
    finally:
        state.active -= 1
    state.metrics.requests.labels(name, str(resp.status_code)).inc()
    return resp


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {limit}", code="body_too_large")
    buf = bytearray()
    async for part in request.stream():
        buf += part
        if len(buf) > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
    return bytes(buf)


async def _serve(request: Request, state: ServerState, chat: bool) -> Response:
    cfg, engine = state.cfg, state.engine
    _check_key(request, cfg)
    if state.draining:
        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    raw = await _read_body(request, cfg.max_body_bytes)
    loop = asyncio.get_running_loop()
    # a body with images can be megabytes of JSON: parse it off the loop
    body = proto.parse_json(raw) if len(raw) < 65536 else await loop.run_in_executor(state.media_pool,
                                                                                   proto.parse_json, raw)
    p = (proto.parse_chat if chat else proto.parse_completion)(body, cfg.default_max_tokens)
    if p.model != cfg.model_name:
        raise APIError(404, f"model {p.model!r} is not served here; this server serves {cfg.model_name!r}",
                       param="model", code="model_not_found")
    try:
        forced = forced_route_tokens(engine.model, parse_routes(",".join(p.routes))) if p.routes else ()
    except ValueError as e:
        raise bad_request(f"routes: {e}", param="routes", code="unsupported_route") from None
    sampling = proto.finish_sampling(p, forced)
    if len(p.image_urls) > cfg.max_images:
        raise bad_request(f"{len(p.image_urls)} images; at most {cfg.max_images} per request", code="too_many_images")
    images = await _race(loop.run_in_executor(state.media_pool, _load_images, p.image_urls, cfg), request)
    timeout = min((t for t in (p.timeout_s, cfg.request_timeout_s) if t is not None), default=None)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{next(state.ids)}"
    req = EngineRequest(prompt=p.prompt, prompt_token_ids=p.prompt_token_ids, images=images or None,
                        sampling=sampling, chat=False, timeout_s=timeout, priority=p.priority, request_id=rid)
    handle = await engine.submit_async(req)
    handle.future.add_done_callback(lambda f: state.metrics.observe_output(f.result()))  # however it ends
    state.handles.add(handle)
    state.metrics.inflight.inc()
    handed = False
    try:
        if not p.stream:
            out = await _race(_output(handle), request)
            return await _complete(state, out, rid, p.model, chat)
        stream = handle.astream()
        first = await _race(stream.__anext__(), request)
        if first.finished and first.output.finish_reason not in ("stop", "length"):
            raise from_engine(first.output.error, first.output.finish_reason, cfg.retry_after_s)
        handed = True  # the response takes over the handle's bookkeeping
        return _SSEResponse(state, handle, stream, _sse(state, stream, first, rid, p, chat))
    except (ClientGone, asyncio.CancelledError):
        handle.cancel()
        raise
    finally:
        if not handed:
            _forget(state, handle)


def _forget(state: ServerState, handle) -> None:
    if handle in state.handles:
        state.handles.discard(handle)
        state.metrics.inflight.dec()


def _load_images(urls: list[str], cfg: ServerConfig) -> list:
    return [load_image_url(u, cfg.allowed_local_media_path, cfg.max_image_pixels, cfg.max_body_bytes) for u in urls]


async def _output(handle):
    """The RequestOutput whatever the ending (aresult() would raise a failed request's error)."""
    try:
        await handle.aresult()
    except Exception:  # noqa: BLE001 - the output carries the error
        pass
    return handle.future.result()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _race(aw, request: Request):
    """Await `aw` unless the client disconnects first (then ClientGone; `aw` is cancelled)."""
    task = asyncio.ensure_future(aw)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watch.cancel()
        raise
    if task.done():
        watch.cancel()
        return task.result()
    task.cancel()
    raise ClientGone()


def _tasks_json(out) -> list[dict]:
    """Super-link task results, then span-route results (UnifiedMLLM; theirs carry `span` offsets), as
    the stream sends both kinds as `event: task` chunks."""
    return [t.to_json() for t in (*out.tasks, *out.spans)]


async def _complete(state: ServerState, out, rid: str, model: str, chat: bool) -> Response:
    if out.finish_reason not in ("stop", "length"):
        raise from_engine(out.error, out.finish_reason, state.cfg.retry_after_s)
    tasks = await asyncio.get_running_loop().run_in_executor(state.media_pool, _tasks_json, out)
    body = (proto.chat_response if chat else proto.completion_response)(rid, model, out, tasks)
    return JSONResponse(body)


def _data(obj: dict, event: Optional[str] = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _sse(state: ServerState, stream, ev, rid: str, p, chat: bool):
    """Server-sent events: text chunks, each task result as its own `event: task` chunk (delta.tasks) as
    soon as its decoder finishes, the final chunk, usage when asked, then [DONE]. A request that ends
    without a result mid-stream sends `data: {"error": ...}` (the openai client raises it)."""
    loop = asyncio.get_running_loop()
    model = p.model
    if chat:
        yield _data(proto.chunk(rid, model, True, delta={"role": "assistant", "content": ""}))
    while True:
        if ev.text:
            yield _data(proto.chunk(rid, model, chat, delta={"content": ev.text}, text=ev.text))
        if ev.task is not None:
            tj = await loop.run_in_executor(state.media_pool, ev.task.to_json)
            yield _data(proto.chunk(rid, model, chat, delta={}, text="", extra={"tasks": [tj]}), event="task")
        if ev.finished:
            out = ev.output
            if out.finish_reason in ("stop", "length"):
                yield _data(proto.chunk(rid, model, chat, delta={}, text="", finish_reason=out.finish_reason))
                if p.include_usage:
                    yield _data(proto.chunk(rid, model, chat, usage_=proto.usage(out)))
            else:
                yield _data(from_engine(out.error, out.finish_reason, state.cfg.retry_after_s).body())
            yield "data: [DONE]\n\n"
            return
        ev = await stream.__anext__()


class _SSEResponse(StreamingResponse):
    """A stream whose request is cancelled and forgotten however the response ends: finished, the client
    gone mid-stream (Starlette cancels the body task), or gone before the body started."""

    def __init__(self, state: ServerState, handle, stream, body):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._state, self._handle, self._stream, self._body = state, handle, stream, body

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.aclose()
            await self._stream.aclose()  # cancels the request if it has not ended
            _forget(self._state, self._handle)
