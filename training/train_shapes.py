"""Train the shapes model (issue 18) end to end, as VisionLLM v2 trains: the LLM's next-token cross-entropy on
the answers (query-token labels ignored, as the official `labels[emb_select] = IGNORE_INDEX`) plus the
Grounding-DINO (DET / SEG) and UniPose (POSE) set losses through the super-link payloads, every part trained
together, after a vision-only (--vit-steps) and a VQA-only first phase (see VQA_PHASE_BATCH), with training-only
aids (aids.py). Seeded (data, initialisation, sample order: two short runs of the shipped command wrote
byte-identical checkpoints on one machine); writes an official-layout checkpoint.

    python training/train_shapes.py --out runs/a   # the defaults; the shipped model's one-hour command: README

The input path is the engine's own: `Processor` builds the prompt (vicuna_v1, the <image> expanded to patch
tokens), the answer follows "ASSISTANT:" as " " + answer + "</s>", the K query rows of a routing token's table
replace its [EMB]..[EMB4] tokens, and a payload is the final-norm hidden states of those K positions.
The decoders see the images as the engine feeds them (gdino_image / UniPose prepare_image).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aids import (PAYLOAD_GRAD, PAYLOAD_GRAD_MAX, PROBE_NAMES, AttentionTargets, CapGrad,  # noqa: E402,F401
                  Routed, clip_groups_of, group_det_sample, keyword_ids, patch_loss, patch_targets, payload_keep_loss,
                  probe_loss, VIT_PHASE_SEED, vit_phase)
from decoder_losses import detector_loss, payloads, pose_loss, scene_targets  # noqa: E402,F401
from losses import weighted  # noqa: E402
from packed import PackedCausal, PaddedCausal, shared_prefix  # noqa: E402,F401

from unimlm_engine.checkpoint.loader import save_checkpoint  # noqa: E402
from unimlm_engine.inputs.processor import Processor  # noqa: E402
from unimlm_engine.inputs.tokenizer import HFTokenizer  # noqa: E402
from unimlm_engine.model import build_model  # noqa: E402
from unimlm_engine.routes import get_route  # noqa: E402
from unimlm_engine.shapes.config import shapes_config  # noqa: E402
from unimlm_engine.shapes.evaluate import EVAL_SEED_BASE, EVAL_SEED_LIMIT, reaches_eval_seeds  # noqa: E402
from unimlm_engine.shapes.tasks import (VQA_TYPES, Sample, det_sample, pose_sample, pose_shapes,  # noqa: E402
                                        vqa_sample)
from unimlm_engine.shapes.tokenizer import train_tokenizer  # noqa: E402
from unimlm_engine.shapes.world import CLASSES, Scene, make_scene  # noqa: E402

IGNORE = -100
# per step: VQA images, DET, SEG, POSE samples; the *_text ones are DET / SEG / POSE samples trained on their
# answer text only (no decoder pass: a POSE sample's UniPose pass costs ~0.3 s on 2 cores, a DET / SEG sample's
# ~0.07 s, its text ~0.05 s; benchmarks/bench_train_step.py); det_group: DET samples of object groups
# (aids.group_det_sample)
MIX = {"vqa": 12, "det": 6, "seg": 4, "pose": 2, "pose_text": 0, "det_text": 0, "seg_text": 0, "det_group": 0}
TEXT_ONLY = ("det_text", "seg_text", "pose_text")
# questions per VQA image: more than one makes a multi-turn conversation (vicuna_v1 turns), distinct types
VQA_TURNS = 1
# the first phase: VQA only (images per step). Trained jointly from the start, the small LLM learns the long,
# image-independent task answers first and then ignores the image tokens (measured: VQA at chance after 1,100
# joint steps; fine-tuned from a joint checkpoint, it did not learn the colour of a lone object in 3,200
# samples, while a fresh model learned that in about 125 VQA-only steps of 16)
VQA_PHASE_BATCH = 16


def vqa_turns(sc: Scene, rng: random.Random, n: int, weights: dict[str, float] | None = None) -> list[Sample]:
    """Up to n questions of distinct types about one scene (the types whose precondition it meets), in random
    order, or drawn without replacement in proportion to `weights` (default 1 per type)."""
    types = list(VQA_TYPES)
    if weights:  # Efraimidis-Spirakis: sort by u^(1/w)
        types.sort(key=lambda t: -rng.random() ** (1.0 / weights.get(t, 1.0)))
    else:
        rng.shuffle(types)
    out = []
    for t in types:
        try:
            out.append(vqa_sample(sc, rng, t))
        except ValueError:
            continue
        if len(out) == n:
            break
    return out


def vqa_conversation(sc: Scene, rng: random.Random, turns: int = VQA_TURNS,
                     weights: dict[str, float] | None = None) -> Sample:
    """The first of `turns` questions, the later ones in its `turns`."""
    first, *rest = vqa_turns(sc, rng, turns, weights)
    first.turns = rest
    return first


def vqa_phase_samples(step: int, rng: random.Random, batch: int = VQA_PHASE_BATCH, turns: int = VQA_TURNS,
                      weights: dict[str, float] | None = None) -> list[tuple[Sample, Scene]]:
    """The VQA-only phase's images of `step` (scene seeds 100,000,000 + step * 64 + i: batch <= 64)."""
    if not 1 <= batch <= 64:
        raise ValueError(f"VQA phase batch {batch}: 1 to 64 (scene seeds step * 64 + i)")
    out = []
    for i in range(batch):
        sc = make_scene(100_000_000 + step * 64 + i)
        out.append((vqa_conversation(sc, rng, turns, weights), sc))
    return out


