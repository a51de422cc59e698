"""The shipped shapes model (`tiny`, issue 18): its tokenizer, that training computes what the engine serves,
the training losses against independent references, and its accuracy on held-out scenes through the engine."""
import itertools
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))

from unimlm_engine.checkpoint.pretrained import load_pretrained  # noqa: E402
from unimlm_engine.config.presets import get_preset, shapes_dir  # noqa: E402
from unimlm_engine.routes import required_special_tokens  # noqa: E402
from unimlm_engine.shapes.tokenizer import BASE_VOCAB, train_tokenizer  # noqa: E402
from unimlm_engine.shapes.world import CLASSES, make_scene  # noqa: E402

SHAPES_PNG = ROOT / "examples" / "images" / "shapes.png"
SHAPES_PNG_SEED = 700_000_003  # examples/images/shapes.png is make_scene(SHAPES_PNG_SEED).image


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_pretrained("tiny", device="cpu")


def test_checkpoint_is_small_official_layout_and_tokens_official():
    d = shapes_dir()
    shards = list(d.glob("*.safetensors"))
    assert len(shards) == 1 and shards[0].stat().st_size <= 25_000_000
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "visionllmv2" and cfg["use_gdino"] and cfg["use_unipose"]
    assert get_preset("tiny").llm.vocab_size == BASE_VOCAB + len(required_special_tokens())
    from unimlm_engine.inputs.tokenizer import HFTokenizer

    tok = HFTokenizer(d)
    # the 26 official added tokens right after the learned vocabulary, in the official order
    assert [tok.special_ids[t] for t in required_special_tokens()] == list(range(BASE_VOCAB, BASE_VOCAB + 26))
    assert tok.special_ids["[DET]"] == BASE_VOCAB + 12 and tok.special_ids["[EMB]"] == BASE_VOCAB + 18
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_tokenizer_is_reproducible(tmp_path):
    ours = json.loads(train_tokenizer(tmp_path).joinpath("tokenizer.json").read_text())
    shipped = json.loads((shapes_dir() / "tokenizer.json").read_text())
    assert ours["model"]["vocab"] == shipped["model"]["vocab"]
    assert ours["model"]["merges"] == shipped["model"]["merges"]
    assert ours["added_tokens"] == shipped["added_tokens"]


def test_training_forward_is_the_engines(tiny):
    """The training script's forward (prompt, [EMB] rows, payload positions) equals what the engine computes:
    payloads of a POSE answer forced through the engine match the training forward's."""
    from train_shapes import Routed, encode, llm_forward, payloads

    from unimlm_engine import Engine, EngineConfig, Request, SamplingParams
    from unimlm_engine.inputs.processor import Processor
    from unimlm_engine.shapes.tasks import pose_sample, strip_queries

    model, tok = tiny
    sc = make_scene(3)
    s = pose_sample(sc, random.Random(0), 4)
    ids, _, pix, groups = encode([(s, sc)], Processor(model.cfg.vision, tok), tok, model.special_ids)
    with torch.no_grad():
        ref = payloads(Routed(llm_forward(model, ids, pix, groups, 4)[0], groups, 4), 0, groups, ("[DET]", "[POSE]"))
    forced = tuple(tok.encode(" " + strip_queries(s.answer)))
    with Engine(model, tok, EngineConfig()) as eng:
        out = eng.submit(Request(prompt=s.question, images=[sc.image], sampling=SamplingParams(
            max_tokens=len(forced) + 1, forced_prefix=forced, seed=0))).result()
    assert [p.route for p in out.payloads] == ["[DET]"] * len(s.classes) + ["[POSE]"] * len(s.keypoints)
    for a, b in zip(ref, out.payloads):
        torch.testing.assert_close(b.payload.float(), a, atol=1e-4, rtol=1e-4)


