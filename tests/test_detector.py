"""Detector ([DET] / [GRD] / [SEG]) building blocks against library references, and its invariants.

(a) blocks against transformers' GroundingDino / Swin modules and torch's nn.MultiheadAttention with the same
random weights, (b) the tensor-level outputs and padding, (c) `gdino.`-prefixed state dict round trip,
(d) clear errors on bad inputs. The whole detector against an independent implementation of the official
model: test_gdino_official.py. fp32 on the CPU, small configs.
"""
from __future__ import annotations

import pytest
import torch

from unimlm_engine.config.decoders import DetectorConfig
from unimlm_engine.model.decoders import deformable as dm
from unimlm_engine.model.decoders import gdino_layers as gl
from unimlm_engine.model.decoders.detector import DetectorDecoder

gd = pytest.importorskip("transformers.models.grounding_dino.modeling_grounding_dino")
from transformers import GroundingDinoConfig  # noqa: E402

ATOL = 1e-4
SHAPES = [(7, 9), (5, 3), (3, 2)]  # odd level sizes
LLM = 48


def small_cfg(**kw) -> DetectorConfig:
    base = dict(d_model=64, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=64, decoder_ffn_dim=64, num_feature_levels=4, encoder_n_points=2, decoder_n_points=3,
                num_queries=15, max_classes=6, llm_hidden_size=LLM, mask_dim=16, image_short=64, image_long=96,
                embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8), window_size=2)
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


def test_fusion_matches_transformers_per_sample():
    """transformers' fusion subtracts the max over the whole batch; ours per sample (= the official at batch 1)."""
    hf_f = gd.GroundingDinoFusionLayer(hf_config()).eval()
    randomize(hf_f)
    f = gl.FusionLayer(32, 64, 4)
    f.load_state_dict(hf_f.state_dict(), strict=True)
    vis, txt = torch.randn(2, 31, 32), torch.randn(2, 5, 32)
    vvalid, tvalid = torch.rand(2, 31) > 0.3, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    gv, gt = f(vis, txt, vvalid, tvalid)
    for b in range(2):
        c = int(tvalid[b].sum())
        (wv, _), (wt, _) = hf_f(vis[b:b + 1], txt[b:b + 1, :c], attention_mask_vision=~vvalid[b:b + 1],
                                attention_mask_text=~tvalid[b:b + 1, :c])
        torch.testing.assert_close(gv[b:b + 1], wv, atol=ATOL, rtol=0)
        torch.testing.assert_close(gt[b:b + 1, :c], wt, atol=ATOL, rtol=0)


def test_mha_matches_torch_multihead_attention():
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    randomize(ref)
    ours = gl.MHA(32, 4)
    ours.load_state_dict(ref.state_dict(), strict=True)
    q, kv = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    want = ref(q, kv, kv, key_padding_mask=~valid)[0]
    torch.testing.assert_close(ours(q, kv, kv, gl.key_padding_bias(valid, torch.float32)), want, atol=ATOL, rtol=0)
    tv = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    x = torch.randn(2, 5, 32)
    eye = torch.eye(5, dtype=torch.bool)
    for b in range(2):  # generate_masks_with_text_query_masks: valid block + identity for padded classes
        m = eye.clone()
        n = int(tv[b].sum())
        m[:n, :n] = True
        want = ref(x[b:b + 1], x[b:b + 1], x[b:b + 1], attn_mask=~m)[0]
        got = ours(x, x, x, gl.class_self_attention_bias(tv, torch.float32))[b:b + 1]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("hw,size", [((96, 160), (3, 5)), ((96, 160), (2, 3)), ((160, 96), (20, 12)),
                                     ((64, 96), (1, 2)), ((7, 13), (3, 5))])
def test_nearest_resize_equals_interpolate(hw, size):
    from unimlm_engine.model.decoders.grounding import nearest_resize
    m = torch.rand(2, *hw) > 0.5
    assert torch.equal(nearest_resize(m, size), torch.nn.functional.interpolate(m[None].float(), size=size)[0].bool())