def _parse_pairs(text: str | None, known, what: str, cast, form: str) -> dict:
    """'a=1,b=2' -> {name: cast(value)} for names in `known`; ValueError naming the bad part."""
    out = {}
    for part in text.split(",") if text else []:
        name, _, v = part.partition("=")
        if name not in known:
            raise ValueError(f"unknown {what} {name!r} (known: {', '.join(known)})")
        try:
            out[name] = cast(v)
        except ValueError:
            raise ValueError(f"{part!r} is not {form}") from None
    return out


def parse_vqa_weights(text: str | None) -> dict[str, float]:
    """'exists=4,count_colour=2' -> {type: relative frequency}; ValueError naming the bad part."""
    return _parse_pairs(text, VQA_TYPES, "question type", float, "type=number")


def parse_mix(text: str) -> dict[str, int]:
    """'vqa=16,pose=4' -> samples per step of every task in MIX (0 where not named); ValueError naming the bad
    part."""
    return {t: 0 for t in MIX} | _parse_pairs(text, MIX, "task", int, "task=integer")


def make_samples(step: int, rng: random.Random, num_embs: int, mix: dict[str, int] = MIX,
                 offset: int = 0, vqa_turns_n: int = VQA_TURNS,
                 vqa_weights: dict[str, float] | None = None) -> list[tuple[Sample, Scene]]:
    """-> (sample, scene) pairs; a VQA sample carries its later turns in `turns`. offset: added to the scene
    seeds (a continued run draws scenes the first run did not)."""
    out = []
    i = 0
    for task, n in mix.items():
        for _ in range(n):
            seed = offset + step * 64 + i
            i += 1
            if task in ("pose", "pose_text"):
                sc = make_scene(seed)
                while not pose_shapes(sc):
                    seed += 1_000_000_000
                    sc = make_scene(seed)
                sample = pose_sample(sc, rng, num_embs)
                if task == "pose_text":
                    sample.task = "pose_text"
                out.append((sample, sc))
                continue
            sc = make_scene(seed)
            if task == "vqa":
                out.append((vqa_conversation(sc, rng, vqa_turns_n, vqa_weights), sc))
            elif task == "det_group":
                out.append((group_det_sample(sc, rng, num_embs), sc))
            else:
                sample = det_sample(sc, rng, num_embs, route="[DET]" if task.startswith("det") else "[SEG]")
                if task in TEXT_ONLY:
                    sample.task = task
                out.append((sample, sc))
    return out


