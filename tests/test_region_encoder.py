"""Region encoder (issue 14): features and canvas masks against an independent implementation of the official
code (VisionLLMv2/visionllmv2/model/region_encoder.py, modeling_visionllmv2.py's region branch,
datasets/utils.py boxes_to_masks, coco_interactive.py's mask resize), fp32, with the CLIP levels from
Hugging Face transformers' CLIPVisionModel (hidden_states[-3:]). The official module below is written from
the official code and imports nothing from unimlm_engine."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from unimlm_engine.config.presets import get_preset  # noqa: E402
from unimlm_engine.engine.regions import InvalidRegionError, Region, prepare_regions, rasterize  # noqa: E402
from unimlm_engine.inputs.processor import image_hash, load_image, pixel_values, tile_image  # noqa: E402
from unimlm_engine.model import build_model  # noqa: E402
from unimlm_engine.model.region_encoder import sample_points  # noqa: E402

IMAGE = "examples/images/chelsea.png"  # 451 x 300


# ---- the official computation (independent of the engine) ---------------------------------------------
class OfficialLayerNorm2d(nn.Module):
    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def official_point_sample(inp, coords, **kw):
    return F.grid_sample(inp, 2.0 * coords.unsqueeze(2) - 1.0, **kw).squeeze(3)


def official_sample(x, divisor, keep):
    """rand_sample with the multinomial's draw given (`keep`: positions in the nonzero list, sorted)."""
    nz = (x.nonzero() / divisor).t()
    return nz[:, keep].t()


class OfficialRegionEncoder(nn.Module):
    def __init__(self, hidden_dim, embed_dim, out_dim, patch_size):
        super().__init__()
        k = patch_size // 2
        self.mask_embedding = nn.Sequential(
            nn.Conv2d(4, hidden_dim // 4, kernel_size=k, stride=k), OfficialLayerNorm2d(hidden_dim // 4), nn.GELU(),
            nn.Conv2d(hidden_dim // 4, hidden_dim, kernel_size=2, stride=2), OfficialLayerNorm2d(hidden_dim),
            nn.GELU(), nn.Conv2d(hidden_dim, embed_dim, kernel_size=1))
        self.up_dim = nn.Linear(embed_dim, out_dim)

    def forward(self, images, masks, image_features, keeps):
        masks = masks.to(images.dtype)
        masks_out = self.mask_embedding(torch.cat([images, masks], dim=1))
        bs = len(images)
        h, w = masks_out.shape[-2:]
        outs = []
        for li, lvl in enumerate(image_features):
            masks_out = masks_out + lvl.reshape(bs, h, w, -1).permute(0, 3, 1, 2)
            ori_h, ori_w = masks.shape[-2:]
            divisor = torch.tensor([1, ori_h, ori_w])[None]
            pts = [official_sample(m, divisor, k[li]) for m, k in zip(masks, keeps)]
            idx = [p[:, 0:1].long() for p in pts]
            pts = nn.utils.rnn.pad_sequence(pts, padding_value=-1).permute(1, 0, 2)
            idx = nn.utils.rnn.pad_sequence(idx, padding_value=-1).permute(1, 0, 2)[:, :, 0]
            valid = pts.sum(dim=-1) >= 0
            coords = pts[:, :, -2:].flip(dims=[-1])
            feats = official_point_sample(masks_out.float(), coords.float(), align_corners=False).permute(0, 2, 1)
            out = feats * valid.unsqueeze(-1)
            out = (out.sum(1) / valid.sum(1).unsqueeze(-1)).nan_to_num()
            outs.append(self.up_dim(out))
        return torch.stack(outs).mean(dim=0)


def official_boxes_to_masks(box, h, w):
    m = torch.zeros((h, w))
    x1, y1, x2, y2 = box
    x1, y1 = max(min(x1, w - 1), 0), max(min(y1, h - 1), 0)
    x2, y2 = max(min(x2, w - 1), 0), max(min(y2, h - 1), 0)
    m[int(y1):int(y2) + 1, int(x1):int(x2) + 1] = 1
    return m.bool()


def official_mask_resize(mask, size):
    return F.interpolate(torch.from_numpy(mask).float()[None, None], size=(size, size), mode="bilinear",
                         align_corners=False)[0, 0].bool()


def official_keep(mask, seed, max_len=2304, levels=3):
    """Per level, the positions in the mask's nonzero list the official multinomial keeps (it draws once per
    level: `rand_sample` inside the level loop), with the generator seeded and drawn from level after level."""
    n = int(mask.sum())
    if n <= max_len:
        return [torch.arange(n)] * levels
    g = torch.Generator().manual_seed(seed)
    return [torch.multinomial(torch.ones(n), max_len, replacement=False, generator=g).sort()[0]
            for _ in range(levels)]


# ---- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup():
    cfg = get_preset("tiny-random")
    model = build_model(cfg, seed=11, with_decoders=False)
    v = cfg.vision
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act=v.hidden_act, attn_implementation="eager")).eval()
    own = model.vis_encoder.state_dict()
    hf_sd = {k: own[k if k.startswith("vision_model.") else "vision_model." + k] for k in hf.state_dict()
             if "position_ids" not in k}
    hf.load_state_dict(hf_sd, strict=False)
    off = OfficialRegionEncoder(256, v.hidden_size, cfg.llm.hidden_size, v.patch_size).eval()
    off.load_state_dict(model.region_encoder.state_dict(), strict=True)  # the official parameter names
    img = load_image(IMAGE)
    pixels = pixel_values(tile_image(img, v), v)  # [tiles (+ thumbnail), 3, S, S]
    return model, hf, off, img, pixels


