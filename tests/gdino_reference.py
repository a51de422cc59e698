"""An independent, functional reference of the official VisionLLM v2 gdino at inference, one request at a time
(batch size 1, as the official eval runs), written from the official code (VisionLLMv2/visionllmv2/model/
grounding_dino/modeling_ov_grounding_dino_mask_dn.py, transformers-4.34 SwinBackbone, eval/eval_det.py,
eval/eval_semseg.py, the mmdet test pipeline + nested_tensor_from_tensor_list(size_divisibility=32)).
It reads an official-layout state dict (`gdino.` keys) and does not import the engine's decoder modules.

- `official_keys(cfg)`: the official key names and shapes of `gdino.*` for a gdino_config dict (the tied
  heads under every name they appear under in torch's state_dict).
- `reference_request(sd, cfg, image_uint8, payload)`: the official raw outputs for one request.
- `reference_det` / `reference_instseg` / `reference_semseg`: the official post-processing.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from gdino_reference_keys import P, official_keys, random_state_dict, tied_names  # noqa: F401 (re-exported)


# ---------------------------------------------------------------- image (mmdet test pipeline + nested tensor)
def _bilinear_numpy(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """Separable bilinear with half-pixel centres, no antialiasing (cv2 INTER_LINEAR's geometry), float64."""
    def axis(n_in, n_out):
        x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        x = np.clip(x, 0, None)
        i0 = np.minimum(np.floor(x).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, x - i0
    y0, y1, fy = axis(img.shape[0], oh)
    x0, x1, fx = axis(img.shape[1], ow)
    a = img.astype(np.float64)
    rows = a[y0] * (1 - fy)[:, None, None] + a[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def reference_image(img: np.ndarray, short: int, long: int):
    """uint8 [h, w, 3] RGB -> (pixel_values [1, 3, H32, W32], pixel_mask [1, H32, W32], img_shape, ori_shape)."""
    h, w = img.shape[:2]
    sf = min(long / max(h, w), short / min(h, w))
    nh, nw = int(h * sf + 0.5), int(w * sf + 0.5)
    x = img.astype(np.float64) if (nh, nw) == (h, w) else np.clip(np.floor(_bilinear_numpy(img, nh, nw) + 0.5), 0, 255)
    x = x.astype(np.float32)
    mean, std = np.array([123.675, 116.28, 103.53], np.float32), np.array([58.395, 57.12, 57.375], np.float64)
    x = (x - mean) * (1.0 / std).astype(np.float32)
    t = torch.from_numpy(x).permute(2, 0, 1)
    H, W = -(-nh // 32) * 32, -(-nw // 32) * 32
    pv = torch.zeros(1, 3, H, W)
    pv[0, :, :nh, :nw] = t
    return pv, pv[:, 0] != 0, (nh, nw), (h, w)


# ---------------------------------------------------------------- building blocks
def _lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def _ln(x, sd, p, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps)


def _mlp(x, sd, p):
    n = len([k for k in sd if k.startswith(p + ".layers.") and k.endswith(".weight")])
    for i in range(n):
        x = _lin(x, sd, f"{p}.layers.{i}")
        x = F.relu(x) if i < n - 1 else x
    return x


def _mha(q, k, v, sd, p, heads, attn_mask=None, key_padding_mask=None):
    """nn.MultiheadAttention(batch_first=True) at eval: the library functional."""
    out, _ = F.multi_head_attention_forward(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), q.shape[-1], heads, sd[p + ".in_proj_weight"],
        sd[p + ".in_proj_bias"], None, None, False, 0.0, sd[p + ".out_proj.weight"], sd[p + ".out_proj.bias"],
        training=False, key_padding_mask=key_padding_mask, need_weights=True, attn_mask=attn_mask,
        average_attn_weights=False)
    return out.transpose(0, 1)


def _sine(pos_tensor, num_pos_feats, exchange_xy=True, temperature=10000):
    """get_sine_pos_embed."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    res = []
    for x in pos_tensor.split([1] * pos_tensor.shape[-1], dim=-1):
        s = x * 2 * math.pi / dim_t
        res.append(torch.stack((s[..., 0::2].sin(), s[..., 1::2].cos()), dim=-1).flatten(-2))
    if exchange_xy:
        res[0], res[1] = res[1], res[0]
    return torch.cat(res, -1)


def _pos2d(mask, d, temperature):
    """GroundingDinoSinePositionEmbedding(d // 2, temperature, normalize=True)."""
    n = d // 2
    y = mask.cumsum(1, dtype=torch.float32)
    x = mask.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(n, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / n)
    px, py = x[:, :, :, None] / dim_t, y[:, :, :, None] / dim_t
    px = torch.stack((px[:, :, :, 0::2].sin(), px[:, :, :, 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[:, :, :, 0::2].sin(), py[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


def _msda(hidden, value_in, valid, pos, refs, shapes, sd, p, heads, points):
    """GroundingDinoMultiscaleDeformableAttention with the PyTorch (grid_sample) path."""
    if pos is not None:
        hidden = hidden + pos
    b, q, d = hidden.shape
    s, lv = value_in.shape[1], shapes.shape[0]
    value = _lin(value_in, sd, p + ".value_proj").masked_fill(~valid[..., None], 0.0).view(b, s, heads, d // heads)
    off = _lin(hidden, sd, p + ".sampling_offsets").view(b, q, heads, lv, points, 2)
    aw = F.softmax(_lin(hidden, sd, p + ".attention_weights").view(b, q, heads, lv * points), -1)
    aw = aw.view(b, q, heads, lv, points)
    if refs.shape[-1] == 2:
        norm = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
        loc = refs[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    else:
        loc = refs[:, :, None, :, None, :2] + off / points * refs[:, :, None, :, None, 2:] * 0.5
    vals = value.split([int(h) * int(w) for h, w in shapes], dim=1)
    grids, outs = 2 * loc - 1, []
    for l, (h, w) in enumerate(shapes.tolist()):
        v = vals[l].flatten(2).transpose(1, 2).reshape(b * heads, d // heads, h, w)
        g = grids[:, :, :, l].transpose(1, 2).flatten(0, 1)
        outs.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    aw = aw.transpose(1, 2).reshape(b * heads, 1, q, lv * points)
    out = (torch.stack(outs, dim=-2).flatten(-2) * aw).sum(-1).view(b, d, q).transpose(1, 2)
    return _lin(out, sd, p + ".output_proj")


# ---------------------------------------------------------------- Swin (transformers 4.34 SwinBackbone)
def _swin(px, sd, p, bb):
    e, ws = bb["embed_dim"], bb["window_size"]
    x = F.conv2d(px, sd[p + "embeddings.patch_embeddings.projection.weight"],
                 sd[p + "embeddings.patch_embeddings.projection.bias"], stride=4)
    b, _, H, W = x.shape
    x = _ln(x.flatten(2).transpose(1, 2), sd, p + "embeddings.norm")
    feats = []
    for i, (depth, heads) in enumerate(zip(bb["depths"], bb["num_heads"])):
        dim = e * 2 ** i
        for j in range(depth):
            q = f"{p}encoder.layers.{i}.blocks.{j}."
            window, shift = ws, (0 if j % 2 == 0 else ws // 2)
            if min(H, W) <= window:  # set_shift_and_window_size
                shift, window = 0, min(H, W)
                assert window == ws, "transformers 4.34 fails for maps smaller than the window"
            short = x
            y = _ln(x, sd, q + "layernorm_before").view(b, H, W, dim)
            pr, pb = (window - W % window) % window, (window - H % window) % window
            y = F.pad(y, (0, 0, 0, pr, 0, pb))
            Hp, Wp = H + pb, W + pr
            if shift > 0:
                y = torch.roll(y, (-shift, -shift), (1, 2))
            win = y.view(b, Hp // window, window, Wp // window, window, dim).permute(0, 1, 3, 2, 4, 5)
            win = win.reshape(-1, window * window, dim)
            mask = None
            if shift > 0:
                img = torch.zeros(1, Hp, Wp, 1)
                cnt = 0
                for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                    for wsl in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                        img[:, hs, wsl, :] = cnt
                        cnt += 1
                mw = img.view(1, Hp // window, window, Wp // window, window, 1).permute(0, 1, 3, 2, 4, 5)
                mw = mw.reshape(-1, window * window)
                mask = mw[:, None, :] - mw[:, :, None]
                mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
            n, hd = window * window, dim // heads
            qq, kk, vv = (_lin(win, sd, q + "attention.self." + t).view(-1, n, heads, hd).permute(0, 2, 1, 3)
                          for t in ("query", "key", "value"))
            sc = qq @ kk.transpose(-1, -2) / math.sqrt(hd)
            idx = sd[q + "attention.self.relative_position_index"].view(-1)
            rel = sd[q + "attention.self.relative_position_bias_table"][idx].view(n, n, -1).permute(2, 0, 1)
            sc = sc + rel[None]
            if mask is not None:
                nw = mask.shape[0]
                sc = sc.view(-1, nw, heads, n, n) + mask[None, :, None]
                sc = sc.view(-1, heads, n, n)
            a = (sc.softmax(-1) @ vv).permute(0, 2, 1, 3).reshape(-1, n, dim)
            a = _lin(a, sd, q + "attention.output.dense").view(-1, window, window, dim)
            a = a.view(b, Hp // window, Wp // window, window, window, dim).permute(0, 1, 3, 2, 4, 5)
            a = a.reshape(b, Hp, Wp, dim)
            if shift > 0:
                a = torch.roll(a, (shift, shift), (1, 2))
            x = short + a[:, :H, :W].reshape(b, H * W, dim)
            x = x + _lin(F.gelu(_lin(_ln(x, sd, q + "layernorm_after"), sd, q + "intermediate.dense")), sd,
                         q + "output.dense")
        feats.append(_ln(x, sd, f"{p}hidden_states_norms.stage{i + 1}").view(b, H, W, dim).permute(0, 3, 1, 2))
        if i < 3:
            g = x.view(b, H, W, dim)
            g = F.pad(g, (0, 0, 0, W % 2, 0, H % 2))
            g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1)
            H, W = g.shape[1], g.shape[2]
            x = F.linear(_ln(g.view(b, H * W, 4 * dim), sd, f"{p}encoder.layers.{i}.downsample.norm"),
                         sd[f"{p}encoder.layers.{i}.downsample.reduction.weight"])
    return feats


# ---------------------------------------------------------------- OVGroundingDinoForObjectDetection.forward_test
def _inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _gn(x, sd, p):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], 1e-5)


def reference_forward(sd, cfg, pixel_values, pixel_mask, text_query, text_query_masks):
    """The official raw outputs (bs = 1): logits [1, Q, 256], pred_boxes [1, Q, 4], pred_masks [1, Q, H/4, W/4].
    text_query: [1, C, K, l_hidden], text_query_masks: [1, C] bool."""
    d, m = cfg["d_model"], P + "model."
    eh, dh = cfg["encoder_attention_heads"], cfg["decoder_attention_heads"]
    temp = cfg.get("positional_embedding_temperature", 20)
    tq = _mlp(text_query, sd, P + "patch2query").mean(-2)
    bsz, C = text_query_masks.shape
    tsm = torch.eye(C, dtype=torch.bool).unsqueeze(0).repeat(bsz, 1, 1)
    pos_ids = torch.zeros(bsz, C, dtype=torch.long)
    for bi in range(bsz):
        nv = int(text_query_masks[bi].sum())
        tsm[bi, :nv, :nv] = True
        pos_ids[bi, :nv] = torch.arange(nv)
    ttm = text_query_masks.bool()
    feats = _swin(pixel_values, sd, m + "backbone.conv_encoder.model.", cfg["backbone_config"])
    fmasks = [F.interpolate(pixel_mask[None].float(), size=f.shape[-2:]).to(torch.bool)[0] for f in feats]
    srcs, masks, poss = [], [], []
    for lvl in range(3):
        f = feats[lvl + 1]
        x = F.conv2d(f, sd[f"{m}input_proj_vision.{lvl}.0.weight"], sd[f"{m}input_proj_vision.{lvl}.0.bias"])
        srcs.append(_gn(x, sd, f"{m}input_proj_vision.{lvl}.1"))
        masks.append(fmasks[lvl + 1])
        poss.append(_pos2d(fmasks[lvl + 1], d, temp))
    x = F.conv2d(feats[-1], sd[f"{m}input_proj_vision.3.0.weight"], sd[f"{m}input_proj_vision.3.0.bias"], stride=2,
                 padding=1)
    srcs.append(_gn(x, sd, f"{m}input_proj_vision.3.1"))
    mk = F.interpolate(pixel_mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
    masks.append(mk)
    poss.append(_pos2d(mk, d, temp))
    shapes = torch.as_tensor([s.shape[-2:] for s in srcs], dtype=torch.long)
    start = torch.cat((shapes.new_zeros((1,)), shapes.prod(1).cumsum(0)[:-1]))
    src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    mflat = torch.cat([mm.flatten(1) for mm in masks], 1)
    lpos = torch.cat([pp.flatten(2).transpose(1, 2) + sd[m + "level_embed"][i].view(1, 1, -1)
                      for i, pp in enumerate(poss)], 1)

    def ratio(mask):
        _, h, w = mask.shape
        return torch.stack([mask[:, 0, :].sum(1).float() / w, mask[:, :, 0].sum(1).float() / h], -1)
    vr = torch.stack([ratio(mm) for mm in masks], 1)
    refs = []
    for lvl, (h, w) in enumerate(shapes.tolist()):
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w), indexing="ij")
        refs.append(torch.stack((rx.reshape(-1)[None] / (vr[:, None, lvl, 0] * w),
                                 ry.reshape(-1)[None] / (vr[:, None, lvl, 1] * h)), -1))
    refs = torch.cat(refs, 1)[:, :, None] * vr[:, None]
    vis, txt, kpm = src, tq, ~mflat
    for i in range(cfg["encoder_layers"]):
        b = f"{m}encoder.layers.{i}."
        tpos = _sine(pos_ids[..., None].float(), d, exchange_xy=False)
        f = b + "fusion_layer."
        v, t = _ln(vis, sd, f + "layer_norm_vision"), _ln(txt, sd, f + "layer_norm_text")
        nh, ed = eh // 2, cfg["encoder_ffn_dim"] // 2
        hd = ed // nh

        def sh(z):
            return z.view(bsz, -1, nh, hd).transpose(1, 2).reshape(bsz * nh, -1, hd)
        vq = sh(_lin(v, sd, f + "attn.vision_proj") * hd ** -0.5)
        tk, vv, tv = sh(_lin(t, sd, f + "attn.text_proj")), sh(_lin(v, sd, f + "attn.values_vision_proj")), \
            sh(_lin(t, sd, f + "attn.values_text_proj"))
        aw = torch.bmm(vq, tk.transpose(1, 2))
        aw = aw - aw.max()
        aw = torch.clamp(aw, min=-50000, max=50000)
        awt = aw.transpose(1, 2)
        taw = torch.clamp(awt - torch.max(awt, dim=-1, keepdim=True)[0], min=-50000, max=50000)
        taw = taw.masked_fill(kpm[:, None, None, :].repeat(1, nh, 1, 1).flatten(0, 1), float("-inf")).softmax(-1)
        aw = aw.masked_fill((~ttm)[:, None, None, :].repeat(1, nh, 1, 1).flatten(0, 1), float("-inf")).softmax(-1)
        ov = torch.bmm(aw, tv).view(bsz, nh, -1, hd).transpose(1, 2).reshape(bsz, -1, ed)
        ot = torch.bmm(taw, vv).view(bsz, nh, -1, hd).transpose(1, 2).reshape(bsz, -1, ed)
        vis = v + sd[f + "vision_param"] * _lin(ov, sd, f + "attn.out_vision_proj")
        txt = t + sd[f + "text_param"] * _lin(ot, sd, f + "attn.out_text_proj")
        te = b + "text_enhancer_layer."
        am = (~tsm).repeat(eh // 2, 1, 1)
        qk = txt + tpos
        txt = _ln(txt + _mha(qk, qk, txt, sd, te + "self_attn", eh // 2, attn_mask=am), sd, te + "layer_norm_before")
        txt = _ln(txt + _lin(F.relu(_lin(txt, sd, te + "fc1")), sd, te + "fc2"), sd, te + "layer_norm_after")
        g = b + "deformable_layer."
        a = _msda(vis, vis, mflat, lpos, refs, shapes, sd, g + "self_attn", eh, cfg["encoder_n_points"])
        vis = _ln(vis + a, sd, g + "self_attn_layer_norm")
        vis = _ln(vis + _lin(F.relu(_lin(vis, sd, g + "fc1")), sd, g + "fc2"), sd, g + "final_layer_norm")
    # mask features
    h0, w0 = shapes[0].tolist()
    out0 = vis[:, :h0 * w0].transpose(1, 2).reshape(bsz, d, h0, w0)
    lat = _gn(F.conv2d(feats[0], sd[m + "lateral_convs.0.weight"]), sd, m + "lateral_convs.0.norm")
    y = lat + F.interpolate(out0.float(), size=lat.shape[-2:], mode="bilinear", align_corners=False)
    y = F.relu(_gn(F.conv2d(y, sd[m + "output_convs.0.weight"], padding=1), sd, m + "output_convs.0.norm"))
    mask_features = F.conv2d(y, sd[m + "mask_features.weight"], sd[m + "mask_features.bias"])
    # two-stage
    props, cur = [], 0
    for lvl, (h, w) in enumerate(shapes.tolist()):
        mf = kpm[:, cur:cur + h * w].view(bsz, h, w, 1)
        vh, vw = torch.sum(~mf[:, :, 0, 0], 1), torch.sum(~mf[:, 0, :, 0], 1)
        gy, gx = torch.meshgrid(torch.linspace(0, h - 1, h), torch.linspace(0, w - 1, w), indexing="ij")
        grid = torch.cat([gx.unsqueeze(-1), gy.unsqueeze(-1)], -1)
        scale = torch.cat([vw.unsqueeze(-1), vh.unsqueeze(-1)], 1).view(bsz, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(bsz, -1, -1, -1) + 0.5) / scale
        props.append(torch.cat((grid, torch.ones_like(grid) * 0.05 * (2.0 ** lvl)), -1).view(bsz, -1, 4))
        cur += h * w
    props = torch.cat(props, 1)
    pvalid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
    props = torch.log(props / (1 - props)).masked_fill(kpm.unsqueeze(-1), float("inf"))
    props = props.masked_fill(~pvalid, float("inf"))
    oq = vis.masked_fill(kpm.unsqueeze(-1), 0.0).masked_fill(~pvalid, 0.0)
    oq = _ln(_lin(oq, sd, m + "enc_output"), sd, m + "enc_output_norm")

    def contrastive(hs):
        o = (hs @ txt.transpose(-1, -2)).masked_fill(~ttm[:, None, :], float("-inf"))
        new = torch.full((*o.shape[:-1], cfg.get("max_text_len", 256)), float("-inf"))
        new[..., :o.shape[-1]] = o
        return new
    enc_cls = contrastive(oq)
    coords = _mlp(oq, sd, m + "encoder_output_bbox_embed") + props
    topk = torch.topk(enc_cls.max(-1)[0], cfg["num_queries"], dim=1)[1]
    ref = torch.gather(coords, 1, topk.unsqueeze(-1).repeat(1, 1, 4)).sigmoid()
    init_ref = ref
    hs = sd[m + "query_position_embeddings.weight"].unsqueeze(0).repeat(bsz, 1, 1)
    inter, inter_ref = [], []
    for i in range(cfg["decoder_layers"]):
        b = f"{m}decoder.layers.{i}."
        rin = ref[:, :, None] * torch.cat([vr, vr], -1)[:, None]
        qpos = _mlp(_sine(rin[:, :, 0, :], d // 2), sd, m + "decoder.reference_points_head")
        q = hs + qpos
        hs = _ln(hs + _mha(q, q, hs, sd, b + "self_attn", dh), sd, b + "self_attn_layer_norm")
        hs = _ln(hs + _mha(hs + qpos, txt, txt, sd, b + "encoder_attn_text", dh, key_padding_mask=~ttm), sd,
                 b + "encoder_attn_text_layer_norm")
        a = _msda(hs, vis, mflat, qpos, rin, shapes, sd, b + "encoder_attn", dh, cfg["decoder_n_points"])
        hs = _ln(hs + a, sd, b + "encoder_attn_layer_norm")
        hs = _ln(hs + _lin(F.relu(_lin(hs, sd, b + "fc1")), sd, b + "fc2"), sd, b + "final_layer_norm")
        ref = (_mlp(hs, sd, f"{m}decoder.bbox_embed.{i}") + _inverse_sigmoid(ref)).sigmoid()
        inter.append(_ln(hs, sd, m + "decoder.layer_norm"))
        inter_ref.append(ref)
    L = cfg["decoder_layers"]
    last = inter[-1]
    reference = _inverse_sigmoid(init_ref if L == 1 else inter_ref[-2])
    logits = contrastive(last)
    boxes = (_mlp(last, sd, f"{P}bbox_embed.{L - 1}") + reference).sigmoid()
    pred_masks = torch.einsum("bqc,bchw->bqhw", _mlp(last, sd, f"{P}mask_embed.{L - 1}"), mask_features)
    return logits, boxes, pred_masks


def _cxcywh_to_xyxy(x):
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def reference_det(logits, boxes, ori, num_classes, topk=100, threshold=0.0):
    """eval_det.post_process_det_gdino (one image)."""
    out = logits[:, :, :num_classes]
    prob = out.sigmoid().view(out.shape[0], -1)
    v, i = torch.topk(prob, min(topk, prob.size(1)), dim=1)
    qb = torch.div(i, out.shape[2], rounding_mode="floor")
    labels = i % out.shape[2]
    bx = torch.gather(_cxcywh_to_xyxy(boxes), 1, qb.unsqueeze(-1).repeat(1, 1, 4))
    bx = bx * torch.tensor([ori[1], ori[0], ori[1], ori[0]], dtype=torch.float32)[None, None]
    keep = v[0] > threshold
    return {"scores": v[0][keep], "labels": labels[0][keep], "boxes": bx[0][keep]}


def reference_instseg(logits, boxes, masks, ori, img_shape, num_classes, topk=100):
    """eval_det.post_process_instseg_gdino (one image)."""
    lg = logits[0, :, :num_classes]
    prob = lg.sigmoid().view(-1)
    v, i = torch.topk(prob, min(topk, prob.size(0)), dim=0)
    qb = torch.div(i, lg.shape[1], rounding_mode="floor")
    labels = i % lg.shape[-1]
    bx = _cxcywh_to_xyxy(boxes[0][qb]) * torch.as_tensor([ori[1], ori[0], ori[1], ori[0]], dtype=torch.float32)
    mp = masks[0][qb]
    H, W = mp.shape[-2:]
    mk = F.interpolate(mp[:, None], size=(H * 4, W * 4), mode="bilinear", align_corners=False)
    mk = mk[:, :, :img_shape[0], :img_shape[1]]
    mk = F.interpolate(mk, size=tuple(ori), mode="bilinear", align_corners=False)[:, 0].sigmoid() > 0.5
    return {"scores": v, "labels": labels, "boxes": bx, "masks": mk}


def reference_semseg(logits, masks, ori, img_shape, num_classes, before=True):
    """eval_semseg.process_seg_result."""
    prob = logits[0, :, :num_classes].sigmoid()
    mp = masks[0].sigmoid()
    H, W = mp.shape[-2:]
    if before:
        mp = F.interpolate(mp[:, None], size=(H * 4, W * 4), mode="bilinear", align_corners=False)
        mp = mp[:, :, :img_shape[0], :img_shape[1]]
        mp = F.interpolate(mp, size=tuple(ori), mode="bilinear", align_corners=False)[:, 0]
        return torch.einsum("qc,qhw->chw", prob, mp).argmax(0)
    mp = torch.einsum("qc,qhw->chw", prob, mp)
    mp = F.interpolate(mp[:, None], size=(H * 4, W * 4), mode="bilinear", align_corners=False)
    mp = mp[:, :, :img_shape[0], :img_shape[1]]
    return F.interpolate(mp, size=tuple(ori), mode="bilinear", align_corners=False)[:, 0].argmax(0)


def reference_request(sd, cfg, image, payload, short, long):
    """One request the official way: image uint8 [h, w, 3] (numpy), payload [C, K, l_hidden] ->
    (logits, boxes, masks, img_shape, ori_shape)."""
    pv, pm, img_shape, ori = reference_image(image, short, long)
    c = payload.shape[0]
    logits, boxes, masks = reference_forward(sd, cfg, pv, pm, payload[None], torch.ones(1, c, dtype=torch.bool))
    return logits, boxes, masks, img_shape, ori
