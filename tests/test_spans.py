"""Span parsing (engine/spans.py), the span-route registry (routes.py) and span tokens in the tokenizer:
spans split across any text deltas, every malformed-span case, tokens kept in the text."""
import random

import pytest

from unimlm_engine.engine.spans import SpanParser, parse_box
from unimlm_engine.inputs.tokenizer import ByteTokenizer, IncrementalDetokenizer
from unimlm_engine.routes import (RouteError, SpanRouteSpec, find_route, register_span_route, span_route_for,
                                  span_tasks, span_tokens, unregister_span_route)

TEXT = ("Sure. <IMGSEG>dog</IMGSEG> <BOX>dog:[0.188, 0.632, 0.394, 0.944]</BOX>\n<BOX>cat:[0, 0.5, 1, 1]</BOX> then "
        "<IMGGEN>a red car</IMGGEN>, and <LAYOUTGEN>two pets</LAYOUTGEN><BOX>dog:[0.1,0.1,0.5,0.5]</BOX>")


def _parse(chunks, tasks=None):
    p = SpanParser(span_tasks() if tasks is None else tasks)
    got = [g for c in chunks for g in p.feed(c)]
    return got + p.finish()


def _summary(groups, text):
    return [(g.task, text[g.start:g.end], g.text, g.boxes, g.error) for g in groups]


def test_whole_text_reference():
    """Hand-written expectation for one text fed at once."""
    got = _summary(_parse([TEXT]), TEXT)
    seg = TEXT[TEXT.index("<IMGSEG>"):TEXT.index("then") - 1]
    assert got == [
        ("IMGSEG", seg, "dog", [("dog", (0.188, 0.632, 0.394, 0.944)), ("cat", (0.0, 0.5, 1.0, 1.0))], None),
        ("IMGGEN", "<IMGGEN>a red car</IMGGEN>", "a red car", [], None),
        ("LAYOUTGEN", "<LAYOUTGEN>two pets</LAYOUTGEN><BOX>dog:[0.1,0.1,0.5,0.5]</BOX>", "two pets",
         [("dog", (0.1, 0.1, 0.5, 0.5))], None)]


@pytest.mark.parametrize("mode", ["chars", "every-split", "random"])
def test_split_across_chunks(mode):
    """Any split of the text into deltas (inside tags, numbers, between a span and its boxes) gives the
    same groups and offsets as the whole text."""
    want = _summary(_parse([TEXT]), TEXT)
    if mode == "chars":
        splits = [list(TEXT)]
    elif mode == "every-split":
        splits = [[TEXT[:i], TEXT[i:]] for i in range(len(TEXT) + 1)]
    else:
        rng = random.Random(0)
        splits = []
        for _ in range(50):
            cuts = sorted(rng.sample(range(1, len(TEXT)), 12))
            splits.append([TEXT[a:b] for a, b in zip([0] + cuts, cuts + [len(TEXT)])])
    for chunks in splits:
        assert _summary(_parse(chunks), TEXT) == want


def test_groups_complete_as_soon_as_known():
    """A task span's group is handed over once the next non-box text arrives, not at the end."""
    p = SpanParser(span_tasks())
    assert p.feed("<IMGSEG>dog</IMGSEG>") == []  # boxes may still follow
    assert p.feed(" <BOX>dog:[0.1, 0.1, 0.2, 0.2]</BO") == []
    assert p.feed("X>  ") == []
    done = p.feed("and more")
    assert [(g.task, g.boxes) for g in done] == [("IMGSEG", [("dog", (0.1, 0.1, 0.2, 0.2))])]
    assert p.finish() == []


