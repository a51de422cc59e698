"""Detector ([DET] / [GRD] / [SEG]) against transformers' GroundingDino modules and its own invariants.

(a) shared blocks give the same outputs as transformers' modules with the same random weights,
(b) batched calls equal one-at-a-time calls, (c) `gdino.`-prefixed state dict round trip,
(d) clear errors on bad inputs. fp32 on the CPU, small configs.
"""
from __future__ import annotations

import pytest
import torch

from unimlm_engine.config.decoders import DetectorConfig
from unimlm_engine.model.decoders import deformable as dm
from unimlm_engine.model.decoders.detector import DetectorDecoder
from unimlm_engine.model.decoders.grounding import GroundingCore

gd = pytest.importorskip("transformers.models.grounding_dino.modeling_grounding_dino")
from transformers import GroundingDinoConfig  # noqa: E402

ATOL = 1e-4
SHAPES = [(7, 9), (5, 3), (3, 2)]  # odd level sizes
LLM = 48


def small_cfg(**kw) -> DetectorConfig:
    base = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=64, decoder_ffn_dim=64, num_feature_levels=4, encoder_n_points=2, decoder_n_points=3,
                num_queries=15, max_classes=6, llm_hidden_size=LLM, mask_dim=16, image_short=64, image_long=96,
                embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8), window_size=4, score_threshold=0.0,
                max_detections=9)
    base.update(kw)
    return DetectorConfig(**base)


def hf_config(n_levels: int = 3) -> GroundingDinoConfig:
    return GroundingDinoConfig(d_model=32, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, num_feature_levels=n_levels, encoder_n_points=2, decoder_n_points=3,
                               num_queries=11, dropout=0.0, fusion_droppath=0.0)


