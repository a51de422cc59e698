"""Visual prompts through the engine (issue 14): batched region requests equal the reference model run one
request at a time, prefix caching keys on regions, every bad input is a typed error on its own request,
official-layout checkpoints load `region_encoder.*`, and the CLI's --region."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import unimlm_engine as ue
from engine_helpers import IMAGES, tiny_model
from unimlm_engine.checkpoint.loader import load_checkpoint, save_checkpoint
from unimlm_engine.cli.main import main
from unimlm_engine.config.presets import get_preset
from unimlm_engine.engine.regions import parse_region, prepare_regions
from unimlm_engine.inputs.processor import load_image
from unimlm_engine.inputs.tokenizer import ByteTokenizer
from unimlm_engine.model import build_model, reference_generate

ONE = "Describe <reg>region1<region></reg> in a few words, please."
TWO = "How do <reg>region1<region></reg> and <reg>region2<region></reg> differ?"


def _reference(engine, req):
    """The reference model on one request alone (regions rasterized the same way, encoded plainly)."""
    p = engine.intake.processor(req.prompt, req.images, chat=req.chat)
    images = [load_image(i) for i in req.images or []]
    n = int((p.input_ids == engine.tokenizer.special_ids["<region>"]).sum())
    rins = prepare_regions(req.regions, images, p.image_hashes, engine.model.cfg.vision.image_size, n)
    return reference_generate(engine.model, p.input_ids, p.pixel_values, params=req.sampling, regions=rins)


def _sp(seed, n=8, det=False):
    """Seeded sampling; det: force a [DET] first, so the request also has a payload (hidden states)."""
    forced = (tiny_model()[1].special_ids["[DET]"],) if det else ()
    return ue.SamplingParams(max_tokens=n, temperature=1.0, seed=seed, forced_prefix=forced)


def _same(out, ref):
    assert out.error is None, out.error
    assert out.token_ids == ref.token_ids
    assert [p.route for p in out.payloads] == [p.route for p in ref.payloads]
    for a, b in zip(out.payloads, ref.payloads):
        torch.testing.assert_close(a.payload, b.payload, atol=1e-4, rtol=1e-4)


def _mask(image, y0, y1, x0, x1):
    im = load_image(image)
    m = np.zeros((im.height, im.width), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture(scope="module")
def engine():
    model, tok = tiny_model()
    eng = ue.Engine(model, tok, ue.EngineConfig(num_kv_blocks=256, max_num_seqs=8, block_size=16,
                                                enable_prefix_caching=True))
    yield eng
    eng.close()


def test_batched_region_requests_equal_reference(engine):
    img0, img1 = IMAGES[0], IMAGES[1]
    reqs = [
        ue.Request(prompt=ONE, images=[img0], regions=[ue.Region.box_xyxy(10, 20, 200, 150)],
                   sampling=_sp(1, det=True)),
        ue.Request(prompt=ONE, images=[img0], regions=[ue.Region.point(300, 100)], sampling=_sp(1, det=True)),
        ue.Request(prompt=ONE, images=[img0], regions=[ue.Region.scribble([[5, 5], [400, 250]])],
                   sampling=_sp(1, det=True)),
        ue.Request(prompt=ONE, images=[img0], regions=[{"mask": _mask(img0, 50, 250, 100, 400)}],
                   sampling=_sp(1, det=True)),
        ue.Request(prompt=TWO, images=[img1], regions=[{"box": [0, 0, 50, 60]}, {"points": [[3, 4], [90, 80]]}],
                   sampling=_sp(2)),
        ue.Request(prompt=ONE, images=[img0], regions=[ue.Region.box_xyxy(10, 20, 200, 150)],
                   sampling=_sp(1, det=True)),
        ue.Request(prompt="<image><image> " + ONE, images=[img0, img1], regions=[ue.Region.point(7, 9, image=1)],
                   sampling=_sp(3)),
        ue.Request(prompt=ONE, images=[img1], regions=[{"mask": _mask(img1, 0, 300, 0, 400), "seed": 9}],
                   sampling=_sp(4)),  # over 2304 canvas pixels: sub-sampled, seeded
    ]
    outs = engine.generate_batch(reqs)
    refs = [_reference(engine, r) for r in reqs]
    for out, ref in zip(outs, refs):
        _same(out, ref)
    assert outs[0].token_ids == outs[5].token_ids
    # same image and prompt, different regions: the region really reaches the LLM's hidden states
    rows = [o.payloads[0].payload for o in outs[:4]]
    assert min((a - b).abs().max() for i, a in enumerate(rows) for b in rows[i + 1:]) > 1e-3


def test_regions_under_chunked_prefill_and_preemption():
    """A small KV pool and token budget: prompts split across steps (a chunk may hold the <region> token but
    no image token), preemption recomputes; a one-tile image (no thumbnail: its only tile is the canvas)."""
    model, tok = tiny_model()
    small = np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)  # one 56 px tile
    reqs = [ue.Request(prompt=TWO + " " + "very " * (i * 3), images=[IMAGES[i % 3]], chat=False,
                       regions=[ue.Region.box_xyxy(5, 5, 90 + i, 80), ue.Region.point(20 + i, 30)],
                       sampling=_sp(10 + i, det=True)) for i in range(5)]
    reqs.append(ue.Request(prompt=ONE, images=[small], regions=[ue.Region.box_xyxy(3, 4, 20, 25)], chat=False,
                           sampling=_sp(20, det=True)))
    with ue.Engine(model, tok, ue.EngineConfig(num_kv_blocks=20, max_num_batched_tokens=32, max_num_seqs=8,
                                               block_size=16)) as eng:
        outs = eng.generate_batch(reqs)
        assert eng.stats()["preemptions"] > 0
        for req, out in zip(reqs, outs):
            _same(out, _reference(eng, req))
    assert eng.intake.processor(ONE, [small]).num_tiles == [1]


def test_prefix_cache_keys_on_regions(engine):
    img = IMAGES[2]
    a_region, b_region = ue.Region.box_xyxy(10, 10, 100, 100), ue.Region.box_xyxy(200, 100, 400, 300)
    first = engine.generate(ONE, images=[img], regions=[a_region], sampling=_sp(5, 6, det=True))
    other = engine.generate(ONE, images=[img], regions=[b_region], sampling=_sp(5, 6, det=True))
    again = engine.generate(ONE, images=[img], regions=[a_region], sampling=_sp(5, 6, det=True))
    p = engine.intake.processor(ONE, [img])
    pos = int((p.input_ids == engine.tokenizer.special_ids["<region>"]).nonzero()[0])
    assert pos > p.image_spans[0][1]  # the region token comes after the image tokens
    # the other region shares the image blocks, never the block holding the region token or later ones
    assert p.image_spans[0][0] < other.num_cached_tokens <= pos // 16 * 16
    assert again.num_cached_tokens > pos  # the same image and region: its KV is reused
    assert again.token_ids == first.token_ids
    torch.testing.assert_close(again.payloads[0].payload, first.payloads[0].payload, atol=1e-5, rtol=0)
    for out, region in ((first, a_region), (other, b_region)):
        req = ue.Request(prompt=ONE, images=[img], regions=[region], sampling=_sp(5, 6, det=True))
        _same(out, _reference(engine, req))
    assert (first.payloads[0].payload - other.payloads[0].payload).abs().max() > 1e-3


BAD = [
    (dict(regions=[ue.Region.box_xyxy(0, 0, 1000, 10)]), "outside the 451x300 image"),
    (dict(regions=[{"mask": np.zeros((300, 451), dtype=bool)}]), "the mask is empty"),
    (dict(regions=[{"points": [[1, 2], [3]]}]), "expected 2 finite numbers"),
    (dict(regions=[{"points": "12"}]), "list of at least 1"),
    (dict(regions=[ue.Region.point(1, 1), ue.Region.point(2, 2)]), "1 <region> tokens but 2 regions"),
    (dict(regions=None), "1 <region> tokens but 0 regions"),
    (dict(images=None), "needs an image"),
    (dict(regions=[ue.Region.point(1, 1, image=3)]), "image index 3"),
]


@pytest.mark.parametrize("change,match", BAD, ids=["outside", "empty-mask", "malformed-points", "points-not-list",
                                                    "more-regions", "fewer-regions", "no-image", "bad-image-index"])
def test_bad_region_input_is_a_typed_error_and_the_engine_goes_on(engine, change, match):
    base = dict(prompt=ONE, images=[IMAGES[0]], regions=[ue.Region.point(3, 4)], sampling=_sp(6, 3))
    handle = engine.submit(ue.Request(**{**base, **change}))
    with pytest.raises(ue.InvalidRegionError, match=match) as e:
        handle.result()
    assert isinstance(e.value, ue.InvalidRequestError)
    assert engine.generate(**{k: v for k, v in base.items() if k != "prompt"}, prompt=ONE).ok


def test_prompt_token_ids_with_regions(engine):
    tok = engine.tokenizer
    ids = tok.encode("USER: <image>\n" + ONE + " ASSISTANT:", add_bos=True)
    req = ue.Request(prompt_token_ids=ids, images=[IMAGES[0]], regions=[ue.Region.point(100, 100)],
                     sampling=_sp(7, det=True))
    out = engine.generate_batch([req])[0]
    images = [load_image(IMAGES[0])]
    full, _, pixels, hashes = engine.intake._from_ids(ids, images)
    rins = prepare_regions(req.regions, images, hashes, engine.model.cfg.vision.image_size, 1)
    _same(out, reference_generate(engine.model, full, pixels, params=req.sampling, regions=rins))


def test_official_checkpoint_with_region_encoder_loads(tmp_path):
    cfg = get_preset("tiny-random")
    model = build_model(cfg, seed=3, with_decoders=False)
    path = save_checkpoint(model, tmp_path / "ckpt", tokenizer=ByteTokenizer())
    config = json.loads((path / "config.json").read_text())
    keys = {k for k in json.loads((path / "pytorch_model.bin.index.json").read_text())["weight_map"]
            if k.startswith("region_encoder.")}
    assert config["use_region_encoder"] is True
    assert keys == {f"region_encoder.{m}.{p}" for m in ("mask_embedding.0", "mask_embedding.1", "mask_embedding.3",
                                                         "mask_embedding.4", "mask_embedding.6", "up_dim")
                    for p in ("weight", "bias")}
    loaded, _, report = load_checkpoint(path, with_decoders=False)  # raises on any missing / unexpected key
    assert report.not_loaded == {} and report.loaded == len(model.state_dict())
    for k, v in model.region_encoder.state_dict().items():
        assert torch.equal(v, loaded.region_encoder.state_dict()[k])
    # a config without the region encoder reports its keys as not loaded
    config["use_region_encoder"] = False
    (path / "config.json").write_text(json.dumps(config))
    plain, _, report = load_checkpoint(path, with_decoders=False)
    assert plain.region_encoder is None and report.not_loaded == {"region_encoder": len(keys)}


def test_model_without_region_encoder_rejects_regions():
    model, tok = tiny_model()
    plain = dataclasses.replace(model.cfg, use_region_encoder=False)
    m = build_model(plain, seed=1, with_decoders=False)
    m.special_ids = dict(tok.special_ids)
    with ue.Engine(m, tok, ue.EngineConfig(num_kv_blocks=64)) as eng:
        with pytest.raises(ue.InvalidRegionError, match="no region encoder"):
            eng.generate(ONE, images=[IMAGES[0]], regions=[ue.Region.point(1, 1)], sampling=_sp(1, 2))
        assert eng.generate(ONE, images=[IMAGES[0]], sampling=_sp(1, 2)).ok  # <region>: an ordinary token


def test_parse_region_cli_forms(tmp_path):
    assert parse_region("box:1,2,30.5,40").box == [1, 2, 30.5, 40]
    assert parse_region("point:3,4;5,6").points == [[3, 4], [5, 6]]
    r = parse_region("scribble:1,1;9,9@4")
    assert r.kind == "scribble" and r.width == 4 and r.points == [[1, 1], [9, 9]]
    for bad in ("box:1,2,3", "circle:1,2", "point:1", "mask:/no/such.png", "box"):
        with pytest.raises(ue.InvalidRegionError):
            parse_region(bad)


def test_cli_generate_with_regions(capsys, tmp_path):
    img = load_image(IMAGES[0])
    m = np.zeros((img.height, img.width), dtype=np.uint8)
    m[40:120, 60:200] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    prompt = TWO.replace("region2<region>", "region2<region></reg> <reg>region3<region>")
    argv = ["generate", "--model", "tiny-random", "--image", IMAGES[0], "--prompt", prompt, "--json", "--max-tokens", "3",
            "--region", "box:10,20,200,150", "--region", "point:30,40", "--region", f"mask:{tmp_path / 'm.png'}"]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["error"] is None
    assert main(argv[:-6] + ["--region", "box:10,20,2000,150"]) == 2
    assert "outside" in capsys.readouterr().err
    assert main(argv[:-2]) == 1  # 3 <region> tokens, 2 regions: the request fails with the typed error
    assert "InvalidRegionError" in capsys.readouterr().err
