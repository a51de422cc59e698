"""Running the API under uvicorn, with a draining shutdown.

On SIGTERM (or SIGINT) the server stops accepting connections, answers new requests on open
connections with 503, waits up to `drain_timeout_s` for the requests in flight, then cancels what is
left (those clients get a clear 503 / a stream error event), lets the responses go out, and stops.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

import uvicorn

from .app import ServerConfig, ServerState, build_app

log = logging.getLogger("unimlm_engine.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state

    async def shutdown(self, sockets=None) -> None:
        state = self.state
        for server in self.servers:  # stop accepting connections (uvicorn's shutdown does it again: harmless)
            server.close()
        state.draining = True
        end = time.monotonic() + state.cfg.drain_timeout_s
        while state.handles and time.monotonic() < end:
            await asyncio.sleep(0.02)
        if state.handles:
            n = state.cancel_all()
            log.warning("drain limit of %.1f s reached: cancelled %d request(s)", state.cfg.drain_timeout_s, n)
            end = time.monotonic() + 5.0
            while state.handles and time.monotonic() < end:  # the cancelled requests answer their clients
                await asyncio.sleep(0.02)
        await super().shutdown(sockets)
        # uvicorn re-raises a captured SIGTERM after serving, which would kill the process before `serve`
        # closes the engine; the drain above is the graceful exit, so `unimlm serve` returns 0 instead
        if hasattr(self, "_captured_signals"):
            self._captured_signals.clear()


def make_server(engine, cfg: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
                log_level: str = "info", access_log: bool = True) -> DrainingServer:
    app = build_app(engine, cfg)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=10, lifespan="off")
    return DrainingServer(config, app.state.unimlm)


def serve(engine, cfg: ServerConfig, host: str, port: int, log_level: str = "info") -> None:
    """Blocks until the server is stopped (SIGTERM / SIGINT); then closes the engine."""
    server = make_server(engine, cfg, host, port, log_level)
    try:
        server.run()
    finally:
        engine.close(timeout=2.0)
        server.state.media_pool.shutdown(wait=False, cancel_futures=True)


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_in_thread(engine, cfg: Optional[ServerConfig] = None, host: str = "127.0.0.1",
                    port: Optional[int] = None, timeout: float = 30.0):
    """A server on a background thread (tests, notebooks) -> (server, thread, base URL).
    Stop it with `server.should_exit = True; thread.join()`; signals are not captured off the main thread."""
    import threading

    port = port or free_port(host)
    server = make_server(engine, cfg or ServerConfig(), host, port, log_level="warning", access_log=False)
    thread = threading.Thread(target=server.run, name="unimlm-server", daemon=True)
    thread.start()
    end = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > end:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    return server, thread, f"http://{host}:{port}"