@pytest.mark.parametrize("text, error", [
    ("<IMGSEG>dog", "span <IMGSEG> still open at the end of the text"),
    ("<IMGSEG>dog</IMGSEG><BOX>dog:[0.1, 0.2", "span <BOX> still open at the end of the text"),
    ("<IMGFOO>paint</IMGFOO>", "unknown task token <IMGFOO>"),
    ("<BOX>dog:[0.1, 0.2, 0.3]</BOX>", "expected 4 coordinates, got 3"),
    ("<BOX>dog:[0.1, 0.2, 0.3, 0.4, 0.5]</BOX>", "expected 4 coordinates, got 5"),
    ("<BOX>dog:[0.1, a, 0.3, 0.4]</BOX>", "coordinates must be numbers"),
    ("<BOX>dog:[0.1, nan, 0.3, 0.4]</BOX>", "coordinates must be in [0, 1]"),
    ("<BOX>dog:[0.1, 0.2, 1.3, 0.4]</BOX>", "coordinates must be in [0, 1]"),
    ("<BOX>dog:[-0.1, 0.2, 0.3, 0.4]</BOX>", "coordinates must be in [0, 1]"),
    ("<BOX>dog:[0.5, 0.2, 0.3, 0.4]</BOX>", "needs x1 <= x2 and y1 <= y2"),
    ("<BOX>dog:[0.1, 0.5, 0.3, 0.4]</BOX>", "needs x1 <= x2 and y1 <= y2"),
    ("<BOX>dog 0.1, 0.2, 0.3, 0.4</BOX>", "expected 'label:[x1, y1, x2, y2]'"),
    ("<IMGSEG>dog</IMGSEG><BOX>dog:[0.1,0.2,0.3,0.4]</BOX><BOX>[2,0,0,0]</BOX>", "coordinates must be in [0, 1]"),
], ids=["open-task", "open-box", "unknown-task", "3-coords", "5-coords", "not-number", "nan", "above-1",
        "below-0", "x2<x1", "y2<y1", "no-brackets", "second-box-bad"])
def test_bad_spans_become_error_groups(text, error):
    for chunks in ([text], list(text)):
        groups = _parse(chunks)
        assert len(groups) == 1
        assert error in groups[0].error
        assert (groups[0].start, groups[0].end) == (0, len(text))


def test_unclosed_unknown_tag_is_plain_text():
    assert _parse(["a <B>bold text and <IMGGEN>x</IMGGEN>"])[0].error is None
    assert len(_parse(["a <B>bold text"])) == 0


def test_parse_box_labels():
    assert parse_box(" t-shirt : [0.226, 0.193, 0.758, 0.615] ") == ("t-shirt", (0.226, 0.193, 0.758, 0.615))
    assert parse_box("[0,0,1,1]") == ("", (0.0, 0.0, 1.0, 1.0))
    assert parse_box("a: b:[0,0,1,1]") == ("a: b", (0.0, 0.0, 1.0, 1.0))


def test_registry_routes_by_task_and_boxes():
    assert span_route_for("IMGEDIT", 0).name == "imgedit" and span_route_for("IMGEDIT", 2).name == "imgedit_box"
    assert span_route_for("IMGSEG", 1).decoder == "sam" and span_route_for("IMGSEG", 0) is None
    assert span_route_for("IMGGEN", 1) is None and span_route_for("LAYOUTGEN", 1).decoder == "gligen"
    assert {"<IMGGEN>", "</IMGGEN>", "<IMGEDIT>", "<IMGSEG>", "<LAYOUTGEN>", "<BOX>", "</BOX>"} <= set(span_tokens())
    assert find_route("imgseg").result == "segmentation" and find_route("[DET]").name == "det"
    with pytest.raises(RouteError):
        register_span_route(SpanRouteSpec("imgseg2", "IMGSEG", "required", decoder="sam"))
    spec = register_span_route(SpanRouteSpec("imgdepth", "IMGDEPTH", "none", decoder="nope"))
    try:
        assert "IMGDEPTH" in span_tasks() and "<IMGDEPTH>" in span_tokens()
    finally:
        unregister_span_route(spec.name)
    assert "IMGDEPTH" not in span_tasks()


