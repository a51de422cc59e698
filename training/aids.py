"""Training-only aids of train_shapes.py: none of them is in the checkpoint or changes the served computation.

The payload gradient's scale and cap (CapGrad), the payload probe, the per-patch head on the image tokens,
the per-part gradient clipping groups and the detection of object groups (group_det_sample).
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from unimlm_engine.shapes.tasks import DET_QUESTIONS, YES, Sample, routed_list
from unimlm_engine.shapes.world import CLASSES, COLOURS, IMAGE_SIZE, KEYPOINT_NAMES, SHAPES, Scene, ShapeObject

# the share of the decoder losses' gradient that flows back into the LLM through the payloads (the forward is
# unchanged): the set losses are tens of times the cross-entropy, and at full strength they swamp the LLM's
# updates (its text and its payloads then learn several times slower)
PAYLOAD_GRAD = 0.1
# ... and that gradient's norm (over the whole batch's hidden states) is capped: a loss spike in a decoder
# early on would otherwise swamp the LM's gradient (whose norm at the hidden states is about 0.01)
PAYLOAD_GRAD_MAX = 0.03


class CapGrad(torch.autograd.Function):
    """Identity forward; backward scales the gradient by `scale` and caps its norm at `max_norm`."""

    @staticmethod
    def forward(ctx, x, scale: float, max_norm: float):
        ctx.scale, ctx.max_norm = scale, max_norm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g * ctx.scale
        n = float(g.norm())
        return (g * (ctx.max_norm / n) if n > ctx.max_norm else g), None, None


class Routed:
    """Every routed group's K payload rows of hidden [B, L, H], gathered with one index: `rows[at[(b, p)]]` is
    hidden[b, p + 1:p + 1 + k] for the routing token at position p of sequence b. Slicing hidden once per group
    instead made autograd fill and add a full [B, L, H] gradient per group (~180 a step, ~0.1 s of a 2.5 s
    training step on the 2-core CPU, torch.profiler)."""

    def __init__(self, hidden: torch.Tensor, groups, k: int):
        b, length, h = hidden.shape
        self.at, idx = {}, []
        for bi, gs in enumerate(groups):
            for _, p in gs:
                self.at[(bi, p)] = len(idx)
                idx.append(torch.arange(bi * length + p + 1, bi * length + p + 1 + k))
        self.rows = (hidden.reshape(b * length, h)[torch.cat(idx).to(hidden.device)].view(len(idx), k, h) if idx
                     else hidden.new_zeros(0, k, h))

    def __call__(self, bi: int, p: int) -> torch.Tensor:
        return self.rows[self.at[(bi, p)]]


# object groups a training-only DET sample may ask for (group_det_sample), in the words of the VQA questions
COLOUR_GROUPS = [f"{c} shapes" for c in COLOURS]
SHAPE_GROUPS = [f"{s}s" for s in SHAPES]
GROUPS = COLOUR_GROUPS + SHAPE_GROUPS + ["shapes"]
# the payload probe's labels: the 12 class names, then the keypoint names, then the object groups
PROBE_NAMES = list(CLASSES) + sorted({k for names in KEYPOINT_NAMES.values() for k in names}) + GROUPS


def in_class(o: ShapeObject, name: str) -> bool:
    """Is object o one of the objects `name` (a class, or a group of GROUPS) names?"""
    return name in (o.name, f"{o.colour} shapes", f"{o.shape}s", "shapes")


def group_det_sample(scene: Scene, rng: random.Random, num_embs: int) -> Sample:
    """Training only: a DET sample in the official format whose "classes" are object groups: the colour groups
    ("red shapes", ...: half the samples), the shape groups ("circles", ...: 3 in 10) or all objects ("shapes").
    The detector must box every member, so the payload after "red shapes" must gather every red object: the
    colour-keyed lookup that "How many red shapes are there?" needs, taught with dense box targets (the small
    LLM learns shape-keyed questions from the class-name payloads, but not colour-keyed ones). Like class_list,
    the present groups plus a random number of absent ones, shuffled. Not yet shown to help: the one run with
    it changed five things at once and came out worse (benchmarks/RESULTS.md, fourth attempt)."""
    u = rng.random()
    groups = COLOUR_GROUPS if u < 0.5 else SHAPE_GROUPS if u < 0.8 else ["shapes"]
    present = [g for g in groups if any(in_class(o, g) for o in scene.objects)]
    absent = [g for g in groups if g not in present]
    rng.shuffle(absent)
    names = present + absent[:rng.randint(0, len(absent))]
    rng.shuffle(names)
    q = rng.choice(DET_QUESTIONS).replace("<class>", ", ".join(names))
    a = rng.choice(YES).replace("<class>", routed_list(names, "[DET]", num_embs))
    return Sample("det", q, a, classes=names)


def probe_loss(probe: torch.nn.Linear, hidden, samples, groups, k: int) -> torch.Tensor:
    """Training only: a linear probe (discarded after training) reads each routed group's name from its payload
    (the mean of its K query hidden states, what patch2query / projection_*_llava average). Without it the
    payloads of a small LLM trained from scratch stay alike across classes for hundreds of steps and the decoders
    cannot tell the classes apart; the served model is unchanged (the probe is not in the checkpoint)."""
    feats, labels = [], []
    routed = Routed(hidden, groups, k)
    for bi, (s, _) in enumerate(samples):
        names = {"[DET]": s.classes, "[SEG]": s.classes, "[POSE]": s.keypoints}
        seen = {r: 0 for r in names}
        for route, p in groups[bi]:
            if route not in names:
                continue
            feats.append(routed(bi, p).mean(0))
            labels.append(PROBE_NAMES.index(names[route][seen[route]]))
            seen[route] += 1
    if not feats:
        return hidden.new_zeros(())
    return F.cross_entropy(probe(torch.stack(feats)), torch.tensor(labels, device=hidden.device))


def patch_targets(scenes: list[Scene], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image patch (row-major, grid x grid): the class of the object whose box centre lies in it, and the
    class of the object covering most of it (at least a quarter); len(CLASSES) = none. -> 2 x [N * grid^2]."""
    none, cell = len(CLASSES), IMAGE_SIZE // grid
    centre = torch.full((len(scenes), grid, grid), none, dtype=torch.long)
    cover = torch.full((len(scenes), grid, grid), none, dtype=torch.long)
    for i, sc in enumerate(scenes):
        best = torch.full((grid, grid), cell * cell / 4)
        for o in sc.objects:
            x0, y0, x1, y1 = o.box
            centre[i, min(int((y0 + y1) / 2) // cell, grid - 1), min(int((x0 + x1) / 2) // cell, grid - 1)] = \
                CLASSES.index(o.name)
            m = torch.from_numpy(o.mask[:grid * cell, :grid * cell]).float()
            area = m.view(grid, cell, grid, cell).sum((1, 3))
            take = area > best
            cover[i][take] = CLASSES.index(o.name)
            best = torch.where(take, area, best)
    return centre.flatten(), cover.flatten()


def patch_loss(head: torch.nn.Linear, feats, samples, grid: int, none_weight: float = 1.0) -> torch.Tensor:
    """Training only: a linear head (discarded after training) reads, from each image token the LLM receives,
    which object's centre falls in its patch and which object covers it. This dense signal teaches the small
    ViT trained from scratch a dense signal where the one-token VQA answers give a sparse one (the LLM must
    still learn to count and compare); the served model is unchanged (the head is not saved). none_weight < 1
    weighs the empty patches (about 60 of 64) down against the object patches, where the shape must be read."""
    centre, cover = (t.to(feats.device) for t in patch_targets([sc for _, sc in samples], grid))
    logits = head(feats).view(feats.shape[0], 2, -1)
    w = torch.ones(len(CLASSES) + 1, device=feats.device)
    w[-1] = none_weight
    return F.cross_entropy(logits[:, 0], centre, weight=w) + F.cross_entropy(logits[:, 1], cover, weight=w)


def clip_groups_of(model, params: list) -> dict[str, list]:
    """The gradient is clipped per part (each decoder, the rest): one global norm is dominated by the set losses'
    gradients (hundreds of times the LLM's early on), and clipping it scales the LLM's updates down with them."""
    groups = {n: [p for p in m.parameters() if p.requires_grad] for n, m in model.decoders.named_children()}
    taken = {id(p) for g in groups.values() for p in g}
    groups = {n: g for n, g in groups.items() if g}
    groups["vlm"] = [p for p in params if id(p) not in taken]
    return groups


def payload_keep_loss(hidden, teacher_hidden, groups, k: int) -> torch.Tensor:
    """Training only (a continued run's --keep-payloads): the squared distance of every routed group's K payload
    rows from the starting model's, relative to the starting model's squared norm. The decoders read only the
    payloads (they have their own backbones), so a run that trains the LLM for VQA without the decoder passes
    keeps what the decoders were trained on, the way distillation keeps a fine-tuned model's old outputs."""
    s, t = Routed(hidden, groups, k).rows.flatten(0, 1), Routed(teacher_hidden, groups, k).rows.flatten(0, 1)
    if not s.numel():
        return hidden.new_zeros(())
    return (((s - t) ** 2).sum(-1) / (t ** 2).sum(-1).clamp(min=1e-6)).mean()


VIT_PHASE_SEED = 450_000_000  # the vision-only phase's scenes: VIT_PHASE_SEED + step * batch + i


def vit_phase(model, proc, head: torch.nn.Linear, steps: int, lr: float, none_weight: float, batch: int = 64,
              log=print) -> None:
    """Training only (--vit-steps): the vision tower and bridge trained alone on the per-patch head's loss, the
    LLM untouched. Measured on the third shipped model: a linear probe on an object's centre image token read
    its shape 74% of the time (its colour 100%), and its LLM did not learn "What shape is ..." from those tokens;
    200 such steps of 64 images (90 s on 2 cores, object patches weighted up) raised the probe to 92%, after
    which a fresh LLM learned the question in 150 steps (the old LLM still did not)."""
    from unimlm_engine.shapes.world import make_scene

    grid = model.cfg.vision.image_size // model.cfg.vision.patch_size
    params = list(model.vis_encoder.parameters()) + list(model.vl_bridge.parameters())
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=lr, weight_decay=0.01)
    for step in range(steps):
        scenes = [make_scene(VIT_PHASE_SEED + step * batch + i) for i in range(batch)]
        pixels = torch.cat([proc("x", [sc.image]).pixel_values[0] for sc in scenes]).to(params[0].device)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 30)
        loss = patch_loss(head, model.encode_images(pixels), [(None, sc) for sc in scenes], grid, none_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log({"vit_step": step, "patch": round(float(loss.detach()), 4)})
