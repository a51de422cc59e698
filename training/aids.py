"""Training-only aids of train_shapes.py: none of them is in the checkpoint or changes the served computation.

The payload gradient's scale and cap (CapGrad), the payload probe, the per-patch head on the image tokens,
the per-part gradient clipping groups, the detection of object groups (group_det_sample) and the attention
targets of the VQA lookups (AttentionTargets).
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from unimlm_engine.shapes.tasks import DET_QUESTIONS, VQA_TYPES, YES, Sample, routed_list
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


def centre_patch(o: ShapeObject, grid: int) -> int:
    """The row-major index of the patch holding o's box centre (patch_targets' 'centre')."""
    cell = IMAGE_SIZE // grid
    x0, y0, x1, y1 = o.box
    return min(int((y0 + y1) / 2) // cell, grid - 1) * grid + min(int((x0 + x1) / 2) // cell, grid - 1)


def question_words(s: Sample) -> list[str]:
    """The words of a VQA question (tasks.vqa_sample's templates) that say which objects it is about."""
    q = s.question
    colour = [c for c in COLOURS if f" {c} " in q]
    if s.qtype == "count_all":
        return ["shapes"]
    if s.qtype in ("count_colour", "shape_of"):
        return colour
    if s.qtype == "count_shape":
        return [f"{x}s" for x in SHAPES if f" {x}s " in q]
    if s.qtype == "colour_of":
        return [x for x in SHAPES if f" {x}?" in q]
    if s.qtype == "exists":
        return colour + [x for x in SHAPES if f" {x}?" in q]
    raise ValueError(f"question_words: question type {s.qtype!r}")


def vqa_objects(s: Sample, sc: Scene) -> list[ShapeObject]:
    """The objects a VQA question is about, the ones its question_words name: the ones it counts, names, or asks
    for (none when the answer is 0 or "no")."""
    words = question_words(s)
    return [o for o in sc.objects if all(w in (o.colour, o.shape, f"{o.shape}s", "shapes") for w in words)]


def keyword_ids(tok) -> dict[str, int]:
    """The token id of each word question_words can return (each is one token after a space)."""
    out = {}
    for w in [*COLOURS, *SHAPES, *(f"{x}s" for x in SHAPES), "shapes"]:
        ids = tok.encode(" " + w)
        if len(ids) != 1:
            raise ValueError(f"keyword_ids: {w!r} is {len(ids)} tokens")
        out[w] = ids[0]
    return out


class AttentionTargets:
    """Training only (--attn-sup): attention heads of the LLM are taught where to look when it answers a VQA
    question, at each position that predicts one of the answer's tokens (the </s> aside).

    - The lookup: one head of `layer` is pulled towards the uniform distribution over the first token of the
      sequence (a fixed 'sink') and the centre patch token of each object the question is about (vqa_objects).
      Its mass on the sink is then 1 / (n + 1) for n such objects, which a later layer can read as a count, and
      the patches carry the objects' colour and shape.
    - The question (with key_layer): one head of `key_layer` (before `layer`) is pulled towards the question's
      words that name those objects (question_words), so that the lookup's query knows what to look for.

    Each loss is the cross-entropy of the head's attention (over every key before the position) against its
    target distribution, the two summed. A fresh LLM otherwise has to discover these lookups from the one-token
    answers alone, which it does slowly (the colour-keyed ones not at all in an hour: benchmarks/RESULTS.md).
    The served model is unchanged: nothing of this is in the checkpoint, and the heads are free to do anything
    else elsewhere in the sequence."""

    def __init__(self, samples, ids, labels, patch_id: int, grid: int, layer: int, head: int,
                 keywords: dict[str, int] | None = None, key_layer: int | None = None, key_head: int = 0,
                 ignore: int = -100):
        if key_layer is not None and (keywords is None or not 0 <= key_layer < layer):
            raise ValueError("AttentionTargets: key_layer needs keywords and must come before layer")
        self.watch = {layer: head} | ({} if key_layer is None else {key_layer: key_head})
        self.loss = None
        self.losses: dict[int, torch.Tensor] = {}
        self.masses: dict[int, torch.Tensor] = {}
        self.layer = layer
        qb, qp, looks, keys = [], [], [], []
        for b, (s, sc) in enumerate(samples):
            if s.task != "vqa":
                continue
            lab = (labels[b] != ignore).int()
            edge = lab[1:] - lab[:-1]
            starts = (edge == 1).nonzero()[:, 0] + 1  # each answer's labelled tokens: [start, end]
            ends = (edge == -1).nonzero()[:, 0]
            if lab[-1]:
                ends = torch.cat([ends, ends.new_tensor([len(lab) - 1])])
            turns = [s] + list(s.turns)
            if len(starts) != len(turns) or len(ends) != len(turns):
                raise ValueError(f"AttentionTargets: {len(turns)} turns but {len(starts)} answers in sequence {b}")
            patches = (ids[b] == patch_id).nonzero()[:, 0]
            if len(patches) != grid * grid:
                raise ValueError(f"AttentionTargets: {len(patches)} image tokens, expected {grid * grid}")
            asked_from = int(patches[-1]) + 1  # the turn's question: after the image, then after the last answer
            for t, j0, j1 in zip(turns, starts.tolist(), ends.tolist()):
                if t.qtype in VQA_TYPES:
                    look = [0] + [int(patches[centre_patch(o, grid)]) for o in vqa_objects(t, sc)]
                    key = []
                    if key_layer is not None:
                        want = torch.tensor([keywords[w] for w in question_words(t)], device=ids.device)
                        key = (asked_from + torch.isin(ids[b, asked_from:j0], want).nonzero()[:, 0]).tolist()
                        if len(key) != len(want):
                            raise ValueError(f"AttentionTargets: the words of {t.question!r} not found once each")
                    for p in range(j0 - 1, j1 - 1):  # the positions predicting the answer's tokens before </s>
                        qb.append(b)
                        qp.append(p)
                        looks.append(look)
                        keys.append(key)
                asked_from = j1 + 1
        self.qb = torch.tensor(qb, dtype=torch.long, device=ids.device)
        self.qp = torch.tensor(qp, dtype=torch.long, device=ids.device)
        self.targets = {}
        for at, rows in ((layer, looks), (key_layer, keys)):
            if at is None:
                continue
            tg = torch.zeros(len(qb), ids.shape[1], device=ids.device)
            for i, ts in enumerate(rows):
                tg[i, ts] = 1.0 / len(ts)
            self.targets[at] = tg
        self.target = self.targets[layer]

    def __len__(self) -> int:
        return len(self.qb)

    def observe(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
        """q [B, H, L, D], k [B, Hkv, L, D] (after RoPE, right-padded): at a watched layer, its loss; once every
        watched layer is seen, self.loss is their sum. self.mass: the lookup's attention mass on its targets,
        self.sink the part of it on the sink (diagnostics)."""
        if layer_idx not in self.watch or not len(self):
            return
        head = self.watch[layer_idx]
        hk = head // (q.shape[1] // k.shape[1])
        logits = torch.einsum("md,mld->ml", q[self.qb, head, self.qp], k[self.qb, hk]) * scale
        future = torch.arange(k.shape[2], device=k.device)[None] > self.qp[:, None]
        logp = logits.masked_fill(future, float("-inf")).log_softmax(-1)
        tg = self.targets[layer_idx]
        self.losses[layer_idx] = -(logp.masked_fill(future, 0) * tg).sum(-1).mean()
        self.masses[layer_idx] = (logp.exp() * (tg > 0)).sum(-1).detach()  # diagnostics
        if layer_idx == self.layer:
            self.sink = logp[:, 0].exp().detach()  # the part of the mass on the sink
        if len(self.losses) == len(self.watch):
            self.loss = sum(self.losses.values())
            self.mass = self.masses[self.layer]
