"""DecoderBatcher through the bindings: policies on a fake clock (poll), and a worker
thread blocked in next_batch with the GIL released."""
import threading
import time

import pytest

from unimlm_engine import _C

DECODERS = ("det", "seg", "grd", "pose", "gen", "edit")


def make(batch=4, delay_us=1000, cap=64):
    b = _C.DecoderBatcher()
    for name in DECODERS:
        b.add_decoder(name, _C.DecoderPolicy(max_batch_size=batch, max_queue_delay_us=delay_us, max_queue_size=cap))
    return b


def item(i, t, prio=0, deadline=0, req=None):
    return _C.BatchItem(i, i if req is None else req, payload=100 + i, priority=prio, enqueue_us=t, deadline_us=deadline)


def test_release_by_size_or_delay():
    b = make(batch=3, delay_us=50)
    b.submit("det", item(1, 10))
    b.submit("det", item(2, 20))
    assert b.poll("det", 40).empty()
    got = b.poll("det", 60)
    assert [x.id for x in got.items] == [1, 2] and [x.payload for x in got.items] == [101, 102]
    for i in range(5):
        b.submit("seg", item(10 + i, 100))
    assert len(b.poll("seg", 100).items) == 3 and b.queue_size("seg") == 2
    assert b.poll("gen", 10**9).empty()
    assert b.decoders() == sorted(DECODERS)


def test_priority_deadline_order_expired_cancelled():
    b = make(batch=2, delay_us=0)
    b.submit("pose", item(1, 0, prio=1))
    b.submit("pose", item(2, 1, prio=1, deadline=900))
    b.submit("pose", item(3, 2, prio=0, deadline=5))
    b.submit("pose", item(4, 3, prio=0, req=77))
    assert b.cancel_request(77) == 1
    got = b.poll("pose", 10)
    assert [x.id for x in got.cancelled] == [4]
    assert [x.id for x in got.expired] == [3]
    assert [x.id for x in got.items] == [2, 1]
    assert b.cancel(1) is False


def test_errors():
    b = make(cap=1)
    b.submit("edit", item(1, 0))
    with pytest.raises(_C.QueueFullError):
        b.submit("edit", item(2, 0))
    with pytest.raises(ValueError, match="unknown decoder"):
        b.submit("ocr", item(3, 0))
    with pytest.raises(ValueError, match="max_batch_size"):
        b.add_decoder("x", _C.DecoderPolicy(max_batch_size=0))


def test_worker_thread_blocks_without_gil_and_close_wakes():
    b = make(batch=8, delay_us=100_000)
    batches, closed = [], threading.Event()

    def worker():
        while True:
            got = b.next_batch("det", timeout=None)
            if got.closed:
                closed.set()
                return
            batches.append([x.id for x in got.items])

    th = threading.Thread(target=worker)
    th.start()
    busy_until = time.perf_counter() + 0.05
    spins = 0
    while time.perf_counter() < busy_until:  # the main thread keeps the interpreter
        spins += 1
    assert spins > 1000
    t0 = _C.DecoderBatcher.now_us()
    for i in range(3):
        b.submit("det", _C.BatchItem(i, i, payload=i))
    deadline = time.time() + 5
    while not batches and time.time() < deadline:
        time.sleep(0.001)
    assert batches == [[0, 1, 2]]  # released by max_queue_delay, not by size
    assert _C.DecoderBatcher.now_us() - t0 >= 100_000
    b.close()
    th.join(timeout=5)
    assert closed.is_set() and not th.is_alive()


def test_next_batch_timeout():
    b = make()
    t0 = time.perf_counter()
    got = b.next_batch("grd", timeout=0.01)
    assert got.empty() and not got.closed and time.perf_counter() - t0 >= 0.009