def test_packed_training_forward_equals_the_padded_one(tiny):
    """The training forward runs the LLM packed (no padding, the shared system prompt once: PackedCausal): on a
    batch of every kind of sample (3-turn VQA, DET, SEG, POSE, text-only), its hidden states at every real
    position, and every parameter's gradient, equal the padded batch's (PaddedCausal); it is zero at the pads."""
    import train_shapes as ts

    from unimlm_engine.inputs.processor import Processor
    from unimlm_engine.model import build_model

    model, tok = tiny
    model = build_model(model.cfg, seed=0).train()  # fp32, the shipped weights
    model.load_state_dict({n: t.float() for n, t in tiny[0].state_dict().items()})
    model.special_ids = dict(tok.special_ids)
    mix = {"vqa": 3, "det": 1, "seg": 1, "pose": 1, "det_text": 1, "seg_text": 0, "pose_text": 1}
    samples = ts.make_samples(0, random.Random(0), 4, mix, vqa_turns_n=3)
    ids, labels, pix, groups = ts.encode(samples, Processor(model.cfg.vision, tok), tok, model.special_ids)
    lens = (ids != tok.pad_id).sum(1)
    assert len(set(lens.tolist())) > 2  # padding to test
    real = torch.arange(ids.shape[1]) < lens[:, None]
    stop = {model.special_ids["<im_patch>"]} | {t for n, t in model.special_ids.items() if n.startswith("[EMB")}
    prefix = ts.shared_prefix(ids, lens.tolist(), stop)
    first_patch = int((ids[0] == model.special_ids["<im_patch>"]).nonzero()[0, 0])
    assert 20 < prefix <= first_patch  # the system prompt, shared; not the image's placeholder tokens
    assert ts.shared_prefix(ids, lens.tolist(), set()) > first_patch

    def run(forward):
        model.zero_grad(set_to_none=True)
        hidden, feats = forward(model, ids, pix, groups, 4)
        w = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
        routed = ts.Routed(hidden, groups, 4).rows  # the payload rows the decoders read
        loss = ts.token_losses(model, hidden, labels).sum() + (hidden * w * real[..., None]).sum() * 1e-2 \
            + routed.square().sum() * 1e-2 + feats.sum() * 1e-3
        loss.backward()
        return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    h_pad, g_pad = run(ts.llm_forward_padded)
    h_pack, g_pack = run(ts.llm_forward)
    torch.testing.assert_close(h_pack[real], h_pad[real], atol=1e-5, rtol=1e-5)
    assert (h_pack[~real] == 0).all()
    assert set(g_pack) == set(g_pad) and "llm.model.embed_tokens.weight" in g_pack
    for n in g_pad:  # fp32 sums in another order: the absolute tolerance scales with the gradient's size
        torch.testing.assert_close(g_pack[n], g_pad[n], atol=1e-6 * max(1.0, float(g_pad[n].abs().max())),
                                   rtol=1e-4, msg=n)
    # a pad token inside a sequence is refused, not silently packed wrong
    bad = ids.clone()
    bad[0, 3] = tok.pad_id
    with pytest.raises(ValueError, match="right-padded"):
        ts.llm_forward(model, bad, pix, groups, 4)


