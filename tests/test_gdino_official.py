"""The engine's detector (gdino) against an independent implementation of the official VisionLLM v2 gdino
(tests/gdino_reference.py, written from the official code), on official-layout state dicts at a small config.

fp32, tolerance 1e-4 on raw outputs; 1 and several classes, odd image sizes, both tied-key variants, several
requests batched in one call (different class counts, sizes, canvases) == one at a time == the reference.
"""
import numpy as np
import pytest
import torch
from torch import nn

from gdino_reference import (official_keys, random_state_dict, reference_det, reference_image, reference_instseg,
                             reference_request, reference_semseg, tied_names)
from unimlm_engine.config.decoders import DetectorConfig
from unimlm_engine.model.decoders.detector import DetectorDecoder
from unimlm_engine.model.decoders.images import gdino_image

SHORT, LONG = 96, 160
CFG = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
           encoder_ffn_dim=64, decoder_ffn_dim=64, num_feature_levels=4, encoder_n_points=2, decoder_n_points=2,
           num_queries=30, max_text_len=256, mask_dim=16, norm="GN", l_hidden_size=48, num_embs=4, two_stage=True,
           embedding_init_target=True, decoder_bbox_embed_share=True, two_stage_bbox_embed_share=False, query_dim=4,
           positional_embedding_temperature=20, activation_function="relu", position_embedding_type="sine",
           backbone_config=dict(model_type="swin", embed_dim=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4],
                                window_size=3, out_features=["stage1", "stage2", "stage3", "stage4"]),
           image_short=SHORT, image_long=LONG)
K = 4
ATOL = 1e-4


