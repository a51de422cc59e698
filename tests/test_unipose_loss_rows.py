"""UniPoseNet.loss_rows (training only): the last keypoint layer run on the rows the set loss reads gives the full
forward's outputs for those rows, and the same gradients, on the shapes model's UniPose (50 groups x 69 rows)."""
from __future__ import annotations

import torch

from unimlm_engine.model.decoders.pose import MAX_KPT_SLOTS, MAX_OBJ_SLOTS
from unimlm_engine.model.decoders.unipose.network import UniPoseNet
from unimlm_engine.shapes.config import shapes_config


def _inputs(n_valid, seed=0):
    cfg = shapes_config().pose
    g = torch.Generator().manual_seed(seed)
    b = len(n_valid)
    pixels = torch.randn(b, 3, cfg.image_short, cfg.image_short, generator=g)
    mask = torch.zeros(b, cfg.image_short, cfg.image_short, dtype=torch.bool)
    obj = torch.randn(b, MAX_OBJ_SLOTS, 4, cfg.l_hidden_size, generator=g)
    kq = torch.randn(b, MAX_KPT_SLOTS, 4, cfg.l_hidden_size, generator=g)
    ov = torch.arange(MAX_OBJ_SLOTS)[None] < torch.tensor([[2], [3]][:b])
    kv = torch.arange(MAX_KPT_SLOTS)[None] < torch.tensor(n_valid)[:, None]
    return cfg, pixels, mask, obj, ov, kq, kv


def _run(net, loss_rows, args, n_valid):
    net.zero_grad(set_to_none=True)
    pixels, mask, obj, ov, kq, kv = args
    kq = kq.clone().requires_grad_(True)
    net.loss_rows = loss_rows
    try:
        logits, boxes, kp = net.forward_tensors(pixels, mask, obj, ov, kq, kv)
    finally:
        net.loss_rows = False
    b, g = boxes.shape[:2]
    kxy = kp[..., :net.cfg.num_body_points * 2].view(b, g, -1, 2)
    valid = [kxy[i, :, :n] for i, n in enumerate(n_valid)]
    # a loss of everything a set loss reads: every group's logits and box, each sample's valid keypoints
    w = torch.Generator().manual_seed(1)
    loss = ((logits[:, :, :3] * torch.randn(logits[:, :, :3].shape, generator=w)).sum()
            + (boxes * torch.randn(boxes.shape, generator=w)).sum()
            + sum((v * torch.randn(v.shape, generator=w)).sum() for v in valid))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return logits.detach(), boxes.detach(), [v.detach() for v in valid], kxy.detach(), grads, kq.grad


def test_loss_rows_equal_the_full_keypoint_layer():
    n_valid = [4, 3]  # a square and a triangle request in one batch
    cfg, *args = _inputs(n_valid)
    torch.manual_seed(0)
    net = UniPoseNet(cfg).train()
    assert cfg.dec_layers - 1 >= cfg.num_box_decoder_layers  # the last layer is a keypoint layer
    full = _run(net, False, args, n_valid)
    rows = _run(net, True, args, n_valid)
    torch.testing.assert_close(rows[0], full[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rows[1], full[1], rtol=1e-4, atol=1e-5)
    for a, b in zip(rows[2], full[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the keypoints no loss may read are NaN, the valid ones are not
    assert torch.isnan(rows[3][1, :, 3:]).all() and torch.isnan(rows[3][0, :, 4:]).all()
    assert not torch.isnan(rows[3][0, :, :4]).any() and not torch.isnan(rows[3][1, :, :3]).any()
    assert set(rows[4]) == set(full[4])
    for n in full[4]:  # relative to each gradient's norm (fp32 sums in another order)
        assert (rows[4][n] - full[4][n]).norm() <= 1e-4 * full[4][n].norm() + 1e-7, n
    assert (rows[5] - full[5]).norm() <= 1e-4 * full[5].norm()
    # the keypoint layer's weights get a gradient from the valid rows, and the test sees the leak rows matter
    assert full[4]["transformer.decoder.layers.2.self_attn.in_proj_weight"].abs().sum() > 0


def test_loss_rows_key_set_includes_the_previous_groups_leak():
    """The official mask's off-by-one lets group g's valid rows attend to g rows at the end of group g-1 (invalid
    keypoint slots); dropping them changes the outputs, so _loss_rows must keep them as keys."""
    from unimlm_engine.model.decoders.unipose.network import _loss_rows, group_self_attention

    blk, groups = 69, 50
    kvalid = torch.arange(68)[None] < 4
    allowed = group_self_attention(torch.cat([torch.ones(1, 1, dtype=torch.bool), kvalid], 1), groups)
    rows, cols, mask = _loss_rows(allowed, [4], groups, blk)
    assert rows.shape == (1, groups * 5)
    c = set(cols[0].tolist())
    for g in range(1, groups):
        tail = set(range(68 * g, 69 * g))  # the last g rows of group g-1
        assert tail <= c, g
    own = {g * blk + j for g in range(groups) for j in range(5)}
    assert c == own | {x for g in range(1, groups) for x in range(68 * g, 69 * g)}
    assert mask.shape == (1, 1, groups * 5, len(c))
