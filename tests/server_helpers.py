"""Shared pieces of the HTTP server tests: a real uvicorn on 127.0.0.1 (a free port) over the tiny engine."""
import base64
import contextlib
import struct
import time
import zlib

import httpx

import unimlm_engine as ue
from engine_helpers import tiny_model
from unimlm_engine.server import ServerConfig, start_in_thread

KEY = "test-key"


@contextlib.contextmanager
def running_server(engine_cfg=None, **server_kw):
    """(engine, base URL, ServerState) of a uvicorn server on a background thread; stopped and closed on exit."""
    model, tok = tiny_model()
    engine = ue.Engine(model, tok, engine_cfg or ue.EngineConfig())
    # the engine serves tiny-random: clients name it so
    server, thread, url = start_in_thread(engine, ServerConfig(**{"model_name": "tiny-random", **server_kw}))
    try:
        yield engine, url, server.state
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with a few bytes of image data: decoding
    it would need width * height * 3 bytes (and fail, truncated); its header alone says its size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def sse_events(resp: httpx.Response) -> list[tuple[str, str]]:
    """(event name, data) of a streamed response, in order ("message" when unnamed)."""
    events, name, data = [], "message", []
    for line in resp.iter_lines():
        if line == "":
            if data:
                events.append((name, "\n".join(data)))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        events.append((name, "\n".join(data)))
    return events


def wait_idle(engine, timeout: float = 10.0) -> dict:
    """Engine stats once nothing runs or waits and every KV block is free (or the timeout passed)."""
    end = time.monotonic() + timeout
    while True:
        s = engine.stats()
        idle = s["running"] == 0 and s["queued"] == 0 and s["active_requests"] == 0
        if (idle and s["kv_blocks_free"] == s["kv_blocks_total"]) or time.monotonic() > end:
            return s
        time.sleep(0.02)