def test_swin_backbone_matches_transformers():
    """transformers' SwinBackbone (renamed parameters) on maps larger than the window, where its
    always_partition flag and 4.34's window shrinking do not apply."""
    from transformers import SwinBackbone, SwinConfig

    from unimlm_engine.model.decoders.swin import SwinBackbone as Ours
    hf = SwinBackbone(SwinConfig(image_size=64, embed_dim=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4],
                                 window_size=3, out_features=["stage1", "stage2", "stage3", "stage4"])).eval()
    randomize(hf)
    ours = Ours(16, (1, 2, 1, 1), (1, 2, 2, 4), 3)
    rename = {"attention.q_proj": "attention.self.query", "attention.k_proj": "attention.self.key",
              "attention.v_proj": "attention.self.value", "attention.o_proj": "attention.output.dense",
              "attention.relative_position_bias.relative_position_bias_table":
                  "attention.self.relative_position_bias_table",
              "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    sd = {}
    for k, v in hf.state_dict().items():
        k = k.removeprefix("swin.")
        if k.startswith("layernorm."):  # transformers 5's final norm, unused by the backbone outputs
            continue
        for a, b in rename.items():
            k = k.replace(a, b)
        sd[k] = v
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("relative_position_index") for k in missing)
    x = torch.randn(2, 3, 160, 128)  # stage 4: 5 x 4 > window 3
    with torch.no_grad():
        want, got = hf(x).feature_maps, ours(x)
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


def test_results_shapes_and_grouping_by_canvas(detector):
    images = [_image(50, 70, 0), _image(90, 41, 1), _image(33, 33, 2)]
    payloads = [_payload(3, 0), _payload(1, 1), _payload(5, 2)]
    batched = detector(images, payloads, with_masks=True)
    for i, (im, pl) in enumerate(zip(images, payloads)):
        single = detector([im], [pl], with_masks=True)[0]
        assert len(single.scores) == min(100, detector.cfg.num_queries * pl.shape[0])
        assert single.masks.shape == (len(single.scores), im.shape[0], im.shape[1])
        assert int(single.labels.max()) < pl.shape[0]
        _assert_same(batched[i], single)


def test_forward_tensors_outputs_and_padding(detector):
    from unimlm_engine.model.decoders.detector import pad_payloads
    from unimlm_engine.model.decoders.images import gdino_canvas, gdino_image
    ims = [gdino_image(_image(40, 60, 3), 64, 96)[0], gdino_image(_image(64, 120, 4), 64, 96)[0]]
    pixels, pvalid = gdino_canvas(ims)
    assert pixels.shape[-2:] == (64, 96) and pvalid[0].sum() == 64 * 96 and pvalid[1].sum() == 51 * 96
    payloads, valid = pad_payloads([_payload(2, 3), _payload(4, 4)], "cpu", torch.float32)
    with torch.no_grad():
        logits, boxes, masks = detector.forward_tensors(pixels, pvalid, payloads, valid, True)
    q = detector.cfg.num_queries
    assert logits.shape == (2, q, 4) and boxes.shape == (2, q, 4) and masks.shape == (2, q, 16, 24)
    assert torch.isneginf(logits[0, :, 2:]).all() and torch.isfinite(logits[1]).all()
    assert no_masks_is_none(detector, pixels, pvalid, payloads, valid)
    embeds = detector.class_embeddings(payloads)
    assert embeds.shape == (2, 4, detector.cfg.d_model)
    with torch.no_grad():
        via_embeds = detector.forward_embeddings(pixels, pvalid, embeds, valid, True)
    for a, b in zip(via_embeds, (logits, boxes, masks)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="multiples of 32"):
        detector.forward_tensors(pixels[..., :80], pvalid[..., :80], payloads, valid)


def no_masks_is_none(detector, *args) -> bool:
    with torch.no_grad():
        return detector.forward_tensors(*args, False)[2] is None


def test_state_dict_round_trip_with_gdino_prefix(detector, tmp_path):
    sd = {f"gdino.{k}": v for k, v in detector.state_dict().items()}
    assert "gdino.model.backbone.conv_encoder.model.encoder.layers.0.blocks.0.attention.self.query.weight" in sd
    assert "gdino.model.backbone.conv_encoder.model.encoder.layers.0.blocks.0.attention.self." \
           "relative_position_index" in sd
    assert "gdino.model.encoder.layers.0.fusion_layer.attn.vision_proj.weight" in sd
    assert "gdino.model.decoder.layers.1.self_attn.in_proj_weight" in sd
    assert "gdino.bbox_embed.1.layers.2.bias" in sd and "gdino.model.decoder.bbox_embed.0.layers.0.weight" in sd
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
    (dict(d_model=32), ">= 64"),
    (dict(depths=(1, 1), num_heads=(1, 2, 4)), "4 stages"),
    (dict(image_short=100, image_long=90), "image_short"),
    (dict(num_feature_levels=3), "4 feature levels"),
    (dict(max_classes=0), "max_classes"),
], ids=["d_model-not-32x", "d_model-32", "three-stages", "short-over-long", "levels", "zero-classes"])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        small_cfg(**kw)


def test_pil_input_matches_tensor_input(detector):
    from PIL import Image
    im = _image(37, 52, 6)
    pl = [_payload(2, 6)]
    _assert_same(detector([Image.fromarray(im.numpy())], pl)[0], detector([im], pl)[0])