def test_attention_targets_against_an_explicit_softmax(tiny, monkeypatch):
    """aids.AttentionTargets (--attn-sup): its targets are the first token and the centre patch token of each
    object a question is about (as many as a count question's answer), at every position that predicts an
    answer token but the </s>; its loss on the packed forward equals the cross-entropy of those targets against
    the padded forward's attention probabilities, computed here as an explicit softmax of q.k (GQA head map and
    causal mask included), for every layer and head watched."""
    import train_shapes as ts
    from aids import AttentionTargets, keyword_ids, question_words, vqa_objects

    from unimlm_engine.inputs.processor import Processor
    from unimlm_engine.model import build_model

    model, tok = tiny
    model = build_model(model.cfg, seed=0).eval()
    model.load_state_dict({n: t.float() for n, t in tiny[0].state_dict().items()})
    model.special_ids = dict(tok.special_ids)
    mix = {"vqa": 4, "det": 1, "seg": 0, "pose": 0, "det_text": 1, "seg_text": 0, "pose_text": 0}
    samples = ts.make_samples(3, random.Random(1), 4, mix, vqa_turns_n=3)
    ids, labels, pix, groups = ts.encode(samples, Processor(model.cfg.vision, tok), tok, model.special_ids)
    patch_id, grid = model.special_ids["<im_patch>"], 8
    w = AttentionTargets(samples, ids, labels, patch_id, grid, 1, 3)
    turns = [t for s, _ in samples if s.task == "vqa" for t in [s] + s.turns]
    assert len(turns) == 12 and {int(b) for b in w.qb} == {i for i, (s, _) in enumerate(samples) if s.task == "vqa"}
    for i in range(len(w)):
        b, p = int(w.qb[i]), int(w.qp[i])
        assert labels[b, p + 1] != ts.IGNORE and labels[b, p + 2] != ts.IGNORE  # not the </s>'s position
        tg = w.target[i].nonzero()[:, 0]
        assert tg[0] == 0 and (ids[b, tg[1:]] == patch_id).all()
        torch.testing.assert_close(w.target[i].sum(), torch.tensor(1.0))
    sc = samples[0][1]
    for t in [samples[0][0]] + samples[0][0].turns:
        objs = vqa_objects(t, sc)
        if t.qtype.startswith("count"):
            assert len(objs) == int(t.answer)
        if t.qtype == "exists":
            assert bool(objs) == (t.answer == "yes")

    seen = {}

    class Recording(ts.PaddedCausal):
        def forward(self, layer_idx, q, k, v, scale):
            seen[layer_idx] = (q.view(self.b, self.length, *q.shape[1:]), k.view(self.b, self.length, *k.shape[1:]),
                               scale)
            return super().forward(layer_idx, q, k, v, scale)

    length = ids.shape[1]
    monkeypatch.setattr(ts, "PaddedCausal", Recording)  # the padded reference forward, its q and k recorded
    with torch.no_grad():
        ts.llm_forward_padded(model, ids, pix, groups, 4)

        def probs(layer, head):
            q, k, scale = seen[layer]
            kh = head // (q.shape[2] // k.shape[2])
            att = torch.einsum("bqd,bkd->bqk", q[:, :, head].double(), k[:, :, kh].double()) * scale
            return att.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)

        def ce(w, layer, head):
            return -(w.targets[layer].double() * probs(layer, head)[w.qb, w.qp].clamp(min=1e-300).log()).sum(-1).mean()

        for layer, head in ((1, 3), (2, 0), (3, 1)):
            w = AttentionTargets(samples, ids, labels, patch_id, grid, layer, head)
            ts.llm_forward(model, ids, pix, groups, 4, watch=w)
            torch.testing.assert_close(w.loss.double(), ce(w, layer, head), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(w.mass.double(), (probs(layer, head)[w.qb, w.qp] * (w.target > 0)).sum(-1),
                                       atol=1e-5, rtol=1e-5)
        # with the question's words watched too (key_layer): each position's key targets are its own turn's words
        kw = keyword_ids(tok)
        w = AttentionTargets(samples, ids, labels, patch_id, grid, 3, 2, keywords=kw, key_layer=1, key_head=1)
        rows = [(b, t) for b, (s, _) in enumerate(samples) if s.task == "vqa" for t in [s] + s.turns
                for _ in range(len(tok.encode(" " + t.answer + "</s>")) - 1)]  # the answer's tokens but </s>
        assert len(rows) == len(w)
        for i, (b, t) in enumerate(rows):
            words = question_words(t)
            assert words and all(f" {x}" in t.question for x in words) and int(w.qb[i]) == b
            at = w.targets[1][i].nonzero()[:, 0]
            assert sorted(tok.decode([int(ids[b, j])]).strip() for j in at) == sorted(words)
            assert all(int(w.qp[i]) - 25 < j < int(w.qp[i]) for j in at.tolist())  # this turn's question
        ts.llm_forward(model, ids, pix, groups, 4, watch=w)
        torch.testing.assert_close(w.loss.double(), ce(w, 3, 2) + ce(w, 1, 1), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="key_layer"):
            AttentionTargets(samples, ids, labels, patch_id, grid, 1, 0, keywords=kw, key_layer=2)


def test_one_training_step_reaches_every_part():
    """LLM cross-entropy plus the detector and UniPose set losses through the payloads: one step on a fresh
    model gives finite losses and gradients in the vision tower, the LLM, both query tables and both decoders."""
    import train_shapes as ts

    from unimlm_engine.inputs.processor import Processor
    from unimlm_engine.inputs.tokenizer import HFTokenizer
    from unimlm_engine.model import build_model
    from unimlm_engine.shapes.config import shapes_config

    tok = HFTokenizer(shapes_dir())
    model = build_model(shapes_config(), seed=0).train()
    model.special_ids = dict(tok.special_ids)
    samples = [x for x in ts.make_samples(0, random.Random(0), 4) if x[0].task in ("det", "seg", "pose")][:3]
    samples += [x for x in ts.make_samples(0, random.Random(0), 4) if x[0].task == "pose"][:1]
    ids, labels, pix, groups = ts.encode(samples, Processor(model.cfg.vision, tok), tok, model.special_ids)
    hidden = ts.llm_forward(model, ids, pix, groups, 4)[0]
    lm = torch.nn.functional.cross_entropy(model.llm.logits(hidden[:, :-1].reshape(-1, hidden.shape[-1])),
                                           labels[:, 1:].reshape(-1), ignore_index=ts.IGNORE)
    det = ts.detector_loss(model, hidden, samples, groups, 4)
    pose = ts.pose_loss(model, hidden, samples, groups, 4)
    losses = {"lm": lm, **det, **pose}
    assert set(losses) >= {"lm", "cls", "l1", "giou", "mask", "dice", "pose_cls", "pose_kpt"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name in ("vis_encoder.vision_model.embeddings.patch_embedding.weight", "llm.model.layers.0.mlp.up_proj.weight",
                 "emb_embeddings_det.weight", "emb_embeddings_pose.weight", "decoders.gdino.patch2query.layers.0.weight",
                 "decoders.unipose.projection_kpt_llava.layers.0.weight"):
        g = model.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name


def test_training_aids_patch_targets_turns_and_gradient_cap():
    """The training-only pieces: the per-patch targets against the scene geometry, multi-turn VQA labels (later
    answers learned, their questions not), and the payload gradient's scale and cap."""
    import train_shapes as ts

    from unimlm_engine.inputs.processor import Processor
    from unimlm_engine.inputs.tokenizer import HFTokenizer
    from unimlm_engine.shapes.world import CLASSES

    scenes = [make_scene(40 + i) for i in range(12)]
    centre, cover = ts.patch_targets(scenes, 8)
    none = len(CLASSES)
    for i, sc in enumerate(scenes):
        c, v = centre.view(-1, 8, 8)[i], cover.view(-1, 8, 8)[i]
        assert int((c != none).sum()) == len(sc.objects)  # boxes >= 28 px, 4 px apart: one centre per patch
        for o in sc.objects:
            x0, y0, x1, y1 = o.box
            assert c[int((y0 + y1) / 2) // 28, int((x0 + x1) / 2) // 28] == CLASSES.index(o.name)
        for r in range(8):
            for col in range(8):
                areas = {o.name: o.mask[r * 28:(r + 1) * 28, col * 28:(col + 1) * 28].sum() for o in sc.objects}
                best = max(areas, key=areas.get) if areas else None
                want = CLASSES.index(best) if best and areas[best] > 28 * 28 / 4 else none
                assert v[r, col] == want, (sc.seed, r, col)

    tok = HFTokenizer(shapes_dir())
    sc = make_scene(7)
    first, *rest = ts.vqa_turns(sc, random.Random(0), 3)
    assert len({first.qtype, *(t.qtype for t in rest)}) == 1 + len(rest) == 3
    first.turns = rest
    from unimlm_engine.shapes.config import shapes_config

    ids, labels, _, _ = ts.encode([(first, sc)], Processor(shapes_config().vision, tok), tok, tok.special_ids)
    learned_ids = ids[0][labels[0] != ts.IGNORE]
    assert tok.decode([int(t) for t in learned_ids]).split() == [t.answer for t in [first, *rest]]
    assert int((learned_ids == tok.eos_id).sum()) == 3  # each answer ends its turn with </s>
    assert tok.decode([int(t) for t in ids[0]]).count("USER:") == 3

    # a --mix with text-only POSE samples: their answers are learned like a POSE sample's, and the UniPose
    # loss takes only the "pose" samples (the text-only ones cost no decoder pass)
    mixed = ts.make_samples(0, random.Random(0), 4, {"pose": 1, "pose_text": 2}, offset=200_000_000)
    assert [s.task for s, _ in mixed] == ["pose", "pose_text", "pose_text"]
    assert all("[POSE]" in s.answer and "[DET]" in s.answer for s, _ in mixed)
    assert [sc.seed for _, sc in mixed][0] >= 200_000_000
    with pytest.raises(SystemExit):  # a --seed-offset that would train on the held-out scenes is refused
        ts.main(["--out", "unused", "--seed-offset", "499990000", "--steps", "1000"])
    assert ts.pose_loss(None, None, mixed[1:], None, 4) == {}

    x = torch.ones(4, 3, requires_grad=True)
    (ts.CapGrad.apply(x, 0.1, 10.0) * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((4, 3), 0.2))
    x.grad = None
    (ts.CapGrad.apply(x, 0.1, 0.03) * 2).sum().backward()
    assert abs(float(x.grad.norm()) - 0.03) < 1e-6 and torch.allclose(x.grad, x.grad[0, 0].expand(4, 3))


def test_training_aids_for_a_vqa_continuation():
    """The pieces of a VQA-focused continued run: text-only DET / SEG samples (answer text learned, no decoder
    pass), the payload-keeping loss against hand-computed values, and the patch loss's weight on empty patches."""
    import train_shapes as ts
    from aids import patch_loss, patch_targets, payload_keep_loss

    mixed = ts.make_samples(0, random.Random(0), 4, {"det": 1, "det_text": 1, "seg_text": 1}, offset=300_000_000)
    assert [s.task for s, _ in mixed] == ["det", "det_text", "seg_text"]
    assert "[DET]" in mixed[1][0].answer and "[SEG]" in mixed[2][0].answer
    assert ts.detector_loss(None, None, mixed[1:], None, 4) == {}
    # --vqa-weights: a type weighted up comes first far more often than 1 in 6 (exists is always askable)
    rng = random.Random(0)
    firsts = [ts.vqa_turns(make_scene(60 + i), rng, 2, {"exists": 50.0})[0].qtype for i in range(60)]
    assert firsts.count("exists") >= 50
    plain = [ts.vqa_turns(make_scene(60 + i), rng, 2)[0].qtype for i in range(60)]
    assert plain.count("exists") < 25

    # two groups at positions 1 and 6 of sample 0, one at 2 of sample 1; K = 2 rows after each routing token
    teacher = torch.randn(2, 10, 8)
    student = teacher.clone()
    groups = [[("[DET]", 1), ("[SEG]", 6)], [("[POSE]", 2)]]
    assert float(payload_keep_loss(student, teacher, groups, 2)) == 0.0
    student[0, 9] += 5.0  # outside every group's rows: no loss
    student[1, 3] = 2 * teacher[1, 3]  # one of the 6 payload rows, relative squared distance 1
    assert abs(float(payload_keep_loss(student, teacher, groups, 2)) - 1 / 6) < 1e-6
    assert float(payload_keep_loss(student, teacher, [[], []], 2)) == 0.0

    scenes = [make_scene(40 + i) for i in range(3)]
    samples = [(None, sc) for sc in scenes]
    head = torch.nn.Linear(16, 2 * 13)
    feats = torch.randn(3 * 64, 16)
    centre, cover = patch_targets(scenes, 8)
    logits = head(feats).view(-1, 2, 13)
    obj = centre != 12
    manual = torch.nn.functional.cross_entropy(logits[obj, 0], centre[obj])  # none weight 0: object patches only
    obj = cover != 12
    manual = manual + torch.nn.functional.cross_entropy(logits[obj, 1], cover[obj])
    torch.testing.assert_close(patch_loss(head, feats, samples, 8, none_weight=0.0), manual)
    with pytest.raises(SystemExit):  # keeping payloads needs the model whose payloads are kept
        ts.main(["--out", "unused", "--keep-payloads", "1"])
    with pytest.raises(SystemExit):  # the vision-only phase's scenes must stay clear of the held-out ones
        ts.main(["--out", "unused", "--vit-steps", "1000000"])
    for bad in ("nonsense", "mps") + (() if torch.cuda.is_available() else ("cuda",)):
        with pytest.raises(SystemExit):  # a device this machine cannot train on: refused before any work
            ts.main(["--out", "unused", "--device", bad])

    # the vision-only phase trains the vision tower and bridge, and leaves the LLM as it was
    from aids import vit_phase

    from unimlm_engine.inputs.processor import Processor
    from unimlm_engine.inputs.tokenizer import HFTokenizer
    from unimlm_engine.model import build_model
    from unimlm_engine.shapes.config import shapes_config

    model = build_model(shapes_config(), seed=0)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    head = torch.nn.Linear(model.cfg.llm.hidden_size, 2 * 13)
    logs = []
    vit_phase(model, Processor(model.cfg.vision, HFTokenizer(shapes_dir())), head, 2, 1e-3, 0.05, batch=2,
              log=logs.append)
    after = model.state_dict()
    changed = {n.split(".")[0] for n in after if not torch.equal(after[n], before[n])}
    assert changed == {"vis_encoder", "vl_bridge"} and [r["vit_step"] for r in logs] == [0, 1]


def test_training_group_detection_and_the_tail_phase(tmp_path):
    """Training-only DET samples of object groups ("red shapes", "circles", "shapes"): official-format text, each
    named group's targets exactly its members, a plain class list's targets as before, the probe knows every
    name; and the phases of a whole run (vision, VQA, joint, tail) with their learning rates and the VQA
    attention targets (--attn-sup) in each, end to end."""
    import train_shapes as ts
    from aids import GROUPS, PROBE_NAMES, group_det_sample
    from decoder_losses import scene_targets

    from unimlm_engine.shapes.tasks import det_sample, strip_queries

    rng = random.Random(0)
    kinds = set()
    for i in range(40):
        sc = make_scene(80 + i)
        s = group_det_sample(sc, rng, 4)
        assert s.task == "det" and s.classes and set(s.classes) <= set(GROUPS)
        assert len(set(s.classes)) == len(s.classes) and all(n in PROBE_NAMES for n in s.classes)
        assert strip_queries(s.answer).count("[DET]") == s.answer.count("[EMB4]") == len(s.classes)
        kinds.add("colour" if s.classes[0].split()[0] in ("red", "green", "blue", "yellow") else s.classes[0])
        t = scene_targets(sc, s, None)
        want = sorted((j, ((o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2, o.box[2] - o.box[0],
                           o.box[3] - o.box[1]))  # cxcywh in pixels
                      for j, n in enumerate(s.classes) for o in sc.objects
                      if n == "shapes" or n == f"{o.colour} shapes" or n == f"{o.shape}s")
        got = sorted((int(j), tuple(round(float(v) * 224, 3) for v in b)) for j, b in zip(t.labels, t.boxes))
        assert [j for j, _ in got] == [j for j, _ in want]
        for (_, b), (_, box) in zip(got, want):
            assert b == pytest.approx(box, abs=1e-3)
        plain = det_sample(sc, rng, 4)  # a class list: the objects of those classes, in scene order, as before
        t = scene_targets(sc, plain, None)
        objs = [o for o in sc.objects if o.name in plain.classes]
        assert t.labels.tolist() == [plain.classes.index(o.name) for o in objs]
    assert {"colour", "shapes"} <= kinds and kinds & {"circles", "squares", "triangles"}
    # a red circle under "red shapes" and "circles" at once: two targets
    sc = next(make_scene(i) for i in range(1000) if any(o.name == "red circle" for o in make_scene(i).objects))
    both = ts.Sample("det", "q", "a", classes=["red shapes", "circles"])
    labels = scene_targets(sc, both, None).labels.tolist()
    assert labels.count(0) == sc.count(colour="red") and labels.count(1) == sc.count(shape="circle")

    with pytest.raises(ValueError, match="unknown task"):
        ts.parse_mix("vqa=2,dett=1")
    for bad in (["--tail-steps", "-1"], ["--tail-mix", "vqa=x"], ["--vqa-batch", "65"],
                ["--seed-offset", "499990000", "--steps", "10", "--tail-steps", "1000"], ["--attn-layer", "4"],
                ["--attn-head", "4"], ["--attn-layer", "1", "--attn-key-layer", "1"]):
        with pytest.raises(SystemExit):
            ts.main(["--out", "unused", *bad])

    out = tmp_path / "run"
    assert ts.main(["--out", str(out), "--vit-steps", "1", "--vqa-steps", "2", "--vqa-batch", "2", "--vqa-cosine",
                    "--steps", "2", "--mix", "vqa=1,det_group=1", "--tail-steps", "2", "--tail-mix", "vqa=2",
                    "--tail-lr", "3e-4", "--log-every", "1", "--attn-sup", "2", "--attn-key-layer", "0"]) == 0
    log = json.loads((out / "training_log.json").read_text())
    assert all(r["attn"] > 0 for r in log)  # every phase had VQA questions, so the targets' loss
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4, 5]
    want = [ts.lr_at(0, 2, 1e-3), ts.lr_at(1, 2, 1e-3), ts.lr_at(0, 2, 5e-4), ts.lr_at(1, 2, 5e-4),
            ts.lr_at(0, 2, 3e-4, warmup=25), ts.lr_at(1, 2, 3e-4, warmup=25)]
    assert [r["lr"] for r in log] == pytest.approx(want, rel=1e-2)
    assert "cls" in log[2] and "cls" not in log[4]  # the joint mix's group DET sample; the tail's VQA only
    assert (out / "model.safetensors.index.json").exists()


def test_matching_and_giou_against_references():
    from losses import Target, generalized_iou, match

    # GIoU by hand: [0,0,2,2] vs [1,1,3,3]: inter 1, union 7, hull 9 -> 1/7 - 2/9
    g = generalized_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3]]))
    assert abs(g.item() - (1 / 7 - 2 / 9)) < 1e-6
    # Hungarian matching = the best of all assignments (brute force over permutations)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        q, n = 6, 3
        logits = torch.randn(q, 4, generator=gen)
        boxes = torch.rand(q, 4, generator=gen) * 0.5 + 0.1
        t = Target(torch.randint(0, 4, (n,), generator=gen), torch.rand(n, 4, generator=gen) * 0.5 + 0.1)
        qi, ti = match(logits, boxes, t)
        from losses import W_CLS, W_GIOU, W_L1, box_xyxy, focal_class_cost

        cost = (W_CLS * focal_class_cost(logits, t.labels) + W_L1 * torch.cdist(boxes, t.boxes, p=1)
                - W_GIOU * generalized_iou(box_xyxy(boxes), box_xyxy(t.boxes)))
        best = min(sum(cost[p[j], j].item() for j in range(n)) for p in itertools.permutations(range(q), n))
        assert abs(cost[qi, ti].sum().item() - best) < 1e-4


