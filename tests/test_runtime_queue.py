"""RequestQueue through the bindings: bounds, timeouts, close, multi-threaded push/pop."""
import threading
import time

import pytest

from unimlm_engine import _C


def test_bounded_with_clear_rejection():
    q = _C.RequestQueue(2)
    q.push(1)
    assert q.try_push(2) and not q.try_push(3)
    with pytest.raises(_C.QueueFullError, match="full"):
        q.push(3)
    assert len(q) == 2 and q.pop(timeout=0) == 1 and q.pop_all() == [2]
    t0 = time.perf_counter()
    assert q.pop(timeout=0.01) is None and time.perf_counter() - t0 >= 0.009
    q.push(9)
    q.close()
    with pytest.raises(RuntimeError, match="closed"):
        q.push(10)
    assert q.pop() == 9 and q.pop() is None
    with pytest.raises(ValueError):
        _C.RequestQueue(0)


@pytest.mark.parametrize("producers,consumers", [(1, 1), (4, 3)], ids=["1p-1c", "4p-3c"])
def test_multithreaded_push_pop_every_id_once(producers, consumers):
    q = _C.RequestQueue(17)
    per = 2000
    got, lock = [], threading.Lock()

    def produce(p):
        for i in range(per):
            while not q.try_push(p * per + i):
                time.sleep(0)

    def consume():
        mine = []
        while (x := q.pop(timeout=None)) is not None:
            mine.append(x)
        with lock:
            got.extend(mine)

    cons = [threading.Thread(target=consume) for _ in range(consumers)]
    prods = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in cons + prods:
        t.start()
    for t in prods:
        t.join()
    while len(q):
        time.sleep(0.001)
    q.close()  # wakes every consumer blocked in pop
    for t in cons:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in cons)
    assert sorted(got) == list(range(producers * per))
