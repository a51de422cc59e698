"""The OpenAI-compatible server (issue 16): a real uvicorn on 127.0.0.1, called with the `openai` client
and httpx. Results are checked against the engine's Python API on the same model (the reference)."""
import json
import os
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import unimlm_engine as ue
from server_helpers import KEY, data_url, png_header_only, running_server, sse_events, wait_idle
from unimlm_engine.cli.forcing import forced_route_tokens, parse_routes
from unimlm_engine.routes import RouteSpec, register_route, unregister_route

CAT = "examples/images/chelsea.png"
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(open(CAT, "rb").read())
    (root / "secret.png").write_bytes(open(CAT, "rb").read())
    os.symlink(root / "secret.png", allowed / "link.png")  # a symlink inside pointing outside
    return root


@pytest.fixture(scope="module")
def server(media):
    with running_server(api_key=KEY, allowed_local_media_path=str(media / "allowed"), max_image_pixels=MAX_PIXELS,
                        max_body_bytes=1 << 20) as s:
        yield s[:2]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0)


def _post(url, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, headers=headers, timeout=30, **kw,
                      **({"content": body} if isinstance(body, (bytes, str)) else {"json": body}))


def _image_message(url, text="What is in this image?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_chat_with_an_image_matches_the_engine(server, client, media):
    engine, _ = server
    r = client.chat.completions.create(model="tiny-random", messages=_image_message(data_url(CAT)), max_tokens=12)
    ref = engine.generate("What is in this image?", images=[CAT], sampling=ue.SamplingParams(max_tokens=12))
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_len, len(ref.token_ids))
    assert r.usage.total_tokens == ref.prompt_len + len(ref.token_ids)
    # the same file through file:// under the allowed folder gives the same answer
    local = client.chat.completions.create(model="tiny-random", max_tokens=12, messages=_image_message(
        f"file://{media}/allowed/cat.png"))
    assert local.choices[0].message.content == ref.text


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_streamed_text_equals_non_streamed_for_a_seed(server, client, chat):
    engine, _ = server
    kw = dict(model="tiny-random", max_tokens=24, temperature=0.9, top_p=0.95, seed=7)
    if chat:
        create, msg = client.chat.completions.create, {"messages": [{"role": "user", "content": "Tell me a story"}]}
    else:
        create, msg = client.completions.create, {"prompt": "Once upon a time"}
    full = create(**kw, **msg)
    pieces, usage = [], None
    for ch in create(**kw, **msg, stream=True, stream_options={"include_usage": True}):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            pieces.append((c.delta.content or "") if chat else c.text)
    text = full.choices[0].message.content if chat else full.choices[0].text
    assert "".join(pieces) == text
    assert usage.completion_tokens == full.usage.completion_tokens
    ref = engine.generate(msg.get("prompt", "Tell me a story"), chat=chat, sampling=ue.SamplingParams(
        max_tokens=24, temperature=0.9, top_p=0.95, seed=7))
    assert text == ref.text


def _close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k in ("boxes", "scores", "keypoints"):
            np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-3, atol=1e-3)
        else:
            assert a[k] == b[k], k


def test_task_results_streamed_and_not(server, client):
    engine, url = server
    routes = ["det", "seg", "pose"]
    forced = forced_route_tokens(engine.model, parse_routes(",".join(routes)))
    ref = engine.generate("Find the cat.", images=[CAT], sampling=ue.SamplingParams(
        max_tokens=len(forced) + 2, forced_prefix=forced))
    want = [t.to_json() for t in ref.tasks]
    assert [t["route"] for t in want] == ["[DET]", "[SEG]", "[POSE]"] and all("error" not in t for t in want)
    r = client.chat.completions.create(model="tiny-random", messages=_image_message(data_url(CAT), "Find the cat."),
                                       max_tokens=len(forced) + 2, extra_body={"routes": routes})
    got = r.choices[0].message.model_extra["tasks"]
    for a, b in zip(got, want, strict=True):
        _close(a, b)
    assert r.choices[0].message.content == ref.text
    # streamed: each task is its own `event: task` SSE event, before the final chunk
    body = {"model": "tiny-random", "messages": _image_message(data_url(CAT), "Find the cat."), "stream": True,
            "max_tokens": len(forced) + 2, "routes": routes}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
    names = [n for n, _ in events]
    assert names.count("task") == 3 and events[-1][1] == "[DONE]"
    final = max(i for i, (_, d) in enumerate(events[:-1]) if json.loads(d)["choices"][0]["finish_reason"])
    assert all(i < final for i, n in enumerate(names) if n == "task")
    streamed = [json.loads(d)["choices"][0]["delta"]["tasks"][0] for n, d in events if n == "task"]
    for a, b in zip(sorted(streamed, key=lambda t: t["route"]), sorted(want, key=lambda t: t["route"]), strict=True):
        _close(a, b)


