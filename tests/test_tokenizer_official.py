"""The official VisionLLM v2 tokenizer: added-token ids and the Llama `legacy: false` mode.

References: transformers' LlamaTokenizer built from the same tokenizer.model with the official added
tokens (constant.py DEFAULT_TOKENS, added with `add_tokens(..., special_tokens=True)` in that order),
and the official prompt path (`tokenizer_image_token`: split at <image>, each chunk tokenized alone).
"""
from __future__ import annotations

import io
import json

import pytest

from unimlm_engine.inputs.processor import chat_prompt
from unimlm_engine.inputs.tokenizer import SentencePieceTokenizer, load_tokenizer
from unimlm_engine.routes import required_special_tokens

transformers = pytest.importorskip("transformers")

# constant.py DEFAULT_TOKENS, in its order ("<s>", "</s>", "<unk>" exist already and get no new id)
OFFICIAL_DEFAULT_TOKENS = ["[PAD]", "<s>", "</s>", "<unk>", "<image>", "<im_patch>", "<region>", "<img>", "</img>",
                           "<reg>", "</reg>", "<det>", "</det>", "<grd>", "</grd>", "[DET]", "[GRD]", "[SEG]",
                           "[POSE]", "[GEN]", "[EDIT]", "[EMB]", "[EMB2]", "[EMB3]", "[EMB4]", "[EMB5]", "[EMB6]",
                           "[EMB7]", "[EMB8]"]

CORPUS = ["A chat between a curious user and an artificial intelligence assistant.",
          "USER: What is in the image? ASSISTANT: a cat on a mat.",
          "Please perform object detection on this image for identifying cat, dog.",
          "The cat sat on the mat near the dog. 123 456", "hello world, USER ASSISTANT user assistant"] * 20

MULTI_TURN = [
    [("user", "<image>\nPlease detect the cat and the dog."), ("assistant", "cat[DET][EMB][EMB2][EMB3][EMB4] and dog"),
     ("user", "What is left of the cat?")],
    [("user", "What is it?"), ("assistant", "a cat"), ("user", "Where is it?  Two  spaces\tand\nnewline"),
     ("assistant", "Here: [SEG][EMB][EMB2][EMB3][EMB4]."), ("user", "<reg>region1<region></reg> 12 what?")],
]


@pytest.fixture(scope="module")
def llama_sp(tmp_path_factory):
    """A Llama-like sentencepiece model (BPE, byte fallback, dummy prefix) with tokenizer_config legacy: false."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("llama_sp")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400, model_type="bpe", unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, byte_fallback=True, hard_vocab_limit=False, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, minloglevel=2)
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps({"legacy": False}))
    return d


def _reference(directory, legacy=False):
    ref = transformers.LlamaTokenizer.from_pretrained(str(directory), legacy=legacy)
    ref.add_tokens(OFFICIAL_DEFAULT_TOKENS, special_tokens=True)
    return ref


def _official_ids(ref, prompt: str) -> list[int]:
    """tokenizer_image_token: BOS, then each <image>-separated chunk's ids without its BOS."""
    ids = [ref.bos_token_id]
    for k, chunk in enumerate(prompt.split("<image>")):
        if k:
            ids.append(ref.convert_tokens_to_ids("<image>"))
        if chunk:
            ids += ref(chunk, add_special_tokens=False).input_ids
    return ids


@pytest.mark.parametrize("with_added_json", [False, True], ids=["no_added_tokens_json", "added_tokens_json"])
def test_official_added_token_ids(llama_sp, tmp_path, with_added_json):
    ref = _reference(llama_sp)
    n = 400
    d = tmp_path / "tok"
    d.mkdir()
    for f in ("tokenizer.model", "tokenizer_config.json"):
        (d / f).write_bytes((llama_sp / f).read_bytes())
    if with_added_json:
        (d / "added_tokens.json").write_text(json.dumps({t: ref.convert_tokens_to_ids(t)
                                                         for t in required_special_tokens()}))
    tok = load_tokenizer(d)
    want = {t: ref.convert_tokens_to_ids(t) for t in required_special_tokens()}
    assert tok.special_ids == want
    # the official layout: [PAD]=n, <image>=n+1 ... [DET]=n+12 ... [EMB]=n+18 ... [EMB8]=n+25, vocab n+26
    assert (want["[PAD]"], want["<image>"], want["<region>"], want["<reg>"]) == (n, n + 1, n + 3, n + 6)
    assert (want["[DET]"], want["[EDIT]"], want["[EMB]"], want["[EMB8]"]) == (n + 12, n + 17, n + 18, n + 25)
    assert tok.vocab_size == len(ref) == n + 26
    # every added token is one special id, dropped by skip_special
    text = "".join(required_special_tokens())
    assert tok.encode(text) == [want[t] for t in required_special_tokens()]
    assert tok.decode(tok.encode("a<reg>b</reg>"), skip_special=True) == tok.decode(tok.encode("ab"))


@pytest.mark.parametrize("turns", range(len(MULTI_TURN)))
def test_multi_turn_ids_equal_official_tokenizer(llama_sp, turns):
    tok = load_tokenizer(llama_sp)
    assert isinstance(tok, SentencePieceTokenizer) and tok.legacy is False
    prompt = chat_prompt(MULTI_TURN[turns])
    assert "</s>USER:" in prompt
    assert tok.encode(prompt, add_bos=True) == _official_ids(_reference(llama_sp), prompt)


def test_legacy_false_differs_after_special_tokens(llama_sp):
    """The text right after a special token gets no dummy prefix in the official mode."""
    non_legacy = SentencePieceTokenizer(llama_sp)
    legacy = SentencePieceTokenizer(llama_sp, legacy=True)
    single = chat_prompt("<image>\nWhat is in the image?")
    assert non_legacy.encode(single, add_bos=True) == legacy.encode(single, add_bos=True)
    multi = chat_prompt([("user", "hi"), ("assistant", "a cat"), ("user", "and now?")])
    a, b = non_legacy.encode(multi), legacy.encode(multi)
    assert a != b
    eos = non_legacy.eos_id
    after_a, after_b = a[a.index(eos) + 1], b[b.index(eos) + 1]
    assert not non_legacy.id_to_token(after_a).startswith("\u2581")
    assert legacy.id_to_token(after_b).startswith("\u2581")