def randomize(module: torch.nn.Module) -> None:
    """Random weights everywhere (default inits leave zeros / ones that would hide mistakes)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def levels(batch: int):
    shapes = torch.tensor(SHAPES, dtype=torch.long)
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    s = int(shapes.prod(1).sum())
    valid = torch.rand(batch, s) > 0.2
    return shapes, start, s, valid


@pytest.mark.parametrize("ref_dims", [2, 4], ids=["ref2d", "ref4d"])
def test_msda_module_matches_transformers(ref_dims):
    hf = gd.GroundingDinoMultiscaleDeformableAttention(hf_config(), num_heads=4, n_points=3).eval()
    randomize(hf)
    ours = dm.MultiscaleDeformableAttention(32, 3, 4, 3)
    ours.load_state_dict(hf.state_dict(), strict=True)
    shapes, start, s, valid = levels(2)
    q, mem, pos = torch.randn(2, 13, 32), torch.randn(2, s, 32), torch.randn(2, 13, 32)
    ref = torch.rand(2, 13, 3, ref_dims)
    want = hf(hidden_states=q, attention_mask=valid, encoder_hidden_states=mem, position_embeddings=pos,
              reference_points=ref, spatial_shapes=shapes, spatial_shapes_list=SHAPES, level_start_index=start)[0]
    got = ours(q, mem, valid, pos, ref, shapes, start)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_msda_module_bf16_close_to_fp32():
    ours = dm.MultiscaleDeformableAttention(32, 3, 4, 3)
    randomize(ours)
    shapes, start, s, valid = levels(2)
    args = (torch.randn(2, 13, 32), torch.randn(2, s, 32), valid, torch.randn(2, 13, 32), torch.rand(2, 13, 3, 4))
    want = ours(*args, shapes, start)
    low = ours.to(torch.bfloat16)(*[a.to(torch.bfloat16) if a.is_floating_point() else a for a in args], shapes, start)
    assert low.dtype == torch.bfloat16
    err = (low.float() - want).abs().max().item()
    assert err <= 0.05 * want.abs().max().item(), err

def test_deformable_layer_matches_transformers():
    hf = gd.GroundingDinoDeformableLayer(hf_config()).eval()
    randomize(hf)
    ours = dm.DeformableLayer(32, 64, 3, 4, 2)
    ours.load_state_dict(hf.state_dict(), strict=True)
    shapes, start, s, valid = levels(2)
    x, pos, ref = torch.randn(2, s, 32), torch.randn(2, s, 32), torch.rand(2, s, 3, 2)
    want = hf(x, attention_mask=valid, position_embeddings=pos, reference_points=ref, spatial_shapes=shapes,
              spatial_shapes_list=SHAPES, level_start_index=start)[0]
    torch.testing.assert_close(ours(x, valid, pos, ref, shapes, start), want, atol=ATOL, rtol=0)


def test_fusion_and_text_enhancer_match_transformers():
    cfg = hf_config()
    hf_f, hf_t = gd.GroundingDinoFusionLayer(cfg).eval(), gd.GroundingDinoTextEnhancerLayer(cfg).eval()
    randomize(hf_f)
    randomize(hf_t)
    f, t = dm.FusionLayer(32, 64, 4), dm.TextEnhancerLayer(32, 64, 4)
    f.load_state_dict(hf_f.state_dict(), strict=True)
    t.load_state_dict(hf_t.state_dict(), strict=True)
    vis, txt = torch.randn(2, 31, 32), torch.randn(2, 5, 32)
    vvalid, tvalid = torch.rand(2, 31) > 0.3, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    (wv, _), (wt, _) = hf_f(vis, txt, attention_mask_vision=~vvalid, attention_mask_text=~tvalid)
    gv, gt = f(vis, txt, vvalid, tvalid)
    torch.testing.assert_close(gv, wv, atol=ATOL, rtol=0)
    torch.testing.assert_close(gt, wt, atol=ATOL, rtol=0)
    tpos = torch.randn(2, 5, 32)
    eye = torch.eye(5, dtype=torch.bool).expand(2, -1, -1)
    want = hf_t(txt, attention_masks=eye, position_embeddings=tpos)[0]
    torch.testing.assert_close(t(txt, tpos), want, atol=ATOL, rtol=0)


def test_decoder_layer_matches_transformers():
    hf = gd.GroundingDinoDecoderLayer(hf_config()).eval()
    randomize(hf)
    ours = dm.DecoderLayer(32, 64, 3, 4, 3)
    ours.load_state_dict(hf.state_dict(), strict=True)
    shapes, start, s, valid = levels(2)
    x, pos, ref = torch.randn(2, 11, 32), torch.randn(2, 11, 32), torch.rand(2, 11, 3, 4)
    mem, txt = torch.randn(2, s, 32), torch.randn(2, 6, 32)
    tvalid = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    hf_mask = (~tvalid)[:, None, None, :].float().repeat(1, 4, 11, 1) * torch.finfo(torch.float32).min
    want = hf(x, position_embeddings=pos, reference_points=ref, spatial_shapes=shapes, spatial_shapes_list=SHAPES,
              level_start_index=start, vision_encoder_hidden_states=mem, vision_encoder_attention_mask=valid,
              text_encoder_hidden_states=txt, text_encoder_attention_mask=hf_mask)[0]
    got = ours(x, pos, ref, shapes, start, mem, valid, txt, dm.key_bias(tvalid, torch.float32))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_masked_group_norm_equals_group_norm_on_the_valid_region():
    from unimlm_engine.model.decoders.grounding import masked_group_norm
    norm = torch.nn.GroupNorm(32, 64)
    randomize(norm)
    x = torch.randn(2, 64, 9, 11).to(memory_format=torch.channels_last)  # non-contiguous, as conv outputs can be
    valid = torch.zeros(2, 9, 11, dtype=torch.bool)
    valid[0] = True
    valid[1, :5, :7] = True
    got = masked_group_norm(x, valid, norm)
    torch.testing.assert_close(got[0], norm(x[:1])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1, :, :5, :7], norm(x[1:, :, :5, :7])[0], atol=1e-5, rtol=0)
    assert (got[1, :, 5:] == 0).all() and (got[1, :, :, 7:] == 0).all()

def _stack_core() -> GroundingCore:
    """Our core at the dims of hf_config(): 3 levels, 2 encoder and 2 decoder layers."""
    return GroundingCore(small_cfg(num_feature_levels=3, encoder_layers=2, decoder_layers=2, num_queries=11))


def _rect_valid(batch_sizes: list[list[tuple[int, int]]]) -> list[torch.Tensor]:
    """Per level, top-left valid rectangles [B, H_l, W_l] (what padding produces)."""
    out = []
    for lvl, (h, w) in enumerate(SHAPES):
        v = torch.zeros(len(batch_sizes), h, w, dtype=torch.bool)
        for b, sizes in enumerate(batch_sizes):
            v[b, :sizes[lvl][0], :sizes[lvl][1]] = True
        out.append(v)
    return out


def test_encoder_stack_matches_transformers():
    cfg = hf_config()
    cfg.encoder_layers = 2
    hf = gd.GroundingDinoEncoder(cfg).eval()
    randomize(hf)
    core = _stack_core().eval()
    core.encoder.load_state_dict(hf.state_dict(), strict=True)
    valids = _rect_valid([[(7, 9), (5, 3), (3, 2)], [(5, 6), (3, 2), (2, 1)]])
    srcs = [torch.randn(2, 32, h, w) for h, w in SHAPES]
    memory, pos, valid, shapes, start, ratios = core.flatten_levels(srcs, valids)
    text, text_valid = torch.randn(2, 4, 32), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    enc = dict(valid=valid, shapes=shapes, start=start, ratios=ratios, text_valid=text_valid, level_sizes=SHAPES)
    with torch.no_grad():
        got_v, got_t = core.run_encoder(memory, pos, enc, text)
        out = hf(vision_features=memory, vision_attention_mask=~valid, vision_position_embedding=pos,
                 spatial_shapes=shapes, spatial_shapes_list=SHAPES, level_start_index=start, valid_ratios=ratios,
                 text_features=text, text_attention_mask=~text_valid,
                 text_self_attention_masks=~torch.eye(4, dtype=torch.bool).expand(2, -1, -1),
                 text_position_ids=torch.zeros(2, 4, dtype=torch.long), return_dict=True)
    torch.testing.assert_close(got_v[valid], out.last_hidden_state_vision[valid], atol=ATOL, rtol=0)
    torch.testing.assert_close(got_t[text_valid], out.last_hidden_state_text[text_valid], atol=ATOL, rtol=0)


def test_decoder_stack_with_box_refinement_matches_transformers():
    """Unpadded images (valid ratios 1), where canvas- and valid-relative query positions agree."""
    cfg = hf_config()
    cfg.decoder_layers = 2
    hf = gd.GroundingDinoDecoder(cfg).eval()
    shared = gd.GroundingDinoMLPPredictionHead(32, 32, 4, 3)
    hf.bbox_embed = torch.nn.ModuleList([shared] * 2)
    randomize(hf)
    core = _stack_core().eval()
    sd = hf.state_dict()
    core.decoder.load_state_dict({k: v for k, v in sd.items() if not k.startswith("bbox_embed")}, strict=True)
    core.bbox_embed.load_state_dict({k.removeprefix("bbox_embed."): v for k, v in sd.items()
                                     if k.startswith("bbox_embed")}, strict=True)
    shapes, start, s, valid = levels(2)
    ratios = torch.ones(2, 3, 2)
    text, text_valid = torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    enc = dict(memory=torch.randn(2, s, 32), valid=valid, shapes=shapes, start=start, ratios=ratios, text=text,
               text_valid=text_valid)
    target, ref = torch.randn(2, 11, 32), torch.rand(2, 11, 4) * 0.8 + 0.1
    with torch.no_grad():
        got_h, got_boxes = core.decode(enc, target, ref)
        out = hf(inputs_embeds=target, vision_encoder_hidden_states=enc["memory"], vision_encoder_attention_mask=valid,
                 text_encoder_hidden_states=text, text_encoder_attention_mask=~text_valid, reference_points=ref,
                 spatial_shapes=shapes, spatial_shapes_list=SHAPES, level_start_index=start, valid_ratios=ratios,
                 return_dict=True)
        last_ref = out.intermediate_reference_points[:, -2]
        want_boxes = (shared(out.intermediate_hidden_states[:, -1]) + torch.special.logit(last_ref, eps=1e-5)).sigmoid()
    torch.testing.assert_close(got_h, out.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_boxes, want_boxes, atol=ATOL, rtol=0)

@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_two_stage_proposals_and_selection_match_transformers(padded):
    import types
    core = _stack_core().eval()
    randomize(core)
    sizes = [[(5, 6), (3, 2), (2, 1)], [(7, 9), (5, 3), (3, 2)]] if padded else [[s for s in SHAPES]] * 2
    valids = _rect_valid(sizes)
    memory, _, valid, shapes, start, ratios = core.flatten_levels([torch.randn(2, 32, h, w) for h, w in SHAPES], valids)
    text, text_valid = torch.randn(2, 3, 32), torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    enc = dict(memory=memory, valid=valid, shapes=shapes, start=start, ratios=ratios, text=text,
               text_valid=text_valid, level_sizes=SHAPES)
    fake = types.SimpleNamespace(enc_output=core.enc_output, enc_output_norm=core.enc_output_norm)
    with torch.no_grad():
        want_q, want_p = gd.GroundingDinoModel.generate_encoder_output_proposals(fake, memory, ~valid, SHAPES)
        got_q, got_p = core.proposals(enc)
        torch.testing.assert_close(got_q, want_q, atol=ATOL, rtol=0)
        torch.testing.assert_close(got_p, want_p, atol=ATOL, rtol=0)
        _, got_ref = core.select_queries(enc, 11)
        score = (want_q @ text.transpose(1, 2)).masked_fill(~text_valid[:, None], float("-inf")).max(-1).values
        if padded:  # ours never selects padded tokens; transformers may
            score = score.masked_fill(~valid, float("-inf"))
        idx = score.topk(11, dim=1).indices
        coords = core.encoder_output_bbox_embed(want_q) + want_p
        want_ref = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 4)).sigmoid()
    torch.testing.assert_close(got_ref, want_ref, atol=ATOL, rtol=0)

def test_position_embeddings_and_reference_points_match_transformers():
    cfg = hf_config()
    valid = torch.zeros(2, 9, 13, dtype=torch.bool)
    valid[0, :7, :10] = True
    valid[1] = True
    want = gd.GroundingDinoSinePositionEmbedding(cfg)(torch.zeros(2, 3, 9, 13), valid.long())
    torch.testing.assert_close(dm.sine_position_map(valid, 32, 20.0), want, atol=ATOL, rtol=0)
    coords = torch.rand(3, 7, 4)
    torch.testing.assert_close(dm.sine_embed_coords(coords, 16), gd.encode_sinusoidal_position_embedding(coords, 16))
    ratios = torch.rand(2, 3, 2) * 0.5 + 0.5
    want = gd.GroundingDinoEncoder.get_reference_points(SHAPES, ratios, device="cpu")
    torch.testing.assert_close(GroundingCore.encoder_reference_points(SHAPES, ratios), want, atol=1e-6, rtol=0)



# transformers 5 renames Swin weights when loading (conversion_mapping "swin" / "SwinBackbone"); checkpoints on
# disk, the official `gdino.*` ones included, keep the classic names our module uses. Undo the renaming here.
_SWIN_RENAMES = [("attention.q_proj", "attention.self.query"), ("attention.k_proj", "attention.self.key"),
                 ("attention.v_proj", "attention.self.value"),
                 ("attention.relative_position_bias.relative_position_bias_table",
                  "attention.self.relative_position_bias_table"),
                 ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                 ("mlp.fc2", "output.dense")]


def classic_swin_names(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.startswith("swin.layernorm."):
            continue
        k = k.removeprefix("swin.")
        for a, b in _SWIN_RENAMES:
            k = k.replace(a, b)
        out[k] = v
    return out


def test_swin_backbone_matches_transformers():
    """Where no padding is involved (maps are window multiples, no window shrink), our Swin equals
    transformers' SwinBackbone loaded from the same state dict."""
    from transformers import SwinBackbone, SwinConfig

    from unimlm_engine.model.decoders.swin import SwinBackbone as OurSwin
    hf = SwinBackbone(SwinConfig(image_size=64, embed_dim=16, depths=[2, 2, 2, 1], num_heads=[1, 2, 2, 4],
                                 window_size=2, drop_path_rate=0.0,
                                 out_features=["stage1", "stage2", "stage3", "stage4"])).eval()
    randomize(hf)
    ours = OurSwin(16, (2, 2, 2, 1), (1, 2, 2, 4), 2).eval()
    ours.load_state_dict(classic_swin_names(hf.state_dict()), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = hf(x).feature_maps
        got = ours(x, torch.ones(2, 64, 64, dtype=torch.bool))
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)

