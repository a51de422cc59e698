"""The official UniPose network at inference (`unipose.*` keys without the prefix), batch-first.

forward_tensors(pixels, pixel_mask, obj_querys, obj_valid, kpt_querys, kpt_valid) -> pred_logits [B, 50, 100],
pred_boxes [B, 50, 4] (cx, cy, w, h normalised to the valid image), pred_keypoints [B, 50, 204]
(x0, y0, ..., x67, y67, then 68 visibilities sigmoid(1)), as UniPose.forward in eval mode.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from unimlm_engine.config.decoders import PoseConfig
from unimlm_engine.ops.masked_attention import SparseMask, column_spans

from .layers import (MLP, DecoderLayer, EncoderLayer, FusionLayer, TextLayer, inverse_sigmoid, mask_position_embed,
                     sine_embed_box, text_position_embed)
from .swin import SwinBackbone


class _Encoder(nn.Module):
    def __init__(self, c: PoseConfig):
        super().__init__()
        d, h, ff = c.hidden_dim, c.nheads, c.dim_feedforward
        self.layers = nn.ModuleList(EncoderLayer(d, ff, c.num_feature_levels, h, c.enc_n_points)
                                    for _ in range(c.enc_layers))
        self.text_layers = nn.ModuleList(TextLayer(d, h // 2, ff // 2) for _ in range(c.enc_layers))
        self.fusion_layers = nn.ModuleList(FusionLayer(d, ff // 2, h // 2) for _ in range(c.enc_layers))


class _Decoder(nn.Module):
    def __init__(self, c: PoseConfig, bbox_embed, pose_embed, pose_hw_embed):
        super().__init__()
        d = c.hidden_dim
        self.layers = nn.ModuleList(DecoderLayer(d, c.dim_feedforward, c.num_feature_levels, c.nheads, c.dec_n_points)
                                    for _ in range(c.dec_layers))
        self.norm = nn.LayerNorm(d)
        self.ref_point_head = MLP(2 * d, d, d, 2)
        self.hw = nn.Embedding(17, 2)
        self.hw_append = nn.Embedding(c.num_body_points - 17, 2)
        # the same ModuleLists as the top-level heads: the checkpoint stores both key paths
        self.bbox_embed, self.pose_embed, self.pose_hw_embed = bbox_embed, pose_embed, pose_hw_embed


class _Transformer(nn.Module):
    def __init__(self, c: PoseConfig, bbox_embed, pose_embed, pose_hw_embed):
        super().__init__()
        d = c.hidden_dim
        self.encoder = _Encoder(c)
        self.decoder = _Decoder(c, bbox_embed, pose_embed, pose_hw_embed)
        self.level_embed = nn.Parameter(torch.zeros(c.num_feature_levels, d))
        self.tgt_embed = nn.Embedding(c.num_queries, d)
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_out_bbox_embed = MLP(d, d, 4, 3)  # two_stage_bbox_embed_share=False: its own copy


def _logits(x: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
    """ContrastiveAssign: x [B, Q, D] . text [B, T, D] -> [B, Q, T], -inf at padded classes."""
    return (x @ text.transpose(-1, -2)).masked_fill(~text_valid[:, None, :], float("-inf"))


def _proposals(memory, padding, shapes_list):
    """gen_encoder_output_proposals: -> (memory zeroed at padding / invalid, proposals [B, S, 4] unsigmoided)."""
    b = memory.shape[0]
    props, cur = [], 0
    for lvl, (h, w) in enumerate(shapes_list):
        m = padding[:, cur:cur + h * w].view(b, h, w)
        vh, vw = (~m[:, :, 0]).sum(1), (~m[:, 0, :]).sum(1)
        gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=memory.device),
                                torch.arange(w, dtype=torch.float32, device=memory.device), indexing="ij")
        scale = torch.stack([vw, vh], -1).view(b, 1, 1, 2).float()
        grid = (torch.stack([gx, gy], -1)[None] + 0.5) / scale
        wh = torch.full_like(grid, 0.05 * 2.0 ** lvl)
        props.append(torch.cat([grid, wh], -1).view(b, -1, 4))
        cur += h * w
    p = torch.cat(props, 1)
    ok = ((p > 0.01) & (p < 0.99)).all(-1, keepdim=True)
    p = torch.log(p / (1 - p)).masked_fill(padding[..., None], float("inf")).masked_fill(~ok, float("inf"))
    mem = memory.masked_fill(padding[..., None], 0.0).masked_fill(~ok, 0.0)
    return mem, p


def group_self_attention(kpt_mask: torch.Tensor, n_groups: int) -> torch.Tensor:
    """prepare_for_mask: kpt_mask [B, N+1] (box, then keypoint validity) -> allowed [B, 1, G(N+1), G(N+1)].

    Off the diagonal blocks the official loop masks in groups of N (not N+1), only the first G*N rows, and
    never the columns after the last N-group (its `ej < G*N` test); inside each (N+1)-block a token may
    attend where the validity flags are equal."""
    b, blk = kpt_mask.shape
    n = blk - 1
    size = n_groups * blk
    r = torch.arange(size, device=kpt_mask.device)
    rg, cg = (r // n)[:, None], (r // n)[None, :]
    # row j < G*N masks columns before its N-group, and after it unless that group is the last one
    masked = (r[:, None] < n_groups * n) & ((cg < rg) | ((cg > rg) & (rg < n_groups - 1)))
    masked = masked[None].expand(b, -1, -1).clone()
    same_block = r[:, None] // blk == r[None, :] // blk
    flag = kpt_mask[:, r % blk]  # [B, size]
    in_block = flag[:, :, None] != flag[:, None, :]
    masked = torch.where(same_block[None], in_block, masked)
    return (~masked)[:, None]


_GROUP_MASKS: OrderedDict = OrderedDict()  # (validity row, groups, device) -> ([1, 1, S, S] allowed, spans)
_GROUP_MASKS_MAX = 4  # 12 MB each at the official 50 groups x 69
_GROUP_MASKS_LOCK = threading.Lock()


def group_mask(kpt_mask: torch.Tensor, n_groups: int) -> SparseMask:
    """group_self_attention for a batch with its column spans (ops/masked_attention.py), each distinct
    validity row computed once: a request's mask depends only on how many keypoints it names, and building it
    cost ~20% of a batch-1 CPU forward of the shipped model's decoder."""
    rows = []
    for row, flags in zip(kpt_mask, kpt_mask.tolist()):  # one device-to-host copy for the batch
        key = (tuple(flags), n_groups, str(row.device))
        with _GROUP_MASKS_LOCK:
            hit = _GROUP_MASKS.get(key)
            if hit is not None:
                _GROUP_MASKS.move_to_end(key)
        if hit is None:
            m = group_self_attention(row[None], n_groups)
            hit = (m, column_spans(m))
            with _GROUP_MASKS_LOCK:
                _GROUP_MASKS[key] = hit
                while len(_GROUP_MASKS) > _GROUP_MASKS_MAX:
                    _GROUP_MASKS.popitem(last=False)
        rows.append(hit)
    if all(r is rows[0] for r in rows):
        return SparseMask(rows[0][0].expand(len(rows), -1, -1, -1), rows[0][1])
    spans = [(r0, r1, min(sp[i][2] for _, sp in rows), max(sp[i][3] for _, sp in rows))
             for i, (r0, r1, _, _) in enumerate(rows[0][1])]
    return SparseMask(torch.cat([m for m, _ in rows]), spans)


