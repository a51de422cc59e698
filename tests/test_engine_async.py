"""The engine's async side (issue 16): submit_async runs the intake off the event loop, astream yields the
same events as stream(), leaving astream early cancels the request, aresult awaits the output."""
import asyncio
import threading

import pytest

import unimlm_engine as ue
from engine_helpers import IMAGES, tiny_model
from server_helpers import wait_idle


@pytest.fixture(scope="module", params=[False, True], ids=["inline-output", "output-thread"])
def engine(request):
    """Events come from the loop thread (inline output, the CPU default) or the output thread (CUDA's)."""
    model, tok = tiny_model()
    with ue.Engine(model, tok, ue.EngineConfig(output_thread=request.param)) as eng:
        yield eng


def _req(**kw):
    sp = ue.SamplingParams(max_tokens=kw.pop("max_tokens", 12), temperature=0.8, seed=3, ignore_eos=True)
    return ue.Request(prompt="Describe it.", images=[IMAGES[0]], sampling=sp, **kw)


def test_intake_runs_off_the_loop_and_astream_matches_stream(engine):
    threads = []
    prepare = engine.intake.prepare

    def spy(*a, **k):
        threads.append(threading.current_thread())
        return prepare(*a, **k)

    engine.intake.prepare = spy
    try:
        async def main():
            loop_thread = threading.current_thread()
            h = await engine.submit_async(_req())
            events = [ev async for ev in h]
            return loop_thread, events, await h.aresult()

        loop_thread, events, out = asyncio.run(main())
    finally:
        engine.intake.prepare = prepare
    assert threads and all(t is not loop_thread for t in threads)
    assert events[-1].finished and sum(e.finished for e in events) == 1
    assert "".join(e.text for e in events) == out.text
    assert [i for e in events for i in e.token_ids] == out.token_ids
    ref = engine.submit(_req()).result()  # the blocking API, same seed: the same tokens
    assert ref.token_ids == out.token_ids and ref.text == out.text


def test_leaving_astream_early_cancels_the_request(engine):
    async def main():
        h = await engine.submit_async(_req(max_tokens=1500))
        async for ev in h.astream():
            if ev.text:
                break  # aclose() on leaving: the request is cancelled
        return await asyncio.wait_for(asyncio.wrap_future(h.future), 10)

    out = asyncio.run(main())
    assert out.finish_reason == "cancelled" and len(out.token_ids) < 1500


def test_a_cancelled_aresult_cancels_the_request(engine):
    async def main():
        h = await engine.submit_async(_req(max_tokens=1500))
        task = asyncio.ensure_future(h.aresult())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await asyncio.wait_for(asyncio.wrap_future(h.future), 10)

    assert asyncio.run(main()).finish_reason == "cancelled"
    s = wait_idle(engine)
    assert s["running"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]
