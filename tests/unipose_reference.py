"""An independent plain-PyTorch transcription of the official UniPose inference path (VisionLLMv2
model/unipose/modeling_unipose.py, eval mode, DN off) and of eval_pose.post_process_pose, for tests.

Written from the official code, not from the engine: sequence-first tensors, nn.MultiheadAttention called
as the official layers call it, the official prepare_for_mask loops, Deformable-DETR's grid_sample MSDA.
Its state_dict keys are the official `unipose.*` keys without the prefix, so tests build official-layout
checkpoints from it. Does not import unimlm_engine.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.unipose_reference_layers import (MLP, SWIN, BiAttentionBlock, DeformableTransformerDecoderLayer,
                                            DeformableTransformerEncoderLayer, SwinTransformer,
                                            TransformerEncoderLayer, gen_sineembed_for_position, get_sine_pos_embed,
                                            inverse_sigmoid, position_embedding_sine_hw)


# ------------------------------------------------------------------ the model
class _NS(nn.Module):
    pass


def gen_encoder_output_proposals(memory, memory_padding_mask, spatial_shapes):
    N_, S_, C_ = memory.shape
    proposals, _cur = [], 0
    for lvl, (H_, W_) in enumerate(spatial_shapes):
        mask_flatten_ = memory_padding_mask[:, _cur:(_cur + H_ * W_)].view(N_, H_, W_, 1)
        valid_H = torch.sum(~mask_flatten_[:, :, 0, 0], 1)
        valid_W = torch.sum(~mask_flatten_[:, 0, :, 0], 1)
        grid_y, grid_x = torch.meshgrid(torch.linspace(0, H_ - 1, H_, dtype=torch.float32),
                                        torch.linspace(0, W_ - 1, W_, dtype=torch.float32), indexing="ij")
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.cat([valid_W.unsqueeze(-1), valid_H.unsqueeze(-1)], 1).view(N_, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(N_, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
        proposals.append(torch.cat((grid, wh), -1).view(N_, -1, 4))
        _cur += H_ * W_
    output_proposals = torch.cat(proposals, 1)
    valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
    output_proposals = torch.log(output_proposals / (1 - output_proposals))
    output_proposals = output_proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
    output_proposals = output_proposals.masked_fill(~valid, float("inf"))
    output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), float(0)).masked_fill(~valid, float(0))
    return output_memory, output_proposals


def contrastive_assign(x, text_dict):
    y = text_dict["encoded_text"]
    res = x @ y.transpose(-1, -2)
    res.masked_fill_(~text_dict["text_token_mask"][:, None, :], float("-inf"))
    new_res = torch.full((*res.shape[:-1], y.shape[1]), float("-inf"))
    new_res[..., :res.shape[-1]] = res
    return new_res


class ReferenceUniPose(nn.Module):
    """cfg: an official unipose_config dict; swin: (embed_dim, depths, num_heads, window_size) or None (table)."""

    def __init__(self, cfg: dict, swin=None):
        super().__init__()
        self.cfg = cfg
        d, nh, ff = cfg["hidden_dim"], cfg["nheads"], cfg["dim_feedforward"]
        L, nl = cfg["dec_layers"], cfg["num_feature_levels"]
        sw = SWIN[cfg["backbone"]] if swin is None else dict(zip(("embed_dim", "depths", "num_heads", "window_size"),
                                                                  swin))
        ri = list(cfg["return_interm_indices"])
        bb = SwinTransformer(sw["embed_dim"], sw["depths"], sw["num_heads"], sw["window_size"], tuple(ri))
        self.backbone = nn.ModuleList([bb])
        chans = bb.num_features[4 - len(ri):]
        proj = []
        for c in chans:
            proj.append(nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)))
        in_ch = chans[-1]
        for _ in range(nl - len(chans)):
            proj.append(nn.Sequential(nn.Conv2d(in_ch, d, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, d)))
            in_ch = d
        self.input_proj = nn.ModuleList(proj)
        self.projection_llava = MLP(cfg["l_hidden_size"], d, d, 3)
        self.projection_kpt_llava = MLP(cfg["l_hidden_size"], d, d, 3)
        tr = _NS()
        enc = _NS()
        enc.layers = nn.ModuleList(DeformableTransformerEncoderLayer(d, ff, nl, nh, cfg["enc_n_points"])
                                   for _ in range(cfg["enc_layers"]))
        enc.text_layers = nn.ModuleList(TransformerEncoderLayer(d, nh // 2, ff // 2) for _ in range(cfg["enc_layers"]))
        enc.fusion_layers = nn.ModuleList(BiAttentionBlock(d, ff // 2, nh // 2) for _ in range(cfg["enc_layers"]))
        tr.encoder = enc
        dec = _NS()
        dec.layers = nn.ModuleList(DeformableTransformerDecoderLayer(d, ff, nl, nh, cfg["dec_n_points"])
                                   for _ in range(L))
        dec.norm = nn.LayerNorm(d)
        dec.ref_point_head = MLP(2 * d, d, d, 2)
        dec.hw = nn.Embedding(17, 2)
        dec.hw_append = nn.Embedding(68 - 17, 2)  # the decoder is built with its default num_body_points=68
        tr.decoder = dec
        tr.level_embed = nn.Parameter(torch.zeros(nl, d))
        tr.tgt_embed = nn.Embedding(cfg["num_queries"], d)
        tr.enc_output = nn.Linear(d, d)
        tr.enc_output_norm = nn.LayerNorm(d)
        self.transformer = tr
        _bbox, _pose, _pose_hw = MLP(d, d, 4, 3), MLP(d, d, 2, 3), MLP(d, d, 2, 3)
        nb = cfg["num_box_decoder_layers"]
        self.bbox_embed = nn.ModuleList([_bbox for _ in range(L)])
        self.pose_embed = nn.ModuleList([_pose for _ in range(L - nb + 1)])
        self.pose_hw_embed = nn.ModuleList([_pose_hw for _ in range(L - nb)])
        dec.bbox_embed, dec.pose_embed, dec.pose_hw_embed = self.bbox_embed, self.pose_embed, self.pose_hw_embed
        tr.enc_out_bbox_embed = copy.deepcopy(_bbox)

    def prepare_for_mask(self, kpt_mask):
        nbp, nheads = 68, self.cfg["nheads"]
        tgt_size2 = 50 * (1 + nbp)
        # the official loops fill [bs, nheads, L, L]; every head gets the same mask, so they run on one head
        # here and the result is repeated over the heads
        attn_mask2 = torch.ones(kpt_mask.shape[0], 1, tgt_size2, tgt_size2) < 0
        group_bbox_kpt, num_group = nbp, 50
        for matchj in range(num_group * group_bbox_kpt):
            sj = (matchj // group_bbox_kpt) * group_bbox_kpt
            ej = (matchj // group_bbox_kpt + 1) * group_bbox_kpt
            if sj > 0:
                attn_mask2[:, :, matchj, :sj] = True
            if ej < num_group * group_bbox_kpt:
                attn_mask2[:, :, matchj, ej:] = True
        bs, length = kpt_mask.shape
        equal_mask = kpt_mask[:, :, None] == kpt_mask[:, None, :]
        equal_mask = equal_mask.unsqueeze(1)
        for idx in range(num_group):
            s, e = idx * length, (idx + 1) * length
            attn_mask2[:, :, s:e, s:e][equal_mask] = False
            attn_mask2[:, :, s:e, s:e][~equal_mask] = True
        return attn_mask2.repeat(1, nheads, 1, 1).flatten(0, 1)

    @torch.no_grad()
    def forward(self, tensors, mask, text_query):
        """UniPose.forward (eval): tensors [bs, 3, H, W], mask [bs, H, W] True = padding, text_query as
        modeling_visionllmv2 builds it (obj/kpt querys [bs, 100, K, H] + masks [bs, 100])."""
        cfg = self.cfg
        nbp, nb, d = 68, cfg["num_box_decoder_layers"], cfg["hidden_dim"]
        tr, dec = self.transformer, self.transformer.decoder
        bs = text_query["obj_querys"].shape[0]
        encoded_text = self.projection_llava(text_query["obj_querys"]).mean(-2)
        kpt_emb = torch.zeros((bs, nbp, d))
        for i in range(bs):
            n_kpt = text_query["kpt_query_masks"][i].sum()
            kpt_emb[i, :n_kpt, :] = self.projection_kpt_llava(text_query["kpt_querys"][i]).mean(-2)[:n_kpt, :]
        kpt_vis = text_query["kpt_query_masks"][:, :nbp]
        kpt_mask = torch.cat((torch.ones_like(kpt_vis)[..., 0].unsqueeze(-1), kpt_vis), dim=-1)
        tqm = text_query["obj_query_masks"]
        n_tok = tqm.shape[1]
        tsam = torch.eye(n_tok).bool().unsqueeze(0).repeat(bs, 1, 1)
        position_ids = torch.zeros((bs, n_tok), dtype=torch.long)
        for b in range(bs):
            nv = tqm[b].sum()
            tsam[b, :nv, :nv] = True
            position_ids[b, :nv] = torch.arange(0, nv)
        text_dict = {"encoded_text": encoded_text, "text_token_mask": tqm.bool()}

        feats = self.backbone[0](tensors, mask)
        srcs, masks, poss = [], [], []
        for lvl, (f, m) in enumerate(feats):
            srcs.append(self.input_proj[lvl](f))
            masks.append(m)
            poss.append(position_embedding_sine_hw(m, d // 2, cfg["pe_temperatureH"], cfg["pe_temperatureW"]))
        for lvl in range(len(feats), cfg["num_feature_levels"]):
            src = self.input_proj[lvl](feats[-1][0]) if lvl == len(feats) else self.input_proj[lvl](srcs[-1])
            m = F.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(m)
            poss.append(position_embedding_sine_hw(m, d // 2, cfg["pe_temperatureH"], cfg["pe_temperatureW"]))

        # DeformableTransformer.forward
        src_flatten, mask_flatten, lvl_pos, spatial_shapes = [], [], [], []
        for lvl, (src, m, pe) in enumerate(zip(srcs, masks, poss)):
            spatial_shapes.append(src.shape[-2:])
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(m.flatten(1))
            lvl_pos.append(pe.flatten(2).transpose(1, 2) + tr.level_embed[lvl].view(1, 1, -1))
        src_flatten, mask_flatten = torch.cat(src_flatten, 1), torch.cat(mask_flatten, 1)
        lvl_pos = torch.cat(lvl_pos, 1)
        spatial_shapes = torch.as_tensor([tuple(s) for s in spatial_shapes], dtype=torch.long)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))

        def valid_ratio(m):
            _, H, W = m.shape
            return torch.stack([torch.sum(~m[:, 0, :], 1).float() / W, torch.sum(~m[:, :, 0], 1).float() / H], -1)

        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)
        # TransformerEncoder.forward
        rps = []
        for lvl, (H_, W_) in enumerate(spatial_shapes.tolist()):
            ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, H_ - 0.5, H_), torch.linspace(0.5, W_ - 0.5, W_),
                                          indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H_)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W_)
            rps.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(rps, 1)[:, :, None] * valid_ratios[:, None]
        pos_text = get_sine_pos_embed(position_ids[..., None], num_pos_feats=256, exchange_xy=False)
        output, memory_text = src_flatten, encoded_text
        text_attention_mask = ~text_dict["text_token_mask"]
        for lid, layer in enumerate(tr.encoder.layers):
            output, memory_text = tr.encoder.fusion_layers[lid](v=output, l=memory_text, attention_mask_v=mask_flatten,
                                                                 attention_mask_l=text_attention_mask)
            memory_text = tr.encoder.text_layers[lid](memory_text.transpose(0, 1), ~tsam, text_attention_mask,
                                                      pos_text.transpose(0, 1)).transpose(0, 1)
            output = layer(output, lvl_pos, reference_points, spatial_shapes, level_start_index, mask_flatten)
        memory = output
        text_dict["encoded_text"] = memory_text
        output_memory, output_proposals = gen_encoder_output_proposals(memory, mask_flatten, spatial_shapes.tolist())
        output_memory = tr.enc_output_norm(tr.enc_output(output_memory))
        topk_logits = contrastive_assign(output_memory, text_dict).max(-1)[0]
        enc_coord = tr.enc_out_bbox_embed(output_memory) + output_proposals
        topk_proposals = torch.topk(topk_logits, cfg["num_queries"], dim=1)[1]
        refpoint_embed = torch.gather(enc_coord, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4))
        tgt = tr.tgt_embed.weight[:, None, :].repeat(1, bs, 1).transpose(0, 1)
        attn_mask2 = self.prepare_for_mask(kpt_mask)

        # TransformerDecoder.forward (sequence first)
        output = tgt.transpose(0, 1)
        memory_sf = memory.transpose(0, 1)
        reference_points = refpoint_embed.transpose(0, 1).sigmoid()
        ref_points, intermediate = [reference_points], []
        kpt_index = [x for x in range(50 * (nbp + 1)) if x % (nbp + 1) != 0]
        tgt_mask = None
        for layer_id, layer in enumerate(dec.layers):
            rpi = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[None, :]
            query_pos = dec.ref_point_head(gen_sineembed_for_position(rpi[:, :, 0, :]))
            output = layer(output, query_pos, rpi, memory_text, text_attention_mask, memory_sf, mask_flatten,
                           level_start_index, spatial_shapes, tgt_mask)
            intermediate.append(dec.norm(output))
            if layer_id < nb:
                new_reference_points = (dec.bbox_embed[layer_id](output) + inverse_sigmoid(reference_points)).sigmoid()
            if layer_id == nb - 1:
                cu = contrastive_assign(output.transpose(0, 1), text_dict).transpose(0, 1)
                topk_p = torch.topk(cu.max(-1)[0], 50, dim=0)[1]
                nrb = torch.gather(new_reference_points, 0, topk_p.unsqueeze(-1).repeat(1, 1, 4))
                nob = torch.gather(output, 0, topk_p.unsqueeze(-1).repeat(1, 1, d))
                keypoint_embed = kpt_emb.transpose(0, 1)
                nok = keypoint_embed[None, :, :, :].repeat(nob.shape[0], 1, 1, 1)
                delta_xy = dec.pose_embed[-1](nok)[..., :2]
                keypoint_xy = (inverse_sigmoid(nrb[..., :2][:, None]) + delta_xy).sigmoid()
                nq, _, b_, _ = keypoint_xy.shape
                aa = torch.cat((dec.hw.weight, dec.hw_append.weight), dim=0)
                kwh = aa.unsqueeze(0).unsqueeze(-2).repeat(nq, 1, b_, 1).sigmoid() * nrb[..., 2:][:, None]
                nrk = torch.cat((keypoint_xy, kwh), dim=-1)
                new_reference_points = torch.cat((nrb.unsqueeze(1), nrk), dim=1).flatten(0, 1)
                output = torch.cat((nob.unsqueeze(1), nok), dim=1).flatten(0, 1)
                tgt_mask = attn_mask2
            if layer_id >= nb:
                rbs = inverse_sigmoid(reference_points)
                onb = output[0::(nbp + 1)]
                nrbn = (dec.bbox_embed[layer_id](onb) + rbs[0::(nbp + 1)]).sigmoid()
                ok_ = output.index_select(0, torch.tensor(kpt_index))
                dxy = dec.pose_embed[layer_id - nb](ok_)
                ou = rbs.index_select(0, torch.tensor(kpt_index)).clone()
                dhw = dec.pose_hw_embed[layer_id - nb](ok_)
                ou[..., :2] += dxy[..., :2]
                ou[..., 2:] += dhw
                nrk = ou.sigmoid()
                b_ = nrbn.shape[1]
                new_reference_points = torch.cat((nrbn.unsqueeze(1), nrk.view(-1, nbp, b_, 4)), dim=1).flatten(0, 1)
            reference_points = new_reference_points
            ref_points.append(new_reference_points)
        hs = [x.transpose(0, 1) for x in intermediate]
        reference = [x.transpose(0, 1) for x in ref_points]

        # UniPose.forward heads (last layer only is returned)
        dec_lid = cfg["dec_layers"] - 1
        layer_hs, layer_ref_sig = hs[dec_lid], reference[dec_lid]
        hb = layer_hs[:, 0::(nbp + 1), :]
        boxes = (self.bbox_embed[dec_lid](hb) + inverse_sigmoid(layer_ref_sig[:, 0::(nbp + 1), :])).sigmoid()
        logits = contrastive_assign(hb, text_dict)
        layer_hs_kpt = layer_hs.index_select(1, torch.tensor(kpt_index))
        dxy = self.pose_embed[dec_lid - nb](layer_hs_kpt)
        lrk = layer_ref_sig.index_select(1, torch.tensor(kpt_index))
        xy = dxy + inverse_sigmoid(lrk[..., :2])
        xyv = torch.cat((xy, torch.ones_like(xy)[:, :, 0].unsqueeze(-1)), dim=-1).sigmoid()
        res = xyv.reshape((bs, 50, nbp, 3)).flatten(2, 3)
        kp = torch.zeros_like(res)
        kp[..., 0:2 * nbp:2] = res[..., 0::3]
        kp[..., 1:2 * nbp:2] = res[..., 1::3]
        kp[..., 2 * nbp:] = res[..., 2::3]
        return logits.float(), boxes.float(), kp.float()


# ------------------------------------------------------------------ official pre / post-processing
def official_image(pil_image, size=800, max_size=1333):
    """make_coco_transforms('val'): RandomResize([800], max_size=1333), ToTensor, Normalize -> [3, h, w]."""
    from PIL import Image

    w, h = pil_image.size
    mn, mx = float(min((w, h))), float(max((w, h)))
    if mx / mn * size > max_size:
        size = int(round(max_size * mn / mx))
    if (w <= h and w == size) or (h <= w and h == size):
        oh, ow = h, w
    elif w < h:
        ow, oh = size, int(size * h / w)
    else:
        oh, ow = size, int(size * w / h)
    im = pil_image.resize((ow, oh), Image.BILINEAR)
    t = torch.from_numpy(np.array(im, dtype=np.float32)).permute(2, 0, 1) / 255.0
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (t - mean) / std


def nested(tensors, size_divisibility=32):
    """nested_tensor_from_tensor_list(size_divisibility=32) -> (tensors, mask True = padding)."""
    h = max(t.shape[1] for t in tensors)
    w = max(t.shape[2] for t in tensors)
    h, w = -(-h // size_divisibility) * size_divisibility, -(-w // size_divisibility) * size_divisibility
    out = torch.zeros(len(tensors), 3, h, w)
    mask = torch.ones(len(tensors), h, w, dtype=torch.bool)
    for i, t in enumerate(tensors):
        out[i, :, :t.shape[1], :t.shape[2]] = t
        mask[i, :t.shape[1], :t.shape[2]] = False
    return out, mask


def post_process_pose(logits, boxes_cxcywh, keypoints, target_sizes, num_classes, num_body_points, topk=100):
    """eval_pose.post_process_pose (id_mapping = identity, threshold 0)."""
    out_logits = logits[:, :, :num_classes]
    prob = out_logits.sigmoid().view(out_logits.shape[0], -1)
    k_value = min(topk, prob.size(1))
    scores, idx = torch.topk(prob, k_value, dim=1)
    topk_boxes = torch.div(idx, out_logits.shape[2], rounding_mode="floor")
    labels = idx % out_logits.shape[2]
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    b = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)
    b = torch.gather(b, 1, topk_boxes.unsqueeze(-1).repeat(1, 1, 4))
    img_h = torch.tensor([float(s[0]) for s in target_sizes])
    img_w = torch.tensor([float(s[1]) for s in target_sizes])
    b = b * torch.stack([img_w, img_h, img_w, img_h], dim=1)[:, None, :]
    kps = torch.gather(keypoints, 1, topk_boxes.unsqueeze(-1).repeat(1, 1, 68 * 3))
    Z = kps[:, :, :num_body_points * 2]
    V = torch.ones_like(Z)[:, :, :num_body_points]
    Z = Z * torch.stack([img_w, img_h], dim=1).repeat(1, num_body_points)[:, None, :]
    res = torch.zeros(Z.shape[0], Z.shape[1], num_body_points * 3)
    res[..., 0::3], res[..., 1::3], res[..., 2::3] = Z[..., 0::2], Z[..., 1::2], V
    out = []
    for s, l_, bb, k in zip(scores, labels, b, res):
        keep = s > 0
        out.append({"scores": s[keep], "labels": l_[keep], "boxes": bb[keep], "keypoints": k[keep]})
    return out