def encode(samples, proc: Processor, tok, special: dict[str, int]):
    """-> ids [B, L], labels [B, L], pixels [B, 3, S, S], per-sample routed groups [(route, position)]."""
    emb_ids = {special[t] for t in special if t.startswith("[EMB")}
    routes = {special[t]: t for t in ("[DET]", "[SEG]", "[GRD]", "[POSE]") if t in special}
    seqs, labs, pix, groups = [], [], [], []
    for s, sc in samples:
        pi = proc(s.question, [sc.image])
        ans = torch.tensor(tok.encode(" " + s.answer + "</s>"), dtype=torch.long)
        ids = torch.cat([pi.input_ids, ans])
        lab = torch.full_like(ids, IGNORE)
        lab[len(pi.input_ids):] = ans
        for t in s.turns:  # later turns: "USER: q ASSISTANT:" (no loss), " a</s>" (loss)
            q = torch.tensor(tok.encode(f"USER: {t.question} ASSISTANT:"), dtype=torch.long)
            a = torch.tensor(tok.encode(" " + t.answer + "</s>"), dtype=torch.long)
            ids = torch.cat([ids, q, a])
            lab = torch.cat([lab, torch.full_like(q, IGNORE), a])
        for e in emb_ids:
            lab[ids == e] = IGNORE
        seqs.append(ids)
        labs.append(lab)
        pix.append(pi.pixel_values[0])
        groups.append([(routes[int(t)], p) for p, t in enumerate(ids.tolist()) if int(t) in routes])
    length = max(len(x) for x in seqs)
    pad = tok.pad_id
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE, dtype=torch.long)
    for b, (x, y) in enumerate(zip(seqs, labs)):
        ids[b, :len(x)], labels[b, :len(y)] = x, y
    return ids, labels, torch.cat(pix), groups


def llm_forward(model, ids, pixels, groups, k: int, pad_id: int | None = None, watch=None):
    """-> final-norm hidden [B, L, H] (queries fed as the engine feeds them; zero at the padding), image features
    [B * P, H]. The sequences are right-padded with pad_id (default: model.special_ids["[PAD]"], encode's); the
    LLM runs on them packed (PackedCausal). watch: shown every layer's attention inputs (aids.AttentionTargets)."""
    b, length = ids.shape
    dev = ids.device
    patch_id = model.special_ids["<im_patch>"]
    emb_ids = {t for n, t in model.special_ids.items() if n.startswith("[EMB")}
    real = ids != (model.special_ids["[PAD]"] if pad_id is None else pad_id)
    lens = real.sum(1)
    if not bool((real == (torch.arange(length, device=dev) < lens[:, None])).all()):
        raise ValueError("llm_forward: the sequences must be right-padded, with no pad token inside them")
    lens = lens.tolist()
    prefix = shared_prefix(ids, lens, emb_ids | {patch_id})
    attn = PackedCausal(lens, prefix, dev)
    attn.watch = watch
    flat = ids.flatten()[attn.scatter]
    positions = torch.arange(length, device=dev).repeat(b)[attn.scatter]
    emb = model.llm.embed(flat)
    feats = model.encode_images(pixels)
    emb = emb.index_put(((flat == patch_id).nonzero()[:, 0],), feats)
    rows, pos = [], []
    for bi, gs in enumerate(groups):
        for route, p in gs:
            rows.append(model.query_embeddings(route)[:k])
            pos.append(attn.gather[bi * length + p + 1:bi * length + p + 1 + k])
    if rows:
        emb = emb.index_put((torch.cat(pos),), torch.cat(rows))
    return attn.pad(model.llm(emb, positions, attn)), feats


def llm_forward_padded(model, ids, pixels, groups, k: int):
    """llm_forward on the padded batch (PaddedCausal): the reference the packed forward is tested against."""
    b, length = ids.shape
    emb = model.llm.embed(ids.flatten())
    feats = model.encode_images(pixels)
    patch = ids.flatten() == model.special_ids["<im_patch>"]
    emb = emb.index_put((patch.nonzero()[:, 0],), feats)
    rows, pos = [], []
    for bi, gs in enumerate(groups):
        for route, p in gs:
            rows.append(model.query_embeddings(route)[:k])
            pos.append(torch.arange(bi * length + p + 1, bi * length + p + 1 + k, device=ids.device))
    if rows:
        emb = emb.index_put((torch.cat(pos),), torch.cat(rows))
    positions = torch.arange(length, device=ids.device).repeat(b)
    hidden = model.llm(emb, positions, PaddedCausal(b, length))
    return hidden.view(b, length, -1), feats


def token_losses(model, hidden, labels) -> torch.Tensor:
    """Next-token cross-entropy [B, L - 1], 0 where the label is IGNORE; the logits are computed at the labelled
    positions only (about one position in ten)."""
    lab = labels[:, 1:]
    sel = lab != IGNORE
    out = hidden.new_zeros(lab.shape)
    out[sel] = F.cross_entropy(model.llm.logits(hidden[:, :-1][sel]), lab[sel], reduction="none")
    return out


