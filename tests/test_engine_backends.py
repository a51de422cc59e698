"""Decoder back ends selected in the engine (issue 11): a checkpoint directory exported with
`unimlm export det --model DIR` serves [DET] through ONNX Runtime, chosen by EngineConfig.decoder_backends
or the CLI's --decoder-backend, and equals the eager engine for concurrent requests with different
class counts and image sizes (all resized onto the exported 64x96 canvas: the official detector runs each
image on its own canvas, so an export serves exactly the canvases it was made for)."""
import json

import numpy as np
import pytest
import torch

import unimlm_engine as ue
from unimlm_engine.checkpoint.pretrained import load_pretrained
from unimlm_engine.cli.main import main

IMAGES = [(41, 97), (80, 120), (300, 451)]  # (h, w): resized to 41x96, 64x96, 64x96: one 64x96 canvas
CLASSES = [1, 3, 5]


@pytest.fixture(scope="module")
def exported(det_ckpt, det_ckpt_export):
    """A tiny checkpoint directory and its detector exported from that directory (tests/conftest.py: shared
    with test_export_checkpoint.py)."""
    rc, _, err, out = det_ckpt_export
    assert rc == 0, err
    return det_ckpt, out / "det.onnx"


def _requests(tok):
    det = tok.special_ids["[DET]"]
    rng = np.random.default_rng(0)
    return [ue.Request(prompt=f"Find {c} things.", images=[rng.integers(0, 256, (h, w, 3), dtype=np.uint8)],
                       sampling=ue.SamplingParams(max_tokens=c + 1, forced_prefix=(det,) * c))
            for c, (h, w) in zip(CLASSES, IMAGES)]


def _serve(ckpt, **cfg):
    model, tok = load_pretrained(str(ckpt), device="cpu")
    with ue.Engine(model, tok, ue.EngineConfig(decoder_max_batch_size=4, decoder_max_queue_delay_ms=200, **cfg)) as e:
        outs = e.generate_batch(_requests(tok))
        stats = e.stats()
    return outs, stats


def test_det_through_onnxruntime_equals_eager(exported):
    ckpt, onnx_path = exported
    eager, _ = _serve(ckpt)
    ort, stats = _serve(ckpt, decoder_backends={"det": f"onnxruntime:{onnx_path}"})
    assert stats["decoder_backends"] == {"[DET]": "onnxruntime"}
    assert stats["decoder_mean_batch_size"]["det"] > 1  # the requests really shared a decoder call
    for a, b, c in zip(ort, eager, CLASSES):
        (ta,), (tb,) = a.tasks, b.tasks
        assert ta.backend == "onnxruntime" and tb.backend == "eager" and ta.num_groups == c
        assert torch.equal(ta.labels, tb.labels)
        torch.testing.assert_close(ta.scores, tb.scores, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ta.boxes, tb.boxes, atol=1e-2, rtol=1e-4)  # pixels
    assert sum(len(o.tasks[0].boxes) for o in eager) > 0, "no detection left to compare"


def test_cli_decoder_backend(exported, capsys):
    ckpt, onnx_path = exported
    argv = ["generate", "--model", str(ckpt), "--image", "examples/images/coffee.png", "--prompt", "Find it.",
            "--route", "DET", "--json"]
    assert main(argv) == 0
    eager = json.loads(capsys.readouterr().out)["tasks"][0]
    assert main(argv + ["--decoder-backend", f"det=onnxruntime:{onnx_path}"]) == 0
    ort = json.loads(capsys.readouterr().out)["tasks"][0]
    assert (eager["backend"], ort["backend"]) == ("eager", "onnxruntime")
    assert ort["labels"] == eager["labels"]
    np.testing.assert_allclose(ort["boxes"], eager["boxes"], atol=1e-2)


def test_backend_that_cannot_serve_a_route_is_refused(exported):
    ckpt, onnx_path = exported
    model, tok = load_pretrained(str(ckpt), device="cpu")
    with pytest.raises(ValueError, match="cannot serve \\[SEG\\]"):
        ue.Engine(model, tok, ue.EngineConfig(decoder_backends={"seg": f"onnxruntime:{onnx_path}"}))


def test_value_log_keeps_count_sum_and_feeds_subscribers_without_history():
    """The router's per-decoder statistics: mean from count and sum, every value passed to the subscribers
    (the server's histograms) from several threads, and no per-value list kept."""
    import threading

    from unimlm_engine.engine.routing import ValueLog

    log = ValueLog()
    assert log.mean() is None and len(log) == 0
    log.add(3)
    seen = []
    log.subscribe(seen.append)  # values from now on
    threads = [threading.Thread(target=lambda: [log.add(1.0) for _ in range(1000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(log) == 4001 and log.total == 4003.0 and abs(log.mean() - 4003 / 4001) < 1e-12
    assert len(seen) == 4000 and set(seen) == {1.0}
    assert not any(isinstance(v, (list, tuple)) for v in vars(log).values() if v is not log._subscribers)