def test_tokenizer_keeps_span_tokens_in_text():
    tok = ByteTokenizer(extra_special=span_tokens())
    text = "x <IMGSEG>dög</IMGSEG><BOX>dog:[0.1, 0.2, 0.3, 0.4]</BOX> [DET] <image>"
    ids = tok.encode(text)
    assert ids.count(tok.special_ids["<IMGSEG>"]) == 1 and ids.count(tok.special_ids["</BOX>"]) == 1
    kept = text.replace(" [DET] <image>", "  ")  # routing and placeholder tokens drop, span tokens stay
    assert tok.decode(ids) == kept
    det = IncrementalDetokenizer(tok)
    assert "".join(det.step_one(i) for i in ids) + det.flush() == kept
    plain = ByteTokenizer()  # the VisionLLM vocabulary has no span tokens: the same text is bytes
    assert "<IMGSEG>" not in plain.special_ids and plain.decode(plain.encode("<IMGSEG>a")) == "<IMGSEG>a"


def test_cli_force_text_reports_spans(capsys):
    """`unimlm generate --model tiny-unified --force-text ...`: the text keeps the span, --json lists the
    span result with its offsets; a bad span exits 1 and says why."""
    import json

    from unimlm_engine.cli.main import main

    text = "<IMGSEG>cat</IMGSEG><BOX>cat:[0.1, 0.2, 0.6, 0.9]</BOX>"
    code = main(["generate", "--model", "tiny-unified", "--image", "examples/images/chelsea.png", "--prompt",
                 "Segment the cat.", "--force-text", text, "--max-tokens", "60", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    res = json.loads(out.out)
    assert res["text"].startswith(text) and res["tasks"] == []
    (span,) = res["spans"]
    assert span["route"] == "imgseg" and span["span"] == {"start": 0, "end": len(text), "text": "cat"}
    assert span["phrases"] == ["cat"] and len(span["masks"]) == 1
    code = main(["generate", "--model", "tiny-unified", "--prompt", "Edit.", "--force-text",
                 "<IMGEDIT>snow</IMGEDIT>", "--max-tokens", "30"])
    assert code == 1 and "needs an input image" in capsys.readouterr().err


def test_presets_unifiedmllm():
    """unifiedmllm-7b: Vicuna-7B shapes, LoRA-MoE E=8 r=4 alpha=32 on the FFN linears, no super-link
    decoders, span tokens in the vocabulary; tiny-unified's FFN runs the fused LoRA-MoE op's module."""
    from unimlm_engine.config.presets import get_preset
    from unimlm_engine.model.lora_moe import LoRAMoELinear
    from unimlm_engine.routes import required_special_tokens

    cfg = get_preset("unifiedmllm-7b")
    assert (cfg.llm.hidden_size, cfg.llm.num_hidden_layers, cfg.llm.intermediate_size) == (4096, 32, 11008)
    lm = cfg.lora_moe
    assert (lm.num_experts, lm.rank, lm.alpha, lm.target_modules) == (8, 4, 32.0, ("gate_proj", "up_proj", "down_proj"))
    assert cfg.detector is cfg.pose is cfg.gen is cfg.edit is None and cfg.experts is not None
    assert cfg.llm.vocab_size == 32000 + len(required_special_tokens()) + len(span_tokens())
    assert (cfg.vision.image_size, cfg.vision.max_tiles) == (336, 1)
    import json

    from unimlm_engine.config import ModelConfig

    for name in ("unifiedmllm-7b", "tiny-unified"):
        c = get_preset(name)
        assert ModelConfig.from_official_dict(json.loads(json.dumps(c.to_official_dict()))) == c
    from unimlm_engine.checkpoint.pretrained import load_pretrained

    model, tok = load_pretrained("tiny-unified", device="cpu")
    assert tok.vocab_size == model.cfg.llm.vocab_size
    mlp = model.llm.model.layers[0].mlp
    assert all(isinstance(getattr(mlp, n), LoRAMoELinear) for n in ("gate_proj", "up_proj", "down_proj"))


@pytest.mark.parametrize("kind", ["hf", "side-files"], ids=["in-tokenizer-json", "added-tokens-json"])
def test_hf_tokenizer_span_tokens_from_added_tokens(tmp_path, kind):
    """A tokenizer directory listing the span tokens as added tokens: each is one id, and decode and the
    streaming detokenizer (tokenizers' DecodeStream) keep them in the text."""
    import json

    from test_tokenizer import SPECIAL_TOKENS, _train_bpe

    from unimlm_engine.inputs.tokenizer import HFTokenizer, load_tokenizer

    extra = list(span_tokens())
    if kind == "hf":
        _train_bpe(["<unk>", "<s>", "</s>", *SPECIAL_TOKENS, *extra]).save(str(tmp_path / "tokenizer.json"))
    else:
        base = _train_bpe(["<unk>", "<s>", "</s>"])
        base.save(str(tmp_path / "tokenizer.json"))
        n = base.get_vocab_size()
        table = {t: n + i for i, t in enumerate([*SPECIAL_TOKENS, *extra])}
        (tmp_path / "added_tokens.json").write_text(json.dumps(table))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and set(extra) <= set(tok.special_ids)
    text = "the cat <IMGSEG>cat</IMGSEG><BOX>cat:[0.1, 0.2, 0.3, 0.4]</BOX> [DET]"
    ids = tok.encode(text)
    assert ids.count(tok.special_ids["<BOX>"]) == 1 and ids.count(tok.special_ids["</IMGSEG>"]) == 1
    want = tok.decode(ids)
    assert "<IMGSEG>cat</IMGSEG><BOX>" in want and "[DET]" not in want
    det = IncrementalDetokenizer(tok)
    assert "".join(det.step_one(i) for i in ids) + det.flush() == want
    groups = _parse([want])
    assert [(g.task, g.text, g.boxes) for g in groups] == [("IMGSEG", "cat", [("cat", (0.1, 0.2, 0.3, 0.4))])]


def test_checkpoint_round_trip_keeps_experts_and_span_tokens(tmp_path):
    """A tiny-unified checkpoint directory: config.json keeps the experts (relative directories resolve
    against the checkpoint), the byte tokenizer keeps its span tokens."""
    from unimlm_engine.checkpoint.loader import load_checkpoint, save_checkpoint
    from unimlm_engine.checkpoint.pretrained import load_pretrained

    model, tok = load_pretrained("tiny-unified", device="cpu")
    model.cfg.experts.sam_dir = "sam"
    try:
        path = save_checkpoint(model, tmp_path / "ckpt", tokenizer=tok)
    finally:
        model.cfg.experts.sam_dir = ""
    loaded, tok2, _ = load_checkpoint(path)
    assert tok2.special_ids == tok.special_ids and tok2.text_token_ids == tok.text_token_ids
    assert loaded.cfg.experts.tiny and loaded.cfg.experts.num_inference_steps == 2
    again, _ = load_pretrained(str(path), device="cpu")
    assert again.cfg.experts.sam_dir == str(path / "sam")


def test_serve_bench_span_workloads():
    """serve-bench kinds include every span route: the request's forced answer is the route's sample
    span, which the parser routes back to that route."""
    from unimlm_engine.cli import serve_bench as sb
    from unimlm_engine.cli.forcing import span_text
    from unimlm_engine.routes import all_span_routes, get_span_route

    names = [s.name for s in all_span_routes()]
    mix = sb.parse_mix(",".join(names) + ",vqa")
    assert set(mix) == set(names) | {"vqa"}
    with pytest.raises(ValueError, match="unknown workload kind 'imgfoo'.*imgseg"):
        sb.parse_mix("imgfoo")
    tok = ByteTokenizer(extra_special=span_tokens())
    for name in names:
        req = sb.make_request(name, random.Random(0), None, ["x.png"], 4, tokenizer=tok)
        text = tok.decode(req.sampling.forced_prefix)
        assert text == span_text(get_span_route(name))
        (g,) = _parse([text])
        assert g.error is None and span_route_for(g.task, g.box_spans).name == name
    with pytest.raises(ValueError, match="needs the tokenizer"):
        sb.make_request("imgseg", random.Random(0), None, ["x.png"], 4)