def lr_at(step: int, steps: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--vqa-steps", type=int, default=800, help="the VQA-only first phase")
    ap.add_argument("--vqa-lr", type=float, default=1e-3)
    ap.add_argument("--vqa-batch", type=int, default=VQA_PHASE_BATCH, help="images per VQA-phase step (<= 64)")
    ap.add_argument("--vqa-phase-turns", type=int, default=1, help="questions per image in the VQA phase")
    ap.add_argument("--vqa-phase-weights", default=None, help="question weights in the VQA phase (default: 1 each)")
    ap.add_argument("--vqa-cosine", action="store_true",
                    help="the VQA phase's learning rate: warm-up 50 steps, then cosine to 0 (default: constant)")
    ap.add_argument("--steps", type=int, default=900, help="the joint phase")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N (fp32; not bit-reproducible there: "
                    "atomic-add backward kernels)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--save-every", type=int, default=0, help="also write the checkpoint every N steps")
    ap.add_argument("--init", default=None, help="continue from this checkpoint (its weights and tokenizer)")
    ap.add_argument("--mix", default=None, help="samples per joint step, e.g. vqa=10,det=4,seg=3,pose=4,pose_text=4")
    ap.add_argument("--patch-none-weight", type=float, default=1.0,
                    help="class weight of the empty patches in that loss (object patches: 1)")
    ap.add_argument("--vqa-weights", default=None,
                    help="relative frequency of VQA question types in the joint phase, e.g. exists=3 (default 1)")
    ap.add_argument("--vit-steps", type=int, default=0,
                    help="first, the vision tower alone on the per-patch loss (aids.vit_phase), batches of 64")
    ap.add_argument("--vit-lr", type=float, default=1e-3)
    ap.add_argument("--fresh-llm", action="store_true",
                    help="with --init: the LLM starts from a fresh initialisation (the rest from --init)")
    ap.add_argument("--vqa-turns", type=int, default=VQA_TURNS, help="questions per VQA image in the joint phase")
    ap.add_argument("--keep-payloads", type=float, default=0.0,
                    help="with --init: weight of the loss that keeps the routed payloads at the --init model's "
                         "(payload_keep_loss); the payload probe is then off")
    ap.add_argument("--seed-offset", type=int, default=0, help="added to the joint phase's scene seeds")
    ap.add_argument("--tail-steps", type=int, default=0,
                    help="a last phase after the joint one, with its own mix, question weights and learning-rate "
                         "schedule (warm-up 25 steps, cosine to 0): e.g. VQA-heavy with 'exists' drawn often")
    ap.add_argument("--tail-mix", default=None, help="the tail's samples per step (default: --mix)")
    ap.add_argument("--tail-vqa-weights", default=None, help="the tail's question weights (default: --vqa-weights)")
    ap.add_argument("--tail-lr", type=float, default=3e-4)
    ap.add_argument("--attn-sup", type=float, default=0.0,
                    help="weight of the VQA attention targets' loss (aids.AttentionTargets), in every phase; 0: off")
    ap.add_argument("--attn-layer", type=int, default=2, help="the LLM layer whose head --attn-sup teaches")
    ap.add_argument("--attn-head", type=int, default=0, help="the attention head --attn-sup teaches")
    ap.add_argument("--attn-key-layer", type=int, default=-1,
                    help="with --attn-sup: also teach a head of this layer (before --attn-layer) to read the "
                         "question's words (-1: no)")
    ap.add_argument("--attn-key-head", type=int, default=1)
    args = ap.parse_args(argv)
    if (args.keep_payloads or args.fresh_llm) and not args.init:
        ap.error("--keep-payloads and --fresh-llm need --init (the model whose payloads are kept / parts reused)")
    if reaches_eval_seeds(VIT_PHASE_SEED, VIT_PHASE_SEED + args.vit_steps * 64):
        ap.error(f"--vit-steps {args.vit_steps}: its scenes would reach the held-out evaluation seeds")
    try:
        mix = parse_mix(args.mix) if args.mix else dict(MIX)
        tail_mix = parse_mix(args.tail_mix) if args.tail_mix else mix
    except ValueError as e:
        ap.error(f"--mix / --tail-mix: {e}")
    try:
        vqa_weights = parse_vqa_weights(args.vqa_weights)
        tail_weights = parse_vqa_weights(args.tail_vqa_weights) if args.tail_vqa_weights else vqa_weights
        phase_weights = parse_vqa_weights(args.vqa_phase_weights)
    except ValueError as e:
        ap.error(f"--vqa-weights / --tail-vqa-weights / --vqa-phase-weights: {e}")
    if not 1 <= args.vqa_batch <= 64:
        ap.error(f"--vqa-batch {args.vqa_batch}: 1 to 64 (the VQA phase's scene seeds are step * 64 + i)")
    if args.tail_steps < 0:
        ap.error("--tail-steps: 0 or more")
    llm_cfg = shapes_config().llm
    if not (0 <= args.attn_layer < llm_cfg.num_hidden_layers and 0 <= args.attn_head < llm_cfg.num_attention_heads
            and -1 <= args.attn_key_layer < args.attn_layer and 0 <= args.attn_key_head < llm_cfg.num_attention_heads):
        ap.error(f"--attn-layer / --attn-head / --attn-key-layer / --attn-key-head: layers 0..."
                 f"{llm_cfg.num_hidden_layers - 1} (the key layer before the other, or -1), heads 0..."
                 f"{llm_cfg.num_attention_heads - 1}")
    lo, hi = args.seed_offset, args.seed_offset + (args.steps + args.tail_steps) * 64
    if reaches_eval_seeds(lo, hi):
        ap.error(f"--seed-offset {args.seed_offset}: the joint phase's scene seeds [{lo}, {hi}) reach the held-out "
                 f"evaluation seeds [{EVAL_SEED_BASE}, {EVAL_SEED_LIMIT}) (mod 10^9)")
    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        ap.error(f"--device {args.device!r}: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this torch build or machine has no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        ap.error(f"--device {args.device}: only cpu and cuda are supported")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    t0 = time.time()
    tok = HFTokenizer(Path(args.init) if args.init else train_tokenizer(out))
    cfg = shapes_config()
    model = build_model(cfg, seed=args.seed).train()
    if args.init:
        from unimlm_engine.checkpoint.loader import load_checkpoint

        init, _, _ = load_checkpoint(args.init)
        model.load_state_dict({n: t.float() for n, t in init.state_dict().items()})
        del init
    teacher = None
    if args.keep_payloads:
        teacher = build_model(cfg, seed=args.seed).eval().requires_grad_(False)
        teacher.load_state_dict(model.state_dict())
        teacher.special_ids = dict(tok.special_ids)
    if args.fresh_llm:
        fresh = build_model(cfg, seed=args.seed + 1).state_dict()
        model.load_state_dict({n: t for n, t in fresh.items() if n.startswith("llm.")}, strict=False)
        del fresh
    model.special_ids = dict(tok.special_ids)
    model.to(dev)
    if teacher is not None:
        teacher.to(dev)
    proc = Processor(cfg.vision, tok)
    keywords = keyword_ids(tok) if args.attn_sup else None
    k = cfg.superlink.num_embs
    for r in ("[DET]", "[POSE]"):
        assert get_route(r).num_queries_in(cfg.superlink) == k
    probe = torch.nn.Linear(cfg.llm.hidden_size, len(PROBE_NAMES)).to(dev)
    grid = cfg.vision.image_size // cfg.vision.patch_size
    head = torch.nn.Linear(cfg.llm.hidden_size, 2 * (len(CLASSES) + 1)).to(dev)
    if args.vit_steps:
        vit_phase(model, proc, head, args.vit_steps, args.vit_lr, args.patch_none_weight,
                  log=lambda rec: print(json.dumps({**rec, "s": round(time.time() - t0, 1)}), flush=True))
    params = [p for p in model.parameters() if p.requires_grad] + list(probe.parameters()) + list(head.parameters())
    clip_groups = clip_groups_of(model, params)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = random.Random(args.seed)
    log = []
    last = args.vqa_steps + args.steps + args.tail_steps - 1
    for step in range(last + 1):
        joint = step - args.vqa_steps  # < 0 in the VQA phase; the tail's steps go on counting (scene seeds)
        tail = joint - args.steps  # >= 0 in the tail
        if joint < 0:
            lr = (lr_at(step, args.vqa_steps, args.vqa_lr) if args.vqa_cosine
                  else min(1.0, (step + 1) / 50) * args.vqa_lr)
        elif tail < 0:
            lr = lr_at(joint, args.steps, args.lr)
        else:
            lr = lr_at(tail, args.tail_steps, args.tail_lr, warmup=25)
        for g in opt.param_groups:
            g["lr"] = lr
        if joint < 0:
            samples = vqa_phase_samples(step, rng, args.vqa_batch, args.vqa_phase_turns, phase_weights or None)
        else:
            samples = make_samples(joint, rng, k, tail_mix if tail >= 0 else mix, args.seed_offset, args.vqa_turns,
                                   tail_weights if tail >= 0 else vqa_weights)
        ids, labels, pixels, groups = (x.to(dev) if torch.is_tensor(x) else x
                                       for x in encode(samples, proc, tok, model.special_ids))
        watch = (AttentionTargets(samples, ids, labels, model.special_ids["<im_patch>"], grid, args.attn_layer,
                                  args.attn_head, keywords, None if args.attn_key_layer < 0 else args.attn_key_layer,
                                  args.attn_key_head) if args.attn_sup else None)
        hidden, feats = llm_forward(model, ids, pixels, groups, k, watch=watch)
        tok_loss = token_losses(model, hidden, labels)
        n_lab = (labels[:, 1:] != IGNORE).sum(1)
        is_vqa = torch.tensor([s.task == "vqa" for s, _ in samples], device=dev)
        losses = {"lm": tok_loss.sum() / n_lab.sum().clamp(min=1),
                  "probe": (hidden.new_zeros(()) if teacher is not None
                            else probe_loss(probe, hidden, samples, groups, k)),
                  "patch": patch_loss(head, feats, samples, grid, args.patch_none_weight)}
        if watch is not None and watch.loss is not None:
            losses["attn"] = args.attn_sup * watch.loss
        routed = [i for i, g in enumerate(groups) if g]
        if teacher is not None and routed:
            sub = [groups[i] for i in routed]
            with torch.no_grad():
                ref, _ = llm_forward(teacher, ids[routed], pixels[routed], sub, k)
            losses["keep"] = args.keep_payloads * payload_keep_loss(hidden[routed], ref, sub, k)
        # the VQA answers are a few tokens among the long task answers: their mean is added as its own term
        losses["vqa"] = tok_loss.view(len(samples), -1)[is_vqa].sum() / n_lab[is_vqa].sum().clamp(min=1)
        dec_hidden = CapGrad.apply(hidden, PAYLOAD_GRAD, PAYLOAD_GRAD_MAX)
        losses.update(detector_loss(model, dec_hidden, samples, groups, k))
        pose = pose_loss(model, dec_hidden, samples, groups, k)
        plain = ("lm", "vqa", "probe", "patch", "keep", "attn")
        total = sum(losses[n] for n in plain if n in losses) + weighted(
            {n: v for n, v in losses.items() if n not in plain}) + 0.5 * weighted(
            {n[5:]: v for n, v in pose.items()})
        losses.update(pose)
        opt.zero_grad(set_to_none=True)
        total.backward()
        norms = {f"gn_{n}": torch.nn.utils.clip_grad_norm_(g, 1.0) for n, g in clip_groups.items()}
        opt.step()
        if step % args.log_every == 0 or step == last:
            rec = {"step": step, "s": round(time.time() - t0, 1), "lr": float(f"{lr:.3g}"),
                   "total": round(float(total.detach()), 4),
                   **{n: round(float(v.detach()), 4) for n, v in {**losses, **norms}.items()}}
            log.append(rec)
            print(json.dumps(rec), flush=True)
        if args.save_every and step and step % args.save_every == 0:
            write(model, tok, out, log)
    write(model, tok, out, log)
    print(f"done in {time.time() - t0:.0f} s -> {out}", flush=True)
    return 0


def write(model, tok, out: Path, log: list) -> None:
    """fp16 safetensors in the official layout (one shard), the tokenizer files, the training log."""
    half = build_model(model.cfg, seed=0, dtype=torch.float16)
    half.load_state_dict(model.state_dict())
    half.special_ids = dict(model.special_ids)
    save_checkpoint(half, out, tokenizer=tok, fmt="safetensors", num_shards=1)
    (out / "training_log.json").write_text(json.dumps(log, indent=0))


if __name__ == "__main__":
    raise SystemExit(main())
