"""`unimlm serve-bench --url http://HOST:PORT`: load on a running OpenAI-compatible server (like vLLM's
`bench serve`). Streams every request (`stream: true` with usage) and measures on the client:

    TTFT   request sent -> first streamed chunk with text or a task result
    TPOT   (end - first) / (completion tokens - 1)
    e2e    request sent -> [DONE]

Arrivals: Poisson at one or more request rates (one run per rate), or a closed loop of N clients. Workload
kinds as in the in-process bench (serve_bench.parse_mix): vqa (an image, free text), text, and route names
(forced through the server's `routes` extension). `--plot` draws latency against request rate.
"""
from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .serve_bench import QUESTIONS, TEXT_KINDS, latency_summary

ROUTES_WITHOUT_IMAGE = ("gen",)


@dataclass
class Record:
    ok: bool
    ttft: Optional[float] = None
    tpot: Optional[float] = None
    e2e: Optional[float] = None
    tokens: int = 0
    error: Optional[str] = None


def make_bodies(n: int, mix: dict[str, float], images: list[str], max_tokens: int, model: str, seed: int = 0
                ) -> list[dict]:
    """n chat requests drawn from `mix`; images as data: URLs; fixed lengths (ignore_eos)."""
    rng = random.Random(seed)
    urls = [f"data:image/{Path(p).suffix.lstrip('.').replace('jpg', 'jpeg') or 'png'};base64,"
            + base64.b64encode(Path(p).read_bytes()).decode() for p in images]
    bodies = []
    for kind in rng.choices(list(mix), weights=list(mix.values()), k=n):
        parts: list = [{"type": "text", "text": rng.choice(QUESTIONS)}]
        if kind != "text" and kind not in ROUTES_WITHOUT_IMAGE and urls:
            parts.insert(0, {"type": "image_url", "image_url": {"url": rng.choice(urls)}})
        body = {"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if kind not in TEXT_KINDS:
            body["routes"] = [kind]
        bodies.append(body)
    return bodies


async def _one(client, body: dict) -> Record:
    t0 = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Record(False, error=f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                ch = json.loads(data)
                if "error" in ch:
                    return Record(False, error=ch["error"].get("message"))
                if ch.get("usage"):
                    tokens = ch["usage"]["completion_tokens"]
                delta = ch["choices"][0].get("delta", {}) if ch.get("choices") else {}
                if first is None and (delta.get("content") or delta.get("tasks")):
                    first = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - a failed request is a result of the benchmark
        return Record(False, error=f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    ttft = (first - t0) if first is not None else None
    tpot = (end - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return Record(True, ttft, tpot, end - t0, tokens)


async def _run(url: str, bodies: list[dict], rate: Optional[float], concurrency: int, api_key: Optional[str],
               seed: int, progress=None) -> tuple[list[Record], float]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=max(concurrency, 64))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(600.0), limits=limits) as c:
        async def done(rec: Record) -> Record:
            if progress is not None:
                progress.update(1)
            return rec

        t0 = time.perf_counter()
        if rate:  # open loop: Poisson arrivals
            rng = random.Random(seed)
            tasks = []
            for body in bodies:
                tasks.append(asyncio.create_task(_one(c, body)))
                await asyncio.sleep(rng.expovariate(rate))
            records = [await done(await t) for t in tasks]
        else:  # closed loop: `concurrency` clients
            it = iter(enumerate(bodies))
            records: list = [None] * len(bodies)

            async def client():
                for i, body in it:
                    records[i] = await done(await _one(c, body))

            await asyncio.gather(*(client() for _ in range(max(1, concurrency))))
        return records, time.perf_counter() - t0


def served_model(url: str, api_key: Optional[str]) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    if r.status_code != 200:
        raise RuntimeError(f"GET {url}/v1/models: HTTP {r.status_code} {r.text[:200]}")
    return r.json()["data"][0]["id"]


def run(url: str, bodies: list[dict], rate: Optional[float], concurrency: int, api_key: Optional[str] = None,
        seed: int = 0, progress=None) -> dict:
    records, wall = asyncio.run(_run(url.rstrip("/"), bodies, rate, concurrency, api_key, seed, progress))
    ok = [r for r in records if r.ok]
    summary = latency_summary(len(records), [r.ttft for r in ok], [r.tpot for r in ok], [r.e2e for r in ok],
                              sum(r.tokens for r in ok), wall)
    summary.update(request_rate=rate, concurrency=None if rate else concurrency,
                   errors=sorted({r.error for r in records if not r.ok})[:5])
    return summary


COLUMNS = (("rate", "request_rate", "{}"), ("conc", "concurrency", "{}"), ("ok", "ok", "{}"),
           ("fail", "failed", "{}"), ("req/s", "req_per_s", "{:.2f}"), ("tok/s", "output_tok_per_s", "{:.1f}"),
           ("TTFT p50", "ttft_p50_s", "{:.3f}"), ("TTFT p99", "ttft_p99_s", "{:.3f}"),
           ("TPOT p50", "tpot_p50_s", "{:.4f}"), ("TPOT p99", "tpot_p99_s", "{:.4f}"),
           ("e2e p50", "e2e_p50_s", "{:.3f}"), ("e2e p99", "e2e_p99_s", "{:.3f}"))


def table(summaries: list[dict]) -> str:
    """A Markdown table, one row per run (seconds)."""
    rows = [[h for h, _, _ in COLUMNS], ["---"] * len(COLUMNS)]
    for s in summaries:
        rows.append(["-" if s.get(k) is None else f.format(s[k]) for _, k, f in COLUMNS])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def plot(summaries: list[dict], path: str) -> None:
    """TTFT, TPOT and e2e (p50 solid, p99 dashed) against the achieved request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(summaries, key=lambda s: s["req_per_s"])
    x = [s["req_per_s"] for s in runs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, key) in zip(axes, (("TTFT", "ttft"), ("TPOT", "tpot"), ("end to end", "e2e"))):
        for p, style in (("p50", "-o"), ("p99", "--o")):
            ax.plot(x, [s[f"{key}_{p}_s"] for s in runs], style, label=p)
        ax.set_title(f"{name} latency")
        ax.set_xlabel("achieved requests / s")
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