def _loss_rows(allowed: torch.Tensor, n_valid: list[int], n_groups: int, blk: int):
    """Training only: the rows of the last keypoint layer that the set loss reads, and the rows they attend to.

    allowed [B, 1, S, S] (the group mask), n_valid[b] = sample b's valid keypoints -> rows [B, G(1+K)] (each
    group's box row, then its K = max(n_valid) keypoint rows; a sample's rows past its own valid keypoints repeat
    the group's box row), cols [B, C] (every row any of them may attend to, padded with column 0) and the mask
    [B, 1, G(1+K), C] (False at the padding). The kept rows' outputs equal the full layer's: a row's output
    depends only on the rows it may attend to, and the official mask lets a valid row attend only to its group's
    valid rows and, through its off-by-one group test, a few rows of the group before (group_self_attention).
    On the shapes model (50 groups, 4 keypoints) that is 250 query rows and ~1,500 key rows instead of 3,450 of
    each, and the keypoint layer's projections, cross-attentions and FFN run on 250 rows."""
    nk = max(n_valid)
    dev = allowed.device
    g = torch.arange(n_groups, device=dev)
    rows, cols = [], []
    for bi, n in enumerate(n_valid):
        j = torch.arange(1, nk + 1, device=dev)
        kpt = g[:, None] * blk + torch.where(j <= n, j, 0)[None]
        r = torch.cat([g * blk, kpt.flatten()])
        rows.append(r)
        cols.append(allowed[bi, 0, r].any(0).nonzero()[:, 0])
    width = max(len(c) for c in cols)
    keep = torch.stack([torch.arange(width, device=dev) < len(c) for c in cols])
    cols = torch.stack([F.pad(c, (0, width - len(c))) for c in cols])
    rows = torch.stack(rows)
    bi = torch.arange(len(n_valid), device=dev)[:, None, None]
    mask = allowed[:, 0][bi, rows[:, :, None], cols[:, None, :]] & keep[:, None, :]
    return rows, cols, mask[:, None]


