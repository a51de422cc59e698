"""Learning curves of single phases of train_shapes.py, for choosing a recipe (issue 18's one-hour run) without a
whole training run. Experiments, not tests; benchmarks/RESULTS.md records what they measured.

  vqa   From scratch: the vision-only phase (cached by step count), then the VQA-only phase with --turns questions
        per image. Every --eval-every steps: exact match per question type on --neval validation scenes (seeds
        600,000,000 + i, the validation set of earlier recipes; not the benchmark's), teacher-forced. A greedy
        decode reproduces the answer exactly when every answer token (and the </s>) is the argmax given the ones
        before it, so this is the greedy exact match the benchmark counts, without generating.
  pose  From a checkpoint (--init): UniPose alone trained on POSE samples, the LLM frozen (the paper's
        decoder-only stage), then PCK@0.1 through the engine on --neval validation scenes' POSE requests.

    python training/curves.py vqa --vit-steps 900 --steps 600 --turns 3
    python training/curves.py pose --init CKPT --steps 200 --pose 3 --lr 2e-4
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import losses as L  # noqa: E402
import train_shapes as T  # noqa: E402
from aids import VIT_PHASE_SEED, AttentionTargets, keyword_ids, patch_loss, vit_phase  # noqa: E402
from decoder_losses import pose_loss  # noqa: E402

from unimlm_engine.inputs.processor import Processor  # noqa: E402
from unimlm_engine.inputs.tokenizer import HFTokenizer  # noqa: E402
from unimlm_engine.model import build_model  # noqa: E402
from unimlm_engine.shapes.config import shapes_config  # noqa: E402
from unimlm_engine.shapes.evaluate import reaches_eval_seeds  # noqa: E402
from unimlm_engine.shapes.tasks import Sample, pose_sample, pose_shapes, vqa_sample  # noqa: E402
from unimlm_engine.shapes.tokenizer import train_tokenizer  # noqa: E402
from unimlm_engine.shapes.world import CLASSES, Scene, make_scene  # noqa: E402

VAL_SEED = 600_000_000
POSE_TRAIN_SEED = 777_000_000


def caption(sc: Scene) -> Sample:
    """A training-only turn naming every object, top row of patches first, then left to right."""
    patch = shapes_config().vision.patch_size
    objs = sorted(sc.objects, key=lambda o: ((o.box[1] + o.box[3]) / 2 // patch, (o.box[0] + o.box[2]) / 2))
    return Sample("vqa", "Describe the shapes in the image.", ", ".join(o.name for o in objs), qtype="caption")


def vqa_hits(model, proc, tok, items, chunk: int = 50) -> list[bool]:
    """Per (sample, scene): is every answer token, </s> included, the argmax given the ones before it? That is
    exactly when greedy decoding gives the answer (tests/test_shapes_model.py checks it against the engine)."""
    was_training = model.training
    model.eval()
    hits: list[bool] = []
    with torch.no_grad():
        for j in range(0, len(items), chunk):
            part = items[j:j + chunk]
            ids, labels, pixels, groups = T.encode(part, proc, tok, model.special_ids)
            hidden, _ = T.llm_forward(model, ids, pixels, groups, model.cfg.superlink.num_embs)
            pred = model.llm.logits(hidden[:, :-1].reshape(-1, hidden.shape[-1])).argmax(-1).view(len(part), -1)
            lab = labels[:, 1:]
            hits += ((pred == lab) | (lab == T.IGNORE)).all(1).tolist()
    model.train(was_training)
    return hits


def vqa_exact_match(model, proc, tok, items) -> tuple[float, dict[str, float]]:
    """-> overall exact match, per question type."""
    per: dict[str, list[bool]] = {}
    for (s, _), h in zip(items, vqa_hits(model, proc, tok, items)):
        per.setdefault(s.qtype, []).append(h)
    n = sum(len(v) for v in per.values())
    return sum(sum(v) for v in per.values()) / n, {k: sum(v) / len(v) for k, v in sorted(per.items())}


def attention_mass(model, proc, tok, items, layer: int, head: int) -> dict[str, list[float]]:
    """Per question type: the mean attention mass that `head` of `layer` puts on aids.AttentionTargets' targets
    (the sink and the centre patches of the objects asked about) at the answer positions, and the part of it on
    the sink; 1 is all of it."""
    grid = model.cfg.vision.image_size // model.cfg.vision.patch_size
    was_training = model.training
    model.eval()
    per: dict[str, list[float]] = {}
    with torch.no_grad():
        for j in range(0, len(items), 50):
            part = items[j:j + 50]
            ids, labels, pixels, groups = T.encode(part, proc, tok, model.special_ids)
            w = AttentionTargets(part, ids, labels, model.special_ids["<im_patch>"], grid, layer, head)
            T.llm_forward(model, ids, pixels, groups, model.cfg.superlink.num_embs, watch=w)
            for b, m, sk in zip(w.qb.tolist(), w.mass.tolist(), w.sink.tolist()):
                per.setdefault(part[b][0].qtype, []).append((m, sk))
    model.train(was_training)
    return {k: [round(sum(x[0] for x in v) / len(v), 2), round(sum(x[1] for x in v) / len(v), 2)]
            for k, v in sorted(per.items())}


def run_vqa(a) -> None:
    tok_dir = Path(a.work) / "tokenizer"
    tok = HFTokenizer(tok_dir if (tok_dir / "tokenizer.json").exists() else train_tokenizer(tok_dir))
    cfg = shapes_config()
    model = build_model(cfg, seed=0).train()
    model.special_ids = dict(tok.special_ids)
    proc = Processor(cfg.vision, tok)
    grid = cfg.vision.image_size // cfg.vision.patch_size
    head = torch.nn.Linear(cfg.llm.hidden_size, 2 * (len(CLASSES) + 1))
    t0 = time.time()
    cache = Path(a.work) / f"vit{a.vit_steps}_none{a.patch_none_weight}.pt"
    from_cache = bool(a.vit_steps) and cache.exists()
    if from_cache:
        state = torch.load(cache)
        model.load_state_dict(state["model"])
        head.load_state_dict(state["head"])
    elif a.vit_steps:
        vit_phase(model, proc, head, a.vit_steps, 1e-3, a.patch_none_weight,
                  log=lambda rec: print(json.dumps(rec), flush=True))
        torch.save({"model": model.state_dict(), "head": head.state_dict()}, cache)
    print(json.dumps({"vision_phase_s": round(time.time() - t0, 1), "from_cache": from_cache}), flush=True)
    val = []
    for i in range(a.neval):
        sc = make_scene(VAL_SEED + i)
        val.append((vqa_sample(sc, random.Random(VAL_SEED + i)), sc))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))
    weights = T.parse_vqa_weights(a.weights) or None
    rng = random.Random(0)
    train_s = 0.0
    for step in range(a.steps):
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = T.lr_at(step, a.steps, a.lr) if a.cosine else min(1.0, (step + 1) / 50) * a.lr
        samples = T.vqa_phase_samples(step, rng, a.batch, a.turns, weights)
        if a.caption:
            for s, sc in samples:
                s.turns = list(s.turns) + [caption(sc)]
        ids, labels, pixels, groups = T.encode(samples, proc, tok, model.special_ids)
        watch = (AttentionTargets(samples, ids, labels, model.special_ids["<im_patch>"], grid, a.attn_layer,
                                  a.attn_head, keyword_ids(tok), None if a.attn_key_layer < 0 else a.attn_key_layer,
                                  a.attn_key_head) if a.attn_sup else None)
        hidden, feats = T.llm_forward(model, ids, pixels, groups, cfg.superlink.num_embs, watch=watch)
        lm = T.token_losses(model, hidden, labels).sum() / (labels[:, 1:] != T.IGNORE).sum().clamp(min=1)
        loss = lm + patch_loss(head, feats, samples, grid, a.patch_none_weight)
        if watch is not None:
            loss = loss + a.attn_sup * watch.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        train_s += time.time() - t0  # the evaluations' time is left out
        if (step + 1) % a.eval_every == 0 or step == a.steps - 1:
            acc, per = vqa_exact_match(model, proc, tok, val)
            mass = attention_mass(model, proc, tok, val, a.attn_layer, a.attn_head)
            print(json.dumps({"step": step + 1, "train_s": round(train_s, 1), "lm": round(float(lm.detach()), 3),
                              **({"attn": round(float(watch.loss.detach()), 3)} if watch is not None else {}),
                              "exact_match": round(acc, 3), **{k: round(v, 3) for k, v in per.items()},
                              "mass_sink": mass}),
                  flush=True)


def pose_scene(step: int, i: int, candidates: int) -> tuple[Scene, str] | None:
    """The (scene, kind) with the most objects of one kind (square or triangle) among `candidates` scenes; None
    when none of them has a square or triangle."""
    best = None
    for c in range(max(1, candidates)):
        sc = make_scene(POSE_TRAIN_SEED + step * 64 + i + c * 1_000_000_000)
        for kind in pose_shapes(sc):
            if best is None or sc.count(shape=kind) > best[0]:
                best = (sc.count(shape=kind), sc, kind)
    return None if best is None else best[1:]


def pose_pck(model, tok, n: int) -> float:
    from unimlm_engine import Engine
    from unimlm_engine.checkpoint.pretrained import load_pretrained
    from unimlm_engine.config import EngineConfig
    from unimlm_engine.shapes.evaluate import eval_items, run_requests, score

    with tempfile.TemporaryDirectory() as d:
        T.write(model, tok, Path(d), [])
        m, tk = load_pretrained(d, device="cpu")
    items = eval_items(n, seed_base=VAL_SEED, tasks=("pose",))
    with Engine(m, tk, EngineConfig(max_num_seqs=32)) as eng:
        outs = run_requests(eng, items, 32)
    return score(items, outs, tk)["pose_pck"]


def run_pose(a) -> None:
    from unimlm_engine.checkpoint.loader import load_checkpoint

    L.WEIGHTS["kpt"] = a.kpt_weight
    tok = HFTokenizer(Path(a.init))
    cfg = shapes_config()
    model = build_model(cfg, seed=0).train()
    init, _, _ = load_checkpoint(a.init)
    model.load_state_dict({n: t.float() for n, t in init.state_dict().items()})
    del init
    model.special_ids = dict(tok.special_ids)
    proc = Processor(cfg.vision, tok)
    k = cfg.superlink.num_embs
    params = [p for p in model.decoders.unipose.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = random.Random(0)
    if a.eval_start:
        print(json.dumps({"step": 0, "pck": round(pose_pck(model, tok, a.neval), 4)}), flush=True)
    t0 = time.time()
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / a.warmup)
        samples = []
        for i in range(a.pose):
            got = pose_scene(step, i, a.candidates) if a.candidates > 1 else None
            if got is not None:
                samples.append((pose_sample(got[0], rng, k, shape=got[1]), got[0]))
            else:
                samples += T.make_samples(step, rng, k, {"pose": 1}, POSE_TRAIN_SEED + i)
        ids, _, pixels, groups = T.encode(samples, proc, tok, model.special_ids)
        with torch.no_grad():
            hidden, _ = T.llm_forward(model, ids, pixels, groups, k)
        pose = pose_loss(model, hidden, samples, groups, k)
        total = 0.5 * L.weighted({n[5:]: v for n, v in pose.items()})  # train_shapes' pose share
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0:
            print(json.dumps({"step": step, "s": round(time.time() - t0, 1),
                              **{n: round(float(v.detach()), 4) for n, v in pose.items()}}), flush=True)
    print(json.dumps({"step": a.steps, "train_s": round(time.time() - t0, 1),
                      "pck": round(pose_pck(model, tok, a.neval), 4)}), flush=True)
    if a.out:
        T.write(model, tok, Path(a.out), [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("vqa")
    v.add_argument("--work", default="runs/curves", help="the tokenizer and the cached vision phases")
    v.add_argument("--vit-steps", type=int, default=300)
    v.add_argument("--patch-none-weight", type=float, default=0.05)
    v.add_argument("--steps", type=int, default=600)
    v.add_argument("--batch", type=int, default=T.VQA_PHASE_BATCH)
    v.add_argument("--turns", type=int, default=1)
    v.add_argument("--weights", default=None, help="question types' relative frequency, e.g. exists=4 (train_shapes' "
                   "--vqa-weights)")
    v.add_argument("--caption", action="store_true", help="add a last turn naming every object (caption())")
    v.add_argument("--lr", type=float, default=1e-3)
    v.add_argument("--attn-sup", type=float, default=0.0,
                   help="weight of the attention targets' loss (aids.AttentionTargets; 0: off)")
    v.add_argument("--attn-layer", type=int, default=2)
    v.add_argument("--attn-head", type=int, default=0)
    v.add_argument("--attn-key-layer", type=int, default=-1, help="also teach the question's words (-1: no)")
    v.add_argument("--attn-key-head", type=int, default=1)
    v.add_argument("--cosine", action="store_true", help="warm-up 50 steps, then cosine to 0 over --steps "
                   "(train_shapes' joint schedule; default: warm-up, then constant)")
    v.add_argument("--eval-every", type=int, default=200)
    v.add_argument("--neval", type=int, default=300)
    p = sub.add_parser("pose")
    p.add_argument("--init", required=True)
    p.add_argument("--out", default=None, help="write the trained checkpoint here")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--pose", type=int, default=3, help="POSE samples per step")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--kpt-weight", type=float, default=L.W_KPT,
                   help="the keypoint L1 loss's weight (the Hungarian matching's keypoint cost keeps losses.W_KPT)")
    p.add_argument("--candidates", type=int, default=1,
                   help="> 1: each POSE sample from the scene with the most objects of one kind among this many")
    p.add_argument("--neval", type=int, default=120)
    p.add_argument("--eval-start", action="store_true")
    for q in (v, p):
        q.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if a.cmd == "vqa":
        if not 1 <= a.batch <= 64:
            ap.error("--batch: 1 to 64 (the VQA phase's scene seeds are 100,000,000 + step * 64 + i)")
        try:
            T.parse_vqa_weights(a.weights)
        except ValueError as e:
            ap.error(f"--weights: {e}")
        if reaches_eval_seeds(VIT_PHASE_SEED, VIT_PHASE_SEED + a.vit_steps * 64):
            ap.error("--vit-steps: the vision phase's scenes would reach the held-out evaluation seeds")
    if a.cmd == "pose" and reaches_eval_seeds(POSE_TRAIN_SEED, POSE_TRAIN_SEED + a.steps * 64):
        ap.error("--steps: the POSE scenes would reach the held-out evaluation seeds")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    (run_vqa if a.cmd == "vqa" else run_pose)(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