def _box_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / u


def test_make_run_on_the_shipped_image(tiny):
    """`make run`: the question and the detection instruction on examples/images/shapes.png. The count is right
    (4), the 12 classes are named in order, each with its [DET] group, and every object is found with the right
    class (score >= 0.3, IoU >= 0.5; the shipped model's best box per object: scores 0.40-0.59, IoU 0.68-0.92)."""
    from PIL import Image

    from unimlm_engine import Engine, EngineConfig, Request, SamplingParams
    from unimlm_engine.outputs.labels import routed_group_names
    from unimlm_engine.shapes.tasks import DET_EVAL

    sc = make_scene(SHAPES_PNG_SEED)
    image = Image.open(SHAPES_PNG).convert("RGB")
    assert image.tobytes() == sc.image.tobytes()
    model, tok = tiny
    greedy = SamplingParams(max_tokens=160, temperature=0.0, seed=0)
    with Engine(model, tok, EngineConfig()) as eng:
        q = eng.submit(Request(prompt="How many shapes are in the image? Answer with a single word.",
                               images=[image], sampling=greedy)).result()
        d = eng.submit(Request(prompt=DET_EVAL.replace("<class>", ", ".join(CLASSES)), images=[image],
                               sampling=greedy)).result()
    assert q.text.strip() == str(len(sc.objects)) == "4"
    names = routed_group_names(d.token_ids, tok)["[DET]"]
    assert names == list(CLASSES)
    det = next(t for t in d.tasks if t.route == "[DET]")
    found = 0
    for o in sc.objects:
        found += any(names[lab] == o.name and s >= 0.3 and _box_iou(b, o.box) >= 0.5
                     for b, s, lab in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()))
    assert found == len(sc.objects)