def _img(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _payload(c, seed):
    return 0.2 * torch.randn(c, K, CFG["l_hidden_size"], generator=torch.Generator().manual_seed(seed))


def _load(cfg, sd):
    det = DetectorDecoder(DetectorConfig.from_dict(cfg)).eval()
    holder = nn.Module()
    holder.gdino = det
    res = holder.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    return det


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small ops: one intra-op thread is much faster than two on a loaded machine (and deterministic)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def det_sd():
    return random_state_dict(CFG, seed=0)


@pytest.fixture(scope="module")
def sd():
    return det_sd()


@pytest.fixture(scope="module")
def det(sd):
    return _load(CFG, sd)


def _once(sd, keep_first_of_group: bool):
    """The tied tensors written once: HF's safetensors dedup keeps the first name of each group in state_dict
    order (model.decoder.bbox_embed.0 / mask_embed.0); the other variant keeps the head's bbox_embed.0 only."""
    out = dict(sd)
    for group in tied_names(CFG):
        keep = group[0] if keep_first_of_group else ([k for k in group if k.startswith("gdino.bbox_embed.0.")]
                                                       or group[:1])[0]
        for k in group:
            if k != keep:
                out.pop(k)
    return out


def test_state_dict_is_the_official_key_set(det):
    own = {"gdino." + k: tuple(v.shape) for k, v in det.state_dict().items()}
    assert own == official_keys(CFG)


@pytest.mark.parametrize("variant", ["twice", "once-first", "once-head"])
def test_tied_variants_load_with_no_missing_or_unexpected_keys(sd, variant):
    src = sd if variant == "twice" else _once(sd, variant == "once-first")
    if variant != "twice":
        assert len(src) < len(sd)
    det = _load(CFG, src)
    got = {"gdino." + k: v for k, v in det.state_dict().items()}
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    assert det.bbox_embed[0] is det.model.decoder.bbox_embed[1] and det.mask_embed[0] is det.mask_embed[1]


def test_differing_tied_copies_raise(sd):
    bad = dict(sd)
    k = "gdino.bbox_embed.1.layers.0.bias"
    bad[k] = bad[k] + 1
    with pytest.raises(ValueError, match="tied"):
        _load(CFG, bad)


def test_config_reads_and_writes_the_official_gdino_config():
    c = DetectorConfig.from_dict(CFG)
    assert (c.embed_dim, c.depths, c.num_heads, c.window_size) == (16, (1, 2, 1, 1), (1, 2, 2, 4), 3)
    assert (c.llm_hidden_size, c.max_classes, c.mask_dim, c.num_embs) == (48, 256, 16, 4)
    out = c.to_dict()
    assert out["backbone_config"]["depths"] == [1, 2, 1, 1] and out["l_hidden_size"] == 48 and out["norm"] == "GN"
    assert DetectorConfig.from_dict(out) == c
    with pytest.raises(ValueError, match="two_stage"):
        DetectorConfig.from_dict({**CFG, "two_stage": False})
    with pytest.raises(ValueError, match="model_type"):
        DetectorConfig.from_dict({**CFG, "backbone_config": {"model_type": "resnet"}})


@pytest.mark.parametrize("h,w", [(50, 73), (61, 95), (90, 41), (96, 160), (7, 300)])
def test_image_preparation_matches_the_official_pipeline(h, w):
    img = _img(h, w, h * w)
    pv, pm, img_shape, ori = reference_image(img, SHORT, LONG)
    x, resized, original = gdino_image(torch.from_numpy(img), SHORT, LONG)
    assert resized == img_shape and original == ori
    # both are float bilinear stand-ins for cv2's fixed-point INTER_LINEAR: a value at an exact .5 may round
    # either way, so allow one grey level (1 / std) on a few pixels
    diff = (x - pv[0, :, :resized[0], :resized[1]]).abs()
    assert diff.max() <= 1 / 57.12 + 1e-4 and (diff > 1e-5).float().mean() < 1e-3
    assert pm[0].sum() == resized[0] * resized[1]


def _compare_raw(det, image, payload, ref):
    logits, boxes, masks, img_shape, ori = ref
    c = payload.shape[0]
    x, resized, _ = gdino_image(torch.from_numpy(image), SHORT, LONG)
    pv, pm, _, _ = reference_image(image, SHORT, LONG)
    with torch.no_grad():
        el, eb, em = det.forward_tensors(pv, pm, payload[None], torch.ones(1, c, dtype=torch.bool), True)
    torch.testing.assert_close(el, logits[:, :, :c], atol=ATOL, rtol=0)
    assert torch.isinf(logits[:, :, c:]).all()
    torch.testing.assert_close(eb, boxes, atol=ATOL, rtol=0)
    torch.testing.assert_close(em, masks, atol=ATOL, rtol=0)


def _compare_post(got, want, masks=False):
    torch.testing.assert_close(got.scores, want["scores"], atol=ATOL, rtol=0)
    assert torch.equal(got.labels, want["labels"])
    torch.testing.assert_close(got.boxes, want["boxes"], atol=1e-3, rtol=0)
    if masks:
        assert got.masks.shape == want["masks"].shape
        assert (got.masks != want["masks"]).float().mean() < 1e-3


@pytest.mark.parametrize("h,w,c", [(50, 73, 1), (61, 95, 3), (90, 41, 5)], ids=["1cls", "3cls", "5cls-portrait"])
def test_single_request_matches_official(det, sd, h, w, c):
    image, payload = _img(h, w, c), _payload(c, c)
    ref = reference_request(sd, CFG, image, payload, SHORT, LONG)
    _compare_raw(det, image, payload, ref)
    logits, boxes, masks, img_shape, ori = ref
    _compare_post(det([torch.from_numpy(image)], [payload])[0], reference_det(logits, boxes, ori, c))
    grd = det([torch.from_numpy(image)], [payload], top_k=1)[0]
    _compare_post(grd, reference_det(logits, boxes, ori, c, topk=1))
    _compare_post(det([torch.from_numpy(image)], [payload], with_masks=True)[0],
                  reference_instseg(logits, boxes, masks, ori, img_shape, c), masks=True)
    for before in (True, False):
        sem = det([torch.from_numpy(image)], [payload], seg_mode="semantic", semantic_resize_first=before)[0]
        want = reference_semseg(logits, masks, ori, img_shape, c, before)
        assert (sem.semantic_map != want).float().mean() < 1e-3


def test_batched_equals_one_at_a_time_equals_official(det, sd):
    """Four requests in one call: two share the 96x160 canvas (different valid areas), one portrait, one
    square; class counts 2, 1, 4, 3."""
    sizes, counts = [(50, 73), (61, 95), (90, 41), (70, 70)], [2, 1, 4, 3]
    images = [torch.from_numpy(_img(h, w, 10 + i)) for i, (h, w) in enumerate(sizes)]
    payloads = [_payload(c, 20 + i) for i, c in enumerate(counts)]
    batched = det(images, payloads, with_masks=True)
    for i, (im, pl) in enumerate(zip(images, payloads)):
        single = det([im], [pl], with_masks=True)[0]
        torch.testing.assert_close(batched[i].scores, single.scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(batched[i].boxes, single.boxes, atol=1e-4, rtol=0)
        assert torch.equal(batched[i].labels, single.labels) and torch.equal(batched[i].masks, single.masks)
        logits, boxes, masks, img_shape, ori = reference_request(sd, CFG, im.numpy(), pl, SHORT, LONG)
        _compare_post(batched[i], reference_instseg(logits, boxes, masks, ori, img_shape, counts[i]), masks=True)


def test_padded_tokens_stay_in_the_two_stage_top_k(sd):
    """num_queries near the token count: padded / out-of-range tokens (memory 0, proposal +inf) are selected."""
    cfg = {**CFG, "num_queries": 300}
    big = random_state_dict(cfg, seed=1)
    det = _load(cfg, big)
    image, payload = _img(61, 95, 5), _payload(2, 5)
    logits, boxes, masks, img_shape, ori = reference_request(big, cfg, image, payload, SHORT, LONG)
    pv, pm, _, _ = reference_image(image, SHORT, LONG)
    with torch.no_grad():
        el, eb, em = det.forward_tensors(pv, pm, payload[None], torch.ones(1, 2, dtype=torch.bool), True)
    torch.testing.assert_close(el, logits[:, :, :2], atol=ATOL, rtol=0)
    torch.testing.assert_close(eb, boxes, atol=ATOL, rtol=0)
    assert (boxes > 0.999).all(-1).any(), "no query came from a padded / out-of-range token"


def test_options_and_errors(det):
    image, payload = torch.from_numpy(_img(50, 73, 1)), _payload(2, 1)
    full = det([image], [payload])[0]
    assert len(full.scores) == min(100, CFG["num_queries"] * 2) and full.masks is None and full.semantic_map is None
    thr = det([image], [payload], score_threshold=0.6)[0]
    assert torch.equal(thr.scores, full.scores[full.scores > 0.6])
    clamped = det([image], [payload], clamp_boxes=True)[0]
    assert clamped.boxes[:, 0::2].max() <= 73 and clamped.boxes.min() >= 0
    with pytest.raises(ValueError, match="unknown options"):
        det([image], [payload], bogus=1)
    small = det([image], [payload], image_short=96, image_long=128)[0]  # another resize: 88x128 on 96x128
    logits, boxes, _, _, ori = reference_request(det_sd(), CFG, image.numpy(), payload, 96, 128)
    _compare_post(small, reference_det(logits, boxes, ori, 2))
    with pytest.raises(ValueError, match="image_short"):
        det([image], [payload], image_short=0)
    with pytest.raises(ValueError, match="top_k"):
        det([image], [payload], top_k=0)
    with pytest.raises(ValueError, match="max_classes"):
        det([image], [torch.zeros(257, K, CFG["l_hidden_size"])])


def test_semantic_map_in_the_task_json(det):
    import base64
    import io

    from PIL import Image

    from unimlm_engine.engine.types import TaskResult
    image, payload = torch.from_numpy(_img(50, 73, 2)), _payload(3, 2)
    res = det([image], [payload], seg_mode="semantic")[0]
    task = TaskResult("[SEG]", 3, res.boxes, res.scores, res.labels, res.masks, raw=res)
    sem = task.to_json()["semantic_map"]
    back = np.asarray(Image.open(io.BytesIO(base64.b64decode(sem["data"]))))
    assert (sem["height"], sem["width"]) == (50, 73) and np.array_equal(back, res.semantic_map.numpy())


def test_engine_checkpoint_with_tied_heads_written_once_loads(tmp_path):
    """A whole-model checkpoint directory whose gdino tied heads are written once (HF's dedup: the first name
    of each group) loads through load_checkpoint with nothing missing, and equals the model saved."""
    from unimlm_engine.checkpoint.loader import load_checkpoint, save_checkpoint
    from unimlm_engine.config.presets import TINY_SEED, get_preset
    from unimlm_engine.inputs.tokenizer import ByteTokenizer
    from unimlm_engine.model import build_model
    cfg = get_preset("tiny-random")
    cfg.pose = cfg.gen = cfg.edit = None
    model = build_model(cfg, seed=TINY_SEED, dtype=torch.float32, device="cpu")
    path = save_checkpoint(model, tmp_path / "ckpt", ByteTokenizer())
    dropped = 0
    for shard in path.glob("pytorch_model-*.bin"):
        sd = torch.load(shard, weights_only=True)
        for k in [k for k in sd if k.startswith("gdino.bbox_embed.") or k.startswith("gdino.mask_embed.1.")
                  or (k.startswith("gdino.model.decoder.bbox_embed.") and not k.startswith(
                      "gdino.model.decoder.bbox_embed.0."))]:
            del sd[k]
            dropped += 1
        torch.save(sd, shard)
    assert dropped > 0
    loaded, _, report = load_checkpoint(path)
    want = model.decoders.gdino.state_dict()
    got = loaded.decoders.gdino.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_options_flow_through_the_decoder_set():
    """RouteSpec.options (GRD top-1, SEG masks) and per-call options (EngineConfig.decoder_options' path)."""
    from unimlm_engine.config.presets import get_preset
    from unimlm_engine.model.decoders import DecoderSet
    cfg = get_preset("tiny-random")
    cfg.pose = cfg.gen = cfg.edit = None
    ds = DecoderSet(cfg).eval()
    g = torch.Generator().manual_seed(3)
    payloads = [[0.2 * torch.randn(cfg.superlink.num_embs, cfg.llm.hidden_size, generator=g) for _ in range(2)]]
    img = [_img(50, 73, 3)]
    (det_all,) = ds.run_decoder("[DET]", payloads, img)
    (det3,) = ds.run_decoder("[DET]", payloads, img, top_k=3)
    assert torch.equal(det3.scores, det_all.scores[:3]) and det3.masks is None
    (grd,) = ds.run_decoder("[GRD]", payloads, img)
    assert torch.equal(grd.scores, det_all.scores[:1])
    (seg,) = ds.run_decoder("[SEG]", payloads, img)
    assert seg.masks.shape == (len(seg.scores), 50, 73)
    (sem,) = ds.run_decoder("[SEG]", payloads, img, seg_mode="semantic")
    assert sem.semantic_map.shape == (50, 73) and int(sem.semantic_map.max()) < 2
    with pytest.raises(ValueError, match="unknown options"):
        ds.run_decoder("[DET]", payloads, img, bogus=1)


def test_engine_decoder_options_reach_the_detector():
    """EngineConfig.decoder_options["det"] -> the detector's options; the default is the official top-100."""
    import unimlm_engine as ue
    from engine_helpers import IMAGES, tiny_model
    model, tok = tiny_model()
    sp = ue.SamplingParams(max_tokens=3, forced_prefix=(tok.special_ids["[DET]"],) * 2)
    req = ue.Request(prompt="Find two things.", images=[IMAGES[0]], sampling=sp)
    outs = {}
    for name, opts in (("default", {}), ("top3", {"det": {"top_k": 3, "clamp_boxes": True}})):
        with ue.Engine(model, tok, ue.EngineConfig(num_kv_blocks=64, decoder_options=opts)) as eng:
            outs[name] = eng.generate_batch([req])[0].tasks[0]
    full, top3 = outs["default"], outs["top3"]
    assert full.num_groups == 2 and len(full.scores) == min(100, 2 * model.cfg.detector.num_queries)
    torch.testing.assert_close(top3.scores, full.scores[:3])
    assert torch.equal(top3.labels, full.labels[:3])


def test_config_from_a_transformers_grounding_dino_config_dict():
    """A gdino_config as train.py writes it: GroundingDinoConfig.to_dict() (many keys the engine ignores) plus
    mask_dim, norm, l_hidden_size, num_embs."""
    tf = pytest.importorskip("transformers")
    swin = tf.SwinConfig(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12,
                         out_features=["stage1", "stage2", "stage3", "stage4"])
    d = tf.GroundingDinoConfig(backbone_config=swin, num_queries=900).to_dict()
    d.update(mask_dim=256, norm="GN", l_hidden_size=4096, num_embs=4)
    c = DetectorConfig.from_dict(d)
    assert (c.embed_dim, c.depths, c.num_heads, c.window_size) == (128, (2, 2, 18, 2), (4, 8, 16, 32), 12)
    assert (c.d_model, c.num_queries, c.max_classes, c.llm_hidden_size, c.position_temperature) == \
        (256, 900, 256, 4096, 20)


def test_bf16_keeps_box_references_in_fp32():
    """Under a bf16 model the official proposals, references and pred_boxes are fp32 (bf16 delta + fp32
    proposal promotes): ours too (they were bf16 before; a log-odds step of ~0.016 per rounding)."""
    import numpy as np
    from PIL import Image

    from unimlm_engine.config.presets import get_preset
    from unimlm_engine.model.decoders.base import DecoderInput
    from unimlm_engine.model.decoders.detector import DetectorDecoder
    from unimlm_engine.routes import get_route

    torch.manual_seed(0)
    dec32 = DetectorDecoder.from_model_config(get_preset("tiny-random")).eval()
    dec16 = DetectorDecoder.from_model_config(get_preset("tiny-random")).eval()
    dec16.load_state_dict(dec32.state_dict())
    dec16 = dec16.to(torch.bfloat16)
    img = Image.fromarray((np.random.default_rng(0).random((70, 90, 3)) * 255).astype("uint8"))
    payloads = [torch.randn(4, 256) for _ in range(2)]
    r32 = dec32.run(get_route("[DET]"), [DecoderInput(payloads, img)], {"top_k": 5}, None)[0]
    r16 = dec16.run(get_route("[DET]"), [DecoderInput([p.bfloat16() for p in payloads], img)], {"top_k": 5},
                    None)[0]
    assert r16.boxes.dtype == torch.float32 and r32.boxes.dtype == torch.float32
