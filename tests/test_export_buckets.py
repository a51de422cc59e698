"""Export bucket planning (export/buckets.py): default canvases, --canvas / --batch / --classes parsing."""
import pytest

from unimlm_engine.config.decoders import DetectorConfig
from unimlm_engine.config.presets import get_preset
from unimlm_engine.export.buckets import Range, default_canvases, parse_canvases, plan_buckets


def test_default_canvases_are_every_canvas_of_the_resize():
    tiny = get_preset("tiny-random").detector
    assert default_canvases(tiny, 32) == [(32, 96), (96, 32), (64, 64), (64, 96), (96, 64)]
    big = default_canvases(DetectorConfig(), 32)
    assert len(big) == 83 and (800, 800) in big and (800, 1344) in big and (32, 1344) in big
    # the canvas of every resized image (mmcv rescale, padded to 32) is in the list
    from unimlm_engine.model.decoders.images import canvas_of, mmcv_rescale_size
    for h in range(1, 200, 7):
        for w in range(1, 200, 11):
            assert canvas_of(mmcv_rescale_size(h, w, 64, 96)) in default_canvases(tiny, 32)


def test_default_plan():
    plan = plan_buckets(get_preset("tiny-random").detector, 32, queries=4)
    assert plan.batch == Range(1, 8, 8) and plan.classes == Range(1, 8, 256)
    assert plan.main_canvas() == (96, 64) and plan.to_dict()["queries"] == 4


@pytest.mark.parametrize("spec,want", [
    ("8", Range(1, 8, 8)), ("2:4", Range(2, 4, 4)), ("1:2:8", Range(1, 2, 8)), ("4:4:4", Range(4, 4, 4)),
])
def test_range_forms(spec, want):
    r = Range.parse(spec, "batch")
    assert r == want and r.static == (want.min == want.max)


def test_example_avoids_0_1_specialisation():
    assert Range(1, 1, 8).example() == 2 and Range(1, 1, 1).example() == 1 and Range(3, 3, 3).example() == 3


@pytest.mark.parametrize("spec,match", [("0", "1 <= min"), ("4:2", "min <= opt"), ("a", "integers"),
                                        ("1:2:3:4", "MIN:OPT:MAX")])
def test_range_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        Range.parse(spec, "batch")


def test_canvas_list_and_errors():
    tiny = get_preset("tiny-random").detector
    assert parse_canvases("128x128,64X128,64x128", tiny, 64) == [(64, 128), (128, 128)]
    assert parse_canvases("auto", tiny, 64) == default_canvases(tiny, 64)
    with pytest.raises(ValueError, match="pad multiple 64"):
        parse_canvases("96x128", tiny, 64)
    with pytest.raises(ValueError, match="HxW"):
        parse_canvases("128", tiny, 64)
    with pytest.raises(ValueError, match="max_classes"):
        plan_buckets(tiny, 64, classes="300")
