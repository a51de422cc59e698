"""SIGTERM drains a `unimlm serve` process (issue 16): a request in flight finishes within the drain limit,
the rest are cancelled with a clear error, no new connection is accepted, and the process exits 0."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from unimlm_engine.inputs.tokenizer import ByteTokenizer
from unimlm_engine.routes import route_tokens
from unimlm_engine.server.serve import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRAIN_S = 3.0
N_LONG = 6  # long requests: together ~1900 steps of a 7-sequence batch, far past the drain limit


def _stream(url, max_tokens, out: dict, started: threading.Event):
    no_routes = {str(ByteTokenizer().special_ids[t]): -100 for t in route_tokens()}
    body = {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "logit_bias": no_routes}
    events = out["events"] = []
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    started.set()
    except httpx.HTTPError as e:
        out["exception"] = e
    finally:
        started.set()


@pytest.mark.timeout(120)
def test_sigterm_drains_then_cancels():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "unimlm_engine.cli.main", "serve", "--model", "tiny-random", "--port",
                             str(port), "--drain-timeout", str(DRAIN_S), "--log-level", "warning"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end, "the server did not start"
            time.sleep(0.2)
        short, longs = {}, [{} for _ in range(N_LONG)]
        threads = []
        for out, n in [(short, 60)] + [(o, 1900) for o in longs]:
            started = threading.Event()
            t = threading.Thread(target=_stream, args=(url, n, out, started))
            t.start()
            threads.append(t)
            assert started.wait(30)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # no new connections once draining
            httpx.get(url + "/health", timeout=2)
        for t in threads:
            t.join(30)
        rc = proc.wait(30)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read().decode()
    assert rc == 0, log
    # the short request finished normally, every token delivered
    assert short["status"] == 200 and short["events"][-1] == "[DONE]", short
    chunks = [json.loads(e) for e in short["events"][:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 60
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    # the long ones ran past the drain limit: cancelled, told so, not cut off silently
    for long in longs:
        assert long["status"] == 200 and long["events"][-1] == "[DONE]", long
        err = json.loads(long["events"][-2])["error"]
        assert err["code"] == "cancelled" and "shutting down" in err["message"]
    assert DRAIN_S - 0.5 < elapsed < DRAIN_S + 8, elapsed
    assert f"cancelled {N_LONG} request" in log
