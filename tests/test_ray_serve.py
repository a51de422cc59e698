"""Replicas on Ray Serve (unimlm_engine.server.ray_serve).

The fast tests drive the proxy-side middleware with hand-made ASGI messages, the CLI flags and the
documented Serve config. The slow ones start one Ray cluster of two nodes on this machine (1 CPU each,
shared by the module) with 2 replicas of `tiny` at 1 CPU, so one per node: the requests spread over
both, answers match the plain `unimlm serve` app, and a replica killed mid-request ends its requests
with the replica_lost error while the service goes on.
"""
import asyncio
import concurrent.futures as cf
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")

from server_helpers import running_server, sse_events  # noqa: E402
from unimlm_engine.server import ray_serve as rs  # noqa: E402
from unimlm_engine.server.serve import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---- the proxy middleware, no cluster -------------------------------------------------------------------------
def _drive(inner) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(rs._ReplicaLostErrors(inner)({"type": "http"}, receive, send))
    return sent


def _start(ctype: bytes) -> dict:
    return {"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)]}


def test_no_response_becomes_502_json_error():
    async def lost(scope, receive, send):  # what the Ray proxy does when the replica died before answering
        return

    sent = _drive(lost)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 502
    assert json.loads(sent[1]["body"])["error"]["code"] == "replica_lost"


def test_cut_stream_gets_error_event_and_finished_responses_pass_through():
    async def cut(scope, receive, send):  # a stream whose replica died mid-way: no final body message
        await send(_start(b"text/event-stream"))
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})

    sent = _drive(cut)
    assert len(sent) == 3 and not sent[-1].get("more_body", False)
    last = sent[-1]["body"].decode()
    assert last.startswith("data: ") and json.loads(last[6:])["error"]["code"] == "replica_lost"

    async def whole(scope, receive, send):
        await send(_start(b"text/event-stream"))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    done = _drive(whole)
    assert len(done) == 2 and done[-1]["body"] == b"data: [DONE]\n\n"


def test_app_builder_rejects_unknown_arguments():
    with pytest.raises(ValueError, match="replicas"):
        rs.app_builder({"model": "tiny-random", "replicas": "2"})


def test_documented_serve_config_builds_an_autoscaled_app():
    import yaml

    (app,) = yaml.safe_load((ROOT / "examples/ray_serve.yaml").read_text())["applications"]
    mod, _, fn = app["import_path"].partition(":")
    assert (mod, fn) == (rs.__name__, "app_builder")
    built = rs.app_builder(app["args"])
    dep = built._bound_deployment  # (Serve keeps the deployment options there)
    assert dep._deployment_config.autoscaling_config.max_replicas == app["args"]["max_replicas"]
    assert dep.ray_actor_options["num_cpus"] == app["args"]["num_cpus"]


@pytest.mark.parametrize("argv, message", [(["--replicas", "2"], "need --ray"),
                                           (["--ray", "--autoscale", "4:1"], "expected MIN:MAX"),
                                           (["--ray", "--device", "cuda"], "needs --replica-gpus")])
def test_cli_checks_ray_flags_before_starting_anything(capsys, argv, message):
    from unimlm_engine.cli.main import main

    assert main(["serve", "--model", "tiny-random", *argv]) == 2
    assert message in capsys.readouterr().err