def _regions(img):
    h, w = img.height, img.width
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[60:170, 120:300] = 1
    mask[200:230, 50:90] = 255
    big = np.ones((h, w), dtype=bool)
    big[:40] = False  # over 2304 canvas pixels
    return {
        "point": Region("point", points=[[200.5, 120.25], [10, 290], [451, 300]]),
        "box": Region.box_xyxy(33.3, 41.7, 260.9, 199.2),
        "scribble": Region.scribble([[20, 20], [200, 80], [400, 260]], width=12),
        "mask": Region.from_mask(mask),
        "mask-over-2304": Region.from_mask(big, seed=5),
    }


KINDS = ["point", "box", "scribble", "mask", "mask-over-2304"]


@pytest.mark.parametrize("kind", KINDS)
def test_region_features_equal_official(setup, kind):
    model, hf, off, img, pixels = setup
    region = _regions(img)[kind]
    [rin] = prepare_regions([region], [img], [image_hash(img)], model.cfg.vision.image_size, 1)
    canvas = pixels[-1:]  # the anyres thumbnail: the image stretched to the canvas
    keep = official_keep(rin.mask, region.seed if region.seed is not None else 0)  # the seed matters over 2304 only
    n = int(rin.mask.sum())
    flat = rin.mask.reshape(-1).nonzero().flatten()
    if kind == "mask-over-2304":  # one draw per level, each the official multinomial with a seeded generator
        assert n > 2304 and rin.points.shape == (3, 2304)
        assert all(torch.equal(rin.points[li], flat[keep[li]]) for li in range(3))
        assert not torch.equal(rin.points[0], rin.points[1])
    else:
        assert rin.points.numel() == n <= 2304 and torch.equal(rin.points, flat[keep[0]])
    with torch.no_grad():
        levels = [h_[:, 1:] for h_ in hf(pixel_values=canvas, output_hidden_states=True).hidden_states[-3:]]
        ref = off(canvas, rin.mask[None, None], levels, [keep])
        ours_ref = model.encode_regions([pixels], [rin])  # the reference model's path
        vis, lv = model.vis_encoder.forward_with_levels(pixels, torch.tensor([pixels.shape[0] - 1]), (-3, -2, -1))
        ours_engine = model.region_features(canvas, lv, [rin])  # the engine's path (levels from one pass)
    assert ref.shape == (1, model.cfg.llm.hidden_size)
    assert (ours_ref - ref).abs().max() <= 1e-4
    assert (ours_engine - ref).abs().max() <= 1e-4
    assert (vis - model.vis_encoder(pixels)).abs().max() <= 1e-5


def test_batched_regions_equal_one_at_a_time(setup):
    model, _, _, img, pixels = setup
    regs = list(_regions(img).values())
    rins = prepare_regions(regs, [img], [image_hash(img)], model.cfg.vision.image_size, len(regs))
    with torch.no_grad():
        batched = model.encode_regions([pixels], rins)
        single = torch.cat([model.encode_regions([pixels], [r]) for r in rins])
    assert (batched - single).abs().max() <= 1e-5
    assert (batched[0] - batched[1]).abs().max() > 1e-3  # different regions, different features


def test_empty_point_list_gives_up_dim_bias(setup):
    model, _, off, img, pixels = setup
    [rin] = prepare_regions([Region.point(5, 5)], [img], [image_hash(img)], model.cfg.vision.image_size, 1)
    rin.points = rin.points[:0]
    with torch.no_grad():
        got = model.encode_regions([pixels], [rin])
    torch.testing.assert_close(got[0], model.region_encoder.up_dim.bias, atol=1e-6, rtol=0)