def test_models_health_and_cors_off(server):
    _, url = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in models["data"]] == ["tiny-random"]
    pre = httpx.options(url + "/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    got = httpx.get(url + "/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in got.headers


def test_api_key(server):
    _, url = server
    body = {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for key in (None, "wrong"):
        r = _post(url, "/v1/chat/completions", body, key=key)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert _post(url, "/v1/chat/completions", body).status_code == 200


def test_local_files_outside_the_allowed_folder_are_forbidden(server, media):
    _, url = server
    allowed = media / "allowed"
    for path in (f"{allowed}/../secret.png", str(media / "secret.png"), f"{allowed}/link.png", "/etc/passwd",
                 f"{allowed}/%2E%2E/secret.png"):
        r = _post(url, "/v1/chat/completions", {"model": "tiny-random", "messages": _image_message(f"file://{path}"),
                                                "max_tokens": 1})
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["type"] == "permission_error"


def _bad_bodies(media):
    msg = [{"role": "user", "content": "hi"}]
    ok = {"model": "tiny-random", "messages": msg, "max_tokens": 2}
    garbage = "data:image/png;base64," + __import__("base64").b64encode(b"not an image at all").decode()
    return {
        "bad json": (b"{\"model\": \"tiny\", \"messages\": [", None),
        "not an object": (b"[1, 2]", None),
        "unknown parameter": ({**ok, "frobnicate": 1}, "frobnicate"),
        "n > 1": ({**ok, "n": 2}, "n"),
        "logprobs": ({**ok, "logprobs": True}, "logprobs"),
        "tools": ({**ok, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        "penalty": ({**ok, "presence_penalty": 0.5}, "presence_penalty"),
        "temperature range": ({**ok, "temperature": 5}, "temperature"),
        "max_tokens type": ({**ok, "max_tokens": "ten"}, "max_tokens"),
        "no messages": ({"model": "tiny-random", "messages": []}, "messages"),
        "bad role": ({"model": "tiny-random", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        "audio part": ({"model": "tiny-random", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {}}]}]}, "messages[0].content"),
        "undecodable image": ({**ok, "messages": _image_message(garbage)}, "image_url"),
        "invalid base64": ({**ok, "messages": _image_message("data:image/png;base64,@@@")}, "image_url"),
        "remote url": ({**ok, "messages": _image_message("http://example.com/cat.png")}, "image_url"),
        "unknown route": ({**ok, "routes": ["nosuch"]}, "routes"),
        "route without decoder": ({**ok, "routes": ["toy400"]}, "routes"),
        "image over the pixel limit": ({**ok, "messages": _image_message(
            "data:image/png;base64," + __import__("base64").b64encode(png_header_only(2000, 1000)).decode())},
            "image_url"),
        "decompression bomb": ({**ok, "messages": _image_message(
            "data:image/png;base64," + __import__("base64").b64encode(png_header_only(60000, 60000)).decode())},
            "image_url"),
        "prompt too long": ({**ok, "messages": [{"role": "user", "content": "x" * 5000}]}, None),
        "nul byte in a file path": ({**ok, "messages": _image_message(f"file://{media}/allowed/a%00.png")},
                                    "image_url"),
        "logit_bias id outside the vocabulary": ({**ok, "logit_bias": {"99999999": 1}}, None),
    }


def test_every_bad_request_is_a_400_with_an_openai_error(server, media, client):
    _, url = server
    register_route(RouteSpec("[TOY400]", table="toy400", num_queries="num_embs", decoder="toy400"))
    try:
        for name, (body, param) in _bad_bodies(media).items():
            r = _post(url, "/v1/chat/completions", body)
            assert r.status_code == 400, (name, r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["message"], name
            if param is not None:
                assert err["param"] == param, (name, err)
            if name in ("image over the pixel limit", "decompression bomb"):
                assert err["code"] == "image_too_large", err  # refused on the header, before decoding
    finally:
        unregister_route("[TOY400]")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "hi"}], n=3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    big = _post(url, "/v1/chat/completions", b"{" + b" " * (2 << 20) + b"}")
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    r = _post(url, "/v1/completions", {"model": "tiny-random", "prompt": "hi", "echo": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_per_request_timeout(server):
    engine, url = server
    body = {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500,
            "ignore_eos": True, "timeout": 0.3}
    r = _post(url, "/v1/chat/completions", body)
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    assert r.headers["x-should-retry"] == "false"  # clients must not run it again
    s = wait_idle(engine)
    assert s["kv_blocks_free"] == s["kv_blocks_total"]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_a_client_that_disconnects_cancels_its_request(server, stream):
    engine, url = server
    before = _metric(url, "unimlm_request_finished_total", reason="cancelled") or 0
    body = {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1900,
            "ignore_eos": True, "stream": stream}
    headers = {"Authorization": f"Bearer {KEY}"}
    if stream:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as resp:
            lines = resp.iter_lines()
            while not next(lines).startswith("data:"):
                pass
            assert engine.stats()["running"] == 1
    else:  # the client gives up after 0.5 s and closes the connection
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=httpx.Timeout(30, read=0.5))
    t0 = time.monotonic()
    s = wait_idle(engine)
    assert s["running"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]
    assert time.monotonic() - t0 < 3.0  # cancelled, not run to its 1900 tokens
    assert _metric(url, "unimlm_request_finished_total", reason="cancelled") == before + 1


def _metric(url, name, **labels):
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_metrics_parse(server, client):
    engine, url = server
    client.chat.completions.create(model="tiny-random", messages=_image_message(data_url(CAT)), max_tokens=6,
                                   extra_body={"routes": ["det"]})
    wait_idle(engine)
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    for name in ("unimlm_queue_depth", "unimlm_running_seqs", "unimlm_kv_blocks_used", "unimlm_kv_blocks_free",
                 "unimlm_preemptions", "unimlm_time_to_first_token_seconds", "unimlm_time_per_output_token_seconds",
                 "unimlm_e2e_request_latency_seconds", "unimlm_decoder_batch_size",
                 "unimlm_decoder_queue_delay_seconds", "unimlm_decoder_queue_depth"):
        assert name in fams, name
    s = engine.stats()
    val = {x.name: x.value for f in fams.values() for x in f.samples if not x.labels}
    assert val["unimlm_kv_blocks_free"] == s["kv_blocks_total"] == val["unimlm_kv_blocks_total"]
    assert val["unimlm_kv_blocks_used"] == 0 and val["unimlm_running_seqs"] == 0
    assert val["unimlm_preemptions_total"] == s["preemptions"]
    ok = sum(x.value for x in fams["unimlm_request_finished"].samples if x.labels.get("reason") in ("stop", "length")
             and x.name.endswith("_total"))
    assert _metric(url, "unimlm_e2e_request_latency_seconds_count") == ok > 0
    det = [x for x in fams["unimlm_decoder_batch_size"].samples
           if x.name.endswith("_count") and x.labels["decoder"] == "det"]
    assert det[0].value == len(engine.router.batch_sizes["det"]) >= 1
    delays = [x for x in fams["unimlm_decoder_queue_delay_seconds"].samples
              if x.name.endswith("_sum") and x.labels["decoder"] == "det"]
    assert 0 <= delays[0].value < 10


def test_a_full_queue_gives_429_with_retry_after():
    """One sequence runs, one waits (max_queue_size=1): the next request is refused at once."""
    cfg = ue.EngineConfig(max_num_seqs=1, max_queue_size=1)
    with running_server(cfg) as (engine, url, _):
        long = {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500,
                "ignore_eos": True, "stream": True}
        waiting = threading.Thread(target=lambda: pytest.raises(httpx.ReadTimeout, httpx.post, url + "/v1/chat/"
                                   "completions", json={**long, "stream": False}, timeout=httpx.Timeout(30, read=1.5)))
        with httpx.stream("POST", url + "/v1/chat/completions", json=long, timeout=30) as first:
            assert first.status_code == 200
            waiting.start()
            end = time.monotonic() + 5
            while engine.stats()["queued"] < 1 and time.monotonic() < end:
                time.sleep(0.01)
            r = _post(url, "/v1/chat/completions", {**long, "stream": False, "max_tokens": 2}, key=None)
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0).chat.completions.create(
                    model="tiny-random", messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True)
        waiting.join()
        s = wait_idle(engine)  # both long requests were cancelled when their clients closed
        assert s["kv_blocks_free"] == s["kv_blocks_total"]
        assert _post(url, "/v1/chat/completions", {**long, "stream": False, "max_tokens": 2}).status_code == 200


def test_serve_bench_against_the_running_server(server, tmp_path, capsys):
    from unimlm_engine.cli.main import main

    _, url = server
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(["serve-bench", "--url", url, "--api-key", KEY, "--num-requests", "4", "--request-rate", "50,100",
               "--mix", "text:0.5,vqa:0.3,det:0.2", "--max-tokens", "5", "--out", str(out), "--plot", str(png)])
    assert rc == 0
    table = capsys.readouterr().out
    assert table.startswith("| rate | conc | ok |") and table.count("\n") >= 3
    runs = json.loads(out.read_text())["runs"]
    assert [r["request_rate"] for r in runs] == [50.0, 100.0]
    for r in runs:
        assert r["ok"] == 4 and r["failed"] == 0
        # ignore_eos: every request generates exactly max_tokens tokens
        assert abs(r["output_tok_per_s"] * r["wall_s"] - 4 * 5) < 1e-6
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["e2e_p99_s"]
    assert png.stat().st_size > 1000


def test_span_route_results_are_in_the_message_tasks():
    """UnifiedMLLM span results (RequestOutput.spans) join the super-link ones in `message.tasks`, in that
    order, each with its character offsets, as the stream sends both kinds as task events."""
    import torch

    from unimlm_engine.server import app as server_app
    from unimlm_engine.engine.types import RequestOutput, TaskResult

    det = TaskResult(route="[DET]", num_groups=1, boxes=torch.tensor([[1.0, 2.0, 3.0, 4.0]]),
                     scores=torch.tensor([0.5]), labels=torch.tensor([0]), kind="detection", backend="eager")
    seg = TaskResult(route="box", num_groups=1, boxes=torch.tensor([[5.0, 6.0, 7.0, 8.0]]),
                     scores=torch.tensor([1.0]), labels=torch.tensor([0]), kind="detection", span=(10, 42),
                     span_text="dog", phrases=["dog"])
    out = RequestOutput("r", text="x", tasks=[det], spans=[seg])
    got = server_app._tasks_json(out)
    assert [t["route"] for t in got] == ["[DET]", "box"]
    assert got[0] == det.to_json() and got[1] == seg.to_json() and got[1]["span"] == {"start": 10, "end": 42, "text": "dog"}


def test_a_closed_engine_answers_503_and_health_says_so():
    """After the engine closes (e.g. a tensor-parallel worker died), requests get 503, not a traceback, and
    /health turns 503 so a load balancer stops sending traffic."""
    with running_server(api_key=KEY) as (engine, url, _):
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        engine.close()
        r = _post(url, "/v1/chat/completions", {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["message"], r.text
        assert httpx.get(url + "/health", timeout=10).status_code == 503