@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(1)
    model = DetectorDecoder(small_cfg()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(0.5)
            elif not name.endswith("weight"):
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def _image(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)


def _payload(c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(c, 4, LLM, generator=g) * 0.2


def _assert_same(a, b):
    torch.testing.assert_close(a.scores, b.scores, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.boxes, b.boxes, atol=1e-3, rtol=0)
    assert torch.equal(a.labels, b.labels)
    if a.masks is not None:
        differ = (a.masks != b.masks).float().mean().item()
        assert differ < 1e-3, f"{differ:.4%} of mask pixels differ"


def test_batched_equals_one_at_a_time(detector):
    images = [_image(50, 70, 0), _image(90, 41, 1), _image(33, 33, 2)]
    payloads = [_payload(3, 0), _payload(1, 1), _payload(5, 2)]
    batched = detector(images, payloads, with_masks=True)
    for i, (im, pl) in enumerate(zip(images, payloads)):
        single = detector([im], [pl], with_masks=True)[0]
        assert len(single.scores) == detector.cfg.max_detections
        assert single.masks.shape == (len(single.scores), im.shape[0], im.shape[1])
        assert int(single.labels.max()) < pl.shape[0]
        assert (single.boxes[:, 2] <= im.shape[1]).all() and (single.boxes[:, 3] <= im.shape[0]).all()
        _assert_same(batched[i], single)


def test_forward_tensors_outputs_and_padding(detector):
    from unimlm_engine.model.decoders.detector import pad_payloads
    from unimlm_engine.model.decoders.images import prepare_images
    batch = prepare_images([_image(40, 60, 3), _image(64, 30, 4)], 64, 96, detector.pad_multiple,
                           torch.device("cpu"), torch.float32)
    assert batch.pixel_values.shape[-1] % 64 == 0 and batch.pixel_values.shape[-2] % 64 == 0
    payloads, valid = pad_payloads([_payload(2, 3), _payload(4, 4)], "cpu", torch.float32)
    with torch.no_grad():
        logits, boxes, masks = detector.forward_tensors(batch.pixel_values, batch.pixel_valid, payloads, valid, True)
    q = detector.cfg.num_queries
    assert logits.shape == (2, q, 4) and boxes.shape == (2, q, 4)
    assert masks.shape == (2, q, batch.pixel_values.shape[-2] // 4, batch.pixel_values.shape[-1] // 4)
    assert torch.isneginf(logits[0, :, 2:]).all() and torch.isfinite(logits[1]).all()
    assert ((boxes > 0) & (boxes < 1)).all()
    no_masks = detector.forward_tensors(batch.pixel_values, batch.pixel_valid, payloads, valid, False)
    assert no_masks[2] is None
    embeds = detector.class_embeddings(payloads)
    assert embeds.shape == (2, 4, detector.cfg.d_model)
    with torch.no_grad():
        via_embeds = detector.forward_embeddings(batch.pixel_values, batch.pixel_valid, embeds, valid, True)
    for a, b in zip(via_embeds, (logits, boxes, masks)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="multiples of 64"):
        detector.forward_tensors(batch.pixel_values[..., :96], batch.pixel_valid[..., :96], payloads, valid)


def test_state_dict_round_trip_with_gdino_prefix(detector, tmp_path):
    sd = {f"gdino.{k}": v for k, v in detector.state_dict().items()}
    assert not any("relative_position_index" in k for k in sd)
    assert "gdino.backbone.conv_encoder.model.encoder.layers.0.blocks.0.attention.self.query.weight" in sd
    assert "gdino.encoder.layers.0.fusion_layer.attn.vision_proj.weight" in sd
    assert "gdino.decoder.layers.1.encoder_attn.sampling_offsets.weight" in sd
    torch.save(sd, tmp_path / "gdino.pt")
    loaded = torch.load(tmp_path / "gdino.pt", weights_only=True)
    fresh = DetectorDecoder(small_cfg()).eval()
    result = fresh.load_state_dict({k.removeprefix("gdino."): v for k, v in loaded.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    im, pl = [_image(45, 64, 5)], [_payload(2, 5)]
    _assert_same(fresh(im, pl, with_masks=True)[0], detector(im, pl, with_masks=True)[0])


@pytest.mark.parametrize("images, payloads, match", [
    ([_image(40, 40, 0)], [torch.randn(2, 4, LLM + 1)], "llm_hidden_size"),
    ([_image(40, 40, 0)], [torch.randn(0, 4, LLM)], "zero classes"),
    ([_image(40, 40, 0)], [torch.randn(7, 4, LLM)], "max_classes"),
    ([torch.zeros(0, 40, 3, dtype=torch.uint8)], [torch.randn(2, 4, LLM)], "zero size"),
    ([_image(40, 40, 0)], [], "one class payload per image"),
    ([torch.zeros(40, 40, 3)], [torch.randn(2, 4, LLM)], "uint8"),
    ([_image(40, 40, 0)] * 2, [torch.randn(2, 4, LLM), torch.randn(2, 3, LLM)], "same K"),
], ids=["wrong-width", "zero-classes", "too-many-classes", "zero-size-image", "count-mismatch", "float-image",
        "mixed-K"])
def test_bad_inputs_raise(detector, images, payloads, match):
    with pytest.raises(ValueError, match=match):
        detector(images, payloads)


@pytest.mark.parametrize("kw, match", [
    (dict(d_model=48), "multiple of 32"),
    (dict(depths=(1, 1), num_heads=(1, 2, 4)), "same length"),
    (dict(image_short=100, image_long=90), "image_short"),
    (dict(score_threshold=1.5), "score_threshold"),
    (dict(num_feature_levels=2), "num_feature_levels"),
    (dict(max_classes=0), "max_classes"),
], ids=["d_model-not-32x", "depth-heads-mismatch", "short-over-long", "threshold", "too-few-levels", "zero-classes"])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        small_cfg(**kw)


def test_pil_input_matches_tensor_input(detector):
    from PIL import Image
    im = _image(37, 52, 6)
    pl = [_payload(2, 6)]
    _assert_same(detector([Image.fromarray(im.numpy())], pl)[0], detector([im], pl)[0])