def test_canvas_masks_follow_the_official_construction(setup):
    model, _, _, img, _ = setup
    s, w, h = model.cfg.vision.image_size, img.width, img.height
    r = _regions(img)
    box = rasterize(r["box"], w, h, s)
    x1, y1, x2, y2 = r["box"].box
    # mmdet Resize(keep_ratio=False) scales the box, then boxes_to_masks (refcoco / ShapeSampler "Box")
    assert torch.equal(box, official_boxes_to_masks((x1 * s / w, y1 * s / h, x2 * s / w, y2 * s / h), s, s))
    assert torch.equal(rasterize(r["mask"], w, h, s), official_mask_resize(r["mask"].mask, s))
    pts = rasterize(r["point"], w, h, s)
    want = torch.zeros(s, s, dtype=torch.bool)
    for x, y in r["point"].points:  # the canvas pixel holding the point (the official Point sampler's pixels)
        want[min(int(y * s / h), s - 1), min(int(x * s / w), s - 1)] = True
    assert torch.equal(pts, want)


def test_scribble_is_a_band_around_the_polyline():
    # a horizontal stroke on a 100 x 100 image, canvas 50: rows whose centre is within width/2 of y = 40
    r = Region.scribble([[10, 40], [90, 40]], width=8)
    m = rasterize(r, 100, 100, 50)
    ys, xs = m.nonzero(as_tuple=True)
    centres_y = (ys.float() + 0.5) * 2
    centres_x = (xs.float() + 0.5) * 2
    assert ((centres_y - 40).abs() <= 4).all()
    assert set(ys.tolist()) == {18, 19, 20, 21}  # centres 37, 39, 41, 43
    # inside the segment's x range every band pixel is set; beyond it, within the rounded caps only
    assert m[18:22, 5:45].all()
    assert (((centres_x - 10).clamp(min=0) ** 2 + (centres_y - 40) ** 2 <= 16) | (centres_x >= 10)).all()


def test_sample_points_is_seeded_and_uniform_subset():
    mask = torch.ones(60, 60, dtype=torch.bool)
    a, b, c = sample_points(mask, 1), sample_points(mask, 1), sample_points(mask, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 2304) and (a[:, 1:] > a[:, :-1]).all()  # one sorted draw per level
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    assert torch.equal(sample_points(mask[:40, :40], 3), torch.arange(1600))


@pytest.mark.parametrize("region,match", [
    (Region.box_xyxy(0, 0, 452, 10), "outside"),
    (Region.point(-1, 3), "outside"),
    (Region.scribble([[1, 1], [10, 301]]), "outside"),
    (Region.box_xyxy(50, 10, 20, 30), "x1 < x2"),
    (Region("point", points=[[1, 2, 3]]), "expected 2 finite numbers"),
    (Region("point", points="1,2"), "list of at least 1"),
    (Region("point", points=[]), "list of at least 1"),
    (Region("scribble", points=[[1, 2]]), "at least 2"),
    (Region("point", points=[[1, float("nan")]]), "finite"),
    (Region.from_mask(np.zeros((300, 451))), "empty"),
    (Region.from_mask(np.ones((30, 45))), "45x30 but the image is 451x300"),
    (Region("circle"), "kind must be one of"),
], ids=["box-outside", "point-outside", "scribble-outside", "box-inverted", "point-3-numbers", "points-string",
        "points-empty", "scribble-one-point", "point-nan", "empty-mask", "mask-wrong-size", "unknown-kind"])
def test_bad_regions_raise_typed_errors(region, match):
    img = load_image(IMAGE)
    with pytest.raises(InvalidRegionError, match=match):
        prepare_regions([region], [img], [image_hash(img)], 56, 1)


def test_dict_regions():
    img = load_image(IMAGE)
    rins = prepare_regions([{"point": [3, 4]}, {"box": [1, 2, 30, 40]}, {"scribble": [[1, 1], [9, 9]], "width": 3},
                            {"points": [[1, 1], [2, 2]], "seed": 4}], [img], [image_hash(img)], 56, 4)
    assert [int(r.mask.sum()) > 0 for r in rins] == [True] * 4
    with pytest.raises(InvalidRegionError, match="exactly one of"):
        prepare_regions([{"point": [3, 4], "box": [1, 2, 3, 4]}], [img], [image_hash(img)], 56, 1)
