"""The decoder losses of train_shapes.py: the Grounding-DINO (DET / SEG) and UniPose (POSE) set losses on the
super-link payloads, with the auxiliary losses DINO / ED-Pose train (the two-stage selection, every decoder
layer). The decoders see the images as the engine feeds them (gdino_image / UniPose prepare_image)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from aids import Routed, in_class
from losses import Target, set_loss

from unimlm_engine.model.decoders.grounding import class_logits, inverse_sigmoid
from unimlm_engine.model.decoders.images import gdino_canvas, gdino_image
from unimlm_engine.model.decoders.pose import MAX_KPT_SLOTS, MAX_OBJ_SLOTS, prepare_image
from unimlm_engine.model.decoders.unipose.network import _logits as pose_logits
from unimlm_engine.shapes.tasks import Sample
from unimlm_engine.shapes.world import IMAGE_SIZE, Scene


def payloads(routed: Routed, bi: int, groups, route_names: tuple[str, ...]) -> list[torch.Tensor]:
    return [routed(bi, p) for route, p in groups[bi] if route in route_names]


def scene_targets(sc: Scene, s: Sample, mask_hw: int | None):
    # (object, class) pairs: an object of a class named in the sample (or of a group, group_det_sample)
    pairs = [(o, j) for o in sc.objects for j, name in enumerate(s.classes) if in_class(o, name)]
    objs = [o for o, _ in pairs]
    labels = torch.tensor([j for _, j in pairs], dtype=torch.long)
    xyxy = torch.tensor([o.box for o in objs], dtype=torch.float32).view(-1, 4) / IMAGE_SIZE
    boxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], -1)
    masks = None
    if mask_hw is not None:
        m = torch.stack([torch.from_numpy(o.mask).float() for o in objs]) if objs else torch.zeros(0, 224, 224)
        masks = F.adaptive_avg_pool2d(m[:, None], mask_hw)[:, 0] if objs else torch.zeros(0, mask_hw, mask_hw)
    kpts = None
    if s.task == "pose":
        kpts = torch.tensor(np.array([o.keypoints for o in objs]), dtype=torch.float32).view(len(objs), -1, 2) / IMAGE_SIZE
    return Target(labels, boxes, masks, kpts)


def detector_loss(model, hidden, samples, groups, k: int):
    idx = [i for i, (s, _) in enumerate(samples) if s.task in ("det", "seg")]
    if not idx:
        return {}
    det = model.decoders.gdino
    ims = [gdino_image(samples[i][1].image, det.cfg.image_short, det.cfg.image_long)[0] for i in idx]
    dev = hidden.device
    pixels, valid = (t.to(dev) for t in gdino_canvas(ims, det.pad_multiple))
    routed = Routed(hidden, groups, k)
    pl = [torch.stack(payloads(routed, i, groups, ("[DET]", "[SEG]"))) for i in idx]
    c_max = max(p.shape[0] for p in pl)
    cp = torch.stack([F.pad(p, (0, 0, 0, 0, 0, c_max - p.shape[0])) for p in pl])
    cv = torch.tensor([[j < p.shape[0] for j in range(c_max)] for p in pl], device=dev)
    det.model.collect = []
    try:
        logits, boxes, masks = det.forward_tensors(pixels, valid, cp, cv, with_masks=True)
        collected = det.model.collect
    finally:
        det.model.collect = None
    hw = masks.shape[-1]
    targets = [scene_targets(samples[i][1], samples[i][0], hw).to(dev) for i in idx]
    ncls = [p.shape[0] for p in pl]
    out = set_loss(logits, boxes, targets, ncls, masks=masks)
    # auxiliary losses, as DINO / Grounding-DINO train: the two-stage selection (this is what teaches the
    # encoder's class scores which proposals to pick: top-k itself passes no gradient) and every decoder layer
    g = det.model
    heads = []
    layers = [r for r in collected if r[0] == "dec"][:-1]  # the last layer's output is the main loss above
    for rec in collected:
        if rec[0] == "enc":
            _, query, props, top, text = rec
            sel = torch.gather(query, 1, top[..., None].expand(-1, -1, query.shape[-1]))
            coords = torch.gather(g.encoder_output_bbox_embed(query).float() + props, 1,
                                  top[..., None].expand(-1, -1, 4))
            heads.append((class_logits(sel, text, cv), coords.sigmoid()))
    text = next(r[4] for r in collected if r[0] == "enc")
    for i, (_, hidden, ref) in enumerate(layers):
        hs = g.decoder.layer_norm(hidden)
        heads.append((class_logits(hs, text, cv), (det.bbox_embed[i](hs).float() + inverse_sigmoid(ref)).sigmoid()))
    for lg, bx in heads:
        for k, v in set_loss(lg, bx, targets, ncls).items():
            out[k] = out[k] + v
    return out


def pose_loss(model, hidden, samples, groups, k: int):
    idx = [i for i, (s, _) in enumerate(samples) if s.task == "pose"]
    if not idx:
        return {}
    net = model.decoders.unipose
    cfg = net.cfg
    pix, obj, kq, ov, kv, ncls, targets = [], [], [], [], [], [], []
    dev = hidden.device
    routed = Routed(hidden, groups, k)
    for i in idx:
        x, _ = prepare_image(samples[i][1].image, cfg.image_short, cfg.image_long)
        pix.append(x)
        cls_p = torch.stack(payloads(routed, i, groups, ("[DET]",)))
        kpt_p = torch.stack(payloads(routed, i, groups, ("[POSE]",)))
        obj.append(F.pad(cls_p, (0, 0, 0, 0, 0, MAX_OBJ_SLOTS - cls_p.shape[0])))
        kq.append(F.pad(kpt_p, (0, 0, 0, 0, 0, MAX_KPT_SLOTS - kpt_p.shape[0])))
        ov.append(torch.arange(MAX_OBJ_SLOTS, device=dev) < cls_p.shape[0])
        kv.append(torch.arange(MAX_KPT_SLOTS, device=dev) < kpt_p.shape[0])
        ncls.append(cls_p.shape[0])
        targets.append(scene_targets(samples[i][1], samples[i][0], None).to(dev))
    pixels = torch.stack(pix).to(dev)  # every shapes image has the same (224 x 224) canvas
    mask = torch.zeros(pixels.shape[0], pixels.shape[2], pixels.shape[3], dtype=torch.bool, device=dev)
    ov = torch.stack(ov)
    # the last (keypoint) layer on the rows this loss reads: the same outputs there, ~1/14 of its rows
    net.collect, net.loss_rows = [], True
    try:
        logits, boxes, kp = net.forward_tensors(pixels, mask, torch.stack(obj), ov, torch.stack(kq), torch.stack(kv))
        collected = net.collect
    finally:
        net.collect, net.loss_rows = None, False
    kxy = kp[..., :cfg.num_body_points * 2].reshape(kp.shape[0], kp.shape[1], cfg.num_body_points, 2)
    out = set_loss(logits, boxes, targets, ncls, kpts=kxy)
    # auxiliary object losses (ED-Pose / UniPose train every layer): the two-stage selection and the box layers
    text = next(r[4] for r in collected if r[0] == "enc")
    for rec in collected:
        if rec[0] == "enc":
            _, mem, coord, top, _ = rec
            sel = torch.gather(mem, 1, top[..., None].expand(-1, -1, mem.shape[-1]))
            lg, bx = pose_logits(sel, text, ov), torch.gather(coord, 1, top[..., None].expand(-1, -1, 4)).sigmoid()
        else:
            lg, bx = pose_logits(rec[1], text, ov), rec[2]
        for k, v in set_loss(lg, bx, targets, ncls).items():
            out[k] = out[k] + v
    return {f"pose_{n}": v for n, v in out.items()}