class UniPoseNet(nn.Module):
    def __init__(self, c: PoseConfig):
        super().__init__()
        self.cfg = c
        d = c.hidden_dim
        e, depths, heads, window = c.swin()
        swin = SwinBackbone(e, depths, heads, window, c.return_interm_indices)
        self.backbone = nn.ModuleList([swin])
        chans = swin.num_features[4 - len(c.return_interm_indices):]
        proj = [nn.Sequential(nn.Conv2d(ch, d, 1), nn.GroupNorm(32, d)) for ch in chans]
        in_ch = chans[-1]
        for _ in range(c.num_feature_levels - len(chans)):
            proj.append(nn.Sequential(nn.Conv2d(in_ch, d, 3, 2, 1), nn.GroupNorm(32, d)))
            in_ch = d
        self.input_proj = nn.ModuleList(proj)
        self.projection_llava = MLP(c.l_hidden_size, d, d, 3)
        self.projection_kpt_llava = MLP(c.l_hidden_size, d, d, 3)
        bbox, pose, pose_hw = MLP(d, d, 4, 3), MLP(d, d, 2, 3), MLP(d, d, 2, 3)
        nb = c.num_box_decoder_layers
        self.bbox_embed = nn.ModuleList([bbox] * c.dec_layers)
        self.pose_embed = nn.ModuleList([pose] * (c.dec_layers - nb + 1))
        self.pose_hw_embed = nn.ModuleList([pose_hw] * (c.dec_layers - nb))
        self.transformer = _Transformer(c, self.bbox_embed, self.pose_embed, self.pose_hw_embed)
        # training only (training/train_shapes.py): a list set here collects the two-stage selection and the box
        # layers' outputs for the auxiliary losses; None (always, at inference) collects nothing
        self.collect: list | None = None
        # training only: True runs the last decoder layer (a keypoint layer) on the rows the set loss reads (each
        # group's box and valid keypoints) instead of all 50 x 69; see _loss_rows. False (always, at inference).
        self.loss_rows = False

    # ---------------------------------------------------------------- image side
    def _levels(self, pixels: torch.Tensor, pad: torch.Tensor):
        c = self.cfg
        feats = self.backbone[0](pixels)
        srcs, masks = [], []
        for lvl, f in enumerate(feats):
            srcs.append(self.input_proj[lvl](f))
            masks.append(F.interpolate(pad[None].float(), size=f.shape[-2:])[0].bool())
        for lvl in range(len(feats), c.num_feature_levels):
            src = self.input_proj[lvl](feats[-1] if lvl == len(feats) else srcs[-1])
            srcs.append(src)
            masks.append(F.interpolate(pad[None].float(), size=src.shape[-2:])[0].bool())
        poss = [mask_position_embed(m, c.hidden_dim // 2, c.pe_temperatureH, c.pe_temperatureW).to(s.dtype)
                for s, m in zip(srcs, masks)]
        return srcs, masks, poss

    def forward_tensors(self, pixels, pixel_mask, obj_querys, obj_valid, kpt_querys, kpt_valid):
        """pixels [B, 3, H, W]; pixel_mask [B, H, W] True = padding; obj_querys [B, 100, K, H_llm] with obj_valid
        [B, 100] (a valid prefix); kpt_querys [B, 100, K, H_llm] with kpt_valid [B, 100] (a valid prefix,
        at most 68)."""
        c = self.cfg
        tr, dec = self.transformer, self.transformer.decoder
        n_kpt, n_grp, nb = c.num_body_points, c.num_groups, c.num_box_decoder_layers
        text = self.projection_llava(obj_querys).mean(-2)
        kpt = self.projection_kpt_llava(kpt_querys).mean(-2)[:, :n_kpt]
        kvalid = kpt_valid[:, :n_kpt]
        kpt = kpt * kvalid[..., None].to(kpt.dtype)  # absent keypoints: zero embeddings (still queried)
        b, t = obj_valid.shape
        ar = torch.arange(t, device=obj_valid.device)
        nvalid = obj_valid.sum(1)
        valid_block = (ar[None, :] < nvalid[:, None])
        text_allowed = (valid_block[:, :, None] & valid_block[:, None, :]) | torch.eye(t, dtype=torch.bool,
                                                                                         device=ar.device)[None]
        text_pos = text_position_embed(torch.where(valid_block, ar[None], 0)).to(text.dtype)

        srcs, masks, poss = self._levels(pixels, pixel_mask)
        shapes_list = [tuple(s.shape[-2:]) for s in srcs]
        shapes = torch.as_tensor(shapes_list, dtype=torch.long, device=pixels.device)
        starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
        if int(shapes.prod(1).sum()) < c.num_queries:
            raise ValueError(f"UniPose: the image gives {int(shapes.prod(1).sum())} feature tokens, fewer than "
                             f"num_queries={c.num_queries} (image_short too small for this config)")
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pad = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + tr.level_embed[i] for i, p in enumerate(poss)], 1)
        ratios = torch.stack([torch.stack([(~m[:, 0, :]).sum(1).float() / m.shape[2],
                                           (~m[:, :, 0]).sum(1).float() / m.shape[1]], -1) for m in masks], 1)
        # encoder reference points: cell centres over the valid region, then times the valid ratios
        refs = []
        for lvl, (h, w) in enumerate(shapes_list):
            ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, device=src.device),
                                    torch.linspace(0.5, w - 0.5, w, device=src.device), indexing="ij")
            refs.append(torch.stack([rx.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w),
                                     ry.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)], -1))
        enc_ref = torch.cat(refs, 1)[:, :, None] * ratios[:, None]

        enc = tr.encoder
        memory = src
        for i, layer in enumerate(enc.layers):
            memory, text = enc.fusion_layers[i](memory, text, pad, ~obj_valid)
            text = enc.text_layers[i](text, text_allowed[:, None], text_pos)
            memory = layer(memory, pos, enc_ref, shapes, starts, pad)

        out_mem, props = _proposals(memory, pad, shapes_list)
        out_mem = tr.enc_output_norm(tr.enc_output(out_mem))
        score = _logits(out_mem, text, obj_valid).max(-1).values
        coord = tr.enc_out_bbox_embed(out_mem) + props
        top = torch.topk(score, c.num_queries, dim=1).indices
        if self.collect is not None:  # training only (training/train_shapes.py: the two-stage auxiliary loss)
            self.collect.append(("enc", out_mem, coord, top, text))
        ref = torch.gather(coord, 1, top[..., None].expand(-1, -1, 4)).sigmoid()
        out = tr.tgt_embed.weight[None].expand(b, -1, -1)

        text_valid = obj_valid[:, None, None, :]
        ratios4 = torch.cat([ratios, ratios], -1)[:, None]
        blk = n_kpt + 1
        kpt_index = torch.tensor([x for x in range(n_grp * blk) if x % blk], device=src.device)
        kpt_mask = torch.cat([torch.ones_like(kvalid[:, :1]), kvalid], 1)
        allowed = None
        rows = None
        for lid, layer in enumerate(dec.layers):
            ref_in = ref[:, :, None] * ratios4
            if self.loss_rows and lid == c.dec_layers - 1 and lid >= nb:
                rows, cols, rc_allowed = _loss_rows(allowed.allowed, kvalid.sum(1).tolist(), n_grp, blk)
                bi = torch.arange(b, device=out.device)[:, None]
                qpos = dec.ref_point_head(sine_embed_box(ref_in[bi, rows][:, :, 0]).to(out.dtype))
                kpos = dec.ref_point_head(sine_embed_box(ref_in[bi, cols][:, :, 0]).to(out.dtype))
                out = layer(out[bi, rows], qpos, ref_in[bi, rows], text, text_valid, memory, pad, shapes, starts,
                            rc_allowed, keys=(out[bi, cols], kpos))
                hs, ref_sig = dec.norm(out), ref[bi, rows]
                break
            qpos = dec.ref_point_head(sine_embed_box(ref_in[:, :, 0]).to(out.dtype))
            out = layer(out, qpos, ref_in, text, text_valid, memory, pad, shapes, starts, allowed)
            hs, ref_sig = dec.norm(out), ref
            if lid < nb:
                new_ref = (self.bbox_embed[lid](out) + inverse_sigmoid(ref)).sigmoid()
                if self.collect is not None:
                    self.collect.append(("dec", hs, new_ref))
            if lid == nb - 1:
                cls = _logits(out, text, obj_valid).max(-1).values
                sel = torch.topk(cls, n_grp, dim=1).indices
                box_ref = torch.gather(new_ref, 1, sel[..., None].expand(-1, -1, 4))
                box_out = torch.gather(out, 1, sel[..., None].expand(-1, -1, out.shape[-1]))
                kq = kpt[:, None].expand(-1, n_grp, -1, -1)
                kxy = (inverse_sigmoid(box_ref[..., :2])[:, :, None] + self.pose_embed[-1](kq)).sigmoid()
                hw = torch.cat([dec.hw.weight, dec.hw_append.weight], 0).sigmoid()
                kwh = hw[None, None] * box_ref[:, :, None, 2:]
                new_ref = torch.cat([box_ref[:, :, None], torch.cat([kxy, kwh], -1)], 2).flatten(1, 2)
                out = torch.cat([box_out[:, :, None], kq], 2).flatten(1, 2)
                allowed = group_mask(kpt_mask, n_grp)
            if lid >= nb:
                inv = inverse_sigmoid(ref)
                box_new = (self.bbox_embed[lid](out[:, 0::blk]) + inv[:, 0::blk]).sigmoid()
                ko = out[:, kpt_index]
                kr = inv[:, kpt_index].clone()
                kr[..., :2] += self.pose_embed[lid - nb](ko)
                kr[..., 2:] += self.pose_hw_embed[lid - nb](ko)
                new_ref = torch.cat([box_new[:, :, None], kr.sigmoid().view(b, n_grp, n_kpt, 4)], 2).flatten(1, 2)
            ref = new_ref

        # heads on the last layer (normed hidden states, the reference that layer started from)
        lid = c.dec_layers - 1
        box_at = slice(0, n_grp) if rows is not None else slice(0, None, blk)
        hb = hs[:, box_at]
        logits = _logits(hb, text, obj_valid).float()
        boxes = (self.bbox_embed[lid](hb) + inverse_sigmoid(ref_sig[:, box_at])).sigmoid().float()
        if rows is None:
            kxy = self.pose_embed[lid - nb](hs[:, kpt_index]) + inverse_sigmoid(ref_sig[:, kpt_index][..., :2])
            kxy = kxy.sigmoid().view(b, n_grp, n_kpt * 2)
        else:  # the valid keypoints' rows, the other keypoints NaN (no loss may read them)
            nk = (rows.shape[1] - n_grp) // n_grp
            kxy = self.pose_embed[lid - nb](hs[:, n_grp:]) + inverse_sigmoid(ref_sig[:, n_grp:, :2])
            kxy = kxy.sigmoid().view(b, n_grp, nk, 2)
            kxy = torch.where((torch.arange(nk, device=kxy.device) < kvalid.sum(1, keepdim=True))[:, None, :, None],
                              kxy, float("nan"))
            kxy = F.pad(kxy, (0, 0, 0, n_kpt - nk), value=float("nan")).flatten(2)
        vis = torch.full((b, n_grp, n_kpt), torch.sigmoid(torch.tensor(1.0)).item(), dtype=kxy.dtype,
                         device=kxy.device)
        return logits, boxes, torch.cat([kxy, vis], -1).float()