# regression floors, under what the shipped model measures on these 50 scenes (routing 1.0, VQA 0.98,
# AP50 0.85, mIoU 0.70, PCK 0.72; the targets: 0.95 / 0.85 / 0.7 / 0.6 / 0.7; 50 VQA questions, so
# one answer is 0.02)
FLOORS = {"routing": 0.95, "vqa_exact_match": 0.9, "det_ap50": 0.78, "seg_miou": 0.62, "pose_pck": 0.6}


def test_accuracy_on_held_out_scenes(tiny):
    """50 held-out scenes (the benchmark's first 50) through the engine at concurrency 16."""
    from unimlm_engine import Engine, EngineConfig
    from unimlm_engine.shapes.evaluate import eval_items, run_requests, score

    model, tok = tiny
    items = eval_items(50)
    with Engine(model, tok, EngineConfig(max_num_seqs=16)) as eng:
        outs = run_requests(eng, items, concurrency=16)
    res = score(items, outs, tok)
    assert res["errors"] == 0
    for k, floor in FLOORS.items():
        assert res[k] >= floor, (k, res[k], res)
    assert not np.isnan(res["pose_pck"])


def test_curves_teacher_forced_exact_match_is_the_engines_greedy(tiny):
    """training/curves.py scores VQA without generating: an answer counts when every answer token (and </s>) is
    the argmax given the ones before it. That must be exactly the engine's greedy exact match, item by item."""
    import curves

    from unimlm_engine import Engine, EngineConfig
    from unimlm_engine.inputs.processor import Processor
    from unimlm_engine.shapes.evaluate import EvalItem, run_requests
    from unimlm_engine.shapes.tasks import vqa_sample

    model, tok = tiny
    scenes = [make_scene(curves.VAL_SEED + i) for i in range(48)]
    items = [(vqa_sample(sc, random.Random(i)), sc) for i, sc in enumerate(scenes)]
    hits = curves.vqa_hits(model, Processor(model.cfg.vision, tok), tok, items, chunk=16)
    with Engine(model, tok, EngineConfig(max_num_seqs=16)) as eng:
        outs = run_requests(eng, [EvalItem(sc, s) for s, sc in items], concurrency=16)
    greedy = [o.text.strip() == s.answer for o, (s, _) in zip(outs, items)]
    assert hits == greedy
    assert 0 < sum(hits) < len(hits)  # both outcomes occur, so the comparison can fail either way


