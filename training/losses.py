"""Set-prediction losses for training the shapes model's decoders (DETR / DINO family, as Grounding-DINO and
UniPose train): Hungarian matching (scipy's linear_sum_assignment) on focal class cost + L1 + GIoU (+ keypoint
L1 for UniPose), then sigmoid focal loss over every (query, class), L1 + GIoU on the matched boxes, BCE + dice on
the matched masks, L1 on the matched keypoints. Boxes are cxcywh in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

W_CLS, W_L1, W_GIOU, W_MASK, W_DICE, W_KPT = 2.0, 5.0, 2.0, 5.0, 5.0, 10.0
ALPHA, GAMMA = 0.25, 2.0


@dataclass
class Target:
    labels: torch.Tensor  # [n] long: index of the object's class among the request's classes
    boxes: torch.Tensor  # [n, 4] cxcywh in [0, 1]
    masks: torch.Tensor | None = None  # [n, h, w] float in [0, 1] at the prediction's mask resolution
    keypoints: torch.Tensor | None = None  # [n, k, 2] xy in [0, 1]

    def to(self, device) -> "Target":
        return Target(*(None if t is None else t.to(device) for t in (self.labels, self.boxes, self.masks,
                                                                      self.keypoints)))


def box_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [n, 4], b [m, 4] xyxy -> [n, m]"""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt, rb = torch.max(a[:, None, :2], b[None, :, :2]), torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None] - inter
    iou = inter / union.clamp(min=1e-7)
    lt_c, rb_c = torch.min(a[:, None, :2], b[None, :, :2]), torch.max(a[:, None, 2:], b[None, :, 2:])
    hull = (rb_c - lt_c).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-7)


def focal_class_cost(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [Q, C], labels [n] -> [Q, n] (DINO's matcher cost)."""
    p = logits.sigmoid()[:, labels]
    neg = (1 - ALPHA) * p.pow(GAMMA) * -(1 - p + 1e-8).log()
    pos = ALPHA * (1 - p).pow(GAMMA) * -(p + 1e-8).log()
    return pos - neg


@torch.no_grad()
def match(logits: torch.Tensor, boxes: torch.Tensor, t: Target, kpts: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: logits [Q, C], boxes [Q, 4], optional keypoints [Q, k, 2] -> (query idx, target idx)."""
    if t.labels.numel() == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    cost = W_CLS * focal_class_cost(logits.float(), t.labels) + W_L1 * torch.cdist(boxes.float(), t.boxes, p=1) \
        - W_GIOU * generalized_iou(box_xyxy(boxes.float()), box_xyxy(t.boxes))
    if kpts is not None and t.keypoints is not None:
        k = t.keypoints.shape[1]
        cost = cost + W_KPT * torch.cdist(kpts[:, :k].flatten(1).float(), t.keypoints.flatten(1), p=1) / max(k, 1)
    q, j = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(q, dtype=torch.long), torch.as_tensor(j, dtype=torch.long)


def sigmoid_focal(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pt = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - pt) ** GAMMA
    return (ALPHA * target + (1 - ALPHA) * (1 - target)) * loss


def dice(pred_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = pred_logits.sigmoid().flatten(1)
    t = target.flatten(1)
    return 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)


def set_loss(logits: torch.Tensor, boxes: torch.Tensor, targets: list[Target], num_classes: list[int],
             masks: torch.Tensor | None = None, kpts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """logits [B, Q, C_max] (padded classes may be -inf), boxes [B, Q, 4], masks [B, Q, h, w] logits,
    kpts [B, Q, K, 2]; num_classes[b] = the request's class count. Losses normalised by the number of objects."""
    n_obj = max(1, sum(int(t.labels.numel()) for t in targets))
    out = {"cls": logits.new_zeros(()), "l1": logits.new_zeros(()), "giou": logits.new_zeros(())}
    if masks is not None:
        out["mask"], out["dice"] = logits.new_zeros(()), logits.new_zeros(())
    if kpts is not None:
        out["kpt"] = logits.new_zeros(())
    for b, t in enumerate(targets):
        c = num_classes[b]
        lg = logits[b, :, :c].float()
        qi, ti = match(lg, boxes[b], t, None if kpts is None else kpts[b])
        qi, ti = qi.to(lg.device), ti.to(lg.device)
        onehot = torch.zeros_like(lg)
        onehot[qi, t.labels[ti]] = 1.0
        out["cls"] = out["cls"] + sigmoid_focal(lg, onehot).sum() / n_obj
        if qi.numel() == 0:
            continue
        pb, tb = boxes[b, qi].float(), t.boxes[ti]
        out["l1"] = out["l1"] + F.l1_loss(pb, tb, reduction="sum") / n_obj
        out["giou"] = out["giou"] + (1 - torch.diag(generalized_iou(box_xyxy(pb), box_xyxy(tb)))).sum() / n_obj
        if masks is not None and t.masks is not None:
            pm, tm = masks[b, qi].float(), t.masks[ti]
            out["mask"] = out["mask"] + F.binary_cross_entropy_with_logits(pm, tm, reduction="none").mean((1, 2)).sum() / n_obj
            out["dice"] = out["dice"] + dice(pm, tm).sum() / n_obj
        if kpts is not None and t.keypoints is not None:
            k = t.keypoints.shape[1]
            out["kpt"] = out["kpt"] + F.l1_loss(kpts[b, qi, :k].float(), t.keypoints[ti], reduction="sum") / (n_obj * k)
    return out


WEIGHTS = {"cls": W_CLS, "l1": W_L1, "giou": W_GIOU, "mask": W_MASK, "dice": W_DICE, "kpt": W_KPT}


def weighted(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(WEIGHTS[k] * v for k, v in losses.items())