# ---- a real Ray Serve deployment ------------------------------------------------------------------------------
BODY = {"model": "tiny-random", "prompt": "Describe the picture.", "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def ray_url():
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH")}
    # replicas and the proxy import this checkout's package; the proxy turns lost requests into clear errors
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved["PYTHONPATH"]) if p)
    os.environ[rs.PROXY_ENV] = rs.PROXY_CALLBACK
    # two Ray nodes on this machine (1 CPU each): the multi-node path as far as one machine allows
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(rs.app_builder({"model": "tiny-random", "num_replicas": "2", "num_cpus": "1", "max_num_seqs": "8"}),
                  name=rs.APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


@pytest.mark.slow
def test_requests_spread_over_both_replicas_with_the_same_answers(ray_url):
    with cf.ThreadPoolExecutor(4) as ex:
        resps = list(ex.map(lambda _: _post(ray_url, BODY), range(12)))
    assert all(r.status_code == 200 for r in resps), [r.text for r in resps]
    replicas = {r.headers[rs.REPLICA_HEADER]: r.headers[rs.PID_HEADER] for r in resps}
    assert len(replicas) == 2 and len(set(replicas.values())) == 2, replicas
    assert len({r.headers[rs.NODE_HEADER] for r in resps}) == 2  # one replica per node (1 CPU each)
    with running_server() as (_, url, _):  # the plain one-process server is the reference
        ref = _post(url, BODY).json()
    for r in resps:
        got = r.json()
        assert got["choices"][0]["text"] == ref["choices"][0]["text"]
        for k in ("prompt_tokens", "completion_tokens"):  # (cached_tokens depends on each replica's history)
            assert got["usage"][k] == ref["usage"][k]
    health = httpx.get(ray_url + "/health", timeout=30)
    assert health.json() == {"status": "ok"} and health.headers[rs.REPLICA_HEADER] in replicas


def _long(url: str, stream: bool, started: cf.Future):
    """One long request -> ("ok" | "lost", pid or None, detail); `started` is set once the replica answered."""
    body = dict(BODY, max_tokens=400, ignore_eos=True, stream=stream)
    if not stream:
        r = _post(url, body)
        started.set_result(r.headers.get(rs.PID_HEADER))
        if r.status_code == 200:
            assert r.json()["choices"][0]["finish_reason"] == "length"
            return "ok", r.headers[rs.PID_HEADER], None
        assert r.status_code == 502, r.text
        return "lost", None, r.json()["error"]["code"]
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        if r.status_code != 200:  # its replica died before the stream started
            started.set_result(None)
            assert r.status_code == 502, r.read()
            return "lost", None, json.loads(r.read())["error"]["code"]
        started.set_result(r.headers[rs.PID_HEADER])
        events = [data for _, data in sse_events(r)]
    if events[-1] == "[DONE]":
        return "ok", r.headers[rs.PID_HEADER], None
    return "lost", r.headers[rs.PID_HEADER], json.loads(events[-1])["error"]["code"]


@pytest.mark.slow
def test_killed_replica_fails_its_requests_clearly_and_service_goes_on(ray_url):
    with cf.ThreadPoolExecutor(8) as ex:
        starts = [cf.Future() for _ in range(6)]
        futs = [ex.submit(_long, ray_url, i % 2 == 1, s) for i, s in enumerate(starts)]
        streams = [starts[i] for i in (1, 3, 5)]
        victim = next(iter(cf.wait(streams, timeout=60, return_when=cf.FIRST_COMPLETED).done)).result()
        assert victim is not None  # a stream is running there (its first token came back): kill its replica
        os.kill(int(victim), signal.SIGKILL)
        results = [f.result(timeout=120) for f in futs]
    # every request either finished or ended with the replica_lost error; none hung, none was cut silently
    for kind, pid, code in results:
        assert (kind, code) in {("ok", None), ("lost", "replica_lost")}
    lost_streams = [r for i, r in enumerate(results) if i % 2 == 1 and r[1] == victim]
    assert lost_streams and all(r[0] == "lost" for r in lost_streams)  # 400 tokens take far longer than a kill
    # requests the other replica served finished (Serve's power-of-two routing may have sent all six to the
    # victim: then there are none, and the 4 requests below show the other replica serving)
    assert all(r[0] == "ok" for r in results if r[1] is not None and r[1] != victim)
    # new requests go to the live replica (or its replacement), without errors
    t0 = time.monotonic()
    after = [_post(ray_url, BODY) for _ in range(4)]
    assert all(r.status_code == 200 and r.headers[rs.PID_HEADER] != victim for r in after)
    assert time.monotonic() - t0 < 60
