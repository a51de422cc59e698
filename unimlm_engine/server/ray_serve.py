"""Replicas of the HTTP server on Ray Serve (`unimlm serve --ray --replicas N`, or `serve run`).

Each replica is a Ray actor that builds its own Engine (its own scheduler thread, intake threads and
decoders) and serves the same FastAPI app as `unimlm serve` (`build_app`) through `@serve.ingress`:
the same OpenAI-compatible API, errors and streaming. Ray Serve's HTTP proxy spreads requests over
the replicas (power-of-two-choices on the replicas' queue lengths) and, when `autoscaling` is given,
adds and removes replicas from the requests in flight. Every response names the replica that served it
(`X-Unimlm-Replica`, `X-Unimlm-Pid`, `X-Unimlm-Node` headers).

A replica that dies (process killed, node lost, or its engine failed: `check_health` reports it and
Serve replaces the replica) loses its requests in flight; the proxy middleware here
(`proxy_middlewares`) ends each with a clear error, code `replica_lost` (a 502, or a final error event
on a stream). The proxy sends new requests to the live replicas and Serve starts a replacement.
Nothing is retried behind the client's back: generation is not idempotent.

Needs the `ray` extra (`pip install 'unimlm-engine[ray]'`, i.e. ray[serve]). Multi-node: start a Ray
cluster (`ray start --head` on one machine, `ray start --address HEAD:6379` on the others) and pass
`--ray-address auto` (or HEAD:6379); replicas land on any node with the resources they ask for
(`--replica-gpus 1` per GPU replica). Each replica is one engine on one node; one engine split over
nodes (NCCL across nodes) is not supported (README: replicas with Ray Serve).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import asdict
from typing import Any, Optional

from ray import serve

from .app import ServerConfig, build_app

REPLICA_HEADER = "x-unimlm-replica"
PID_HEADER = "x-unimlm-pid"
NODE_HEADER = "x-unimlm-node"  # the Ray node id
APP_NAME = "unimlm"


class _ReplicaHeaders:
    """ASGI middleware: adds the replica id, pid and Ray node id to every HTTP response (streams included)."""

    def __init__(self, app, replica_id: str, node_id: str):
        self.app = app
        self.extra = [(REPLICA_HEADER.encode(), replica_id.encode()), (PID_HEADER.encode(), str(os.getpid()).encode()),
                      (NODE_HEADER.encode(), node_id.encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + self.extra)
            await send(message)

        await self.app(scope, receive, send_with_headers)


_LOST = {"message": "the replica serving this request died or failed before it finished (Ray Serve); "
                     "new requests go to the live replicas", "type": "server_error", "param": None,
         "code": "replica_lost"}


class _ReplicaLostErrors:
    """Proxy-side ASGI middleware (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=PROXY_CALLBACK): Ray Serve's
    proxy ends a request whose replica died with no response at all (its server then sends a bare
    "500 Internal Server Error") or, mid-stream, by just ending the stream. Here the first becomes a 502
    with an OpenAI-style JSON error (code replica_lost) and the second gets a final
    `data: {"error": ...}` event (as the server's own mid-stream errors), so a client never mistakes a
    lost request for a finished one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "done": False, "sse": False}

        async def watch(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                ctype = dict(message.get("headers", [])).get(b"content-type", b"")
                state["sse"] = ctype.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["done"] = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:  # noqa: BLE001 - answered below when nothing was sent yet
            if state["done"] or (state["started"] and not state["sse"]):
                raise
        if not state["started"]:
            body = json.dumps({"error": _LOST}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 502, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif state["sse"] and not state["done"]:
            await send({"type": "http.response.body", "body": f"data: {json.dumps({'error': _LOST})}\n\n".encode()})


def proxy_middlewares() -> list:
    """The callback named by PROXY_CALLBACK (Ray Serve calls it in each HTTP proxy)."""
    from starlette.middleware import Middleware

    return [Middleware(_ReplicaLostErrors)]


PROXY_CALLBACK = f"{__name__}:proxy_middlewares"
PROXY_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (not expected): the pid still tells replicas apart
        return f"pid-{os.getpid()}"


@serve.ingress()
class UnimlmReplica:
    """One replica: an Engine and the FastAPI app over it (built in the replica process)."""

    def __init__(self, model: str = "tiny", device: Optional[str] = None, engine_kwargs: Optional[dict] = None,
                 server_kwargs: Optional[dict] = None):
        import unimlm_engine as ue

        self.cfg = ServerConfig(**(server_kwargs or {}))
        self.engine = ue.Engine.from_pretrained(model, device=device, config=ue.EngineConfig(**(engine_kwargs or {})))

    def __serve_build_asgi_app__(self):
        import ray

        self.fastapi_app = build_app(self.engine, self.cfg)  # (`app` is the Serve wrapper's own attribute)
        return _ReplicaHeaders(self.fastapi_app, _replica_id(), ray.get_runtime_context().get_node_id())

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and Serve replaces it."""
        core = self.engine.core
        if core.fatal is not None:
            raise RuntimeError(f"engine failed: {core.fatal}")
        if not core._thread.is_alive():
            raise RuntimeError("engine loop thread is not running")

    def __del__(self):
        # Serve first waits up to graceful_shutdown_timeout_s for the requests in flight
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(timeout=2.0)
        app = getattr(self, "fastapi_app", None)
        if app is not None:
            app.state.unimlm.media_pool.shutdown(wait=False, cancel_futures=True)


def build_application(model: str = "tiny", *, num_replicas: int = 1, autoscaling: Optional[dict] = None,
                      device: Optional[str] = None, engine_kwargs: Optional[dict] = None,
                      server_config: Optional[ServerConfig] = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                      max_ongoing_requests: Optional[int] = None, runtime_env: Optional[dict] = None):
    """A Serve application of `num_replicas` replicas (or autoscaled within `autoscaling`, a Serve
    autoscaling_config dict such as {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})."""
    cfg = server_config or ServerConfig()
    engine_kwargs = dict(engine_kwargs or {})
    if max_ongoing_requests is None:  # let each replica's own scheduler batch and queue (429 past its queue)
        max_ongoing_requests = engine_kwargs.get("max_num_seqs", 64) + engine_kwargs.get("max_queue_size", 256)
    actor_options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if runtime_env:
        actor_options["runtime_env"] = runtime_env
    options: dict[str, Any] = dict(name="UnimlmReplica", ray_actor_options=actor_options,
                                   max_ongoing_requests=max_ongoing_requests,
                                   graceful_shutdown_timeout_s=cfg.drain_timeout_s, health_check_period_s=2.0)
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = num_replicas
    deployment = serve.deployment(UnimlmReplica).options(**options)
    return deployment.bind(model=model, device=device, engine_kwargs=engine_kwargs, server_kwargs=asdict(cfg))


def app_builder(args: dict):
    """For `serve run unimlm_engine.server.ray_serve:app_builder model=tiny num_replicas=2` (or a Serve
    config file's `import_path` with `args:`). Keys: model, num_replicas, device, num_cpus, num_gpus,
    min_replicas/max_replicas/target_ongoing_requests (autoscaling), max_num_seqs, max_queue_size, api_key,
    served_model_name."""
    a = dict(args)
    autoscaling = None
    if "min_replicas" in a or "max_replicas" in a:
        autoscaling = {"min_replicas": int(a.pop("min_replicas", 1)), "max_replicas": int(a.pop("max_replicas", 1)),
                       "target_ongoing_requests": float(a.pop("target_ongoing_requests", 8))}
    model = a.pop("model", "tiny")
    engine_kwargs = {k: int(a.pop(k)) for k in ("max_num_seqs", "max_queue_size") if k in a}
    cfg = ServerConfig(model_name=a.pop("served_model_name", model), api_key=a.pop("api_key", None))
    app = build_application(model, num_replicas=int(a.pop("num_replicas", 1)), autoscaling=autoscaling,
                            device=a.pop("device", None), engine_kwargs=engine_kwargs, server_config=cfg,
                            num_cpus=float(a.pop("num_cpus", 1)), num_gpus=float(a.pop("num_gpus", 0)))
    if a:
        raise ValueError(f"unknown argument(s) for the unimlm Serve app: {sorted(a)}")
    return app


def run(app, host: str, port: int, address: Optional[str] = None, num_cpus: Optional[int] = None,
        drain_timeout_s: float = 30.0) -> None:
    """`unimlm serve --ray`: connect to (or start) Ray, deploy `app` on host:port, block until SIGTERM or
    SIGINT, then shut Serve down (each replica drains its requests first) and disconnect."""
    import ray

    if address is None:  # a local Ray inherits this; a cluster's nodes need it set at `ray start` (README)
        os.environ.setdefault(PROXY_ENV, PROXY_CALLBACK)
    ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"unimlm: Ray Serve app {APP_NAME!r} on http://{host}:{port}", flush=True)
        stop.wait()
    finally:
        # serve.shutdown waits for the replicas to drain; it would wait forever if Ray's own processes were
        # killed too (a SIGTERM to the whole process group): give it the drain time, then leave anyway
        t = threading.Thread(target=serve.shutdown, name="unimlm-serve-shutdown", daemon=True)
        t.start()
        t.join(drain_timeout_s + 15.0)
        if t.is_alive():
            print("unimlm: Ray Serve did not shut down in time (Ray's processes gone?); exiting", file=sys.stderr)
            os._exit(1)
        ray.shutdown()