def test_curves_phases_run_end_to_end(tmp_path, capsys):
    """Both curves.py phases, a few steps each: the VQA phase from scratch (vision phase cached, then reused) and
    UniPose alone from the shipped checkpoint, scored through the engine."""
    import curves

    work = str(tmp_path / "work")
    args = ["vqa", "--work", work, "--vit-steps", "2", "--steps", "2", "--eval-every", "1", "--neval", "6",
            "--turns", "2", "--caption", "--threads", "1"]
    curves.main(args)
    curves.main(args)  # the second run takes the cached vision phase
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["from_cache"] for r in recs if "vision_phase_s" in r] == [False, True]
    assert sum("vit_step" in r for r in recs) == 2  # the first run's steps 0 and 1 only
    assert [r["step"] for r in recs if "exact_match" in r] == [1, 2, 1, 2]
    assert all(0.0 <= r["exact_match"] <= 1.0 for r in recs if "exact_match" in r)
    curves.main(["pose", "--init", str(shapes_dir()), "--steps", "1", "--pose", "1", "--neval", "4",
                 "--candidates", "2", "--threads", "1", "--out", str(tmp_path / "pose")])
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last["step"] == 1 and 0.0 <= last["pck"] <= 1.0
    assert (tmp_path / "pose" / "model.safetensors.index.json").exists()
